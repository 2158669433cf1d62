"""Forged UDP beacons (from ``attacker.py beacon``, its own process) against a victim
node in this process, all on loopback: datagrams come from 127.0.0.3 to 127.0.0.1 and
try to point the victim at a TCP target on 127.0.0.2, at ``ipc://`` and at
``inproc://``. A beacon carries only a port: the victim dials that port on the address
the datagram came from, or nothing at all, within the dial caps; everything else is
dropped and counted. (Datagrams from a spoofed source address need raw sockets, which
this suite does not use: the source here is a real second loopback address.)"""

from __future__ import annotations

import socket

import pytest
from helpers import wait_until
from test_attacks import attack  # the one runner of attacker.py

from dmodel.net.discovery import DiscoveryConfig

pytestmark = pytest.mark.timeout(90)



def _free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("0.0.0.0", 0))
        return sock.getsockname()[1]


def _attack(port: int, seconds: float) -> dict:
    return attack("beacon", str(port), str(seconds), timeout=60)


@pytest.mark.parametrize("dial", ["learned", "static"])
def test_forged_beacons_never_point_the_victim_elsewhere(make_node, dial) -> None:
    port = _free_udp_port()
    config = DiscoveryConfig(port=port, interval=0.5, address="127.0.0.1")
    victim = make_node("victim", listen="tcp://127.0.0.1:*", discovery=True, dial=dial,
                       network_options={"discovery_config": config, "unreached_after": 0.3})
    result = _attack(port, 2.0)
    assert result["accepted"] == 0, result  # the target on 127.0.0.2 was never dialled
    wait_until(lambda: victim.network.stats["guard"]["beacons_in"] > 0, timeout=10)
    guard = victim.network.stats["guard"]
    assert guard["beacon"] > 0  # the spelled-out endpoints: not beacons at all
    assert guard["beacon"] + guard["beacons_in"] <= result["valid"] + result["forged"]
    refused = guard["dials_refused_by"]
    if dial == "static":
        assert victim.network.bus.stats["links"] == 0
        assert refused["policy"] == guard["beacons_in"]  # every beacon, none dialled
    else:
        # Dialled: ports on the datagrams' own address, at most dial_per_address of them.
        wait_until(lambda: victim.network.stats["guard"]["unreached"], timeout=10)
        unreached = victim.network.stats["guard"]["unreached"]
        assert all(e.startswith("tcp://127.0.0.3:") for e in unreached), unreached
        assert victim.network.bus.stats["links"] <= 4
        assert refused["per_address"] > 0
