"""Log pages served while the node writes (dmodel.store.redis.RedisStore.log_page, the
"log" request of dmodel.net.sync): a page never lists an id beyond the end it reports,
which a peer checks (net/catchup._page_error) and would count against an honest node."""

from __future__ import annotations

import threading

import dmodel
from dmodel.net import sync
from dmodel.net.catchup import _page_error


class Item(dmodel.DModel):
    name = dmodel.DField()


def test_pages_read_during_commits_stay_within_their_end(make_node) -> None:
    node = make_node("a")
    items = [Item.create(name="x", node=node) for _ in range(4)]
    stop = threading.Event()

    def write() -> None:
        i = 0
        while not stop.is_set() and i < 3_000:
            items[i % 4].name = f"v{i}"
            i += 1

    writer = threading.Thread(target=write)
    writer.start()
    pages, errors = 0, []
    try:
        while writer.is_alive() and pages < 20_000:
            # what the request worker does for a peer (replication._serve)
            start = max(0, node.log_length() - 3)
            ids, resume = node.store.log_page(start, 64)
            page = sync.LogPage(b"e", start, node.log_length(), tuple(ids), resume)
            why = _page_error(page, start, 64)
            if why:
                errors.append(why)
            pages += 1
    finally:
        stop.set()
        writer.join(30)
    assert pages > 100
    assert errors == []
