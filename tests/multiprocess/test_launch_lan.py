"""``dmodel.launch()`` with no network argument joins the LAN, checked for real but only
inside a network namespace this test makes (loopback only, nothing leaves it).

The session's conftest sets DMODEL_DISCOVERY=0 so that no other test joins the LAN; the
children here get an environment without it, so they see launch()'s real default.
Skipped where namespaces cannot be made (not root, no ``ip``, EPERM).
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import textwrap

import pytest
from peer_driver import MODELS, add_netns, kill_redis

from dmodel.tools.driver import PeerProcess, child_env, peer_argv

pytestmark = [pytest.mark.netns, pytest.mark.multiprocess, pytest.mark.timeout(90)]

_runs = itertools.count(1)

CHILD = textwrap.dedent("""
    import logging, socket, sys
    import dmodel
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    taken = None
    if sys.argv[2] == "taken":  # someone already listens on 7600
        taken = socket.socket()
        taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        taken.bind(("0.0.0.0", 7600))
        taken.listen()
    node = dmodel.launch(sys.argv[1])
    print(node.network.endpoint, node.discovery, flush=True)
    dmodel.shutdown()
""")


@pytest.fixture
def netns():
    """A fresh network namespace with only its loopback up; yields its name."""
    name = f"dml{os.getpid()}x{next(_runs)}"
    add_netns(name)
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True,
                       capture_output=True, timeout=15)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=15)


def _launch_in(ns: str, home, mode: str) -> subprocess.CompletedProcess[str]:
    env = child_env()
    assert "DMODEL_DISCOVERY" not in env  # the default itself is under test
    return subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", CHILD, str(home),
                           mode], capture_output=True, text=True, timeout=60, env=env)


def test_launch_joins_the_lan_on_7600(netns, tmp_path) -> None:
    done = _launch_in(netns, tmp_path / "a", "free")
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["tcp://0.0.0.0:7600", "True"]
    joined = [line for line in done.stderr.splitlines() if "joined the LAN" in line]
    assert len(joined) == 1 and "INFO" in joined[0] and "tcp://0.0.0.0:7600" in joined[0]
    assert "network=False" in joined[0]


def test_launch_takes_the_next_free_port(netns, tmp_path) -> None:
    done = _launch_in(netns, tmp_path / "a", "taken")
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["tcp://0.0.0.0:7601", "True"]


def test_peer_with_discovery_and_no_listen_is_reachable_from_the_lan(netns, tmp_path) -> None:
    home = tmp_path / "p"
    argv = peer_argv(home, models=[MODELS], prefix=["ip", "netns", "exec", netns])
    argv[argv.index("--listen"):argv.index("--listen") + 2] = []  # no --listen
    argv[argv.index("--no-discovery")] = "--discovery"
    with PeerProcess(argv, name="lan", home=home) as proc:
        assert proc.endpoint.startswith("tcp://0.0.0.0:76"), proc.endpoint
        assert proc.ok("ping")["endpoint"] == proc.endpoint
    kill_redis(home)
