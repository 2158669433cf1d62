"""Peer processes of the network benchmarks: the parent's cluster and the child commands.

Both ``bench_network.py`` and ``bench_convergence.py`` run every peer as its own
``dmodel peer --stdin-commands`` process (one node, its own embedded Redis), driven by
:class:`dmodel.tools.driver.PeerProcess`, the one driver of such children. The
benchmark's requests are extra commands loaded into the peer with
``--commands benchmarks/_peer.py:BenchCommands`` (or ``_conv_peer.py:ConvCommands``):
classes built on :class:`BenchCommandsBase` here, whose ``op_<name>`` methods answer
the op ``<name>`` next to the peer's own (``ping``, ``digest``, ``wait_peers``...).

Parent side: :class:`Cluster` (the children of a phase, all closed when it ends).
Child side: :class:`Recorder` (updates from peers after a mark) and
:class:`BenchCommandsBase` (the requests both scripts answer alike: CPU, stats,
mark, wait for the log, garbage-collector pauses).

The scripts import this module as ``_children``: a script's own folder is first on
``sys.path`` (the child modules put it there when ``dmodel peer`` loads them).
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import _common

from dmodel.tools.driver import PeerProcess, peer_argv


class PeerError(RuntimeError):
    """A benchmark's own check failed (a child that fails or answers not-ok raises
    :class:`dmodel.errors.CommandError`)."""


# ------------------------------------------------------------------ parent side


class Cluster:
    """The ``dmodel peer`` children of one phase; all are closed when it ends.

    ``commands`` is the ``--commands`` spec (``FILE.py:Class``) every child loads.
    """

    def __init__(self, tmp: Path, commands: str, *, timeout: float = 60.0) -> None:
        self.tmp = tmp
        self.commands = commands
        self.timeout = timeout
        self.children: list[PeerProcess] = []
        self._lock = threading.Lock()

    def spawn(self, name: str, *, peers: Sequence[str] = (),
              options: dict[str, Any] | None = None, profile: bool = False) -> PeerProcess:
        """Start one child and wait for its endpoint line.

        ``options`` are the node's network options (``--network-options``); ``profile``
        sets ``DMODEL_BENCH_PROFILE=1`` in it (``_peer.py`` then profiles its apply).
        """
        extra = ["--commands", self.commands]
        if options:
            extra += ["--network-options", json.dumps(options)]
        # BENCH_LOG=info shows the peers' catch-up decisions in their stderr lines
        argv = peer_argv(self.tmp / name, name=name, peers=peers, options=extra,
                         log_level=os.environ.get("BENCH_LOG", "warning"))
        child = PeerProcess(argv, name=name, home=self.tmp / name, timeout=self.timeout,
                            env={"DMODEL_BENCH_PROFILE": "1"} if profile else None)
        with self._lock:
            self.children.append(child)
        return child

    def spawn_many(self, names: Sequence[str], **kwargs: Any) -> list[PeerProcess]:
        """Start several children at once (their start-ups overlap)."""
        with concurrent.futures.ThreadPoolExecutor(len(names) or 1) as pool:
            futures = [pool.submit(self.spawn, name, **kwargs) for name in names]
            return [f.result() for f in futures]

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc: object) -> None:
        for child in reversed(self.children):
            child.close(20)


def ask_all(children: Sequence[PeerProcess], op: str, timeout: float = 60.0,
            **args: Any) -> list[dict[str, Any]]:
    """Send one request to every child first, then collect the answers (they run at once)."""
    ids = [child.send(op, **args) for child in children]
    return [child.check(child.recv(rid, timeout, f"answer to {op!r}"), op)
            for child, rid in zip(children, ids, strict=True)]


def answer(child: PeerProcess, request_id: int, timeout: float,
           op: str = "request") -> dict[str, Any]:
    """The ok answer to a request sent with ``child.send`` (else CommandError)."""
    return child.check(child.recv(request_id, timeout, f"answer to {op!r}"), op)


def wait_connected(children: Sequence[PeerProcess], n: int = 1, timeout: float = 30.0) -> None:
    """Every child sees ``n`` ready peers (the built-in ``wait_peers``), or PeerError."""
    for child in children:
        if not child.ok("wait_peers", n=n, timeout=timeout)["ready"]:
            raise PeerError(f"{child.name} did not see {n} peer(s) within {timeout:.0f} s")


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


class BenchCommandsBase:
    """Commands common to both benchmark peers; ``CLASS(peer)`` is built by ``dmodel peer``
    once its node runs (``peer`` is a :class:`dmodel.tools.peer.Peer`).

    Subclasses declare their models in ``__init__`` and add ``op_<name>`` methods (an op
    the peer already answers, such as ``create`` or ``stats``, cannot be reused).
    """

    ticks = False

    def __init__(self, peer: Any) -> None:
        self.peer = peer
        self.node = peer.node
        self.started_ns = time.time_ns()
        self.recorder = Recorder(ticks=self.ticks)
        self.node.on_accepted(self.recorder)
        self.gc_watch = _common.GcWatch()
        self.cpu_at_start = self.cpu()  # once the node runs: start-up CPU is not counted

    @property
    def endpoint(self) -> str:
        return self.node.network.endpoint or ""

    def redis_cpu(self) -> float:
        return _common.redis_cpu_seconds(self.node.store.client)

    def cpu(self) -> dict[str, float]:
        """CPU seconds so far: this process (user+sys, all threads), its redis-server and
        its dmodel threads by role (``bus_thread``, ``apply_thread``, ...)."""
        return {"process": _common.cpu_seconds(), "redis": self.redis_cpu(),
                **{f"{role}_thread": secs for role, secs in _common.thread_cpu_seconds().items()}}

    def wait_log(self, target: int, timeout: float, poll: float) -> tuple[int, float]:
        """Wait until the log holds ``target`` updates (or ``timeout`` s pass).

        Returns the log length and the seconds waited.
        """
        start = time.monotonic()
        length = self.node.log_length()
        while length < target and time.monotonic() - start < timeout:
            time.sleep(poll)
            length = self.node.log_length()
        return length, time.monotonic() - start

    def _stats(self) -> dict[str, Any]:
        net = self.node.network
        return {"node": self.node.stats.as_dict(), "network": dict(net.stats),
                **self._bus_stats(),
                "log_length": self.node.log_length(), "pending": self.node.pending_count,
                "queue": net._queue.qsize()}

    def _bus_stats(self) -> dict[str, Any]:
        """Extra entries of ``_stats`` (after ``network``); none here."""
        return {}

    # ------------------------------------------------------------- commands
    def op_bench_ping(self, req: dict[str, Any]) -> dict[str, Any]:
        return {"endpoint": self.endpoint, "node_id": self.node.node_id.hex(),
                "started_ns": self.started_ns, "cpu_at_start": self.cpu_at_start}

    def op_bench_stats(self, req: dict[str, Any]) -> dict[str, Any]:
        return {"stats": self._stats(), "cpu": self.cpu()}

    def op_gc_mode(self, req: dict[str, Any]) -> dict[str, Any]:
        """``mode`` "default": undo ``dmodel.runtime.tune_gc`` (unfreeze, CPython's
        thresholds 700/10/10), for a before/after comparison; "tuned": ``tune_gc()``."""
        return _common.gc_mode(str(req.get("mode", "tuned")))

    def op_gc_watch(self, req: dict[str, Any]) -> dict[str, Any]:
        """Start (again) recording every collection's pause with ``gc.callbacks``."""
        self.gc_watch.start()
        return {}

    def op_gc_pauses(self, req: dict[str, Any]) -> dict[str, Any]:
        """Pauses recorded since ``gc_watch``, per generation (count, p50/p99/max ms)."""
        return {"gc": self.gc_watch.report(stop=bool(req.get("stop", True)))}
