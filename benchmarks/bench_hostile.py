"""Honest throughput and victim memory under each attack of tests/hostile_net.

For every attack of ``tests/hostile_net/attacker.py``: a victim and an honest peer
(``dmodel peer`` children), the honest one creating objects as fast as its command
channel allows for ``--seconds``; the honest rate is the number of those creates the
victim holds, over the time until the last one arrived. A run without an attacker
comes before each attack and after the last, so the load of a shared machine drifts
less between an attack and its reference. Printed per attack: that rate as a ratio to
the mean rate of the runs without attack just before and after it (aim >= 0.8); the
victim's CPU (all its threads and its redis-server) per honest update, against the
same in those runs; the CPU seconds of the victim's network threads (bus I/O, request
worker, sync, ZeroMQ's I/O thread: where attack frames are handled), against the same;
the attacker process's CPU seconds (its start included); and the victim's peak VmRSS
against its baseline (aim < 2x baseline + 64 MiB). Then, in this process: the
handshake cost per connection (both sides' signatures and checks) and the rate
limiter's cost per message.

``--nice-attacker`` runs the attacker at nice 19: a control for a machine where the
attacker's own CPU competes with the honest peer (as it does not when the attacker is
elsewhere). ``--decoy`` aims each attack (but the trap) at a third node, not the victim:
what is left of the ratio then is the attack's cost to the shared machine (attacker and
decoy), none of it the victim's. ``--repeat N`` runs each attack N times (each try
followed by a run without attack) and prints the median ratio with every try's. JSON
goes to ``results/hostile.json``.

    python benchmarks/bench_hostile.py [--seconds 5] [--repeat 1] [--json PATH] [--cpu]
                                       [--profile DIR]

``--cpu`` also prints where the CPU went while the honest peer wrote: the victim's by
thread (bus I/O, request worker, apply, verify, sync, main, ZeroMQ's I/O thread), the
honest peer's and the attacker's. ``--profile DIR`` writes a cProfile file per victim
thread to DIR (``<attack>-<thread>.prof``, read with ``python -m pstats``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any

import _common as common

HERE = Path(__file__).resolve().parent
TESTS = HERE.parent / "tests"
ATTACKER = TESTS / "hostile_net" / "attacker.py"
MODELS = f"{TESTS / 'multiprocess' / 'peer_driver.py'}:Person"
MiB = 1024 * 1024
VICTIM = {"sync_interval": 0.5, "sync_turn_seconds": 1.0, "flood_threshold": 200,
          "max_update_bytes_per_s": 2 * MiB, "queue_bytes": 16 * MiB,
          "reply_bytes_per_s": 2 * MiB}


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


# `python -m dmodel`, but each thread names itself after its Python name (so
# /proc/<pid>/task/<tid>/comm tells them apart), and, if BENCH_PROFILE is set, runs
# under its own cProfile, dumped to BENCH_PROFILE-<thread name>.prof when it ends.
_NAMED_THREADS = """
import ctypes, os, runpy, sys, threading
libc, inner = ctypes.CDLL(None), threading.Thread._bootstrap_inner
prefix = os.environ.get("BENCH_PROFILE")
def bootstrap(self):
    libc.prctl(15, self.name.encode()[:15], 0, 0, 0)  # PR_SET_NAME
    if not (prefix and self.name.startswith("dmodel-")):
        return inner(self)
    import cProfile
    prof = cProfile.Profile()
    prof.enable()
    try:
        inner(self)
    finally:
        prof.disable()
        prof.dump_stats(f"{prefix}-{'-'.join(self.name.split('-')[:2])}.prof")
threading.Thread._bootstrap_inner = bootstrap
sys.argv[0] = "dmodel"
runpy.run_module("dmodel", run_name="__main__", alter_sys=True)
"""
PROFILE_DIR: Path | None = None
NICE_ATTACKER = False
DECOY = False


def spawn(home: Path, name: str, peers: list[str] = (), options: dict | None = None,
          profile: str | None = None) -> Any:
    from dmodel.tools.driver import PeerProcess, peer_argv

    extra = ["--network-options", json.dumps(options)] if options else []
    argv = peer_argv(home, name=name, peers=peers, models=[MODELS], options=extra)
    env = None
    assert argv[1:3] == ["-m", "dmodel"]
    argv[1:3] = ["-c", _NAMED_THREADS]
    if PROFILE_DIR is not None and profile is not None:
        env = {"BENCH_PROFILE": str(PROFILE_DIR / f"{profile}-{name}")}
    return PeerProcess(argv, name=name, home=home, timeout=60, env=env)


def task_cpu(pid: int) -> dict[str, float]:
    """CPU seconds so far of each thread of ``pid``, summed by thread name (a dmodel
    thread by its role: ``bus``, ``serve``, ``apply`` ...), and of its child processes
    (its redis-server) as ``redis``."""
    tick = os.sysconf("SC_CLK_TCK")
    out: dict[str, float] = {}
    for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
        out["redis"] = out.get("redis", 0.0) + proc_cpu(int(child))
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            comm = (task / "comm").read_text().strip()
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parts = comm.split("-")
        role = parts[1] if parts[0] == "dmodel" and len(parts) > 1 else comm
        out[role] = out.get(role, 0.0) + (int(fields[11]) + int(fields[12])) / tick
    return out


def proc_cpu(pid: int) -> float:
    """CPU seconds so far of process ``pid`` (all threads)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def attacker(*args: str) -> subprocess.Popen[str]:
    from dmodel.tools.driver import child_env

    return subprocess.Popen([sys.executable, str(ATTACKER), *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=child_env(),
                            preexec_fn=(lambda: os.nice(19)) if NICE_ATTACKER else None)


def attack_args(name: str, victim: Any, honest: Any, seconds: float) -> list[str]:
    ep = victim.endpoint
    return {
        "forge-ban": ["forge-ban", ep, honest.stats()["node_id"], str(int(2000 * seconds))],
        "rotate": ["rotate", ep, str(int(5000 * seconds)), "200"],
        "amplify": ["amplify", ep, str(seconds), ""],
        "garbage": ["garbage", ep, str(int(1000 * seconds))],
        "flood": ["flood", ep, str(int(10 * seconds)), "500000"],
        "dial": ["dial", ep, str(seconds)],
    }[name]


def one_run(tmp: Path, name: str | None, seconds: float) -> dict[str, Any]:
    """Victim + honest (+ attacker ``name``); honest rate and victim RSS."""
    procs: list[Any] = []
    trap = None
    try:
        peers: list[str] = []
        if name == "trap":
            trap = attacker("trap", str(seconds + 30))
            peers.append(json.loads(trap.stdout.readline())["endpoint"])  # type: ignore[union-attr]
        victim = spawn(tmp / f"{name}-victim", "victim", peers=peers, options=VICTIM,
                       profile=name or "none")
        procs.append(victim)
        honest = spawn(tmp / f"{name}-honest", "honest", peers=[victim.endpoint],
                       profile=name or "none")
        procs.append(honest)
        victim.ok("wait_peers", n=1 + (name == "trap"), timeout=20)
        honest.ok("wait_peers", n=1, timeout=20)
        target = victim
        if DECOY and name not in (None, "trap"):
            target = spawn(tmp / f"{name}-decoy", "decoy", options=VICTIM)
            procs.append(target)
        if name == "amplify":  # something big for the attacker to ask for
            writer = honest if target is victim else target
            for _ in range(15):
                writer.ok("create", model="Person", fields={"name": "x" * 60_000})
            time.sleep(1)
        baseline = rss(victim.pid)
        peak = [baseline]
        stop = threading.Event()

        def sample() -> None:
            while not stop.wait(0.05):
                peak[0] = max(peak[0], rss(victim.pid))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        proc = None
        if name not in (None, "trap"):
            args = attack_args(name, target, honest, seconds)
            if name == "amplify":
                args[-1] = ",".join(_log_ids(target)[:20])
            proc = attacker(*args)
        peers = {"victim": victim.pid, "honest": honest.pid}
        if target is not victim:
            peers["decoy"] = target.pid
        others = {} if proc is None and trap is None else {"attacker": (proc or trap).pid}

        def cpu_now() -> dict[str, float]:
            out = {f"{p} {k}": v for p, pid in peers.items() for k, v in task_cpu(pid).items()}
            return {**out, **{k: proc_cpu(v) for k, v in others.items()}}

        cpu0 = cpu_now()
        ids: list[str] = []
        t0 = time.monotonic()
        while time.monotonic() - t0 < seconds:
            ids.append(honest.ok("create", model="Person", fields={"name": "h"})["db_id"])
        victim.wait(ids[-1], "name", timeout=60)
        elapsed = time.monotonic() - t0
        cpu = {k: round(v - cpu0.get(k, 0.0), 2) for k, v in cpu_now().items()
               if v - cpu0.get(k, 0.0) >= 0.01}
        have = set(victim.ok("ls", filter="Person:*")["ids"])
        stop.set()
        sampler.join(5)
        if proc is not None:
            proc.communicate(timeout=120)
        guard = victim.stats()["network"].get("guard", {})
        return {"attack": name or "none", "honest_updates": len(ids), "seconds": round(elapsed, 2),
                "cpu_s": cpu,
                "arrived": len(set(ids) & have), "honest_rate": round(len(ids) / elapsed, 1),
                "rss_baseline_mib": round(baseline / MiB, 1),
                "rss_peak_mib": round(max(peak[0], rss(victim.pid)) / MiB, 1),
                "honest_banned": honest.stats()["node_id"] in guard.get("banned", []),
                "guard": {k: v for k, v in guard.items() if isinstance(v, int) and v}}
    finally:
        for p in reversed(procs):
            p.close()
        if trap is not None:
            trap.kill()
            trap.wait(10)


NET_THREADS = ("victim bus", "victim serve", "victim sync", "victim ZMQbg/IO/0")


def net_cpu_s(run: dict[str, Any]) -> float:
    """CPU seconds of the victim's network threads (bus I/O, request worker, sync,
    ZeroMQ's I/O thread): where an attack's frames are read, checked and answered."""
    return round(sum(run["cpu_s"].get(k, 0.0) for k in NET_THREADS), 2)


def victim_cpu_us(run: dict[str, Any]) -> float:
    """The victim's CPU (every thread, and its redis-server) per honest update, in µs."""
    spent = sum(v for k, v in run["cpu_s"].items() if k.startswith("victim "))
    return round(spent / max(1, run["honest_updates"]) * 1e6, 1)


def _log_ids(victim: Any) -> list[str]:
    import msgpack
    import zmq

    sys.path.insert(0, str(ATTACKER.parent))
    from attacker import proven_dealer

    ctx = zmq.Context()
    try:
        sock = proven_dealer(ctx, victim.endpoint)
        sock.send_multipart([b"Q", b"\0" * 8, msgpack.packb(
            {"q": "log", "e": b"", "from": 0, "max": 2000}, use_bin_type=True)])
        while sock.poll(5000):
            frames = sock.recv_multipart()
            if frames[0] == b"R":
                return [i.hex() for i in msgpack.unpackb(frames[2])["ids"]]
        return []
    finally:
        ctx.destroy(linger=0)


def micro() -> dict[str, float]:
    """Handshake cost per connection and limiter cost per message, in µs."""
    from dmodel.net.flood import RateLimiter
    from dmodel.net.identity import KeyPins, NodeKey, proof_message, verify

    a, b = NodeKey.generate(), NodeKey.generate()
    ida, idb, na, nb = os.urandom(16), os.urandom(16), os.urandom(16), os.urandom(16)
    n = 300
    t0 = time.perf_counter()
    for _ in range(n):  # the four steps of one handshake: two signatures, two checks
        pins = KeyPins()
        w = b.sign(proof_message(b"W", idb, b.public, na))
        assert verify(b.public, proof_message(b"W", idb, b.public, na), w)
        pins.accept(idb, b.public)
        h = a.sign(proof_message(b"H", ida, a.public, nb))
        assert verify(a.public, proof_message(b"H", ida, a.public, nb), h)
        pins.accept(ida, a.public)
    handshake = (time.perf_counter() - t0) / n * 1e6
    count, size = RateLimiter(20_000, 40_000), RateLimiter(64 * MiB, 128 * MiB)
    sources = [os.urandom(16) for _ in range(64)]
    m = 200_000
    t0 = time.perf_counter()
    now = time.monotonic()
    for i in range(m):
        src = sources[i & 63]
        count.allow(src, now)
        size.allow(src, now, 300)
        now += 1e-6
    limiter = (time.perf_counter() - t0) / m * 1e6
    return {"handshake_us_per_connection": round(handshake, 1),
            "rate_limit_us_per_message": round(limiter, 2)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--attacks", default="forge-ban,rotate,amplify,garbage,flood,trap,dial")
    parser.add_argument("--json", type=Path, default=common.RESULTS_DIR / "hostile.json")
    parser.add_argument("--repeat", type=int, default=1,
                        help="tries per attack, each followed by a run without attack; "
                             "the median ratio is printed")
    parser.add_argument("--nice-attacker", action="store_true",
                        help="run the attacker at nice 19 (a control: what is left is what "
                             "the victim does, not the attacker's own CPU on shared cores)")
    parser.add_argument("--decoy", action="store_true",
                        help="attack a third node instead of the victim (a control: the "
                             "attack's cost to the machine, none to the victim)")
    parser.add_argument("--cpu", action="store_true",
                        help="print CPU seconds by process and victim thread, per attack")
    parser.add_argument("--profile", metavar="DIR",
                        help="write a cProfile file per victim thread to DIR")
    args = parser.parse_args()
    global PROFILE_DIR, NICE_ATTACKER, DECOY
    NICE_ATTACKER, DECOY = args.nice_attacker, args.decoy
    if args.profile is not None:
        PROFILE_DIR = Path(args.profile).resolve()
        PROFILE_DIR.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    rows, runs = [], []
    bases: list[dict[str, Any]] = []
    with TemporaryDirectory() as tmp:

        def baseline(i: int) -> dict[str, Any]:
            base = one_run(Path(tmp) / f"base{i}", None, args.seconds)
            base["victim_cpu_us"] = victim_cpu_us(base)
            bases.append(base)
            runs.append(base)
            common.log(f"baseline: {base['honest_rate']}/s, rss {base['rss_peak_mib']} MiB")
            return base

        before = baseline(0)
        for name in args.attacks.split(","):
            tries = []
            for _ in range(args.repeat):
                run = one_run(Path(tmp) / f"run{len(runs)}", name, args.seconds)
                run["victim_cpu_us"] = victim_cpu_us(run)
                runs.append(run)
                after = baseline(len(bases))
                ref_rate = (before["honest_rate"] + after["honest_rate"]) / 2
                ref_cpu = (before["victim_cpu_us"] + after["victim_cpu_us"]) / 2
                run["ratio"] = round(run["honest_rate"] / ref_rate, 2)
                run["victim_cpu_ratio"] = round(run["victim_cpu_us"] / ref_cpu, 2)
                run["net_cpu_s"] = net_cpu_s(run)
                run["net_cpu_ref_s"] = round((net_cpu_s(before) + net_cpu_s(after)) / 2, 2)
                run["rss_ok"] = run["rss_peak_mib"] < 2 * run["rss_baseline_mib"] + 64
                tries.append(run)
                common.log(f"{name}: {run['ratio']}x, rss {run['rss_peak_mib']} MiB")
                before = after
            # The median try by ratio (the lower one of two) stands for the attack; all are
            # in the JSON.
            run = sorted(tries, key=lambda r: r["ratio"])[(len(tries) - 1) // 2]
            ratios = "/".join(f"{r['ratio']:.2f}" for r in tries)
            rows.append([name, f"{run['honest_rate']:.0f}/s",
                         common.fmt_ratio(run["ratio"]) + (f" ({ratios})" if len(tries) > 1
                                                           else ""),
                         f"{run['victim_cpu_us']:.0f} µs ({run['victim_cpu_ratio']:.2f}x)",
                         f"{run['net_cpu_s']:.2f} s ({run['net_cpu_ref_s']:.2f} s)",
                         f"{run['cpu_s'].get('attacker', 0.0):.2f} s",
                         f"{sum(r['arrived'] for r in tries)}/"
                         f"{sum(r['honest_updates'] for r in tries)}",
                         f"{run['rss_baseline_mib']} -> "
                         f"{max(r['rss_peak_mib'] for r in tries)} MiB",
                         "BANNED" if any(r["honest_banned"] for r in tries) else "no"])
    figures = micro()
    rates = [b["honest_rate"] for b in bases]
    print(f"\nhonest peer without attack: {sum(rates) / len(rates):.0f} creates/s arriving "
          f"({min(rates):.0f} to {max(rates):.0f} over {len(rates)} runs); victim CPU "
          f"{sum(b['victim_cpu_us'] for b in bases) / len(bases):.0f} µs per update\n")
    common.print_table(["attack", "honest rate", "ratio", "victim CPU/update",
                        "victim net threads (no attack)", "attacker CPU", "arrived",
                        "victim RSS", "honest banned"], rows)
    if args.cpu:
        print("\nCPU seconds while the honest peer wrote:")
        for run in runs:
            spent = sorted(run["cpu_s"].items(), key=lambda kv: -kv[1])
            print(f"  {run['attack']} ({run['seconds']} s): "
                  + ", ".join(f"{k} {v}" for k, v in spent))
    print(f"\nhandshake per connection: {figures['handshake_us_per_connection']} µs; "
          f"rate limiter per message: {figures['rate_limit_us_per_message']} µs")
    return common.finish(args.json, {
        "benchmark": "hostile", "when": common.utc_now(), "params": common.params(args),
        "machine": common.machine_info(), "runs": runs, "micro": figures}, started)


if __name__ == "__main__":
    sys.exit(main())
