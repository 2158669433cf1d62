"""The network benchmark's peer commands, loaded into ``dmodel peer``.

Private to ``bench_network.py`` (not a benchmark, not a tool). Every peer is a
``dmodel peer --stdin-commands --commands benchmarks/_peer.py:BenchCommands`` process
(one node with its own embedded Redis), driven by ``dmodel.tools.driver.PeerProcess``;
:class:`BenchCommands` adds the benchmark's requests (create objects, write N updates,
optionally paced, mark, wait until the log holds N, stats, listeners, publish or ingest
a file of pre-signed updates, profile, GC pauses) to the peer's own (``ping``,
``digest``, ``wait_peers``...). See ``_children.py``.

Every update this node stores from a peer (``local=False``) after the last ``mark``
is counted, with the wall-clock time (``time.time_ns``) of the first and the last,
so the parent can compute apply rates across processes (one machine, one clock).

With ``DMODEL_BENCH_PROFILE=1`` every call of ``node.ingest_many`` (apply thread,
sync thread) runs under a per-thread cProfile; ``{"op": "profile"}`` returns the top
functions by own time.

``python benchmarks/_peer.py --zmq-pub ENDPOINT --count N --size S [--rate R]`` is a
separate mode, for the raw pyzmq reference (no dmodel): a PUB socket connects to
ENDPOINT, sends tiny warm-up messages until ``go`` arrives on stdin, then N messages of
S bytes (paced at R a second if given) and an end marker.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import select
import sys
import threading
import time
from pathlib import Path
from typing import Any

if str(Path(__file__).resolve().parent) not in sys.path:  # loaded by dmodel peer --commands
    sys.path.insert(0, str(Path(__file__).resolve().parent))

import _children  # noqa: E402 - the benchmarks folder, just put on sys.path
import _common  # noqa: E402
import msgpack  # noqa: E402

# -------------------------------------------------------------- raw pyzmq mode


def zmq_pub(endpoint: str, count: int, size: int, rate: float = 0.0) -> int:
    import zmq

    ctx = zmq.Context()
    sock = ctx.socket(zmq.PUB)
    sock.sndhwm = 0  # unlimited: the reference measures transport, not drops
    sock.linger = 5000
    sock.connect(endpoint)
    print("ready", flush=True)
    deadline = time.monotonic() + 20
    go = False
    while time.monotonic() < deadline:  # slow joiner: warm up until the parent says go
        sock.send(b"w")
        ready, _, _ = select.select([sys.stdin], [], [], 0.002)
        if ready:
            go = sys.stdin.readline().strip() == "go"
            break
    if go:
        payload = b"d" + os.urandom(size - 1)
        send = sock.send
        start = time.perf_counter()
        for i in range(count):
            if rate:
                wait = start + i / rate - time.perf_counter()
                if wait > 0:
                    time.sleep(wait)
            send(payload)
        for _ in range(100):  # the end marker, a few times (a SUB may drop at HWM)
            send(b"e")
    sock.close()
    ctx.term()
    return 0 if go else 1


# ------------------------------------------------------------------ node mode


class ThreadCPU:
    """CPU seconds spent inside ``node.ingest_many`` (per calling thread, summed)."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.lock = threading.Lock()


class BenchCommands(_children.BenchCommandsBase):
    """The bench_network requests (``op_<name>``), built by ``dmodel peer`` as
    ``BenchCommands(peer)`` once its node runs."""

    ticks = True

    def __init__(self, peer: Any) -> None:
        import dmodel
        from dmodel.actions import DAction

        class BenchItem(dmodel.DModel):
            n = dmodel.DField("n", False)
            t = dmodel.DField("t", False)

        class LatencyListener(DAction):
            def __init__(self) -> None:
                self.samples: list[int] = []

            def on_updated(self, object_id: str, field: str, old_value: Any,
                           new_value: Any) -> None:
                if field == "t" and isinstance(new_value, int):
                    self.samples.append(time.time_ns() - new_value)

        class SlowListener(DAction):
            def __init__(self, seconds: float) -> None:
                self.seconds = seconds

            def on_updated(self, object_id: str, field: str, old_value: Any,
                           new_value: Any) -> None:
                time.sleep(self.seconds)

        self.model = BenchItem
        self.latency_cls = LatencyListener
        self.slow_cls = SlowListener
        self.listeners: list[tuple[Any, str]] = []
        self.apply_cpu = ThreadCPU()
        super().__init__(peer)
        self.profiles: dict[int, cProfile.Profile] = {}
        self._wrap_ingest(profile=os.environ.get("DMODEL_BENCH_PROFILE") == "1")
        self.objects: list[Any] = []
        self.accepted_samples: list[int] | None = None

    def _wrap_ingest(self, *, profile: bool) -> None:
        original = self.node.ingest_many
        cpu, profiles = self.apply_cpu, self.profiles

        def ingest_many(raws: Any, *args: Any, **kwargs: Any) -> Any:
            start = time.thread_time()
            prof = None
            if profile:
                prof = profiles.setdefault(threading.get_ident(), cProfile.Profile())
                prof.enable()
            try:
                return original(raws, *args, **kwargs)
            finally:
                if prof is not None:
                    prof.disable()
                spent = time.thread_time() - start
                with cpu.lock:
                    cpu.seconds += spent

        self.node.ingest_many = ingest_many

    def cpu(self) -> dict[str, float]:
        with self.apply_cpu.lock:
            apply = self.apply_cpu.seconds
        return {**super().cpu(), "ingest_many": apply}

    # ------------------------------------------------------------- commands
    def op_store_info(self, req: dict[str, Any]) -> dict[str, Any]:
        """What this node's store is: the client's class and how many redis-servers its
        CPU figures sum (a RedisCluster's masters; 1 otherwise)."""
        client = self.node.store.client
        return {"client": type(client).__name__,
                "servers": len(_common.redis_servers(client))}

    def op_create_items(self, req: dict[str, Any]) -> dict[str, Any]:
        new = [self.model([], node=self.node) for _ in range(int(req.get("count", 1)))]
        self.objects.extend(new)
        return {"ids": [o.db_id for o in new], "log_length": self.node.log_length()}

    def op_write(self, req: dict[str, Any]) -> dict[str, Any]:
        """Write ``n`` updates round-robin over the owned objects, optionally paced.

        ``field`` "n": the value is a sequence number; "t": ``time.time_ns()`` at the call.
        """
        n, rate = int(req["n"]), float(req.get("rate", 0))
        field = req.get("field", "n")
        objs = self.objects
        if not objs:
            raise RuntimeError("create objects first")
        handles = [getattr(o, field) for o in objs]
        k = len(handles)
        behind = 0
        cpu0 = self.cpu()
        start = time.perf_counter()
        first_ns = time.time_ns()
        for i in range(n):
            if rate:
                due = start + i / rate
                wait = due - time.perf_counter()
                if wait > 0:
                    time.sleep(wait)
                elif wait < -0.001:
                    behind += 1
            handles[i % k].set(time.time_ns() if field == "t" else i)
        last_ns = time.time_ns()
        elapsed = time.perf_counter() - start
        cpu1 = self.cpu()
        return {"n": n, "elapsed": elapsed, "rate": n / elapsed if elapsed else 0.0,
                "first_ns": first_ns, "last_ns": last_ns, "behind": behind,
                "cpu": {k2: cpu1[k2] - cpu0[k2] for k2 in cpu0},
                "log_length": self.node.log_length()}

    def op_mark(self, req: dict[str, Any]) -> dict[str, Any]:
        self.recorder.mark(int(req.get("stride", 500)))
        return {"log_length": self.node.log_length(), "cpu": self.cpu(),
                "stats": self._stats()}

    def op_wait_log(self, req: dict[str, Any]) -> dict[str, Any]:
        """Wait until the log holds ``target`` updates (or ``timeout`` s pass)."""
        target = int(req["target"])
        length, waited = self.wait_log(target, float(req.get("timeout", 60)), poll=0.01)
        return {"reached": length >= target, "log_length": length,
                "waited": waited, "applied": self.recorder.as_dict(),
                "cpu": self.cpu(), "stats": self._stats()}

    def op_listen_latency(self, req: dict[str, Any]) -> dict[str, Any]:
        listener = self.latency_cls()
        listener.apply(f"{self.model.__name__}:*", node=self.node)
        self.listeners.append((listener, f"{self.model.__name__}:*"))
        return {}

    def op_listen_accepted(self, req: dict[str, Any]) -> dict[str, Any]:
        """Latency without a listener: an ``on_accepted`` callback takes now - the value
        of every remote set of ``t`` (a matching listener makes the node commit each
        update alone, so this measures the plain live path)."""
        self.accepted_samples = []
        if not getattr(self, "_accepted_hooked", False):
            self._accepted_hooked = True

            def record(update: Any, local: bool) -> None:
                if local or self.accepted_samples is None:
                    return
                now = time.time_ns()
                for op in update.ops:
                    if op.op == "set" and op.field == "t" and isinstance(op.value, int):
                        self.accepted_samples.append(now - op.value)

            self.node.on_accepted(record)
        return {}

    def op_latencies(self, req: dict[str, Any]) -> dict[str, Any]:
        samples = [s for lst, _ in self.listeners if isinstance(lst, self.latency_cls)
                   for s in lst.samples]
        samples += getattr(self, "accepted_samples", None) or []
        return {"samples_us": [round(s / 1000, 1) for s in samples]}

    def op_slow(self, req: dict[str, Any]) -> dict[str, Any]:
        listener = self.slow_cls(float(req["sleep_ms"]) / 1000)
        listener.apply(f"{self.model.__name__}:*", node=self.node)
        self.listeners.append((listener, f"{self.model.__name__}:*"))
        return {}

    def op_unlisten(self, req: dict[str, Any]) -> dict[str, Any]:
        for listener, pattern in self.listeners:
            listener.revoke(pattern, node=self.node)
        self.listeners.clear()
        self.accepted_samples = None
        return {}

    def op_deaf(self, req: dict[str, Any]) -> dict[str, Any]:
        """Discard whatever peers send (a pure publisher: it stores nothing from them)."""
        self.node.ingest_many = lambda raws, *args, **kwargs: [None] * len(list(raws))
        return {}

    def op_publish_file(self, req: dict[str, Any]) -> dict[str, Any]:
        """Publish pre-signed updates from a file on the bus, unstored, as fast as possible."""
        raws = _load(req["path"])[: req.get("limit")]
        bus = self.node.network.bus
        start = time.perf_counter()
        first_ns = time.time_ns()
        for raw in raws:
            bus.publish(raw)
        return {"n": len(raws), "elapsed": time.perf_counter() - start,
                "first_ns": first_ns, "last_ns": time.time_ns()}

    def op_ingest_file(self, req: dict[str, Any]) -> dict[str, Any]:
        """``node.ingest_many`` of pre-signed updates from a file, in batches (no network)."""
        raws = _load(req["path"])[: req.get("limit")]
        batch = int(req.get("batch", 256))
        cpu0 = self.cpu()
        start = time.perf_counter()
        for i in range(0, len(raws), batch):
            self.node.ingest_many(raws[i:i + batch])
        elapsed = time.perf_counter() - start
        cpu1 = self.cpu()
        return {"n": len(raws), "elapsed": elapsed, "log_length": self.node.log_length(),
                "cpu": {k: cpu1[k] - cpu0[k] for k in cpu0}, "stats": self._stats()}

    def _bus_stats(self) -> dict[str, Any]:
        bus = self.node.network.bus.stats
        return {"bus": {"messages_in": bus["messages_in"], "messages_out": bus["messages_out"],
                        "bytes_in": bus["bytes_in"], "dropped": bus["dropped"],
                        "peers": {nid.hex(): dict(s) for nid, s in bus["peers"].items()}}}

    def op_profile(self, req: dict[str, Any]) -> dict[str, Any]:
        if not self.profiles:
            return {"rows": [], "calls": 0}
        stats = pstats.Stats(*self.profiles.values())
        per = max(1, int(req.get("per", 1)))
        rows = []
        for (filename, line, func), (_cc, calls, tt, ct, _c) in stats.stats.items():  # type: ignore[attr-defined]
            rows.append({"function": _common._short_func(filename, line, func),
                         "calls_per_op": round(calls / per, 3),
                         "own_us_per_op": round(tt * 1e6 / per, 2),
                         "cum_us_per_op": round(ct * 1e6 / per, 2)})
        rows.sort(key=lambda r: -r["own_us_per_op"])
        return {"rows": rows[: int(req.get("top", 25))],
                "total_s": round(sum(r[2] for r in stats.stats.values()), 3)}  # type: ignore[attr-defined]


def _load(path: str) -> list[bytes]:
    with open(path, "rb") as fh:
        raws: list[bytes] = msgpack.unpackb(fh.read(), raw=False)
        return raws


def main() -> int:
    parser = argparse.ArgumentParser(description="raw pyzmq publisher of bench_network "
                                                 "(private); the peers are dmodel peer "
                                                 "processes with --commands "
                                                 "benchmarks/_peer.py:BenchCommands")
    parser.add_argument("--zmq-pub", required=True, help="the SUB endpoint to connect to")
    parser.add_argument("--count", type=int, default=0)
    parser.add_argument("--size", type=int, default=250)
    parser.add_argument("--rate", type=float, default=0.0, help="messages/s (0: flat out)")
    args = parser.parse_args()
    return zmq_pub(args.zmq_pub, args.count, args.size, args.rate)


if __name__ == "__main__":
    sys.exit(main())
