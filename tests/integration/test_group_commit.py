"""Group commit (dmodel/node/writes.py): concurrent local writers share one commit, and
each write is still signed, chained, decided and acknowledged on its own.

The tests hold the apply lock while writer threads queue, so that the group they form
is known; then they check the outcome per writer and on a receiver fed every update.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import pytest
from helpers import wait_until

import dmodel
from dmodel.update import decode


class GDoc(dmodel.DModel):
    title = dmodel.DField()
    secret = dmodel.DField(encrypted=True)
    items = dmodel.DList()


def queued_together(node: dmodel.Node, writes: list[Callable[[], Any]]) -> list[Any]:
    """Run ``writes`` on threads that all queue before any may commit; each one's
    result, or the exception it raised."""
    results: list[Any] = [None] * len(writes)

    def run(i: int) -> None:
        try:
            results[i] = writes[i]()
        except Exception as exc:
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(writes))]
    queue = node.writes
    with queue.lock:
        for thread in threads:
            thread.start()
        wait_until(lambda: queue.queued == len(writes))
    for thread in threads:
        thread.join(timeout=30)
        assert not thread.is_alive()
    return results


def receive_all(make_node, src: dmodel.Node) -> dmodel.Node:
    r = make_node("receiver")
    for raw in src.updates_since(0):
        r.ingest(raw)
    assert r.pending_count == 0
    assert not r.stats.dropped
    return r


def test_concurrent_writers_share_one_commit_and_each_is_acknowledged(make_node) -> None:
    node = make_node("a")
    docs = [GDoc.create(node=node, title="t") for _ in range(6)]
    commits = node.writes.commits
    results = queued_together(node, [lambda d=d, i=i: setattr(d, "title", f"v{i}")
                                     for i, d in enumerate(docs)])
    assert results == [None] * 6
    assert node.writes.commits == commits + 1  # one commit for the six
    assert [d.title.get() for d in docs] == [f"v{i}" for i in range(6)]
    r = receive_all(make_node, node)
    assert [GDoc(d.db_id, node=r).title.get() for d in docs] == [f"v{i}" for i in range(6)]
    assert node.verify_store() == [] and r.verify_store() == []


def failing_build() -> list[Any]:
    raise ValueError("bad build")


def test_a_write_refused_in_a_group_fails_alone(make_node) -> None:
    node = make_node("a")
    owner, outsider, other = (GDoc.create(node=node, title="t") for _ in range(3))
    intruding = GDoc(owner.db_id, outsider.db_id, node=node)  # no grant: refused locally
    results = queued_together(node, [
        lambda: setattr(other, "title", "fine"),
        lambda: setattr(intruding, "title", "intruder"),
        lambda: node.write(outsider.db_id, failing_build),
        lambda: setattr(outsider, "secret", "sealed"),  # same caller: next group
    ])
    assert results[0] is None and results[3] is None
    assert isinstance(results[1], dmodel.UnauthorizedError)
    assert isinstance(results[2], ValueError) and str(results[2]) == "bad build"
    assert owner.title.get() == "t" and other.title.get() == "fine"
    assert outsider.secret.get() == "sealed"
    r = receive_all(make_node, node)
    assert GDoc(other.db_id, node=r).title.get() == "fine"
    assert GDoc(owner.db_id, node=r).title.get() == "t"


def test_writes_of_one_caller_stay_chained_in_order(make_node) -> None:
    node = make_node("a")
    doc = GDoc.create(node=node, title="t")
    commits = node.writes.commits
    results = queued_together(node, [lambda i=i: doc.items.append(i) for i in range(4)])
    assert results == [None] * 4
    assert node.writes.commits == commits + 4  # one caller: a commit each
    chain = [decode(raw) for raw in node.updates_since(0) if decode(raw).caller == doc.db_id]
    assert all(b.prev == a.id for a, b in zip(chain, chain[1:], strict=False))
    assert sorted(doc.items.to_list()) == [0, 1, 2, 3]
    r = receive_all(make_node, node)
    assert GDoc(doc.db_id, node=r).items.to_list() == doc.items.to_list()


def test_an_authorization_change_goes_alone(make_node) -> None:
    node = make_node("a")
    owner, member, other = (GDoc.create(node=node, title="t") for _ in range(3))
    commits = node.writes.commits
    results = queued_together(node, [
        lambda: setattr(other, "title", "x"),
        lambda: owner.append_update_authorized(member.db_id),
        lambda: setattr(member, "title", "y"),
    ])
    assert results == [None, None, None]
    assert node.writes.commits == commits + 3
    assert member.db_id in node.members(owner.db_id, "u")


@pytest.mark.parametrize("n", [1, 8])
def test_grouped_creates_each_get_their_own_keys(make_node, n: int) -> None:
    node = make_node("a")
    results = queued_together(node, [lambda i=i: GDoc.create(node=node, title=f"c{i}")
                                     for i in range(n)])
    assert len({doc.db_id for doc in results}) == n
    r = receive_all(make_node, node)
    assert sorted(GDoc(d.db_id, node=r).title.get() for d in results) == sorted(
        f"c{i}" for i in range(n))
