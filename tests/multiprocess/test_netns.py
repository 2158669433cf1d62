"""Three hosts on one LAN, made of Linux network namespaces; peers find each other by
UDP beacons and converge.

Layout (all names carry this test's pid and a counter, so parallel runs never clash)::

    <p>hub   a namespace holding only the bridge br0
    <p>n1    eth0 10.77.0.1/24 --veth-- p1 ┐
    <p>n2    eth0 10.77.0.2/24 --veth-- p2 ├ br0 (in <p>hub)
    <p>n3    eth0 10.77.0.3/24 --veth-- p3 ┘

Every interface and address lives inside these namespaces, none in the host's, so no
packet leaves them. One peer process (peer_driver.py) runs in each of n1..n3 with
``ip netns exec``: it listens on tcp://0.0.0.0:* and has no configured peers; it sends
beacons to the subnet broadcast 10.77.0.255, and the others dial the address a beacon
came from. The namespaces (and with them the veths and the bridge) are deleted in a
finalizer, after the peers were stopped, even when the test fails.

Skipped, with the reason, only where namespaces cannot be made (not root, no ``ip``,
EPERM in a restricted container).
"""

from __future__ import annotations

import itertools
import os
import subprocess

import pytest
from helpers import wait_until
from peer_driver import PeerProc, add_netns, driver_argv, kill_redis

pytestmark = [pytest.mark.netns, pytest.mark.multiprocess, pytest.mark.timeout(90)]

SUBNET = "10.77.0"
_runs = itertools.count(1)


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=15)


@pytest.fixture
def lan():
    """Three namespaces bridged on 10.77.0.0/24; yields their names."""
    prefix = f"dmt{os.getpid()}x{next(_runs)}"
    hub, hosts = f"{prefix}hub", [f"{prefix}n{i}" for i in (1, 2, 3)]
    created: list[str] = []
    try:
        add_netns(hub)
        created.append(hub)
        _ip("-n", hub, "link", "add", "br0", "type", "bridge")
        _ip("-n", hub, "link", "set", "br0", "up")
        for i, ns in enumerate(hosts, 1):
            _ip("netns", "add", ns)
            created.append(ns)
            _ip("-n", hub, "link", "add", f"p{i}", "type", "veth", "peer", "name", "eth0",
                "netns", ns)
            _ip("-n", hub, "link", "set", f"p{i}", "master", "br0")
            _ip("-n", hub, "link", "set", f"p{i}", "up")
            _ip("-n", ns, "addr", "add", f"{SUBNET}.{i}/24", "broadcast", f"{SUBNET}.255",
                "dev", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "up")
            _ip("-n", ns, "link", "set", "lo", "up")
        yield hosts
    finally:
        # Deleting a namespace deletes the interfaces in it (and each veth's other end).
        for ns in reversed(created):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=15)


@pytest.fixture
def hosts(lan, tmp_path):
    """One peer process per namespace, discovery on; stopped before the LAN goes away."""
    procs: list[PeerProc] = []
    try:
        for i, ns in enumerate(lan, 1):
            home = tmp_path / f"host{i}"
            argv = ["ip", "netns", "exec", ns,
                    *driver_argv(home, "--listen", "tcp://0.0.0.0:*", "--name", f"host{i}",
                                 "--discovery", f"{SUBNET}.255", "--beacon-interval", "0.25",
                                 "--sync-interval", "0.5")]
            procs.append(PeerProc(argv, home=home, name=f"host{i}"))
        yield procs
    finally:
        for proc in reversed(procs):
            proc.close()
        for proc in procs:
            kill_redis(proc.home)


def test_peers_in_three_namespaces_find_each_other_and_converge(hosts) -> None:
    h1, h2, h3 = hosts
    for host in hosts:  # no host was told of another: beacons are the only way in
        assert host.ok("wait_peers", n=2, timeout=20)["ready"], host.stderr_tail()
        assert host.ok("ping")["endpoint"].startswith("tcp://0.0.0.0:")

    db_id = h1.create(fields={"name": "from ns1", "salary": "1"})
    h2.wait(db_id, "name", value="from ns1")
    h3.wait(db_id, "name", value="from ns1")
    assert h3.call("get", db_id=db_id, field="salary", caller="")["error"] == "DecryptionError"

    reply = h3.create(fields={"name": "from ns3"})
    h1.wait(reply, "name", value="from ns3")
    h2.wait(reply, "name", value="from ns3")
    wait_until(lambda: len({host.stats()["log_length"] for host in hosts}) == 1)
