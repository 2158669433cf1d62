"""Three peers on three (virtual) hosts: network namespaces joined by a bridge.

Each host is a network namespace with its own interface and address, and runs one
``dmodel peer`` listening there, so updates really cross a network between hosts:

    dm-br0 (bridge, root namespace)
      ├── veth ── dm-a: 10.77.0.1   host A  tcp://10.77.0.1:7600
      ├── veth ── dm-b: 10.77.0.2   host B  tcp://10.77.0.2:7600  (peer: A)
      └── veth ── dm-c: 10.77.0.3   host C  tcp://10.77.0.3:7600  (peer: A)

It needs root and iproute2 (``ip``), and checks for both first. Run:

    sudo .venv/bin/python examples/multihost/multihost.py
    .venv/bin/python examples/multihost/multihost.py --dry-run   # only print the ip commands
    sudo .venv/bin/python examples/multihost/multihost.py --cleanup  # after an interrupted run

Everything it creates (namespaces, links, the peers' homes) is removed at the end,
Ctrl-C included. On hosts where bridged traffic goes through iptables (Docker sets
``net.bridge.bridge-nf-call-iptables=1`` with a FORWARD policy of DROP), the peers
may not see each other; the script says so when they do not.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

HOSTS = ("a", "b", "c")
PORT = 7600


class Net:
    """The namespaces and links of this example, named from ``prefix``."""

    def __init__(self, prefix: str, subnet: str, dry_run: bool) -> None:
        self.prefix = prefix
        self.subnet = subnet  # the first three octets
        self.dry_run = dry_run
        self.bridge = f"{prefix}-br0"

    def ns(self, host: str) -> str:
        return f"{self.prefix}-{host}"

    def address(self, host: str) -> str:
        return f"{self.subnet}.{HOSTS.index(host) + 1}"

    def ip(self, *args: str, check: bool = True) -> None:
        print("  ip " + " ".join(args))
        if not self.dry_run:
            result = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
            if check and result.returncode != 0:
                raise RuntimeError(f"ip {' '.join(args)}: {result.stderr.strip()}")

    def existing(self) -> list[str]:
        out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True,
                             timeout=30).stdout
        names = {line.split()[0] for line in out.splitlines() if line.strip()}
        return [self.ns(h) for h in HOSTS if self.ns(h) in names]

    def up(self) -> None:
        self.ip("link", "add", self.bridge, "type", "bridge")
        self.ip("link", "set", self.bridge, "up")
        for host in HOSTS:
            ns, inner, outer = self.ns(host), f"{self.ns(host)}-in", f"{self.ns(host)}-out"
            self.ip("netns", "add", ns)
            self.ip("link", "add", outer, "type", "veth", "peer", "name", inner)
            self.ip("link", "set", inner, "netns", ns)
            self.ip("link", "set", outer, "master", self.bridge)
            self.ip("link", "set", outer, "up")
            self.ip("-n", ns, "addr", "add", f"{self.address(host)}/24", "dev", inner)
            self.ip("-n", ns, "link", "set", inner, "up")
            self.ip("-n", ns, "link", "set", "lo", "up")

    def down(self) -> None:
        # Deleting a namespace deletes the veth inside it, and with it the outer end.
        for host in HOSTS:
            self.ip("netns", "del", self.ns(host), check=False)
        self.ip("link", "del", self.bridge, check=False)


def check_environment() -> str | None:
    """Why this example cannot run here, or None."""
    if shutil.which("ip") is None:
        return ("the 'ip' command (iproute2) is not installed; this example creates network "
                "namespaces with it")
    if os.geteuid() != 0:
        return ("this example needs root to create network namespaces: run it with sudo, "
                "or run `dmodel demo` for the same story with three processes on one host")
    return None


def story(net: Net, root: Path, timeout: float) -> None:
    """Create on A, read on B and C; the salary opens only for the chief on C."""
    from dmodel.tools.demo import DemoFailure, start_host

    hosts: dict[str, Any] = {}

    def start(host: str, peers: Sequence[str]) -> Any:
        handle = start_host(host.upper(), root / f"host-{host}", peers=peers,
                            listen=f"tcp://{net.address(host)}:{PORT}",
                            prefix=["ip", "netns", "exec", net.ns(host)], timeout=timeout)
        hosts[host] = handle
        print(f"  host {host.upper()}  {handle.endpoint}  (namespace {net.ns(host)})")
        return handle

    try:
        a = start("a", [])
        b = start("b", [a.endpoint])
        c = start("c", [a.endpoint])
        for handle in (a, b, c):
            if not handle.ok("wait_peers", n=2, timeout=timeout,
                             reply_timeout=timeout + 10)["ready"]:
                raise DemoFailure(f"host {handle.name} does not see the two others; is "
                                  "bridged traffic filtered (sysctl "
                                  "net.bridge.bridge-nf-call-iptables)?")
        print("  every host sees the two others")

        chief = c.ok("create", model="Person", fields={"name": "Chief"})["db_id"]
        a.ok("wait", db_id=chief, timeout=timeout, reply_timeout=timeout + 10)
        bob = a.ok("create", model="Person", authorized=[chief],
                   fields={"name": "Bob", "salary": "44321"})["db_id"]
        print(f"  A: Bob created, salary readable by the chief on C  -> {bob}")
        for handle in (b, c):
            handle.ok("wait", db_id=bob, field="salary", timeout=timeout,
                      reply_timeout=timeout + 10)
            name = handle.ok("get", db_id=bob, field="name", caller="")["value"]
            print(f"  {handle.name}: name -> {name!r}")
        on_b = b.call("get", db_id=bob, field="salary", caller="")
        on_c = c.call("get", db_id=bob, field="salary", caller=chief)
        print(f"  B: salary -> {on_b.get('error')}; C as the chief: salary -> "
              f"{on_c.get('value')!r}")
        if on_b.get("error") != "DecryptionError" or on_c.get("value") != "44321":
            raise DemoFailure("the salary was not sealed as it should be")
        for handle in (a, b, c):
            s = handle.stats()
            print(f"  {handle.name}: made {s['local']}, sent {s['published']}, applied from "
                  f"peers {s['remote']}, rejected {s['rejected_total']}")
    finally:
        for handle in reversed(list(hosts.values())):
            handle.close()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="print the ip commands only")
    parser.add_argument("--cleanup", action="store_true",
                        help="remove what an interrupted run left behind, then exit")
    parser.add_argument("--prefix", default="dm", help="prefix of namespace and link names")
    parser.add_argument("--subnet", default="10.77.0", help="first three octets to use")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds per step")
    args = parser.parse_args(argv)
    if len(args.prefix) > 8:
        parser.error("--prefix: at most 8 characters (interface names are short)")
    net = Net(args.prefix, args.subnet, args.dry_run)
    if args.dry_run:
        print("would run:")
        net.up()
        print("then start one `dmodel peer` per namespace (ip netns exec), and finally:")
        net.down()
        return 0
    problem = check_environment()
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    if args.cleanup:
        net.down()
        return 0
    leftovers = net.existing()
    if leftovers:
        print(f"error: namespace {leftovers[0]} exists already (an interrupted run?); "
              "remove it with --cleanup", file=sys.stderr)
        return 2
    # Imported only now, so the checks above answer even where dmodel cannot load.
    from dmodel.errors import ToolError

    root = Path(tempfile.mkdtemp(prefix="dmodel-multihost-"))
    started = time.monotonic()
    try:
        print("setting up the network:")
        net.up()
        print("the story:")
        story(net, root, args.timeout)
        print(f"done in {time.monotonic() - started:.1f} s")
        return 0
    except (ToolError, RuntimeError) as exc:  # DemoFailure, a host's CommandError
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    finally:
        print("tearing down:")
        net.down()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
