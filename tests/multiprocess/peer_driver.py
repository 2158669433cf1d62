"""Peers in separate processes, for tests/multiprocess: the child side and the parent's handle.

Child (a test-private peer, for what ``dmodel peer`` has no option for, such as the
beacon address)::

    python peer_driver.py HOME [--listen EP] [--peer EP]... [--discovery ADDRESS]
                               [--discovery-port N] [--beacon-interval S]
                               [--sync-interval S] [--name NAME]

starts a :class:`dmodel.Node` with these options, prints ``endpoint <ep>`` as its first
stdout line, then answers the JSON-lines protocol of :mod:`dmodel.tools.peer` (one JSON
answer per JSON request on stdin: ``create``, ``set``, ``get``, ``wait``, ``stats``,
``ls``, ``sync``, ``wait_peers``, ``quit`` ...), the same protocol as
``dmodel peer --stdin-commands``.

``Person`` below is the model both kinds of children load (``dmodel peer`` gets it with
``--models <this file>:Person``).

Parent: :class:`PeerProc` (the one driver, :class:`dmodel.tools.driver.PeerProcess`, plus
Person helpers) runs one child (this driver, ``dmodel peer``, or either under ``ip netns
exec``), reads its endpoint, sends requests and stops it by its handle.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import dmodel
from dmodel.tools.driver import PeerProcess, peer_argv
from dmodel.tools.home import RedisLayout

DRIVER = Path(__file__).resolve()
MODELS = f"{DRIVER}:Person"


class Person(dmodel.DModel):
    name = dmodel.DField("name", False)
    salary = dmodel.DField("salary", True)


# ------------------------------------------------------------------ parent side


def cli_argv(home: Path, *, peers: Sequence[str] = (), listen: str = "tcp://127.0.0.1:*",
             options: Sequence[str] = ()) -> list[str]:
    """argv of ``dmodel peer --stdin-commands`` with this file's models."""
    return peer_argv(home, listen=listen, peers=peers, models=[MODELS], options=options)


def driver_argv(home: Path, *options: str) -> list[str]:
    """argv of this driver as a child."""
    return [sys.executable, str(DRIVER), str(home), *options]


def redis_pid(home: Path) -> int | None:
    """The pid of the home's embedded redis-server, from its pidfile."""
    return RedisLayout.of(home).pid()


def add_netns(name: str) -> None:
    """``ip netns add name``, or skip the test (with the reason) where namespaces cannot be
    made: not root, no ``ip``, EPERM in a restricted container."""
    import os
    import shutil
    import subprocess

    import pytest

    if os.geteuid() != 0:
        pytest.skip("network namespaces need root (ip netns add)")
    if shutil.which("ip") is None:
        pytest.skip("no `ip` command (iproute2) to create network namespaces")
    try:
        subprocess.run(["ip", "netns", "add", name], check=True, capture_output=True,
                       text=True, timeout=15)
    except subprocess.CalledProcessError as exc:
        if "not permitted" in exc.stderr or "denied" in exc.stderr:
            pytest.skip(f"cannot create network namespaces here: {exc.stderr.strip()}")
        raise


def kill_redis(home: Path) -> bool:
    """SIGKILL the home's redis-server by the pid in its pidfile (never by name).

    Returns True if there was one to kill.
    """
    return RedisLayout.of(home).kill()


class PeerProc(PeerProcess):
    """:class:`dmodel.tools.driver.PeerProcess` with the tests' Person helpers."""

    def __init__(self, argv: Sequence[str], *, home: Path, name: str = "peer",
                 timeout: float = 20.0) -> None:
        super().__init__(argv, name=name, home=home, timeout=timeout)

    def get(self, db_id: str, field: str, caller: str | None = None) -> Any:
        args = {} if caller is None else {"caller": caller}
        return self.ok("get", db_id=db_id, field=field, **args)["value"]

    def create(self, **args: Any) -> str:
        return self.ok("create", model="Person", **args)["db_id"]


# ------------------------------------------------------------------ child side


def main(argv: Sequence[str] | None = None) -> int:
    from dmodel.net.discovery import DEFAULT_PORT, DiscoveryConfig
    from dmodel.tools.peer import Peer, configure_logging

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("home", type=Path)
    parser.add_argument("--listen", default="tcp://127.0.0.1:*")
    parser.add_argument("--peer", action="append", default=[])
    parser.add_argument("--discovery", metavar="ADDRESS",
                        help="find peers by beacons sent to ADDRESS (a broadcast address)")
    parser.add_argument("--discovery-port", type=int, default=DEFAULT_PORT)
    parser.add_argument("--beacon-interval", type=float, default=1.0)
    parser.add_argument("--sync-interval", type=float, default=2.0)
    parser.add_argument("--name", default="peer")
    args = parser.parse_args(argv)

    configure_logging(args.name, "warning")
    options: dict[str, Any] = {"sync_interval": args.sync_interval}
    if args.discovery:
        options["discovery_config"] = DiscoveryConfig(
            address=args.discovery, port=args.discovery_port, interval=args.beacon_interval)
    node = dmodel.Node(args.home.resolve(), listen=args.listen, peers=args.peer,
                       discovery=bool(args.discovery), network_options=options)
    peer = Peer(node, name=args.name)
    print(f"endpoint {peer.endpoint}", flush=True)
    peer.run(stdin_commands=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
