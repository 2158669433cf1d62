"""Durability: a node's data survives shutdown, and a SIGKILL in the middle of writing.

The writer runs in a child process (writer.py beside this file). Its embedded redis-server
gets SIGTERM when the writer is SIGKILLed (it never outlives its program), writes its
append-only file and exits; the next node opened in the same home starts a new server,
which must load every acknowledged write from that file. One variant SIGKILLs the server
too (before its death signal could flush anything more), and the store must still come
back from its append-only file.
"""

from __future__ import annotations

import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from peer_driver import kill_redis, redis_pid

import dmodel
from dmodel import clock

pytestmark = [pytest.mark.multiprocess, pytest.mark.timeout(120)]

WRITER = Path(__file__).with_name("writer.py")
BURST = 150  # writes acknowledged before the kill


class Person(dmodel.DModel):
    name = dmodel.DField("name", False)
    salary = dmodel.DField("salary", True)
    tags = dmodel.DDict()


@pytest.fixture
def home(tmp_path):
    path = tmp_path / "home"
    yield path
    kill_redis(path)  # whatever a test left running


def start_writer(home: Path) -> tuple[subprocess.Popen, queue.Queue]:
    proc = subprocess.Popen([sys.executable, str(WRITER), str(home)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    lines: queue.Queue = queue.Queue()

    def pump() -> None:
        for line in proc.stdout:
            lines.put(line.strip())
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    return proc, lines


def wait_for_writes(proc: subprocess.Popen, lines: queue.Queue, count: int,
                    timeout: float = 60.0) -> tuple[str, int]:
    """Read the writer's reports until ``count`` writes are acknowledged (bounded)."""
    deadline = time.monotonic() + timeout
    db_id, last = "", 0
    while last < count:
        remaining = deadline - time.monotonic()
        assert remaining > 0, f"writer reported only {last} writes in {timeout} s"
        try:
            line = lines.get(timeout=remaining)
        except queue.Empty:
            continue
        if line is None:
            raise AssertionError(f"writer exited early: {proc.stderr.read()[-2000:]}")
        if line.startswith("ready "):
            db_id = line.split()[1]
        else:
            last = int(line)
    return db_id, last


def sigkill_writer_mid_burst(home: Path, *, and_redis: bool = False) -> tuple[str, int]:
    proc, lines = start_writer(home)
    try:
        db_id, acknowledged = wait_for_writes(proc, lines, BURST)
        if and_redis:
            assert kill_redis(home)  # first, so that it gets no chance to shut down
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        proc.stdout.close()
        proc.stderr.close()
    return db_id, acknowledged


def check_store(node: dmodel.Node) -> None:
    assert node.verify_store() == []
    for db_id in node.object_ids():
        for name, reg in node.store.registers(db_id).items():
            node.verify_register(db_id, name, reg)  # raises IntegrityError on a bad one
    # Every log entry names a stored update (retention leaves gaps in the positions).
    assert len(node.updates_since(0)) == len(node.store.log_range()) <= node.log_length()


# ------------------------------------------------------------------ clean shutdown


def test_data_survives_shutdown_and_reopen(home) -> None:
    node = dmodel.Node(home)
    p = Person.create(name="Bob", salary="1234", node=node)
    p.tags["k"] = [1, 2]
    other = Person([], node=node)
    last_ts = node.clock.last
    log = node.log_length()
    node_id = node.node_id
    node.shutdown()
    assert redis_pid(home) is None  # the server was stopped, not left behind

    # Reopen with a physical clock an hour behind: timestamps must still move forward.
    reopened = dmodel.Node(home, now=lambda: time.time_ns() - 3600 * 10**9)
    try:
        assert reopened.node_id == node_id
        assert reopened.log_length() == log
        q = Person(p.db_id, node=reopened)
        assert q.is_owned() and Person(other.db_id, node=reopened).is_owned()
        assert q.name.get() == "Bob" and q.salary.get() == "1234"
        assert q.tags["k"] == [1, 2]
        assert sorted(reopened.keyring.owned()) == sorted([p.db_id, other.db_id])
        assert reopened.clock.last >= last_ts
        q.name = "Robert"
        new_ts = reopened.history(p.db_id)[-1].timestamp
        assert new_ts > last_ts
        assert clock.physical_ms(new_ts) >= clock.physical_ms(last_ts)
        check_store(reopened)
    finally:
        reopened.shutdown()
    assert redis_pid(home) is None


# ------------------------------------------------------------------ SIGKILL


def test_sigkill_of_the_writer_mid_burst(home) -> None:
    server = None
    db_id, acknowledged = sigkill_writer_mid_burst(home)
    deadline = time.monotonic() + 15
    while redis_pid(home) is not None:  # the store stops with its writer (no orphan)
        server = server or redis_pid(home)
        assert time.monotonic() < deadline, "redis-server outlived its SIGKILLed writer"
        time.sleep(0.05)
    node = dmodel.Node(home)
    try:
        assert redis_pid(home) not in (None, server)  # a new server, from the AOF
        check_store(node)
        p = Person(db_id, node=node)
        assert p.is_owned()
        # every acknowledged write is there (SIGTERM made the server flush its AOF)
        assert int(p.name.get()[1:]) >= acknowledged
        assert isinstance(p.salary.get(), int)
        before = node.clock.last
        p.name = "after the crash"
        assert node.clock.last > before
        check_store(node)
    finally:
        node.shutdown()
    assert redis_pid(home) is None


def test_sigkill_of_the_writer_and_its_redis(home) -> None:
    db_id, acknowledged = sigkill_writer_mid_burst(home, and_redis=True)
    old_server = redis_pid(home)
    node = dmodel.Node(home)  # starts a new server, which loads the append-only file
    try:
        assert redis_pid(home) not in (None, old_server)
        check_store(node)
        p = Person(db_id, node=node)
        assert p.is_owned()
        # A write reaches the AOF before its reply; SIGKILL loses no written data, but with
        # appendfsync everysec a slow fsync may delay the write, so allow a short tail.
        assert int(p.name.get()[1:]) >= acknowledged - 50
        p.name = "after the crash"
        assert p.name.get(verified=True) == "after the crash"
        check_store(node)
    finally:
        node.shutdown()
