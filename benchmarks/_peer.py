"""A benchmark peer: one dmodel Node in its own process, driven over stdin/stdout.

Private to ``bench_network.py`` (not a benchmark, not a tool). Started as::

    python benchmarks/_peer.py --home DIR [--listen EP] [--peers EP,EP] [--options JSON]

it starts ``dmodel.Node(home, listen=..., peers=[...], network_options=...)`` and
prints its ROUTER endpoint as the first line on stdout. Then it reads one JSON
request per line on stdin (``{"op": ..., ...}``) and answers each with one JSON line:
``{"ok": true, ...}`` or ``{"ok": false, "error": "..."}``. Logging goes to stderr.

Every update this node stores from a peer (``local=False``) after the last ``mark``
is counted, with the wall-clock time (``time.time_ns``) of the first and the last,
so the parent can compute apply rates across processes (one machine, one clock).

With ``DMODEL_BENCH_PROFILE=1`` every call of ``node.ingest_many`` (apply thread,
sync thread) runs under a per-thread cProfile; ``{"op": "profile"}`` returns the top
functions by own time.

``--zmq-pub ENDPOINT --count N --size S`` is a second mode, for the raw pyzmq
reference: a PUB socket connects to ENDPOINT, sends tiny warm-up messages until
``go`` arrives on stdin, then N messages of S bytes and an end marker.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import logging
import os
import pstats
import select
import sys
import threading
import time
from pathlib import Path
from typing import Any

import msgpack

# -------------------------------------------------------------- raw pyzmq mode


def zmq_pub(endpoint: str, count: int, size: int) -> int:
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
        for _ in range(count):
            send(payload)
        for _ in range(100):  # the end marker, a few times (a SUB may drop at HWM)
            send(b"e")
    sock.close()
    ctx.term()
    return 0 if go else 1


# ------------------------------------------------------------------ node mode


class Recorder:
    """Counts updates from peers stored after ``mark()``; first/last time_ns."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
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
            if self.count % self.stride == 0:
                self.ticks.append(now)

    def as_dict(self) -> dict[str, Any]:
        with self.lock:
            return {"count": self.count, "first_ns": self.first_ns, "last_ns": self.last_ns,
                    "stride": self.stride, "ticks": list(self.ticks)}


class ThreadCPU:
    """CPU seconds spent inside ``node.ingest_many`` (per calling thread, summed)."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.lock = threading.Lock()


class Peer:
    def __init__(self, args: argparse.Namespace) -> None:
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
        peers = [p for p in args.peers.split(",") if p]
        options = json.loads(args.options) if args.options else {}
        self.node = dmodel.Node(args.home, listen=args.listen or "", peers=peers,
                                discovery=False, redis_url="", network_options=options)
        self.started_ns = time.time_ns()
        self.recorder = Recorder()
        self.node.on_accepted(self.recorder)
        self.apply_cpu = ThreadCPU()
        self.profiles: dict[int, cProfile.Profile] = {}
        self._wrap_ingest(profile=os.environ.get("DMODEL_BENCH_PROFILE") == "1")
        self.objects: list[Any] = []

    def _wrap_ingest(self, *, profile: bool) -> None:
        original = self.node.ingest_many
        cpu, profiles = self.apply_cpu, self.profiles

        def ingest_many(raws: Any) -> Any:
            start = time.thread_time()
            prof = None
            if profile:
                prof = profiles.setdefault(threading.get_ident(), cProfile.Profile())
                prof.enable()
            try:
                return original(raws)
            finally:
                if prof is not None:
                    prof.disable()
                spent = time.thread_time() - start
                with cpu.lock:
                    cpu.seconds += spent

        self.node.ingest_many = ingest_many  # type: ignore[method-assign]

    @property
    def endpoint(self) -> str:
        return self.node.network.endpoint or ""

    def redis_cpu(self) -> float:
        info = self.node.store.client.info("cpu")
        return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])

    def cpu(self) -> dict[str, float]:
        with self.apply_cpu.lock:
            apply = self.apply_cpu.seconds
        return {"process": time.process_time(), "apply_thread": apply,
                "redis": self.redis_cpu()}

    # ------------------------------------------------------------- commands
    def op_ping(self, req: dict[str, Any]) -> dict[str, Any]:
        return {"endpoint": self.endpoint, "node_id": self.node.node_id.hex(),
                "pid": os.getpid(), "started_ns": self.started_ns}

    def op_wait_peers(self, req: dict[str, Any]) -> dict[str, Any]:
        ready = self.node.network.wait_for_peers(int(req.get("n", 1)),
                                                  float(req.get("timeout", 10)))
        return {"ready": ready, "peers": sum(p.ready for p in
                                             self.node.network.peers().values())}

    def op_create(self, req: dict[str, Any]) -> dict[str, Any]:
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
        target, timeout = int(req["target"]), float(req.get("timeout", 60))
        start = time.monotonic()
        length = self.node.log_length()
        while length < target and time.monotonic() - start < timeout:
            time.sleep(0.01)
            length = self.node.log_length()
        return {"reached": length >= target, "log_length": length,
                "waited": time.monotonic() - start, "applied": self.recorder.as_dict(),
                "cpu": self.cpu(), "stats": self._stats()}

    def op_listen_latency(self, req: dict[str, Any]) -> dict[str, Any]:
        listener = self.latency_cls()
        listener.apply(f"{self.model.__name__}:*", node=self.node)
        self.listeners.append((listener, f"{self.model.__name__}:*"))
        return {}

    def op_latencies(self, req: dict[str, Any]) -> dict[str, Any]:
        samples = [s for lst, _ in self.listeners if isinstance(lst, self.latency_cls)
                   for s in lst.samples]
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
        return {}

    def op_deaf(self, req: dict[str, Any]) -> dict[str, Any]:
        """Discard whatever peers send (a pure publisher: it stores nothing from them)."""
        self.node.ingest_many = lambda raws: [None] * len(list(raws))  # type: ignore[method-assign]
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

    def op_stats(self, req: dict[str, Any]) -> dict[str, Any]:
        return {"stats": self._stats(), "cpu": self.cpu()}

    def _stats(self) -> dict[str, Any]:
        net = self.node.network
        bus = net.bus.stats
        return {"node": self.node.stats.as_dict(), "network": dict(net.stats),
                "bus": {"messages_in": bus["messages_in"], "messages_out": bus["messages_out"],
                        "bytes_in": bus["bytes_in"], "dropped": bus["dropped"],
                        "peers": {nid.hex(): dict(s) for nid, s in bus["peers"].items()}},
                "log_length": self.node.log_length(), "pending": self.node.pending_count,
                "queue": net._queue.qsize()}

    def op_profile(self, req: dict[str, Any]) -> dict[str, Any]:
        if not self.profiles:
            return {"rows": [], "calls": 0}
        import _common  # the benchmarks folder is on sys.path (this script lives there)

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

    def close(self) -> None:
        self.node.shutdown()


def _load(path: str) -> list[bytes]:
    with open(path, "rb") as fh:
        return msgpack.unpackb(fh.read(), raw=False)


def serve(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s peer %(name)s %(levelname)s %(message)s")
    peer = Peer(args)
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
                logging.getLogger("peer").exception("request failed")
                answer = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
            out.write(json.dumps(answer) + "\n")
            out.flush()
    finally:
        peer.close()
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description="dmodel benchmark peer (private)")
    parser.add_argument("--home", type=Path)
    parser.add_argument("--listen", default="tcp://127.0.0.1:*")
    parser.add_argument("--peers", default="")
    parser.add_argument("--options", default="", help="network_options as JSON")
    parser.add_argument("--zmq-pub", default="", help="raw pyzmq PUB mode: SUB endpoint")
    parser.add_argument("--count", type=int, default=0)
    parser.add_argument("--size", type=int, default=250)
    args = parser.parse_args()
    if args.zmq_pub:
        return zmq_pub(args.zmq_pub, args.count, args.size)
    if args.home is None:
        parser.error("--home is required")
    return serve(args)


if __name__ == "__main__":
    sys.exit(main())
