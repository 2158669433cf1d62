"""Peer processes of the network benchmarks: the parent's handles and the child side.

Both ``bench_network.py`` (child: ``_peer.py``) and ``bench_convergence.py`` (child:
``_conv_peer.py``) run every peer as its own process: one ``dmodel.Node`` with its own
embedded Redis, started as::

    python benchmarks/<script>.py --home DIR [--listen EP] [--peers EP,EP] [--options JSON]

It prints its ROUTER endpoint as the first line on stdout, then reads one JSON request
per line on stdin (``{"op": ..., ...}``) and answers each with one JSON line:
``{"ok": true, ...}`` or ``{"ok": false, "error": "..."}``. Logging goes to stderr.

Parent side: :class:`Child` (one such process) and :class:`Cluster` (the children of a
phase, all closed when it ends). Child side: :class:`NodePeer` (the node, the
:class:`Recorder` of updates from peers and the requests both scripts answer alike),
:func:`peer_parser` and :func:`serve` (the request loop).

The child scripts import this module as ``_children``: a script's own folder is first
on ``sys.path``. Nothing here imports dmodel at import time.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Any

# ------------------------------------------------------------------ parent side


class PeerError(RuntimeError):
    pass


class Child:
    """One peer-script process: JSON requests on stdin, one JSON answer per line.

    ``options`` are the node's ``network_options``; ``profile`` sets
    ``DMODEL_BENCH_PROFILE=1`` in the child (``_peer.py`` then profiles its apply).
    """

    def __init__(self, script: Path, name: str, tmp: Path, *, peers: Sequence[str] = (),
                 options: dict[str, Any] | None = None, profile: bool = False) -> None:
        self.name = name
        self.stderr_path = tmp / f"{name}.stderr"
        env = {k: v for k, v in os.environ.items() if not k.startswith("DMODEL_")}
        if profile:  # besides that, explicit arguments only
            env["DMODEL_BENCH_PROFILE"] = "1"
        cmd = [sys.executable, str(script), "--home", str(tmp / name),
               "--listen", "tcp://127.0.0.1:*", "--peers", ",".join(peers),
               "--options", json.dumps(options or {})]
        self._err: IO[bytes] = open(self.stderr_path, "wb")  # noqa: SIM115 - closed in close()
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self._err, text=True, bufsize=1, env=env)
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True,
                                        name=f"bench-read-{name}")
        self._reader.start()
        self.endpoint = ""

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._lines.put(line)
        self._lines.put(None)

    def started(self, timeout: float = 60.0) -> Child:
        """Wait for the endpoint line."""
        line = self._next(timeout)
        self.endpoint = line.strip()
        if not self.endpoint.startswith("tcp://"):
            raise PeerError(f"{self.name}: unexpected first line {line!r}{self._tail()}")
        return self

    def _next(self, timeout: float) -> str:
        try:
            line = self._lines.get(timeout=timeout)
        except queue.Empty:
            raise PeerError(f"{self.name}: no answer within {timeout:.0f} s{self._tail()}") \
                from None
        if line is None:
            raise PeerError(f"{self.name}: process ended (rc={self.proc.poll()}){self._tail()}")
        return line

    def _tail(self) -> str:
        try:
            text = self.stderr_path.read_text(errors="replace").strip().splitlines()
        except OSError:
            return ""
        return ("\n  stderr: " + "\n  ".join(text[-15:])) if text else ""

    def send(self, op: str, **args: Any) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"op": op, **args}) + "\n")
        self.proc.stdin.flush()

    def recv(self, timeout: float = 60.0) -> dict[str, Any]:
        answer = json.loads(self._next(timeout))
        if not answer.get("ok"):
            raise PeerError(f"{self.name}: {answer.get('error')}{self._tail()}")
        return answer

    def call(self, op: str, **args: Any) -> dict[str, Any]:
        """One request and its answer; a ``timeout`` argument (also sent) bounds the wait."""
        self.send(op, **args)
        return self.recv(float(args.get("timeout", 0)) + 60.0)

    def close(self) -> None:
        """Ask it to quit; terminate, then kill, this process only if it does not."""
        if self.proc.poll() is None:
            try:
                self.send("quit")
                self.proc.wait(timeout=20)
            except (OSError, ValueError, subprocess.TimeoutExpired):
                pass
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        for stream in (self.proc.stdin, self.proc.stdout):
            try:
                if stream is not None:
                    stream.close()
            except OSError:
                pass
        self._err.close()


class Cluster:
    """The children of one phase; all are closed when the phase ends, whatever happens."""

    def __init__(self, tmp: Path, script: Path) -> None:
        self.tmp = tmp
        self.script = script
        self.children: list[Child] = []

    def spawn(self, name: str, **kwargs: Any) -> Child:
        child = Child(self.script, name, self.tmp, **kwargs)
        self.children.append(child)
        return child

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc: object) -> None:
        for child in reversed(self.children):
            child.close()


# ------------------------------------------------------------------- child side


class Recorder:
    """Counts updates from peers stored after ``mark()``; first/last time_ns.

    With ``ticks``, also the time_ns of every ``stride``-th one (for windowed rates).
    """

    def __init__(self, *, ticks: bool = False) -> None:
        self.lock = threading.Lock()
        self.keep_ticks = ticks
        self.mark()

    def mark(self, stride: int = 500) -> None:
        with self.lock:
            self.count = 0
            self.first_ns = 0
            self.last_ns = 0
            self.stride = max(1, stride)
            self.ticks: list[int] = []  # time_ns of every stride-th update

    def __call__(self, update: Any, local: bool) -> None:
        if local:
            return
        now = time.time_ns()
        with self.lock:
            if not self.count:
                self.first_ns = now
            self.last_ns = now
            self.count += 1
            if self.keep_ticks and self.count % self.stride == 0:
                self.ticks.append(now)

    def as_dict(self) -> dict[str, Any]:
        with self.lock:
            out: dict[str, Any] = {"count": self.count, "first_ns": self.first_ns,
                                   "last_ns": self.last_ns}
            if self.keep_ticks:
                out.update(stride=self.stride, ticks=list(self.ticks))
            return out


class NodePeer:
    """The request handler of a peer script: its node and the requests common to both.

    A subclass declares its models, calls ``super().__init__(args)`` and adds
    ``op_<name>(req) -> dict`` methods; :func:`serve` dispatches requests to them.
    """

    def __init__(self, args: argparse.Namespace, *, ticks: bool = False) -> None:
        import dmodel

        peers = [p for p in args.peers.split(",") if p]
        options = json.loads(args.options) if args.options else {}
        self.node = dmodel.Node(args.home, listen=args.listen or "", peers=peers,
                                discovery=False, redis_url="", network_options=options)
        self.recorder = Recorder(ticks=ticks)
        self.node.on_accepted(self.recorder)

    @property
    def endpoint(self) -> str:
        return self.node.network.endpoint or ""

    def redis_cpu(self) -> float:
        info = self.node.store.client.info("cpu")
        return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])

    def cpu(self) -> dict[str, float]:
        return {"process": time.process_time(), "redis": self.redis_cpu()}

    def wait_log(self, target: int, timeout: float,
                 poll: float) -> tuple[int, float]:
        """Wait until the log holds ``target`` updates (or ``timeout`` s pass).

        Returns the log length and the seconds waited.
        """
        start = time.monotonic()
        length = self.node.log_length()
        while length < target and time.monotonic() - start < timeout:
            time.sleep(poll)
            length = self.node.log_length()
        return length, time.monotonic() - start

    def op_wait_peers(self, req: dict[str, Any]) -> dict[str, Any]:
        ready = self.node.network.wait_for_peers(int(req.get("n", 1)),
                                                  float(req.get("timeout", 10)))
        return {"ready": ready, "peers": sum(p.ready for p in
                                             self.node.network.peers().values())}

    def op_stats(self, req: dict[str, Any]) -> dict[str, Any]:
        return {"stats": self._stats(), "cpu": self.cpu()}

    def _stats(self) -> dict[str, Any]:
        net = self.node.network
        return {"node": self.node.stats.as_dict(), "network": dict(net.stats),
                **self._bus_stats(),
                "log_length": self.node.log_length(), "pending": self.node.pending_count,
                "queue": net._queue.qsize()}

    def _bus_stats(self) -> dict[str, Any]:
        """Extra entries of ``_stats`` (after ``network``); none here."""
        return {}

    def close(self) -> None:
        self.node.shutdown()


def peer_parser(description: str, *, home_required: bool = True) -> argparse.ArgumentParser:
    """The options every peer script takes (``--home``, ``--listen``, ``--peers``...)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--home", type=Path, required=home_required)
    parser.add_argument("--listen", default="tcp://127.0.0.1:*")
    parser.add_argument("--peers", default="")
    parser.add_argument("--options", default="", help="network_options as JSON")
    return parser


def serve(make_peer: Callable[[argparse.Namespace], NodePeer], args: argparse.Namespace,
          name: str) -> int:
    """Start the peer, print its endpoint, answer requests until ``quit`` or EOF.

    ``name`` is the logger's (and the log lines') name for this kind of peer.
    """
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format=f"%(asctime)s {name} %(name)s %(levelname)s %(message)s")
    peer = make_peer(args)
    out = sys.stdout
    out.write(peer.endpoint + "\n")
    out.flush()
    try:
        for line in sys.stdin:
            if not line.strip():
                continue
            try:
                req = json.loads(line)
                op = req.get("op")
                if op == "quit":
                    out.write(json.dumps({"ok": True}) + "\n")
                    out.flush()
                    break
                handler = getattr(peer, f"op_{op}", None)
                if handler is None:
                    raise ValueError(f"unknown op {op!r}")
                answer = {"ok": True, **handler(req)}
            except Exception as exc:  # answer, never die: the parent decides
                logging.getLogger(name).exception("request failed")
                answer = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
            out.write(json.dumps(answer) + "\n")
            out.flush()
    finally:
        peer.close()
    return 0
