"""Clock skew over real ZeroMQ on 127.0.0.1 (issue 10): updates from a fast clock are
held, not dropped, and applied once the receiver's clock is within the skew bound; a
timestamp pushed into the future never drags a node's clock beyond that bound.

The nodes' physical clocks are the wall clock plus an offset the test sets (``now=``),
so "a minute later" is an assignment, not a sleep; waits are bounded (``wait_until``).
"""

from __future__ import annotations

import time

import pytest
from helpers import wait_until

import dmodel
from dmodel import clock

pytestmark = pytest.mark.timeout(60)

LOOPBACK = "tcp://127.0.0.1:*"


class Offset:
    """The wall clock (ns) shifted by ``seconds``, which the test may change."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def __call__(self) -> int:
        return time.time_ns() + int(self.seconds * 1e9)


class Note(dmodel.DModel):
    title = dmodel.DField()
    body = dmodel.DField()


@pytest.fixture
def net(make_node):
    def _net(name: str, now: Offset, peers=()) -> dmodel.Node:
        return make_node(name, listen=LOOPBACK, discovery=False, now=now,
                         peers=[p.network.endpoint for p in peers],
                         network_options={"sync_interval": 0.2})
    return _net


def wall_ms() -> int:
    return time.time_ns() // 1_000_000


def test_an_update_from_a_fast_clock_is_held_then_applied(net) -> None:
    fast_clock, slow_clock = Offset(59), Offset(-3)
    fast = net("fast", fast_clock)
    slow = net("slow", slow_clock, peers=[fast])
    assert fast.network.wait_for_peers(1, timeout=10)
    assert slow.network.wait_for_peers(1, timeout=10)
    note = Note.create(node=fast, title="from a fast clock")
    note.body = "second"
    stamps = [e.timestamp for e in fast.history(note.db_id)]
    assert all(clock.physical_ms(s) > wall_ms() + 50_000 for s in stamps)

    wait_until(lambda: slow.future_count >= 1)      # held: the create, and what follows
    assert slow.stats.dropped.keys() <= {"ReplayedUpdate"}
    assert not slow.exists(note.db_id)
    assert slow.clock.ahead_ms() <= slow.skew_ms   # a held update moves no clock

    slow_clock.seconds = 45                          # still more than 5 s short of them
    time.sleep(0.3)                                  # a few ticks of the release timer
    assert not slow.exists(note.db_id)
    assert slow.future_count >= 1

    slow_clock.seconds = 60                          # within the bound: applied
    wait_until(lambda: slow.exists(note.db_id) and slow.read(note.db_id, "body") == "second")
    assert slow.read(note.db_id, "title") == "from a fast clock"
    wait_until(lambda: slow.future_count == 0)
    assert slow.store.future_updates() == []
    assert slow.clock.ahead_ms() <= slow.skew_ms
    assert [e.update_id for e in slow.history(note.db_id)] == [
        e.update_id for e in fast.history(note.db_id)]
    assert slow.stats.dropped.keys() <= {"ReplayedUpdate"}


def test_a_clock_push_over_the_network_stays_within_the_bound(net) -> None:
    victim_clock = Offset(0)
    victim = net("victim", victim_clock)
    near = net("near", Offset(4.9), peers=[victim])
    far = net("far", Offset(59.9), peers=[victim])
    assert victim.network.wait_for_peers(2, timeout=10)
    pushed = Note.create(node=near, title="just inside the bound")
    wait_until(lambda: victim.exists(pushed.db_id))          # accepted
    assert victim.clock.ahead_ms() <= victim.skew_ms
    harder = Note.create(node=far, title="a minute ahead")    # a fresh identity
    wait_until(lambda: victim.future_count == 1)
    assert not victim.exists(harder.db_id)
    assert victim.clock.ahead_ms() <= victim.skew_ms

    before = wall_ms()
    ours = Note.create(node=victim, title="honest")
    stamp = clock.physical_ms(victim.history(ours.db_id)[-1].timestamp)
    assert before <= stamp <= wall_ms() + victim.skew_ms      # near real time
    assert stamp < clock.physical_ms(far.history(harder.db_id)[-1].timestamp) - 50_000

    victim_clock.seconds = 56                                # its time comes
    wait_until(lambda: victim.exists(harder.db_id))
    assert victim.future_count == 0
    assert victim.clock.ahead_ms() <= victim.skew_ms
