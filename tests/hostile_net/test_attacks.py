"""Attacks on a real peer from a hostile process, while an honest peer keeps writing.

Three processes per test, all on 127.0.0.1: the victim and the honest peer are
``dmodel peer --stdin-commands`` children (:class:`dmodel.tools.driver.PeerProcess`),
the attacker is ``attacker.py`` (raw pyzmq and UDP sockets), each stopped by its own
handle. Every test asserts the same four things: every honest update reaches the victim
(catch-up included), the victim's resident memory (VmRSS of its process) stays under
``baseline + RSS_SLACK``, the honest peer is never banned, and the attack shows in the
victim's ``node.network.stats``. Attack windows are short and sizes small: they show
the bound, not the worst case (``benchmarks/bench_hostile.py`` runs them longer).
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dmodel.tools.driver import PeerProcess, child_env, peer_argv

pytestmark = [pytest.mark.timeout(90), pytest.mark.skipif(
    not Path("/proc/self/status").exists(), reason="reads VmRSS from /proc")]

HERE = Path(__file__).resolve().parent
ATTACKER = HERE / "attacker.py"
MODELS = f"{HERE.parent / 'multiprocess' / 'peer_driver.py'}:Person"
RSS_SLACK = 64 * 1024 * 1024
VICTIM_OPTIONS = {
    "sync_interval": 0.5, "sync_turn_seconds": 1.0, "flood_threshold": 200,
    "max_update_bytes_per_s": 2 * 1024 * 1024, "queue_bytes": 16 * 1024 * 1024,
    "reply_bytes_per_s": 2 * 1024 * 1024,
}


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def spawn(home: Path, name: str, peers: list[str] = (), options: dict | None = None
          ) -> PeerProcess:
    extra = ["--network-options", json.dumps(options)] if options else []
    argv = peer_argv(home, name=name, peers=peers, models=[MODELS], options=extra)
    return PeerProcess(argv, name=name, home=home, timeout=30)


class Writer:
    """The honest peer creating one object every ``period`` seconds on a thread."""

    def __init__(self, peer: PeerProcess, period: float = 0.05, size: int = 0) -> None:
        self.peer, self.period, self.size = peer, period, size
        self.ids: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def write(self, n: int) -> None:
        for _ in range(n):
            name = f"h{len(self.ids)}" + "x" * self.size
            self.ids.append(self.peer.ok("create", model="Person", fields={"name": name})
                            ["db_id"])

    def _run(self) -> None:
        while not self._stop.wait(self.period):
            self.write(1)

    def __enter__(self) -> Writer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)


def attack(*args: str, timeout: float = 30.0) -> dict[str, Any]:
    """Run the attacker to its end (bounded); its JSON summary."""
    proc = subprocess.Popen([sys.executable, str(ATTACKER), *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=child_env())
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert proc.returncode == 0, err[-2000:]
    return json.loads(out.strip().splitlines()[-1])


@pytest.fixture
def pair(tmp_path) -> Iterator[tuple[PeerProcess, PeerProcess]]:
    """(victim, honest): linked, the victim's baseline RSS taken."""
    procs: list[PeerProcess] = []
    try:
        victim = spawn(tmp_path / "victim", "victim", options=VICTIM_OPTIONS)
        procs.append(victim)
        honest = spawn(tmp_path / "honest", "honest", peers=[victim.endpoint])
        procs.append(honest)
        assert victim.ok("wait_peers", n=1, timeout=15)["ready"]
        assert honest.ok("wait_peers", n=1, timeout=15)["ready"]
        yield victim, honest
    finally:
        for proc in reversed(procs):
            proc.close()


def guard(victim: PeerProcess) -> dict[str, Any]:
    return victim.stats()["network"]["guard"]


def check_outcome(victim: PeerProcess, honest: PeerProcess, writer: Writer,
                  baseline: int, peak: int) -> dict[str, Any]:
    """The four promises: all honest updates arrived, memory bound, honest not banned."""
    assert writer.ids, "the honest peer wrote nothing"
    victim.wait(writer.ids[-1], "name", timeout=20)
    have = set(victim.ok("ls", filter="Person:*")["ids"])
    assert set(writer.ids) <= have
    assert peak < baseline + RSS_SLACK, (peak, baseline)
    got = guard(victim)
    honest_id = honest.stats()["node_id"]
    assert honest_id not in got["banned"]
    assert victim.ok("wait_peers", n=1, timeout=10)["ready"]
    return got


def during(victim: PeerProcess, fn: Any) -> tuple[Any, int]:
    """Run ``fn()`` while sampling the victim's RSS; (its result, the peak RSS)."""
    peak = [rss(victim.pid)]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.05):
            peak[0] = max(peak[0], rss(victim.pid))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        result = fn()
    finally:
        done.set()
        sampler.join(5)
    return result, max(peak[0], rss(victim.pid))


def run_attack(pair: tuple[PeerProcess, PeerProcess], *args: str,
               timeout: float = 30.0) -> tuple[dict[str, Any], dict[str, Any]]:
    """The attacker's summary and the victim's guard counters, after one attack run
    while the honest peer writes; the four promises checked."""
    victim, honest = pair
    baseline = rss(victim.pid)
    with Writer(honest) as writer:
        result, peak = during(victim, lambda: attack(*args, timeout=timeout))
    return result, check_outcome(victim, honest, writer, baseline, peak)


# ------------------------------------------------------------------ attacks


def test_forging_the_honest_routing_id_bans_the_connection_not_the_peer(pair) -> None:
    victim, honest = pair
    _, got = run_attack(pair, "forge-ban", victim.endpoint, honest.stats()["node_id"], "1100")
    assert got["bans"] >= 1 and any(b.startswith("conn:") for b in got["banned"])


def test_rotating_routing_ids_share_one_budget(pair) -> None:
    result, got = run_attack(pair, "rotate", pair[0].endpoint, "5000", "200")
    assert result["sockets"] == 25
    assert got.get("unproven_limited", 0) + got.get("unproven", 0) > 0


def test_reply_amplification_is_bounded_by_the_reply_budget(pair) -> None:
    victim, honest = pair
    big = Writer(honest, size=60_000)
    big.write(15)  # about 1 MB of updates the attacker asks for again and again
    victim.wait(big.ids[-1], "name", timeout=20)
    ids = victim.ok("stats")  # warm the JSON path before the baseline
    baseline = rss(victim.pid)
    log_ids = _log_ids(victim)
    with Writer(honest) as writer:
        _, peak = during(victim, lambda: attack("amplify", victim.endpoint, "3",
                                                ",".join(log_ids[:20])))
    got = check_outcome(victim, honest, writer, baseline, peak)
    limited = victim.stats()["network"]["replies_limited"]
    assert limited + got.get("reply_hwm", 0) + got.get("requests_limited", 0) \
        + got.get("requests_busy", 0) > 0, (ids, got)


def _log_ids(victim: PeerProcess) -> list[str]:
    """Update ids in the victim's log, through a raw request of our own."""
    import zmq

    sys.path.insert(0, str(HERE))
    import msgpack
    from attacker import proven_dealer

    ctx = zmq.Context()
    try:
        sock = proven_dealer(ctx, victim.endpoint)
        sock.send_multipart([b"Q", b"\0" * 8, msgpack.packb(
            {"q": "log", "e": b"", "from": 0, "max": 2000}, use_bin_type=True)])
        while True:
            assert sock.poll(5000)
            frames = sock.recv_multipart()
            if frames[0] == b"R":
                return [i.hex() for i in msgpack.unpackb(frames[2])["ids"]]
    finally:
        ctx.destroy(linger=0)


def test_garbage_updates_get_their_sender_banned(pair) -> None:
    _, got = run_attack(pair, "garbage", pair[0].endpoint, "500")
    assert got["invalid_update"] >= 200 and got["bans"] >= 1


def test_a_valid_flood_is_rate_limited_in_bytes(pair) -> None:
    result, got = run_attack(pair, "flood", pair[0].endpoint, "40", "500000", timeout=60)
    assert result["bytes"] > 19_000_000
    assert got.get("updates_limited", 0) > 0


@contextlib.contextmanager
def lying_peer(seconds: int, *mode: str) -> Iterator[tuple[str, list[PeerProcess]]]:
    """A fake peer that answers catch-up with lies (``attacker.py trap``) for ``seconds``:
    yields its endpoint and a list for the peers the test starts, all closed after."""
    trap = subprocess.Popen([sys.executable, str(ATTACKER), "trap", str(seconds), *mode],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=child_env())
    procs: list[PeerProcess] = []
    try:
        yield json.loads(trap.stdout.readline())["endpoint"], procs
    finally:
        for proc in reversed(procs):
            proc.close()
        trap.kill()
        trap.wait(10)


def test_the_catch_up_trap_costs_one_turn(tmp_path) -> None:
    with lying_peer(25) as (trap_ep, procs):
        honest = spawn(tmp_path / "honest", "honest")
        procs.append(honest)
        writer = Writer(honest)
        writer.write(20)  # before the victim exists: these come by catch-up only
        victim = spawn(tmp_path / "victim", "victim", peers=[trap_ep, honest.endpoint],
                       options=VICTIM_OPTIONS)
        procs.append(victim)
        baseline = rss(victim.pid)
        with writer:
            _, peak = during(victim, lambda: victim.wait(writer.ids[19], "name", timeout=20))
        got = check_outcome(victim, honest, writer, baseline, peak)
        # The trap's turn comes in some pass (it may come after the honest one's).
        deadline = time.monotonic() + 15
        while victim.stats()["network"]["sync_bad_replies"] < 1:
            assert time.monotonic() < deadline, (got, victim.stderr_tail(30))
            time.sleep(0.1)


def test_lying_state_sums_cost_a_turn_and_bounded_memory(tmp_path) -> None:
    """The trap's state sums all differ, its buckets hold made-up objects, and each of
    them holds 2,000 more ids at every ask, none served: the victim spends a turn on it
    (bounded by the turn's time and bytes), says so, and catches up from the honest."""
    with lying_peer(25, "sums") as (trap_ep, procs):
        honest = spawn(tmp_path / "honest", "honest")
        procs.append(honest)
        writer = Writer(honest)
        writer.write(30)  # the victim holds more than half the trap's claimed log of 40
        victim = spawn(tmp_path / "victim", "victim", peers=[honest.endpoint, trap_ep],
                       options=VICTIM_OPTIONS | {"state_sync_after": 10})
        procs.append(victim)
        baseline = rss(victim.pid)
        with writer:
            _, peak = during(victim, lambda: victim.wait(writer.ids[29], "name", timeout=20))
        check_outcome(victim, honest, writer, baseline, peak)
        deadline = time.monotonic() + 20
        while True:  # the trap's turns reach its objects' ids (and end there)
            net = victim.stats()["network"]
            if net["state_objects"] > 0 and net["sync_bad_replies"] >= 1:
                break
            assert time.monotonic() < deadline, (net, victim.stderr_tail(30))
            time.sleep(0.2)
        assert rss(victim.pid) < baseline + RSS_SLACK


def test_learned_endpoints_do_not_make_the_victim_dial_around(pair) -> None:
    result, got = run_attack(pair, "dial", pair[0].endpoint, "4")
    assert result["accepted"] <= 4 * 4, result  # dial_per_address sockets, slow retries
    assert got["endpoint_refused"] > 0  # the ipc:// ones, never dialled
    # One link per endpoint however many node ids claim it, so caps are rarely needed.
    assert got["dials_refused"] + got.get("endpoint_refused", 0) > 0
