"""Convergence benchmark: concurrent writers, DList operations, replicated transactions.

What is measured, in one run:

1. Concurrent writers. Three peers, each its own process (``benchmarks/_conv_peer.py``:
   one ``dmodel.Node`` with its own embedded Redis), meshed over ZeroMQ on
   tcp://127.0.0.1. Peer A creates 100 objects whose update-authorized set names the
   writer objects of B and C, so every write is authorized. Then all three write at
   once, as fast as they can, for ``--seconds`` (30 s; 3 s with ``--quick``): random
   objects, a mix of field sets, field deletes, DList appends and DList inserts at a
   random index, one signed update each. When the writers stop, every peer's state
   digest (objects, registers, authorization events, DList orders) is taken
   repeatedly until the three are equal, within a bounded wait: the time to
   convergence, and whether the digests are identical. The sets of stored update ids
   are compared too, but only reported: under the default bounded retention each
   peer keeps the superseded versions its arrival order left, so they differ.
2. DList, one node in this process, no network: append and insert at a random index
   on lists of 10 and of 10,000 elements (the list is built first). Every operation
   is timed alone and followed by an untimed delete of the element it added, so the
   list keeps its size. µs per op for both sizes and the ratio; the aim is growth
   per operation no worse than logarithmic (ratio <= log(10,000) / log(10) = 4).
3. Transactions of 100 field changes replicated A -> B: (a) two peer processes over
   ZeroMQ, A writing, field changes per second applied at B; (b) two nodes in this
   process, A's ``with obj.transaction():`` then ``B.ingest(raw)``, one after the other
   (sign, store, verify, store); next to pycrdt in the same run: a ``Doc`` with a
   ``Map``, 100 changes per transaction, replicated with ``A.get_update(B.get_state())``
   and ``B.apply_update`` (c), and with the incremental update of each transaction
   from ``A.observe`` (d). Same number of transactions for every figure.

Run (from the repository root)::

    .venv/bin/python benchmarks/bench_convergence.py            # full run (~3 min, 2 cores)
    .venv/bin/python benchmarks/bench_convergence.py --quick    # smoke run (~20 s)

Results go to ``benchmarks/results/bench_convergence.json`` (git-ignored) unless
``--json`` says otherwise. Progress goes to stderr, the report to stdout.
"""

from __future__ import annotations

import argparse
import math
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import _common as common
from _children import Cluster, PeerError, ask_all, wait_connected
from _common import log

import dmodel

PEER_SCRIPT = Path(__file__).resolve().parent / "_conv_peer.py"
COMMANDS = f"{PEER_SCRIPT}:ConvCommands"  # dmodel peer --commands
WIDE_FIELDS = 100  # field changes per transaction (the width of _conv_peer's ConvWide)
DLIST_CHUNK = 25  # DList ops per list before switching to the other size

# Aims stated for the project (checked and reported, never enforced).
AIM_TX_VS_PYCRDT = 1.0  # replicated field changes/s >= pycrdt's, while signing and verifying


# ------------------------------------------------------ 1. concurrent writers


def phase_concurrent(tmp: Path, seconds: float, objects: int,
                     converge_timeout: float) -> dict[str, Any]:
    with Cluster(tmp, COMMANDS) as cl:
        a = cl.spawn("conv-a")
        b = cl.spawn("conv-b", peers=[a.endpoint])
        c = cl.spawn("conv-c", peers=[a.endpoint, b.endpoint])
        peers = [a, b, c]
        wait_connected(peers, 2, 30)
        writers = [b.ok("create_writer")["db_id"], c.ok("create_writer")["db_id"]]
        if not a.ok("wait_objects", ids=writers, timeout=30)["reached"]:
            raise PeerError("A did not get the writer objects of B and C")
        ids = a.ok("create_items", count=objects, update=writers, timeout=60)["ids"]
        for p in (b, c):
            if not p.ok("wait_objects", ids=ids, timeout=60)["reached"]:
                raise PeerError(f"{p.name} did not get A's {objects} objects")
        setup = ask_all(peers, "conv_digest")
        log(f"  concurrent: 3 peers write to the same {objects} objects for {seconds:g} s")
        start_ns = time.time_ns() + 500_000_000
        rids = [p.send("write_for", ids=ids, seconds=seconds, seed=1000 + i, tag=p.name[-1],
                       start_ns=start_ns) for i, p in enumerate(peers)]
        wrote = [p.check(p.recv(rid, seconds + 120), "write_for")
                 for p, rid in zip(peers, rids, strict=True)]
        stop_ns = max(w["last_ns"] for w in wrote)
        written = sum(w["written"] for w in wrote)
        log(f"    written {written:,} updates ("
            + ", ".join(f"{p.name[-1].upper()} {w['written']:,}" for p, w in
                        zip(peers, wrote, strict=True)) + "); waiting for convergence")
        rounds: list[dict[str, Any]] = []
        converged = None
        logs_equal_s = None
        deadline = time.monotonic() + converge_timeout
        while True:  # bounded by converge_timeout
            digests = ask_all(peers, "conv_digest", timeout=converge_timeout + 60)
            at = (max(d["taken_ns"] for d in digests) - stop_ns) / 1e9
            same_updates = len({d["updates"] for d in digests}) == 1
            same_state = len({d["state"] for d in digests}) == 1
            rounds.append({"after_s": round(at, 3),
                           "update_counts": [d["update_count"] for d in digests],
                           "same_updates": same_updates, "same_state": same_state,
                           "queues": [d["stats"]["queue"] for d in digests],
                           "lock_wait_seconds": [d["lock_wait_seconds"] for d in digests],
                           "digest_seconds": [d["seconds"] for d in digests]})
            if same_updates and logs_equal_s is None:
                logs_equal_s = at
            if same_state:
                converged = digests
                break
            if time.monotonic() > deadline:
                break
            time.sleep(0.05)
        final = digests
        stats = [d["stats"] for d in final]
    expected = len(writers) + objects + written
    out: dict[str, Any] = {
        "peers": 3, "objects": objects, "seconds": seconds,
        "mix": {"set n": 0.60, "set m": 0.20, "delete m": 0.05, "DList append": 0.10,
                "DList insert at random index": 0.05},
        "written_per_peer": {p.name[-1].upper(): w["written"] for p, w in
                             zip(peers, wrote, strict=True)},
        "counts_per_peer": {p.name[-1].upper(): w["counts"] for p, w in
                            zip(peers, wrote, strict=True)},
        "errors_per_peer": {p.name[-1].upper(): w["errors"] for p, w in
                            zip(peers, wrote, strict=True)},
        "write_seconds_per_peer": [round(w["elapsed"], 3) for w in wrote],
        "rate_per_peer": [round(w["written"] / w["elapsed"], 1) if w["elapsed"] else 0.0
                          for w in wrote],
        "written_total": written,
        "total_updates_per_s": round(written / max(w["elapsed"] for w in wrote), 1),
        "write_latency_per_peer": [w["write_ms"] for w in wrote],
        "remote_applied_while_writing": [w["remote_applied"] for w in wrote],
        "cpu_seconds_while_writing": [{k: round(v, 2) for k, v in w["cpu"].items()}
                                      for w in wrote],
        "cpu_us_per_update_per_peer": [common.cpu_us(w["cpu"], w["written"]
                                                     + w["remote_applied"]) for w in wrote],
        "cpu_us_per_written_update_all_peers": round(sum(
            common.cpu_us(w["cpu"], 1) for w in wrote) / max(1, written), 1),
        "converged": converged is not None,
        "convergence_seconds": rounds[-1]["after_s"] if converged else None,
        "convergence_seconds_lower_bound": (rounds[-2]["after_s"] if converged and
                                            len(rounds) > 1 else 0.0),
        "first_digest_lock_wait_seconds": rounds[0]["lock_wait_seconds"],
        "same_update_set_seconds": logs_equal_s,
        "convergence_timeout": converge_timeout,
        "digests_identical": converged is not None,
        "digests": [{k: d[k] for k in ("state", "updates", "objects", "update_count")}
                    for d in final],
        "expected_update_count": expected,
        "all_updates_everywhere": all(d["update_count"] == expected for d in final),
        "digest_rounds": len(rounds),
        "rounds": rounds[:5] + (rounds[-5:] if len(rounds) > 10 else rounds[5:]),
        "setup_update_count": setup[0]["update_count"],
        "peer_stats": [{"received": s["network"]["received"],
                        "queue_dropped": s["network"]["queue_dropped"],
                        "pulled": s["network"]["pulled"],
                        "duplicates": s["node"]["duplicates"],
                        "rejected": s["node"]["rejected"], "dropped": s["node"]["dropped"],
                        "equivocations": s["node"]["equivocations"],
                        "recomputed": s["node"]["recomputed"], "pending": s["pending"]}
                       for s in stats],
    }
    if converged:
        log(f"    converged {out['convergence_seconds']:.2f} s after the writers stopped "
            f"({len(rounds)} digest rounds); digests identical")
    else:
        log(f"    NOT converged within {converge_timeout:g} s")
    return out


# ------------------------------------------------------------------ 2. DList


class ConvList(dmodel.DModel):
    items = dmodel.DList("items")


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def build_list(node: dmodel.Node, size: int) -> tuple[Any, dict[str, Any]]:
    """A new object whose DList holds ``size`` elements, appended one by one."""
    lst = ConvList([], node=node).items
    start = time.perf_counter()
    for i in range(size):
        lst.append(i)
    secs = time.perf_counter() - start
    return lst, {"size": size, "build_seconds": round(secs, 3),
                 "build_appends_per_s": round(size / secs, 1) if secs else 0.0}


def list_ops(node: dmodel.Node, lists: dict[int, Any], n: int,
             seed: int) -> dict[int, dict[str, Any]]:
    """``n`` appends, then ``n`` inserts at random indexes, on every list, interleaved.

    Chunks of ``DLIST_CHUNK`` ops run on each list in turn, so slow drift of the machine
    is shared by the sizes. Each op is timed alone (wall and process CPU), then the
    element it added is deleted (untimed), so every list keeps its size; the
    redis-server's CPU is read around each chunk (so it includes the deletes).
    """
    rng = random.Random(seed)
    client = node.store.client
    out: dict[int, dict[str, Any]] = {size: {} for size in lists}
    for kind in ("append", "insert"):
        wall: dict[int, list[float]] = {size: [] for size in lists}
        cpu: dict[int, list[float]] = {size: [] for size in lists}
        server: dict[int, float] = {size: 0.0 for size in lists}
        for start in range(0, n, DLIST_CHUNK):
            for size, lst in lists.items():
                srv0 = common.redis_cpu_seconds(client)
                for i in range(start, min(n, start + DLIST_CHUNK)):
                    index = size if kind == "append" else rng.randint(0, size)
                    c0, t0 = common.cpu_seconds(), time.perf_counter()
                    if kind == "append":
                        lst.append(-i)
                    else:
                        lst.insert(index, -i)
                    wall[size].append(time.perf_counter() - t0)
                    cpu[size].append(common.cpu_seconds() - c0)
                    lst.delete(index)  # untimed: the list keeps its size
                server[size] += common.redis_cpu_seconds(client) - srv0
        for size in lists:
            w, c = wall[size], cpu[size]
            out[size][kind] = {"us_per_op": round(statistics.mean(w) * 1e6, 1),
                               "median_us": round(statistics.median(w) * 1e6, 1),
                               "p90_us": round(_percentile(w, 0.9) * 1e6, 1),
                               "cpu_us_per_op": round(statistics.mean(c) * 1e6, 1),
                               "server_cpu_us_per_op_and_delete":
                                   round(server[size] * 1e6 / n, 1),
                               "ops_per_s": round(n / sum(w), 1)}
    for size, lst in lists.items():
        if lst.length() != size:
            raise RuntimeError(f"list of {size} has {lst.length()} elements after the run")
        keys = node.store.list_keys_range(lst.obj.db_id, "items", 0, -1)
        lengths = [len(k) - 35 for k in keys]  # order key = position + 0x00 + element id
        out[size]["position_bytes"] = {"mean": round(statistics.mean(lengths), 1),
                                       "max": max(lengths)}
    return out


def phase_dlist(tmp: Path, small: int, large: int, n: int) -> dict[str, Any]:
    node = dmodel.Node(tmp / "dlist", listen="", peers=[], discovery=False, redis_url="")
    try:
        warm = ConvList([], node=node)
        for i in range(50):  # warm the write path and the script cache
            warm.items.append(i)
        log(f"  DList: building lists of {small:,} and {large:,} elements")
        lists, builds = {}, {}
        for size in (small, large):
            lists[size], builds[size] = build_list(node, size)
        log(f"  DList: {n:,} appends and {n:,} inserts at random indexes on each, interleaved")
        timed_ops = list_ops(node, lists, n, seed=7)
        res = {str(size): {**builds[size], "n": n, **timed_ops[size]} for size in lists}
    finally:
        node.shutdown()
    s, la = res[str(small)], res[str(large)]
    bound = math.log(large) / math.log(small)
    out: dict[str, Any] = {"sizes": [small, large], "n": n, "results": res,
                           "log_bound": round(bound, 3)}
    for kind in ("append", "insert"):
        mean_ratio = la[kind]["us_per_op"] / s[kind]["us_per_op"]
        median_ratio = la[kind]["median_us"] / s[kind]["median_us"]
        out[f"{kind}_ratio"] = round(mean_ratio, 3)
        out[f"{kind}_median_ratio"] = round(median_ratio, 3)
        out[f"{kind}_cpu_ratio"] = round(la[kind]["cpu_us_per_op"] / s[kind]["cpu_us_per_op"],
                                         3)
        out[f"{kind}_within_log"] = median_ratio <= bound
    return out


# ------------------------------------------------------------ 3. transactions


def _rate_windows(per_tx: list[float], changes: int) -> dict[str, float]:
    """Changes/s over all, the first tenth and the last tenth of the transactions."""
    k = max(1, len(per_tx) // 10)
    total = sum(per_tx)
    return {"changes_per_s": round(len(per_tx) * changes / total, 1) if total else 0.0,
            "first_tenth_changes_per_s": round(k * changes / sum(per_tx[:k]), 1),
            "last_tenth_changes_per_s": round(k * changes / sum(per_tx[-k:]), 1)}


def _chunk_rates(per_tx: list[float], sizes: list[int], changes: int) -> list[float]:
    """Changes/s of every chunk of transactions (``sizes`` transactions each)."""
    out, at = [], 0
    for k in sizes:
        secs = sum(per_tx[at:at + k])
        out.append(k * changes / secs if secs else 0.0)
        at += k
    return out


class NetworkTx:
    """3a: two peer processes, B with ``peers=[A]``; A writes transactions, B applies."""

    def __init__(self, cl: Cluster) -> None:
        self.a = a = cl.spawn("tx-a")
        self.b = b = cl.spawn("tx-b", peers=[a.endpoint])
        wait_connected([a, b], 1, 30)
        created = a.ok("create_wide")
        if not b.ok("wait_objects", ids=[created["db_id"]], timeout=30)["reached"]:
            raise PeerError("B did not get A's object")
        self.db_id = created["db_id"]
        self.base = created["log_length"]
        self.written = 0
        self.chunks: list[dict[str, Any]] = []

    def run(self, k: int) -> None:
        """``k`` more transactions at A; wait until B has them."""
        mark = self.b.ok("mark")
        wrote = self.a.ok("tx_write", n=k, start=self.written, timeout=60 + k / 5)
        self.written += k
        done = self.b.ok("wait_log", target=self.base + self.written, timeout=60 + k / 5)
        app = done["applied"]
        self.chunks.append({
            "n": k, "complete": done["reached"], "a_elapsed": wrote["elapsed"],
            "a_first_ns": wrote["first_ns"], "b_first_ns": app["first_ns"],
            "b_last_ns": app["last_ns"], "b_count": app["count"],
            "a_cpu": wrote["cpu"],
            "b_cpu": {key: done["cpu"][key] - mark["cpu"][key] for key in mark["cpu"]}})

    def result(self) -> dict[str, Any]:
        n, ch = self.written, self.chunks
        values = self.b.ok("read_wide", db_id=self.db_id)["values"]
        changes = n * WIDE_FIELDS
        b_secs = sum((c["b_last_ns"] - c["b_first_ns"]) / 1e9 for c in ch)
        b_counted = sum(c["b_count"] - 1 for c in ch)
        e2e = sum((c["b_last_ns"] - c["a_first_ns"]) / 1e9 for c in ch)
        a_cpu = {key: sum(c["a_cpu"][key] for c in ch) for key in ch[0]["a_cpu"]}
        b_cpu = {key: sum(c["b_cpu"][key] for c in ch) for key in ch[0]["b_cpu"]}
        chunk_rates = [(c["b_count"] - 1) * WIDE_FIELDS / ((c["b_last_ns"] - c["b_first_ns"])
                                                          / 1e9)
                       if c["b_last_ns"] > c["b_first_ns"] else 0.0 for c in ch]
        return {
            "transactions": n, "changes": changes, "chunks": len(ch),
            "complete": all(c["complete"] for c in ch),
            "b_has_last_values": values == [n * WIDE_FIELDS + k for k in range(WIDE_FIELDS)],
            "a_changes_per_s": round(changes / sum(c["a_elapsed"] for c in ch), 1),
            "a_cpu_us_per_tx": {k: round(v * 1e6 / n, 1) for k, v in a_cpu.items()},
            "b_changes_per_s": round(b_counted * WIDE_FIELDS / b_secs, 1) if b_secs > 0
            else 0.0,
            "b_cpu_us_per_tx": {k: round(v * 1e6 / n, 1) for k, v in b_cpu.items()},
            "b_total_cpu_us_per_tx": common.cpu_us(b_cpu, n),
            "a_total_cpu_us_per_tx": common.cpu_us(a_cpu, n),
            "end_to_end_changes_per_s": round(changes / e2e, 1) if e2e > 0 else 0.0,
            "end_to_end_seconds": round(e2e, 3),
            "b_chunk_changes_per_s": [round(r, 1) for r in chunk_rates],
        }


class InProcessTx:
    """3b: two nodes here, A's transaction, then ``B.ingest`` of its signed update."""

    def __init__(self, tmp: Path) -> None:
        wide = {f"f{k}": dmodel.DField(f"f{k}", False) for k in range(WIDE_FIELDS)}
        self.model = type("ConvWide", (dmodel.DModel,), wide)
        self.a = dmodel.Node(tmp / "tx-in-a", listen="", peers=[], discovery=False,
                             redis_url="")
        self.b = dmodel.Node(tmp / "tx-in-b", listen="", peers=[], discovery=False,
                             redis_url="")
        self.raws: list[bytes] = []
        self.a.on_accepted(lambda update, local: self.raws.append(update.raw))
        self.obj = self.model([], node=self.a)
        for raw in self.a.updates_since(0):
            self.b.ingest(raw)
        self.names = [f"f{k}" for k in range(WIDE_FIELDS)]
        self.a_times: list[float] = []
        self.b_times: list[float] = []
        self.rejected = 0
        self.cpu = self.server_cpu = 0.0
        self.update_bytes = 0

    def run(self, k: int) -> None:
        obj, names, a, b = self.obj, self.names, self.a, self.b
        with common.CpuMeter([a.store.client, b.store.client]) as meter:
            for _ in range(k):
                base = (len(self.a_times) + 1) * WIDE_FIELDS
                self.raws.clear()
                t0 = time.perf_counter()
                with obj.transaction():
                    for i, name in enumerate(names):
                        setattr(obj, name, base + i)
                t1 = time.perf_counter()
                decision = b.ingest(self.raws[0])
                t2 = time.perf_counter()
                if decision is None or decision.verdict != "accepted":
                    self.rejected += 1
                self.a_times.append(t1 - t0)
                self.b_times.append(t2 - t1)
        self.cpu += meter.cpu
        self.server_cpu += meter.server
        self.update_bytes = len(self.raws[0])

    def result(self, sizes: list[int]) -> dict[str, Any]:
        n = len(self.a_times)
        last = [self.b.read(self.obj.db_id, name) for name in self.names]
        both = [x + y for x, y in zip(self.a_times, self.b_times, strict=True)]
        return {"transactions": n, "changes": n * WIDE_FIELDS, "rejected_at_b": self.rejected,
                "b_has_last_values": last == [n * WIDE_FIELDS + k for k in range(WIDE_FIELDS)],
                "update_bytes": self.update_bytes,
                "a_write_us_per_tx": round(statistics.mean(self.a_times) * 1e6, 1),
                "b_apply_us_per_tx": round(statistics.mean(self.b_times) * 1e6, 1),
                "cpu_us_per_tx": round(self.cpu * 1e6 / n, 1),
                "server_cpu_us_per_tx": round(self.server_cpu * 1e6 / n, 1),
                "total_cpu_us_per_tx": round((self.cpu + self.server_cpu) * 1e6 / n, 1),
                "b_apply_changes_per_s": round(n * WIDE_FIELDS / sum(self.b_times), 1),
                "chunk_changes_per_s": [round(r, 1) for r in
                                        _chunk_rates(both, sizes, WIDE_FIELDS)],
                **_rate_windows(both, WIDE_FIELDS)}

    def close(self) -> None:
        self.a.shutdown()
        self.b.shutdown()


class PycrdtTx:
    """3c/3d: pycrdt Doc A with a Map, 100 changes per transaction, replicated to Doc B."""

    def __init__(self, *, observe: bool) -> None:
        import pycrdt

        self.observe = observe
        self.doc_a, self.doc_b = pycrdt.Doc(), pycrdt.Doc()
        self.map_a = self.doc_a.get("m", type=pycrdt.Map)
        self.map_b = self.doc_b.get("m", type=pycrdt.Map)
        self.keys = [f"f{k}" for k in range(WIDE_FIELDS)]
        self.pending: list[bytes] = []
        self.sub = self.doc_a.observe(lambda event: self.pending.append(event.update)) \
            if observe else None
        self.a_times: list[float] = []
        self.b_times: list[float] = []
        self.size = 0
        self.cpu = 0.0

    def run(self, k: int) -> None:
        doc_a, doc_b, map_a, keys = self.doc_a, self.doc_b, self.map_a, self.keys
        cpu0 = common.cpu_seconds()
        for _ in range(k):
            base = (len(self.a_times) + 1) * WIDE_FIELDS
            t0 = time.perf_counter()
            if self.observe:
                with doc_a.transaction():
                    for i, key in enumerate(keys):
                        map_a[key] = base + i
                update = self.pending.pop()
            else:
                state = doc_b.get_state()
                with doc_a.transaction():
                    for i, key in enumerate(keys):
                        map_a[key] = base + i
                update = doc_a.get_update(state)
            t1 = time.perf_counter()
            doc_b.apply_update(update)
            t2 = time.perf_counter()
            self.size = len(update)
            self.a_times.append(t1 - t0)
            self.b_times.append(t2 - t1)
        self.cpu += common.cpu_seconds() - cpu0

    def result(self, sizes: list[int]) -> dict[str, Any]:
        if self.sub is not None:
            self.doc_a.unobserve(self.sub)
        n = len(self.a_times)
        last = [self.map_b[key] for key in self.keys]
        both = [x + y for x, y in zip(self.a_times, self.b_times, strict=True)]
        return {"transactions": n, "changes": n * WIDE_FIELDS,
                "method": "A.observe -> event.update" if self.observe
                else "A.get_update(B.get_state())",
                "b_has_last_values": last == [n * WIDE_FIELDS + k for k in range(WIDE_FIELDS)],
                "update_bytes": self.size,
                "a_encode_us_per_tx": round(statistics.mean(self.a_times) * 1e6, 1),
                "b_apply_us_per_tx": round(statistics.mean(self.b_times) * 1e6, 1),
                "cpu_us_per_tx": round(self.cpu * 1e6 / n, 1),
                "total_cpu_us_per_tx": round(self.cpu * 1e6 / n, 1),
                "b_apply_changes_per_s": round(n * WIDE_FIELDS / sum(self.b_times), 1),
                "chunk_changes_per_s": [round(r, 1) for r in
                                        _chunk_rates(both, sizes, WIDE_FIELDS)],
                **_rate_windows(both, WIDE_FIELDS)}


def phase_tx(tmp: Path, n: int, chunks: int = 10) -> dict[str, Any]:
    """All four figures, interleaved by chunks of n/10 transactions (network, in-process,
    pycrdt get_update, pycrdt observe, then again), so each chunk's ratios compare
    figures measured back to back; every document and node keeps growing across chunks."""
    sizes = [n // chunks + (1 if i < n % chunks else 0) for i in range(chunks)]
    sizes = [k for k in sizes if k]
    log(f"  transactions: {n:,} x {WIDE_FIELDS} field changes, in {len(sizes)} interleaved "
        "chunks: A -> B over ZeroMQ, in-process A -> B, pycrdt get_update, pycrdt observe")
    inproc = InProcessTx(tmp)
    try:
        with Cluster(tmp, COMMANDS) as cl:
            net = NetworkTx(cl)
            crdt, crdt_obs = PycrdtTx(observe=False), PycrdtTx(observe=True)
            for k in sizes:
                net.run(k)
                inproc.run(k)
                crdt.run(k)
                crdt_obs.run(k)
            net_res = net.result()
        inp = inproc.result(sizes)
    finally:
        inproc.close()
    ref, ref_obs = crdt.result(sizes), crdt_obs.result(sizes)
    log(f"    B applied {net_res['b_changes_per_s']:,.0f} changes/s; in-process "
        f"{inp['changes_per_s']:,.0f}; pycrdt {ref['changes_per_s']:,.0f} / "
        f"{ref_obs['changes_per_s']:,.0f}")

    def chunked(a: list[float], b: list[float]) -> float:
        return round(common.median_ratio(a, b) or 0.0, 4)

    inp_ch, net_ch = inp["chunk_changes_per_s"], net_res["b_chunk_changes_per_s"]
    ref_ch, obs_ch = ref["chunk_changes_per_s"], ref_obs["chunk_changes_per_s"]
    return {"network": net_res, "in_process": inp, "pycrdt_get_update": ref,
            "pycrdt_observe": ref_obs, "chunks": sizes,
            "ratios": {
                "in_process_vs_pycrdt_get_update": chunked(inp_ch, ref_ch),
                "in_process_vs_pycrdt_observe": chunked(inp_ch, obs_ch),
                "network_b_vs_pycrdt_get_update": chunked(net_ch, ref_ch),
                "network_b_vs_pycrdt_observe": chunked(net_ch, obs_ch),
                "network_end_to_end_vs_pycrdt_get_update":
                    round(net_res["end_to_end_changes_per_s"] / ref["changes_per_s"], 4),
                "in_process_vs_pycrdt_get_update_first_tenth":
                    round(inp_ch[0] / ref_ch[0], 4),
                "in_process_vs_pycrdt_get_update_last_tenth":
                    round(inp_ch[-1] / ref_ch[-1], 4),
            },
            "cpu_ratios": {  # pycrdt's CPU per transaction / dmodel's (above 1: cheaper)
                "in_process_vs_pycrdt_get_update":
                    round(ref["total_cpu_us_per_tx"] / inp["total_cpu_us_per_tx"], 4),
                "in_process_vs_pycrdt_observe":
                    round(ref_obs["total_cpu_us_per_tx"] / inp["total_cpu_us_per_tx"], 4),
                "network_a_plus_b_vs_pycrdt_get_update":
                    round(ref["total_cpu_us_per_tx"] / (net_res["a_total_cpu_us_per_tx"]
                                                        + net_res["b_total_cpu_us_per_tx"]), 4),
            },
            "runs_ratios": {
                "in_process_vs_pycrdt_get_update": [round(x / y, 4) for x, y in
                                                    zip(inp_ch, ref_ch, strict=True) if y],
                "network_b_vs_pycrdt_get_update": [round(x / y, 4) for x, y in
                                                   zip(net_ch, ref_ch, strict=True) if y]}}


# ------------------------------------------------------------------ report


def build_aims(res: dict[str, Any]) -> list[dict[str, Any]]:
    aims = []
    conv = res["concurrent"]
    aims.append({"aim": "3 concurrent writers: identical state digests after they stop",
                 "ratio": conv["convergence_seconds"], "unit": "s to converge",
                 "target": conv["convergence_timeout"],
                 "met": conv["digests_identical"]})
    dl = res["dlist"]
    for kind in ("append", "insert"):
        aims.append({"aim": f"DList {kind}: µs/op at {dl['sizes'][1]:,} vs {dl['sizes'][0]:,} "
                            f"elements no worse than logarithmic (<= {dl['log_bound']:.1f}x)",
                     "ratio": dl[f"{kind}_median_ratio"], "target": dl["log_bound"],
                     "met": dl[f"{kind}_within_log"]})
    tx = res["transactions"]["ratios"]
    aims.append({"aim": "replicated 100-change transactions (sign+verify, in-process) >= "
                        "pycrdt get_update/apply_update",
                 "ratio": tx["in_process_vs_pycrdt_get_update"], "target": AIM_TX_VS_PYCRDT,
                 "met": tx["in_process_vs_pycrdt_get_update"] >= AIM_TX_VS_PYCRDT})
    aims.append({"aim": "changes/s applied at B over ZeroMQ >= pycrdt get_update/apply_update",
                 "ratio": tx["network_b_vs_pycrdt_get_update"], "target": AIM_TX_VS_PYCRDT,
                 "met": tx["network_b_vs_pycrdt_get_update"] >= AIM_TX_VS_PYCRDT})
    aims.append({"aim": "same, on the first tenth of the transactions (pycrdt's document "
                        "still short)",
                 "ratio": tx["in_process_vs_pycrdt_get_update_first_tenth"],
                 "target": AIM_TX_VS_PYCRDT,
                 "met": tx["in_process_vs_pycrdt_get_update_first_tenth"] >= AIM_TX_VS_PYCRDT})
    aims.append({"aim": "same, against pycrdt's incremental updates (observe)",
                 "ratio": tx["in_process_vs_pycrdt_observe"], "target": AIM_TX_VS_PYCRDT,
                 "met": tx["in_process_vs_pycrdt_observe"] >= AIM_TX_VS_PYCRDT})
    return aims


def print_report(res: dict[str, Any]) -> None:
    conv = res["concurrent"]
    print("\n1. Concurrent writers: 3 peers, same "
          f"{conv['objects']} objects, {conv['seconds']:g} s")
    rows = []
    for (name, count), rate, lat, remote, cpu, per, errs in zip(
            conv["written_per_peer"].items(), conv["rate_per_peer"],
            conv["write_latency_per_peer"], conv["remote_applied_while_writing"],
            conv["cpu_seconds_while_writing"], conv["cpu_us_per_update_per_peer"],
            conv["errors_per_peer"].values(), strict=True):
        rows.append([name, f"{count:,}", f"{rate:,.0f}",
                     f"{lat['mean_ms']:.1f} / {lat.get('p99_ms', 0):,.1f} / "
                     f"{lat['max_ms']:,.0f}", f"{remote:,}",
                     f"{cpu['process']:.1f} + {cpu['redis']:.1f}", f"{per:,.0f}",
                     ", ".join(f"{k} {v}" for k, v in errs.items()) or "-"])
    rows.append(["total", f"{conv['written_total']:,}", f"{conv['total_updates_per_s']:,.0f}",
                 "", "", "", f"{conv['cpu_us_per_written_update_all_peers']:,.0f}", ""])
    common.print_table(["peer", "updates written", "updates/s", "write ms mean/p99/max",
                        "remote applied", "CPU s (proc+redis)", "CPU µs/upd", "errors"], rows,
                       align="<>>>>>><")
    print("  (CPU µs/upd: a peer's process + redis-server CPU per update it wrote or applied; "
          "total: all three's per update written)")
    if conv["converged"]:
        print(f"  converged {conv['convergence_seconds']:.2f} s after the writers stopped "
              f"(not yet at {conv['convergence_seconds_lower_bound']:.2f} s; "
              f"{conv['digest_rounds']} digest rounds)")
        same_set = conv["same_update_set_seconds"]
        print(f"  same set of stored updates at {same_set:.2f} s" if same_set is not None
              else "  stored update sets differ (what retention kept depends on arrival "
              "order; the state does not)")
    else:
        print(f"  NOT converged within {conv['convergence_timeout']:g} s")
    waits = conv["first_digest_lock_wait_seconds"]
    print("  first digest round: waited " + ", ".join(
        f"{n} {w:.2f} s" for n, w in zip("ABC", waits, strict=True))
        + " for each node's apply lock")
    d0 = conv["digests"][0]
    print(f"  digests identical: {conv['digests_identical']}  (state {d0['state'][:16]}…, "
          f"{d0['update_count']:,} updates, expected {conv['expected_update_count']:,}; "
          f"{d0['objects']:,} objects)")
    for name, s in zip("ABC", conv["peer_stats"], strict=True):
        print(f"  {name}: received {s['received']:,} messages, duplicates {s['duplicates']:,}, "
              f"queue dropped {s['queue_dropped']:,}, pulled by catch-up {s['pulled']:,}, "
              f"rejected {sum(s['rejected'].values()):,}, equivocations {s['equivocations']}")

    dl = res["dlist"]
    small, large = (str(x) for x in dl["sizes"])
    print(f"\n2. DList, one node, no network ({dl['n']:,} ops per figure, each followed by an "
          "untimed delete)")
    rows = []
    for kind in ("append", "insert"):
        s, la = dl["results"][small][kind], dl["results"][large][kind]
        rows.append([kind if kind == "append" else "insert at random index",
                     f"{s['us_per_op']:,.0f}", f"{s['median_us']:,.0f}",
                     f"{s['cpu_us_per_op']:,.0f} + {s['server_cpu_us_per_op_and_delete']:,.0f}",
                     f"{la['us_per_op']:,.0f}", f"{la['median_us']:,.0f}",
                     f"{la['cpu_us_per_op']:,.0f} + "
                     f"{la['server_cpu_us_per_op_and_delete']:,.0f}",
                     f"{dl[kind + '_ratio']:.2f}x / {dl[kind + '_median_ratio']:.2f}x",
                     f"{dl[kind + '_cpu_ratio']:.2f}x"])
    common.print_table(["operation", f"µs/op @{int(small):,}", "median", "CPU µs",
                        f"µs/op @{int(large):,}", "median", "CPU µs", "ratio (mean/median)",
                        "CPU ratio"], rows, align="<>>>>>>>>")
    print("  (CPU µs: this process per op + the redis-server per op and its untimed delete)")
    pos = dl["results"][large]["position_bytes"]
    print(f"  building {int(large):,} elements by append: "
          f"{dl['results'][large]['build_appends_per_s']:,.0f} appends/s; positions then "
          f"{pos['mean']:.1f} bytes on average, {pos['max']} at most")

    tx = res["transactions"]
    net, inp = tx["network"], tx["in_process"]
    crdt, obs = tx["pycrdt_get_update"], tx["pycrdt_observe"]
    print(f"\n3. Transactions of {WIDE_FIELDS} field changes replicated A -> B "
          f"({inp['transactions']:,} transactions)")
    rows = [
        ["dmodel over ZeroMQ: applied at B (first to last)", f"{net['b_changes_per_s']:,.0f}",
         f"{net['b_total_cpu_us_per_tx']:,.0f}",
         "", "", f"B's: {net['b_cpu_us_per_tx'].get('process', 0):,.0f} process + "
                 f"{net['b_cpu_us_per_tx'].get('redis', 0):,.0f} redis"],
        ["dmodel over ZeroMQ: A's first write to B's last",
         f"{net['end_to_end_changes_per_s']:,.0f}",
         f"{net['a_total_cpu_us_per_tx'] + net['b_total_cpu_us_per_tx']:,.0f}",
         "", "", f"A + B; A wrote {net['a_changes_per_s']:,.0f}/s"],
        ["dmodel in-process: tx at A, then B.ingest", f"{inp['changes_per_s']:,.0f}",
         f"{inp['total_cpu_us_per_tx']:,.0f}",
         f"{inp['first_tenth_changes_per_s']:,.0f}", f"{inp['last_tenth_changes_per_s']:,.0f}",
         f"A {inp['a_write_us_per_tx']:,.0f} + B {inp['b_apply_us_per_tx']:,.0f} µs/tx, "
         f"{inp['update_bytes']:,} B; CPU {inp['cpu_us_per_tx']:,.0f} + "
         f"{inp['server_cpu_us_per_tx']:,.0f} redis"],
        ["pycrdt get_update(state) + apply_update", f"{crdt['changes_per_s']:,.0f}",
         f"{crdt['total_cpu_us_per_tx']:,.0f}",
         f"{crdt['first_tenth_changes_per_s']:,.0f}", f"{crdt['last_tenth_changes_per_s']:,.0f}",
         f"A {crdt['a_encode_us_per_tx']:,.0f} + B {crdt['b_apply_us_per_tx']:,.0f} µs/tx, "
         f"{crdt['update_bytes']:,} B"],
        ["pycrdt observe (incremental) + apply_update", f"{obs['changes_per_s']:,.0f}",
         f"{obs['total_cpu_us_per_tx']:,.0f}",
         f"{obs['first_tenth_changes_per_s']:,.0f}", f"{obs['last_tenth_changes_per_s']:,.0f}",
         f"A {obs['a_encode_us_per_tx']:,.0f} + B {obs['b_apply_us_per_tx']:,.0f} µs/tx, "
         f"{obs['update_bytes']:,} B"],
    ]
    common.print_table(["figure", "changes/s", "CPU µs/tx", "first 10%", "last 10%", "notes"],
                       rows, align="<>>>><")
    cr = tx["cpu_ratios"]
    print(f"  CPU per transaction (process + redis-servers): pycrdt get_update / dmodel "
          f"in-process {cr['in_process_vs_pycrdt_get_update']:.2f}x, pycrdt observe / dmodel "
          f"{cr['in_process_vs_pycrdt_observe']:.2f}x, pycrdt get_update / dmodel A + B over "
          f"ZeroMQ {cr['network_a_plus_b_vs_pycrdt_get_update']:.2f}x")
    r = tx["ratios"]
    print(f"  rate ratios: medians of the {len(tx['chunks'])} interleaved chunks' ratios; "
          f"dmodel in-process vs pycrdt get_update: "
          f"{r['in_process_vs_pycrdt_get_update']:.2f}x, vs pycrdt observe: "
          f"{r['in_process_vs_pycrdt_observe']:.2f}x; B over ZeroMQ vs pycrdt get_update: "
          f"{r['network_b_vs_pycrdt_get_update']:.2f}x, vs observe: "
          f"{r['network_b_vs_pycrdt_observe']:.2f}x")
    first = r["in_process_vs_pycrdt_get_update_first_tenth"]
    last = r["in_process_vs_pycrdt_get_update_last_tenth"]
    print(f"  in-process vs pycrdt get_update on the first tenth of the transactions: "
          f"{first:.2f}x, on the last tenth: {last:.2f}x (pycrdt's get_update/apply_update "
          "cost grows with the document's history, so the overall ratio depends on --tx)")
    print("  (dmodel signs each transaction at A and verifies it at B, and both store it in "
          "Redis; pycrdt does neither)")

    print("\nAims")
    for aim in res["aims"]:
        unit = aim.get("unit")
        if aim["ratio"] is None:
            value = "n/a"
        elif unit:
            value = f"{aim['ratio']:.2f} {unit}"
        else:
            value = f"{aim['ratio']:.2f}x"
        print(f"  [{'MET ' if aim['met'] else 'MISS'}] {aim['aim']}: {value}")


# -------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=30.0,
                        help="seconds the three peers write concurrently (default 30)")
    parser.add_argument("--objects", type=int, default=100,
                        help="objects all three peers write to (default 100)")
    parser.add_argument("--converge-timeout", type=float, default=120.0,
                        help="longest wait for the digests to agree (default 120 s)")
    parser.add_argument("--list-small", type=int, default=10)
    parser.add_argument("--list-large", type=int, default=10_000)
    parser.add_argument("--list-n", type=int, default=500,
                        help="timed appends and inserts per list size (default 500)")
    parser.add_argument("--tx", type=int, default=1_000,
                        help="transactions of 100 field changes per figure (default 1000)")
    parser.add_argument("--quick", action="store_true",
                        help="3 s of writes, lists of 10 and 1,000, 100 ops, 100 "
                             "transactions: a smoke run")
    parser.add_argument("--json", type=Path,
                        default=common.RESULTS_DIR / "bench_convergence.json")
    args = parser.parse_args(argv)
    if args.quick:
        args.seconds, args.converge_timeout = 3.0, 60.0
        args.list_large, args.list_n, args.tx = 1_000, 100, 100
    if min(args.objects, args.list_n, args.tx) < 1 or args.seconds <= 0 \
            or not 1 < args.list_small < args.list_large:
        parser.error("sizes must be positive and 1 < --list-small < --list-large")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    load_start = common.loadavg()
    res: dict[str, Any] = {}
    phases: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="dmconv-") as tmp_name:
        tmp = Path(tmp_name)
        log(f"bench_convergence: {args.seconds:g} s of concurrent writes to {args.objects} "
            f"objects; DList {args.list_small:,}/{args.list_large:,} x {args.list_n:,} ops; "
            f"{args.tx:,} transactions")
        timed = common.phase_timer("bench_convergence", args, res, phases)
        res["concurrent"] = timed("concurrent", phase_concurrent, tmp, args.seconds,
                                  args.objects, args.converge_timeout)
        res["dlist"] = timed("dlist", phase_dlist, tmp, args.list_small, args.list_large,
                             args.list_n)
        res["transactions"] = timed("transactions", phase_tx, tmp, args.tx)
    res["aims"] = build_aims(res)
    print_report(res)
    machine = common.machine_info({
        "loadavg_start": load_start,
        "packages_extra": common.package_versions(("pycrdt", "pyzmq"))})
    result = {
        "benchmark": "bench_convergence",
        "date": common.utc_now(),
        "params": common.params(args),
        "machine": machine,
        **res,
        "phase_seconds": phases,
        "notes": [
            "Peers are separate processes, each with its own embedded redis-server (unix "
            "socket), meshed over ZeroMQ on tcp://127.0.0.1; all share the machine's cores.",
            "State digest: Node.state_digest() (every object's metadata, registers, DList "
            "orders, authorization events and key wraps), taken under the node's apply "
            "lock; the set of update ids is digested separately.",
            "Convergence time: from the last writer's last write to the digest round in "
            "which all three digests were equal (resolution: one round, see the lower bound).",
            "DList figures: each op timed alone with time.perf_counter, then an untimed "
            "delete of the element it added keeps the list at its size.",
            "pycrdt get_update: B's state vector is read before A's transaction, then "
            "A.get_update(state) -> B.apply_update; observe: the update of each transaction "
            "from A's TransactionEvent.",
        ],
    }
    return common.finish(args.json, result, started)


if __name__ == "__main__":
    sys.exit(main())
