"""Forged UDP beacons (from ``attacker.py beacon``, its own process) against a victim
node in this process, all on loopback: datagrams come from 127.0.0.3 to 127.0.0.1 and
try to point the victim at a TCP target on 127.0.0.2, at ``ipc://`` and at
``inproc://``. A beacon carries only a port: the victim dials that port on the address
the datagram came from, or nothing at all, within the dial caps; everything else is
dropped and counted. (Datagrams from a spoofed source address need raw sockets, which
this suite does not use: the source here is a real second loopback address.)"""

from __future__ import annotations

import os
import socket
import threading

import pytest
from helpers import wait_until
from test_attacks import RSS_SLACK, attack, rss  # the one runner of attacker.py

import dmodel
from dmodel.net.discovery import DiscoveryConfig

pytestmark = pytest.mark.timeout(90)



def _free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("0.0.0.0", 0))
        return sock.getsockname()[1]


class Note(dmodel.DModel):
    text = dmodel.DField()


def _attack(port: int, seconds: float) -> dict:
    return attack("beacon", str(port), str(seconds), timeout=60)


@pytest.mark.parametrize("dial", ["learned", "static"])
def test_forged_beacons_never_point_the_victim_elsewhere(make_node, dial) -> None:
    port = _free_udp_port()
    config = DiscoveryConfig(port=port, interval=0.5, address="127.0.0.1")
    victim = make_node("victim", listen="tcp://127.0.0.1:*", discovery=True, dial=dial,
                       network_options={"discovery_config": config, "unreached_after": 0.3})
    # An honest peer the victim was told about writes all along (the other attack
    # tests' promises: every honest update arrives, memory stays bound, no ban).
    honest = make_node("honest", listen="tcp://127.0.0.1:*", discovery=False, peers=[])
    victim.network.connect(honest.network.endpoint)
    wait_until(lambda: getattr(victim.network.peers().get(honest.node_id.hex()), "connected",
                               False), timeout=15)
    baseline, written, stop = rss(os.getpid()), [], threading.Event()

    def write() -> None:
        while not stop.is_set() and len(written) < 400:
            written.append(Note.create(text=f"n{len(written)}", node=honest).db_id)
            stop.wait(0.05)

    writer = threading.Thread(target=write)
    writer.start()
    try:
        result = _attack(port, 2.0)
    finally:
        stop.set()
        writer.join(30)
    assert written
    wait_until(lambda: all(victim.exists(db_id) for db_id in written), timeout=20)
    assert rss(os.getpid()) < baseline + RSS_SLACK
    assert honest.node_id.hex() not in victim.network.stats["guard"]["banned"]
    assert result["accepted"] == 0, result  # the target on 127.0.0.2 was never dialled
    wait_until(lambda: victim.network.stats["guard"]["beacons_in"] > 0, timeout=10)
    guard = victim.network.stats["guard"]
    assert guard["beacon"] > 0  # the spelled-out endpoints: not beacons at all
    assert guard["beacon"] + guard["beacons_in"] <= result["valid"] + result["forged"]
    refused = guard["dials_refused_by"]
    if dial == "static":
        assert victim.network.bus.stats["links"] == 1  # the honest peer's, no other
        # every beacon refused, none dialled (the honest peer's gossip adds refusals)
        assert refused["policy"] >= guard["beacons_in"]
    else:
        # Dialled: ports on the datagrams' own address, at most dial_per_address of them.
        wait_until(lambda: victim.network.stats["guard"]["unreached"], timeout=10)
        unreached = victim.network.stats["guard"]["unreached"]
        assert all(e.startswith("tcp://127.0.0.3:") for e in unreached), unreached
        assert victim.network.bus.stats["links"] <= 1 + 4  # the honest peer's + the cap
        assert refused["per_address"] > 0
