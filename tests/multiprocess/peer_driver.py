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

Parent: :class:`PeerProc` runs one child (this driver, ``dmodel peer``, or either under
``ip netns exec``), reads its endpoint, sends requests and stops it by its handle.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import dmodel
from dmodel.tools.demo import stop_child

DRIVER = Path(__file__).resolve()
MODELS = f"{DRIVER}:Person"


class Person(dmodel.DModel):
    name = dmodel.DField("name", False)
    salary = dmodel.DField("salary", True)


# ------------------------------------------------------------------ parent side


def child_env() -> dict[str, str]:
    """The parent's environment minus DMODEL_* (children are configured by argv only)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DMODEL_")}
    env["PYTHONUNBUFFERED"] = "1"
    return env


def cli_argv(home: Path, *, peers: Sequence[str] = (), listen: str = "tcp://127.0.0.1:*",
             options: Sequence[str] = ()) -> list[str]:
    """argv of ``dmodel peer --stdin-commands`` with this file's models."""
    argv = [sys.executable, "-m", "dmodel", "peer", "--stdin-commands", "--home", str(home),
            "--listen", listen, "--no-discovery", "--status-interval", "0",
            "--log-level", "warning", "--models", MODELS, *options]
    for endpoint in peers:
        argv += ["--peer", endpoint]
    return argv


def driver_argv(home: Path, *options: str) -> list[str]:
    """argv of this driver as a child."""
    return [sys.executable, str(DRIVER), str(home), *options]


def redis_pid(home: Path) -> int | None:
    """The pid of the home's embedded redis-server, from its pidfile."""
    try:
        return int((home / "redis" / "redis.pid").read_text().strip())
    except (OSError, ValueError):
        return None


def kill_redis(home: Path) -> bool:
    """SIGKILL the home's redis-server by the pid in its pidfile (never by name).

    Returns True if there was one to kill.
    """
    pid = redis_pid(home)
    if pid is None:
        return False
    try:
        if b"redis-server" not in Path(f"/proc/{pid}/cmdline").read_bytes():
            return False  # a stale pidfile whose pid was reused
        os.kill(pid, signal.SIGKILL)
    except OSError:
        return False
    return True


class PeerProc:
    """One peer child process and its JSON-lines command channel."""

    def __init__(self, argv: Sequence[str], *, home: Path, name: str = "peer",
                 timeout: float = 20.0) -> None:
        self.name = name
        self.home = home
        self.timeout = timeout
        self._ids = itertools.count(1)
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._stderr: list[str] = []
        self.proc = subprocess.Popen(list(argv), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, bufsize=1,
                                     env=child_env())
        self._readers = [threading.Thread(target=self._pump_stdout, daemon=True),
                         threading.Thread(target=self._pump_stderr, daemon=True)]
        for reader in self._readers:
            reader.start()
        first = self._next(time.monotonic() + timeout, "its endpoint")
        if not first.startswith("endpoint "):
            raise AssertionError(f"{name} printed {first!r} instead of its endpoint")
        self.endpoint = first.split(None, 1)[1].strip()

    def _pump_stdout(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._lines.put(line)
        self._lines.put(None)

    def _pump_stderr(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self._stderr.append(line.rstrip("\n"))

    def stderr_tail(self, n: int = 15) -> str:
        return "\n".join(f"  {self.name}| {line}" for line in self._stderr[-n:])

    def _next(self, deadline: float, what: str) -> str:
        try:
            line = self._lines.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            raise AssertionError(f"{self.name} gave no {what} in time\n"
                                 f"{self.stderr_tail()}") from None
        if line is None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(5)
            raise AssertionError(f"{self.name} exited ({self.proc.returncode}) before giving "
                                 f"{what}\n{self.stderr_tail()}")
        return line

    def call(self, op: str, *, reply_timeout: float | None = None, **args: Any) -> dict:
        """Send one request; its answer (``ok`` true or false)."""
        request_id = next(self._ids)
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"op": op, "id": request_id, **args}) + "\n")
        self.proc.stdin.flush()
        deadline = time.monotonic() + (reply_timeout or self.timeout)
        while True:
            answer = json.loads(self._next(deadline, f"answer to {op}"))
            if answer.get("id") == request_id:
                return answer

    def ok(self, op: str, **args: Any) -> dict:
        """Like call(), but the answer must be ok."""
        answer = self.call(op, **args)
        assert answer.get("ok"), f"{self.name}: {op} {args} -> {answer}\n{self.stderr_tail()}"
        return answer

    def wait(self, db_id: str, field: str | None = None, timeout: float = 15.0,
             **match: Any) -> None:
        """Wait in the child (a bounded loop there) until the object, field or value is in."""
        args: dict[str, Any] = {"db_id": db_id, "timeout": timeout, **match}
        if field is not None:
            args["field"] = field
        self.ok("wait", reply_timeout=timeout + 10, **args)

    def get(self, db_id: str, field: str, caller: str | None = None) -> Any:
        args = {} if caller is None else {"caller": caller}
        return self.ok("get", db_id=db_id, field=field, **args)["value"]

    def create(self, **args: Any) -> str:
        return self.ok("create", model="Person", **args)["db_id"]

    def stats(self) -> dict:
        return self.ok("stats")["stats"]

    def kill(self) -> None:
        """SIGKILL the child by its handle (its embedded redis-server lives on)."""
        self.proc.kill()
        self.proc.wait(10)
        self._close_streams()

    def close(self, timeout: float = 10.0) -> None:
        """``quit``, then SIGTERM, then SIGKILL, each with a deadline. Idempotent."""
        stop_child(self.proc, timeout)
        self._close_streams()

    def _close_streams(self) -> None:
        for stream in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            with contextlib.suppress(OSError, ValueError):
                if stream is not None:
                    stream.close()
        for reader in self._readers:
            reader.join(2)


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
