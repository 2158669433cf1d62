"""Listener benchmark: what applied listener filters cost a local signed write.

One ``dmodel.Node`` (no networking, its embedded Redis) and one owned object; the
figure is ``p.name.set(i)``, a signed update through the whole pipeline, with the
node's listener registry set up six ways:

* ``f0_none``     no listener at all: the baseline;
* ``f10_none``    10 applied filters, none matching the write;
* ``f1000_none``  1,000 applied filters, none matching;
* ``f0_one`` / ``f10_one`` / ``f1000_one``  the same plus one filter that matches the
  written field (``BenchPerson:[id]:name``) with a trivial ``on_updated``.

The non-matching filters are half on other models (``Other{i}:*``), which the
registry's index by model skips, and half on other fields of the written model
(``BenchPerson:[id]:field{i}``), which it has to match against every change key. The
non-matching listener overrides a before- and an after-callback, so it is not skipped
for having nothing to call. Two more set-ups split the 1,000 into their kinds:
``f1000_models`` (1,000 ``Other{i}:*``) and ``f1000_fields`` (1,000
``BenchPerson:[id]:field{i}``), no matching listener.

Every figure is the median of ``--runs`` (3) timed runs of ``--n`` writes, preceded by
warm-up writes; the runs are interleaved (run 1 of every set-up, then run 2, ...), the
registry being set up again before each one, so drift of the machine and the growth of
the store are shared. Reported: ops/s, µs/op, CPU µs/op of this process and of the
redis-server, and the ratio of each rate to the baseline measured in the same run.
The aim (printed, not enforced): 1,000 non-matching filters cost under 10%, i.e.
``f1000_none`` >= 0.9x ``f0_none``.

Run (from the repository root)::

    .venv/bin/python benchmarks/bench_listeners.py            # default: --n 3000
    .venv/bin/python benchmarks/bench_listeners.py --quick    # a few seconds, for CI

Results go to ``benchmarks/results/bench_listeners.json`` (git-ignored) unless
``--json`` says otherwise.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import _common as common
from _common import Figure

import dmodel

AIM_NONMATCHING_1000 = 0.9  # 1,000 non-matching filters: >= 0.9x the no-listener rate
FILTER_COUNTS = (0, 10, 1000)
VARIANTS = ("none", "one")
SPLIT = ("models", "fields")  # f1000_models, f1000_fields: the two kinds of filter alone


class BenchPerson(dmodel.DModel):
    name = dmodel.DField("name", False)


class Noise(dmodel.DAction):
    """Applied to filters that never match the benchmark's writes."""

    def __init__(self) -> None:
        self.calls = 0

    def on_update(self, object_id, field, old_value, new_value):
        self.calls += 1

    def on_updated(self, object_id, field, old_value, new_value):
        self.calls += 1


class Counter(dmodel.DAction):
    """The matching listener: a trivial after-callback."""

    def __init__(self) -> None:
        self.calls = 0

    def on_updated(self, object_id, field, old_value, new_value):
        self.calls += 1


def noise_filters(count: int, kind: str = "mixed") -> list[str]:
    """``count`` filters matching nothing the benchmark writes: on other models, on
    other fields of BenchPerson, or (``mixed``) half and half."""
    out = []
    for i in range(count):
        on_model = kind == "models" or (kind == "mixed" and i % 2 == 0)
        j = i // 2 if kind == "mixed" else i
        out.append(f"Other{j}:*" if on_model else f"BenchPerson:[id]:field{j}")
    return out


class Env:
    def __init__(self, home: Path) -> None:
        # explicit arguments so DMODEL_* variables of the shell cannot change the set-up
        self.node = dmodel.Node(home, listen="", peers=[], discovery=False, redis_url="")
        self.person = BenchPerson([], node=self.node)
        self.person.name.set(0)
        self.noise = Noise()
        self.counter = Counter()
        self.apply_seconds: dict[int, list[float]] = {}

    def configure(self, filters: int, variant: str) -> None:
        """Set the registry up for one figure (timed: the cost of applying)."""
        registry = self.node.listeners
        registry.clear()
        start = time.perf_counter()
        for pattern in noise_filters(filters, variant if variant in SPLIT else "mixed"):
            self.noise.apply(pattern, node=self.node)
        if filters and variant == "none":
            self.apply_seconds.setdefault(filters, []).append(time.perf_counter() - start)
        if variant == "one":
            self.counter.apply("BenchPerson:[id]:name", node=self.node)
        assert len(registry) == filters + (variant == "one")

    def server_cpu(self) -> float:
        info = self.node.store.client.info("cpu")
        return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])

    def redis_info(self) -> dict[str, Any]:
        info = self.node.store.client.info("server")
        return {"redis_server": info.get("redis_version"), "redis_transport": "unix socket"}

    def close(self) -> None:
        self.node.shutdown()


def key(filters: int, variant: str) -> str:
    return f"f{filters}_{variant}"


def label(filters: int, variant: str) -> str:
    what = "no listener" if filters == 0 else f"{filters:,} non-matching filters"
    if variant in SPLIT:
        what = (f"{filters:,} filters on other models" if variant == "models"
                else f"{filters:,} filters on other fields")
    if variant == "one":
        what = ("1 matching filter" if filters == 0
                else f"{what} + 1 matching")
    return f"p.name.set(i), {what}"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=3000,
                        help="writes per timed run of every figure (default 3000)")
    parser.add_argument("--runs", type=int, default=3,
                        help="timed runs per figure; the median is reported (default 3)")
    parser.add_argument("--quick", action="store_true", help="small N (300): a smoke run")
    parser.add_argument("--json", type=Path,
                        default=common.RESULTS_DIR / "bench_listeners.json",
                        help="where to write the results (default benchmarks/results/...)")
    args = parser.parse_args(argv)
    if args.quick:
        args.n = min(args.n, 300)
    if args.n < 1 or args.runs < 1:
        parser.error("--n and --runs must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    n, runs = args.n, args.runs
    warmup = common.default_warmup
    started = time.perf_counter()
    load_start = common.loadavg()
    setups = [(f, v) for f in FILTER_COUNTS for v in VARIANTS] + [(1000, v) for v in SPLIT]
    figs = {key(f, v): Figure(key(f, v), label(f, v), "write", n) for f, v in setups}
    base = key(0, "none")
    run_ratios: dict[str, list[float]] = {k: [] for k in figs}
    with tempfile.TemporaryDirectory(prefix="dmbench-") as tmp:
        env = Env(Path(tmp) / "node")
        try:
            person = env.person

            def write(i: int) -> None:
                person.name.set(i)

            print(f"bench_listeners: n={n} per run, {runs} runs (median), warm-up "
                  f"{warmup(n)}", file=sys.stderr)
            for _ in range(runs):
                for f, v in setups:
                    env.configure(f, v)
                    fig = figs[key(f, v)]
                    common.run_figures([(fig, write)], runs=1, warmup=warmup,
                                       server_cpu=env.server_cpu)
                for k, fig in figs.items():  # the ratio within this run
                    run_ratios[k].append(fig.runs[-1] / figs[base].runs[-1])
            matched = env.counter.calls
            noise_calls = env.noise.calls
            env.node.listeners.clear()
            machine = common.machine_info({**env.redis_info(), "loadavg_start": load_start})
        finally:
            env.close()

    ratios = {k: statistics.median(v) for k, v in run_ratios.items()}
    cpu_ratios = {k: fig.cpu_us / figs[base].cpu_us for k, fig in figs.items()}
    rows = []
    for k, fig in figs.items():
        srv = fig.server_cpu_us
        rows.append([fig.label, f"{fig.ops:,.0f}", f"{fig.us_per_op:,.1f}", f"{fig.cpu_us:,.1f}",
                     "" if srv is None else f"{srv:,.1f}", f"{ratios[k]:.3f}",
                     f"{cpu_ratios[k]:.3f}"])
    print()
    common.print_table(["set-up", "ops/s", "µs/op", "CPU µs", "srv CPU µs", "rate vs none",
                        "CPU vs none"], rows)
    print("\n(median of runs; rate vs none: median of the per-run ratios to the no-listener "
          "rate of the same run;\n CPU vs none: this process's CPU per write relative to "
          "the no-listener set-up)")
    apply_us = {f: round(statistics.median(s) * 1e6 / f, 2)
                for f, s in env.apply_seconds.items()}
    print("applying a filter: " + ", ".join(f"{us:,.1f} µs each with {f:,} filters"
                                            for f, us in apply_us.items()))
    expected_matches = sum(fig.n + warmup(fig.n) for k, fig in figs.items()
                           if k.endswith("_one") for _ in fig.runs)
    print(f"matching listener called {matched:,} times (expected {expected_matches:,}); "
          f"non-matching listener called {noise_calls} times (expected 0)")

    worst = ratios[key(1000, "none")]
    aims = [{
        "aim": "1,000 non-matching filters cost under 10% of the local signed-write rate",
        "ratio": round(worst, 3), "target": AIM_NONMATCHING_1000,
        "met": worst >= AIM_NONMATCHING_1000,
        "cpu_ratio": round(1 / cpu_ratios[key(1000, "none")], 3),
    }]
    print("\nAims")
    for aim in aims:
        print(f"  [{'MET ' if aim['met'] else 'MISS'}] {aim['aim']}: {aim['ratio']:.3f}x "
              f"(target >= {aim['target']}x; by CPU per write {aim['cpu_ratio']:.3f}x)")

    result = {
        "benchmark": "bench_listeners",
        "date": common.utc_now(),
        "params": {"n": n, "runs": runs, "warmup": warmup(n), "quick": args.quick,
                   "filter_counts": list(FILTER_COUNTS), "variants": list(VARIANTS)},
        "machine": machine,
        "figures": {k: fig.as_dict() for k, fig in figs.items()},
        "ratios": {k: round(v, 4) for k, v in ratios.items()},
        "runs_ratios": {k: [round(x, 4) for x in v] for k, v in run_ratios.items()},
        "cpu_ratios": {k: round(v, 4) for k, v in cpu_ratios.items()},
        "apply_us_per_filter": apply_us,
        "listener_calls": {"matching": matched, "matching_expected": expected_matches,
                           "non_matching": noise_calls},
        "aims": aims,
        "notes": [
            "One node, no networking; writes are p.name.set(i) on one owned object.",
            "Non-matching filters: half Other{i}:* (other models), half "
            "BenchPerson:[id]:field{i} (other fields of the written model).",
            "The registry is cleared and set up again before every timed run; runs are "
            "interleaved across set-ups.",
        ],
    }
    return common.finish(args.json, result, started)


if __name__ == "__main__":
    sys.exit(main())
