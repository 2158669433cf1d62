"""bench_growth: what the store costs as one field is overwritten, under each retention.

For each retention setting (``all``, the default ``10`` versions, ``1``) one node on its
embedded Redis writes one field of one object again and again; after 1, 1,000, 10,000
and 100,000 overwrites it records Redis's ``used_memory``, the AOF size and the RDB
size (after a SAVE), and the CPU per write (process + redis-server) of each stretch:
the difference between the settings is the cost of pruning. Then a node that joins
late catches up from it over ZeroMQ on 127.0.0.1: how many updates it receives, and
how long it takes. Last, a joiner behind ``--objects`` live objects (one create
each, default 10,000), from a keep-all source (``all``: every update stays, the catch-up
of a store without retention) and from one with the default retention, back to back:
catch-up rate in updates per second, CPU per update, and the default's rate as a ratio
to the keep-all source's. Then (``reconcile``) two peers that hold the same
``--reconcile-objects`` live objects (default 20,000: the second got the first's updates
as from a backup) and differ in ``--changed`` of them (default 10, then 1,000) catch up,
once by state sums and once by reading the log (``state_sync_after=0``): seconds, CPU,
bytes of catch-up replies, log ids read and updates fetched; and what the state sums
cost to read (CPU per object) and to keep (bytes per object).

    .venv/bin/python benchmarks/bench_growth.py             # 100,000 overwrites
    .venv/bin/python benchmarks/bench_growth.py --quick     # 10,000: a smoke run
    .venv/bin/python benchmarks/bench_growth.py --parts objects --objects 100000
    .venv/bin/python benchmarks/bench_growth.py --parts reconcile

Results go to ``benchmarks/results/bench_growth.json`` unless ``--json`` says where.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
import tracemalloc
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as common  # noqa: E402

import dmodel  # noqa: E402
from dmodel.node.statesum import StateSums  # noqa: E402


class GrowthDoc(dmodel.DModel):
    n = dmodel.DField()


def _sizes(node: dmodel.Node) -> dict[str, int]:
    client = node.store.client
    client.save()
    redis_dir = node.home / "redis"
    aof = redis_dir / "appendonly.aof"
    rdb = redis_dir / "dump.rdb"
    return {"used_memory": int(client.info("memory")["used_memory"]),
            "aof_bytes": aof.stat().st_size if aof.exists() else 0,
            "rdb_bytes": rdb.stat().st_size if rdb.exists() else 0,
            "live_updates": len(node.store.log_range()),
            "log_positions": node.log_length()}


def _node(home: Path, retention: str, **options: Any) -> dmodel.Node:
    return dmodel.Node(home, listen=options.pop("listen", ""), peers=options.pop("peers", []),
                       discovery=False, retention=retention, **options)


def overwrites(tmp: Path, retention: str, marks: list[int]) -> dict[str, Any]:
    """Overwrite one field up to ``marks[-1]`` times; sizes and CPU at each mark."""
    a = _node(tmp / f"a-{retention}", retention, listen="tcp://127.0.0.1:*")
    try:
        doc = GrowthDoc.create(n=0, node=a)
        doc.n = 1
        samples: list[dict[str, float]] = [{"writes": 1, **_sizes(a)}]
        done = 1
        for mark in marks:
            with common.CpuMeter([a.store.client]) as meter:
                for i in range(done, mark):
                    doc.n = i
            samples.append({"writes": mark, **_sizes(a), **meter.per_op(mark - done),
                            "writes_per_s": round((mark - done) / meter.wall, 1)})
            done = mark
            common.log(f"  retention {retention}: {mark:,} writes, "
                       f"used_memory {samples[-1]['used_memory']:,} B")
        joined = join(tmp / f"b-{retention}", a, lambda b: GrowthDoc(doc.db_id, node=b).n.get()
                      == mark - 1)
        return {"retention": retention, "samples": samples, "joiner": joined,
                "verify_problems": a.verify_store()}
    finally:
        a.shutdown()


def join(home: Path, a: dmodel.Node, done: Any, timeout: float = 600.0) -> dict[str, Any]:
    """A new node that catches up from ``a``: updates received, seconds, and the CPU per
    update received of this process (both nodes: ``a`` serving, the joiner applying)
    and of both redis-servers."""
    meter = common.CpuMeter([a.store.client])
    meter.__enter__()
    t0 = time.perf_counter()
    b = _node(home, "10", listen="tcp://127.0.0.1:*", peers=[a.network.endpoint])
    try:
        redis0 = common.redis_cpu_seconds(b.store.client)
        b.network.wait_for_peers(1, timeout=30)
        deadline = time.monotonic() + timeout
        while not done(b) and time.monotonic() < deadline:
            b.network.sync_now()
        seconds = time.perf_counter() - t0
        received = b.log_length()
        joiner_redis = common.redis_cpu_seconds(b.store.client) - redis0
        meter.__exit__()
        per = max(1, received)
        return {"caught_up": bool(done(b)), "seconds": round(seconds, 2),
                "updates_received": received,
                "updates_per_s": round(received / seconds, 1),
                "cpu_us_per_update": round(meter.cpu * 1e6 / per, 1),
                "redis_cpu_us_per_update": round((meter.server + joiner_redis) * 1e6 / per, 1),
                "chain_gaps_released": b.stats.chain_gaps}
    finally:
        b.shutdown()


def live_objects(tmp: Path, retention: str, n: int) -> dict[str, Any]:
    """A source with ``n`` live objects (one create each) under ``retention``, then a
    joiner that catches up from it (see ``join``)."""
    a = _node(tmp / f"objects-a-{retention}", retention, listen="tcp://127.0.0.1:*")
    try:
        last = None
        t0 = time.perf_counter()
        for i in range(n):
            last = GrowthDoc.create(n=i, node=a).db_id
        create_s = time.perf_counter() - t0
        common.log(f"  {n:,} live objects written (retention {retention}, "
                   f"{n / create_s:,.0f}/s); joining")
        joined = join(tmp / f"objects-b-{retention}", a,
                      lambda b: last is not None and b.exists(last))
        common.log(f"    joiner: {joined['updates_received']:,} updates in "
                   f"{joined['seconds']} s ({joined['updates_per_s']:,.0f}/s)")
        return {"retention": retention, "objects": n, "creates_per_s": round(n / create_s, 1),
                "joiner": joined}
    finally:
        a.shutdown()


def _sums_memory(node: dmodel.Node) -> int:
    """Bytes that a second set of state sums of ``node``'s store holds once built
    (tracemalloc: what stays allocated, not the reads' garbage)."""
    tracemalloc.start()
    try:
        sums = StateSums(node.store, threading.RLock())
        before = tracemalloc.get_traced_memory()[0]
        sums.build()
        return tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()


def reconcile(tmp: Path, n: int, changes: list[int]) -> dict[str, Any]:
    """A source with ``n`` objects and two copies of it (one per way of catching up,
    given its updates as from a backup). For each count in ``changes`` the source changes
    that many objects while both copies are down; then each copy starts, on its own,
    with its cursor reset (as on first contact), and catches up: by state sums, or by
    the log."""
    a = _node(tmp / "rec-a", "10", listen="tcp://127.0.0.1:*")
    try:
        docs = []
        t0 = time.perf_counter()
        for i in range(n):
            docs.append(GrowthDoc.create(n=i, node=a))
        common.log(f"  {n:,} objects written ({n / (time.perf_counter() - t0):,.0f}/s); "
                   "copying them to two more peers")
        for method in ("sums", "log"):
            copy = _node(tmp / f"rec-{method}", "10")
            for start in range(0, n, 2000):
                copy.ingest_many(a.updates_since(start, 2000))
            copy.shutdown()
        with common.CpuMeter([a.store.client]) as meter:
            a.state_sums.refresh(a.log_length)
        build = {"objects": len(a.state_sums), "seconds": round(meter.wall, 2),
                 **meter.per_op(n), "bytes_per_object": _sums_memory(a) / n}
        common.log(f"  state sums read: {build['total_cpu_us']:,.0f} µs CPU per object, "
                   f"{build['bytes_per_object']:,.0f} B of Python memory per object")
        rows = []
        for count in changes:
            changed = [docs[(len(rows) * count + j) % n] for j in range(count)]
            for doc in changed:
                doc.n.set(-1 - doc.n.get())
            want = {d.db_id: d.n.get() for d in changed}
            for method in ("sums", "log"):
                rows.append(_catch_up(tmp / f"rec-{method}", a, method, want))
                r = rows[-1]
                common.log(f"    {count:,} changed, by {method}: {r['seconds']} s, "
                           f"{r['sync_bytes']:,} B, {r['log_ids']:,} log ids, "
                           f"{r['pulled']:,} fetched")
        return {"objects": n, "sums": build, "runs": rows}
    finally:
        a.shutdown()


def _catch_up(home: Path, a: dmodel.Node, method: str, want: dict[str, Any]) -> dict[str, Any]:
    """Start the copy at ``home``, its cursor on ``a`` reset; catch up; its figures."""
    b = _node(home, "10", listen="tcp://127.0.0.1:*", network_options={
        "state_sync_after": 2000 if method == "sums" else 0})
    try:
        b.store.set_meta(f"cursor:{a.node_id.hex()}", b"")
        deadline = time.monotonic() + 600
        while not b.state_sums.built and time.monotonic() < deadline:
            time.sleep(0.05)  # its sums, built as its network starts
        served0 = a.network.stats["served"]
        with common.CpuMeter([a.store.client, b.store.client]) as meter:
            b.network.connect(a.network.endpoint)
            b.network.wait_for_peers(1, timeout=30)
            while time.monotonic() < deadline and not all(
                    b.read(db_id, "n") == value for db_id, value in want.items()):
                b.network.sync_now()
        stats = b.network.stats
        return {"method": method, "changed": len(want), "seconds": round(meter.wall, 3),
                "caught_up": all(b.read(d, "n") == v for d, v in want.items()),
                "cpu_ms": round((meter.cpu + meter.server) * 1e3, 1),
                **{k: stats[k] for k in ("sync_bytes", "log_ids", "pulled", "state_passes",
                                         "state_objects")},
                "served_by_source": a.network.stats["served"] - served0}
    finally:
        b.shutdown()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--writes", type=int, default=100_000,
                        help="overwrites of the one field (default 100,000)")
    parser.add_argument("--objects", type=int, default=10_000,
                        help="live objects behind the second joiner (default 10,000)")
    parser.add_argument("--reconcile-objects", type=int, default=20_000,
                        help="objects two peers both hold for reconcile (default 20,000)")
    parser.add_argument("--changed", default="10,1000",
                        help="objects that differ, comma-separated (default 10,1000)")
    parser.add_argument("--parts", default="overwrites,objects,reconcile",
                        help="what to run, comma-separated: overwrites (sizes and the "
                             "joiner behind them), objects (the joiner behind --objects "
                             "live objects), reconcile (two peers that differ a little); "
                             "default all three")
    parser.add_argument("--retention", default="all,10,1",
                        help="retention settings, comma-separated (default all,10,1)")
    parser.add_argument("--quick", action="store_true",
                        help="10,000 writes, 2,000 objects, 3,000 to reconcile")
    parser.add_argument("--json", type=Path, default=common.RESULTS_DIR / "bench_growth.json")
    args = parser.parse_args(argv)
    if args.quick:
        args.writes, args.objects = min(args.writes, 10_000), min(args.objects, 2_000)
        args.reconcile_objects = min(args.reconcile_objects, 3_000)
    marks = [m for m in (1_000, 10_000, 100_000) if m < args.writes] + [args.writes]
    started = time.perf_counter()
    load_start = common.loadavg()
    settings = [s.strip() for s in args.retention.split(",") if s.strip()]
    parts = {p.strip() for p in args.parts.split(",") if p.strip()}
    if not parts or parts - {"overwrites", "objects", "reconcile"}:
        parser.error("--parts takes overwrites, objects and/or reconcile")
    with tempfile.TemporaryDirectory(prefix="dmbench-g-") as tmp:
        runs = ([overwrites(Path(tmp), s, marks) for s in settings]
                if "overwrites" in parts else [])
        objects = ([live_objects(Path(tmp), s, args.objects) for s in ("all", "10")]
                   if "objects" in parts else [])
        rec = (reconcile(Path(tmp), args.reconcile_objects,
                         [int(c) for c in args.changed.split(",") if c.strip()])
               if "reconcile" in parts else None)
    if runs:
        print_overwrites(runs, marks)
    objects_ratio = print_objects(objects)
    if rec:
        print_reconcile(rec)
    result = {
        "benchmark": "bench_growth",
        "date": common.utc_now(),
        "params": common.params(args),
        "machine": common.machine_info({"loadavg_start": load_start}),
        "overwrites": runs,
        "live_objects": objects,
        "live_objects_ratio": objects_ratio,
        "reconcile": rec,
        "notes": ["One node on its embedded Redis writes one field; sizes after SAVE.",
                  "The joiners keep the default retention and catch up over ZeroMQ on "
                  "127.0.0.1 with sync_now() (the log pull, then fetches).",
                  "Joiner CPU per update: this process (the source serving and the joiner "
                  "applying, both in it) and both redis-servers."],
    }
    return common.finish(args.json, result, started)


def print_overwrites(runs: list[dict[str, Any]], marks: list[int]) -> None:
    rows = []
    for run in runs:
        base = run["samples"][0]
        for s in run["samples"][1:]:
            grown = s["used_memory"] - base["used_memory"]
            rows.append([run["retention"], f"{s['writes']:,}", f"{s['used_memory']:,}",
                         f"{grown:+,}", f"{s['aof_bytes']:,}", f"{s['rdb_bytes']:,}",
                         f"{s['live_updates']:,}", f"{s.get('total_cpu_us', 0):,.0f}"])
    common.print_table(["retention", "writes", "used_memory", "vs 1 write", "AOF", "RDB",
                        "live updates", "CPU µs/write"], rows)
    for run in runs:
        j = run["joiner"]
        print(f"joiner behind {marks[-1]:,} overwrites (retention {run['retention']}): "
              f"{j['updates_received']:,} updates in {j['seconds']} s"
              f"{'' if j['caught_up'] else ' (NOT caught up)'}")


def print_reconcile(rec: dict[str, Any]) -> None:
    """Both catch-ups of each change count; the log's bytes and CPU over the sums' (same
    run): above 1, the sums cost less."""
    rows = []
    by = {(r["changed"], r["method"]): r for r in rec["runs"]}
    for r in rec["runs"]:
        other = by.get((r["changed"], "log"))
        ratio = "" if r["method"] == "log" or other is None else (
            f"bytes {common.fmt_ratio(other['sync_bytes'] / max(1, r['sync_bytes']))}, "
            f"CPU {common.fmt_ratio(other['cpu_ms'] / max(0.001, r['cpu_ms']))}")
        rows.append([f"{r['changed']:,}", r["method"], f"{r['seconds']}", f"{r['cpu_ms']:,}",
                     f"{r['sync_bytes']:,}", f"{r['log_ids']:,}", f"{r['pulled']:,}",
                     f"{r['state_objects']:,}", ratio + ("" if r["caught_up"] else " NOT")])
    print(f"two peers holding {rec['objects']:,} objects, some changed on one:")
    common.print_table(["changed", "by", "s", "CPU ms", "reply bytes", "log ids", "fetched",
                        "objects compared", "log / sums"], rows)
    s = rec["sums"]
    print(f"state sums: read {s['objects']:,} objects in {s['seconds']} s, "
          f"{s['total_cpu_us']:,.0f} µs CPU per object (process {s['cpu_us']:,.0f} + Redis "
          f"{s['server_cpu_us']:,.0f}), {s['bytes_per_object']:,.0f} B of memory per object")


def print_objects(objects: list[dict[str, Any]]) -> dict[str, float | None]:
    """One line per joiner behind live objects; the default-retention source's rate and
    CPU against the keep-all source's (same run)."""
    for o in objects:
        j = o["joiner"]
        print(f"joiner behind {o['objects']:,} live objects (retention {o['retention']}): "
              f"{j['updates_received']:,} updates in {j['seconds']} s, "
              f"{j['updates_per_s']:,.0f} updates/s, CPU {j['cpu_us_per_update']:,.0f} µs "
              f"+ Redis {j['redis_cpu_us_per_update']:,.0f} µs per update"
              f"{'' if j['caught_up'] else ' (NOT caught up)'}")
    by = {o["retention"]: o["joiner"] for o in objects}
    if "all" not in by or "10" not in by:
        return {}
    keep, default = by["all"], by["10"]
    rate = default["updates_per_s"] / keep["updates_per_s"] if keep["updates_per_s"] else None
    def cost(j: dict[str, Any]) -> float:
        return float(j["cpu_us_per_update"] + j["redis_cpu_us_per_update"])

    cpu = cost(keep) / cost(default) if cost(default) else None
    print(f"  default retention vs keep-all source: rate {common.fmt_ratio(rate)}, CPU per "
          f"update {common.fmt_ratio(cpu)} (keep-all's / the default's, above 1 = cheaper)")
    return {"rate_default_vs_keep_all": None if rate is None else round(rate, 4),
            "cpu_keep_all_vs_default": None if cpu is None else round(cpu, 4)}


if __name__ == "__main__":
    raise SystemExit(main())
