"""Peers on several hosts, played by separate processes on 127.0.0.1.

Each peer is ``python -m dmodel peer --stdin-commands`` with its own home (keyring,
embedded redis-server), driven with the JSON-lines protocol of dmodel.tools.peer through
:class:`peer_driver.PeerProc`. Waits for a value happen inside the child (its ``wait``
command is a bounded loop), so nothing here sleeps.
"""

from __future__ import annotations

import pytest
from helpers import wait_until
from peer_driver import PeerProc, cli_argv, kill_redis, redis_pid

pytestmark = [pytest.mark.multiprocess, pytest.mark.timeout(90)]


@pytest.fixture
def spawn(tmp_path):
    """``spawn(name, peers=[proc or endpoint], listen=..., options=[...])``: a CLI peer.

    The same name means the same home (a restart). Every child is stopped by its
    handle, and any redis-server a killed child left behind by its pidfile.
    """
    procs: list[PeerProc] = []

    def _spawn(name: str, *, peers=(), listen: str = "tcp://127.0.0.1:*",
               options=()) -> PeerProc:
        home = tmp_path / name
        endpoints = [p if isinstance(p, str) else p.endpoint for p in peers]
        proc = PeerProc(cli_argv(home, peers=endpoints, listen=listen, options=options),
                        home=home, name=name)
        procs.append(proc)
        return proc

    yield _spawn
    for proc in reversed(procs):
        proc.close()
    for home in {proc.home for proc in procs}:
        kill_redis(home)


def linked(*procs: PeerProc) -> None:
    for proc in procs:
        assert proc.ok("wait_peers", n=len(procs) - 1, timeout=10)["ready"], proc.name


def test_walkthrough_across_processes(spawn) -> None:
    a = spawn("a")
    b = spawn("b", peers=[a])
    linked(a, b)

    p = a.create(fields={"name": "Bob", "salary": "1234"})
    b.wait(p, "name", value="Bob", caller="")
    assert b.call("get", db_id=p, field="salary", caller="")["error"] == "DecryptionError"

    chief = b.create()
    a.wait(chief)
    worker = a.create(authorized=[chief], fields={"name": "Bob", "salary": "44321"})
    b.wait(worker, "salary", value="44321", caller=chief)
    b.ok("set", db_id=worker, field="name", value="Robert", caller=chief)
    a.wait(worker, "name", value="Robert")

    intruder = b.create()
    refused = b.call("set", db_id=worker, field="name", value="hacked", caller=intruder)
    assert refused["error"] == "UnauthorizedError"

    # A peer that defers unauthorized updates to listeners takes its caller's write and
    # publishes it; a and b (default policy) hold it back.
    lax = spawn("lax", peers=[b], options=["--unauthorized-policy", "listeners"])
    lax.wait(worker, "name", value="Robert")
    attacker = lax.create()
    lax.ok("set", db_id=worker, field="name", value="hacked", caller=attacker)
    assert lax.get(worker, "name") == "hacked"
    wait_until(lambda: a.stats()["rejected"].get("UnauthorizedError") == 1)
    wait_until(lambda: b.stats()["rejected"].get("UnauthorizedError") == 2)  # + the local one
    assert a.get(worker, "name") == b.get(worker, "name") == "Robert"


def test_late_joiner_gets_what_was_there_before_it(spawn) -> None:
    a = spawn("a")
    b = spawn("b", peers=[a])
    linked(a, b)
    early = [a.create(fields={"name": f"a{i}", "salary": str(i)}) for i in range(3)]
    early += [b.create(fields={"name": f"b{i}"}) for i in range(2)]
    a.ok("set", db_id=early[0], field="name", value="renamed")
    for db_id in early:
        b.wait(db_id)

    c = spawn("c", peers=[b])
    c.wait(early[0], "name", value="renamed")
    for db_id in early[1:]:
        c.wait(db_id, "name")
    # By catch-up: 5 creates + 5 field sets + the rename. (A wait: the counter moves
    # just after the batch it counts is committed and visible.)
    wait_until(lambda: c.stats()["network"]["pulled"] >= 11)
    late = c.create(fields={"name": "late"})
    a.wait(late, "name", value="late")
    b.wait(late, "name", value="late")
    wait_until(lambda: len({proc.stats()["log_length"] for proc in (a, b, c)}) == 1)


def test_sigkilled_peer_restarts_and_catches_up(spawn) -> None:
    a = spawn("a")
    b = spawn("b", peers=[a])
    linked(a, b)
    p = a.create(fields={"name": "v0"})
    b.wait(p, "name", value="v0")
    q = b.create(fields={"name": "made on b"})
    a.wait(q, "name", value="made on b")

    pid = redis_pid(b.home)
    assert pid is not None
    b.kill()
    # The embedded redis-server stops with its SIGKILLed owner (no orphan).
    wait_until(lambda: redis_pid(b.home) is None, timeout=15)

    a.ok("set", db_id=p, field="name", value="v1")
    r = a.create(fields={"name": "while b was down"})

    b = spawn("b", peers=[a])  # same home
    b.wait(p, "name", value="v1")
    b.wait(r, "name", value="while b was down")
    assert b.get(q, "name") == "made on b"
    wait_until(lambda: b.stats()["log_length"] == a.stats()["log_length"])
    assert redis_pid(b.home) not in (None, pid)  # a new server, from the AOF


def test_partition_heals_across_processes(spawn, tmp_path) -> None:
    a = spawn("a")
    b = spawn("b", peers=[a])
    linked(a, b)
    editor = b.create()
    a.wait(editor)
    doc = a.create(authorized=[editor], fields={"name": "draft"})
    b.wait(doc, "name", value="draft")
    b.close()

    # The partition: b comes back on an ipc endpoint a has never heard of, with no peers.
    b = spawn("b", listen=f"ipc://{tmp_path}/b-alone")
    a.ok("set", db_id=doc, field="name", value="from a")
    only_a = a.create(fields={"name": "only a"})
    b.ok("set", db_id=doc, field="name", value="from b", caller=editor)
    only_b = b.create(fields={"name": "only b"})
    assert a.get(doc, "name") == "from a" and b.get(doc, "name") == "from b"
    assert b.call("get", db_id=only_a, field="name")["error"] == "ObjectNotFoundError"
    b.close()

    # The partition heals: b is back on tcp and knows a again.
    b = spawn("b", peers=[a])
    b.wait(only_a, "name", value="only a")
    a.wait(only_b, "name", value="only b", timeout=30)
    wait_until(lambda: a.get(doc, "name") == b.get(doc, "name"), timeout=15)
    assert a.get(doc, "name") in ("from a", "from b")
    wait_until(lambda: a.stats()["log_length"] == b.stats()["log_length"], timeout=15)
