"""Catch-up protocol between peers: message codecs (pure, bytes in, bytes out).

Every node keeps a log of the updates it stored, in store order, and a random
*epoch* that changes only when its store is new. A peer remembers, per node, the
(epoch, position) it has read up to, and asks for the update ids that follow (a
digest: 32 bytes an update), then fetches only the updates it lacks. The cost of a
pass is the number of log entries added since the last one, and only missing
updates travel in full; updates that already arrived live are not sent again.
If the epoch differs (the other store was replaced), the asker starts again from 0.
Dependencies (an update whose previous update or caller is unknown) are fetched
by id.

Requests (msgpack maps, key ``q``)::

    {"q": "log", "e": epoch, "from": position, "max": n}
        -> {"e": epoch, "from": position, "end": log length, "ids": [update id, ...]}
    {"q": "get", "ids": [update id, ...]}     -> {"u": [raw update, ...]}
    {"q": "obj", "ids": [db_id, ...]}         -> {"u": [raw create update, ...]}

State sums (``dmodel.node.statesum``), for two peers that both hold most of the state
and only need what differs: groups, then the buckets of the groups that differ, then
the objects of the buckets that differ, then the update ids an object holds::

    {"q": "sum"}  -> {"e": epoch, "end": log length, "g": [16-byte sum, ...]}
                     or {"busy": true} while the sums are being built
    {"q": "sumg", "ids": [group, ...]}   -> {"b": [[group, [16-byte sum, ...]], ...]}
    {"q": "sumb", "ids": [bucket, ...]}  -> {"o": [[bucket, [[db_id, digest], ...]], ...]}
    {"q": "stored", "ids": [[db_id, from], ...]}
        -> {"s": [[db_id, from, [update id, ...], more], ...]}

A reply may answer fewer entries than asked (the size limit): the asker asks again for
the rest. ``more`` says the object holds ids past those sent (ask again from there).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgpack

from ..buckets import BUCKETS, BUCKETS_PER_GROUP, GROUPS, SUM_SIZE
from ..errors import ProtocolError

MAX_PAGE = 2000
MAX_IDS = 1000
MAX_SUM_IDS = 64  # groups, buckets or objects in one sum request


class SyncMessageError(ProtocolError):
    """A sync message that does not follow the protocol."""


@dataclass(frozen=True, slots=True)
class LogRequest:
    epoch: bytes
    start: int
    limit: int


@dataclass(frozen=True, slots=True)
class FetchRequest:
    kind: str  # "get" (update ids) or "obj" (db_ids)
    ids: tuple[Any, ...]


@dataclass(frozen=True, slots=True)
class SumRequest:
    kind: str  # "sum" (no ids), "sumg" (group numbers), "sumb" (bucket numbers),
    #            "stored" ((db_id, from) pairs)
    ids: tuple[Any, ...] = ()


@dataclass(frozen=True, slots=True)
class SumTop:
    epoch: bytes
    end: int
    groups: tuple[bytes, ...]


@dataclass(frozen=True, slots=True)
class StoredIds:
    db_id: str
    start: int
    ids: tuple[bytes, ...]
    more: bool


@dataclass(frozen=True, slots=True)
class LogPage:
    epoch: bytes
    start: int
    end: int
    ids: tuple[bytes, ...]
    next: int = -1  # where the next page starts (-1: start + len(ids), as before gaps)

    @property
    def resume(self) -> int:
        return self.start + len(self.ids) if self.next < 0 else self.next


def encode_log_request(epoch: bytes, start: int, limit: int = 500) -> bytes:
    return msgpack.packb({"q": "log", "e": epoch, "from": start, "max": limit},
                         use_bin_type=True)


def encode_fetch(kind: str, ids: list[Any]) -> bytes:
    return msgpack.packb({"q": kind, "ids": list(ids)[:MAX_IDS]}, use_bin_type=True)


def encode_sum_request(kind: str, ids: list[Any] | None = None) -> bytes:
    msg: dict[str, Any] = {"q": kind}
    if ids is not None:
        msg["ids"] = [list(i) if isinstance(i, tuple) else i for i in ids[:MAX_SUM_IDS]]
    return msgpack.packb(msg, use_bin_type=True)


def decode_request(data: bytes) -> LogRequest | FetchRequest | SumRequest:
    """Parse a request; raise SyncMessageError on anything else."""
    msg = _unpack(data)
    kind = msg.get("q")
    if kind == "sum":
        return SumRequest("sum")
    if kind in ("sumg", "sumb", "stored"):
        return SumRequest(kind, _sum_ids(kind, msg.get("ids")))
    if kind == "log":
        epoch, start, limit = msg.get("e"), msg.get("from"), msg.get("max")
        if not isinstance(epoch, bytes) or type(start) is not int or type(limit) is not int \
                or start < 0 or limit < 1:
            raise SyncMessageError("bad log request")
        return LogRequest(epoch, start, min(limit, MAX_PAGE))
    if kind in ("get", "obj"):
        ids = msg.get("ids")
        want = bytes if kind == "get" else str
        if not isinstance(ids, list) or len(ids) > MAX_IDS or \
                not all(isinstance(i, want) for i in ids):
            raise SyncMessageError(f"bad {kind} request")
        return FetchRequest(kind, tuple(ids))
    raise SyncMessageError("unknown request")


def _sum_ids(kind: str, ids: Any) -> tuple[Any, ...]:
    if not isinstance(ids, list) or len(ids) > MAX_SUM_IDS:
        raise SyncMessageError(f"bad {kind} request")
    if kind == "stored":
        if not all(isinstance(i, list) and len(i) == 2 and isinstance(i[0], str)
                   and type(i[1]) is int and i[1] >= 0 for i in ids):
            raise SyncMessageError("bad stored request")
        return tuple((i[0], i[1]) for i in ids)
    top = GROUPS if kind == "sumg" else BUCKETS
    if not all(type(i) is int and 0 <= i < top for i in ids):
        raise SyncMessageError(f"bad {kind} request")
    return tuple(ids)


def encode_sum_top(top: SumTop | None) -> bytes:
    if top is None:
        return msgpack.packb({"busy": True}, use_bin_type=True)
    return msgpack.packb({"e": top.epoch, "end": top.end, "g": list(top.groups)},
                         use_bin_type=True)


def decode_sum_top(data: bytes) -> SumTop | None:
    """The peer's group sums, or None while it builds them."""
    msg = _unpack(data)
    if msg.get("busy") is True:
        return None
    epoch, end, groups = msg.get("e"), msg.get("end"), msg.get("g")
    if not isinstance(epoch, bytes) or type(end) is not int or end < 0 \
            or not isinstance(groups, list) or not _sums(groups, GROUPS):
        raise SyncMessageError("bad sum reply")
    return SumTop(epoch, end, tuple(groups))


def _sums(items: Any, count: int) -> bool:
    return isinstance(items, list) and len(items) == count and all(
        isinstance(s, bytes) and len(s) == SUM_SIZE for s in items)


def encode_sum_reply(kind: str, entries: list[Any]) -> bytes:
    key = {"sumg": "b", "sumb": "o", "stored": "s"}[kind]
    return msgpack.packb({key: entries}, use_bin_type=True)


def decode_group_buckets(data: bytes, asked: list[int]) -> dict[int, tuple[bytes, ...]]:
    """group -> its bucket sums, for groups that were asked for."""
    entries = _entries(data, "b", len(asked))
    out: dict[int, tuple[bytes, ...]] = {}
    for entry in entries:
        if not (isinstance(entry, list) and len(entry) == 2 and entry[0] in asked
                and _sums(entry[1], BUCKETS_PER_GROUP)):
            raise SyncMessageError("bad group sums")
        out[entry[0]] = tuple(entry[1])
    return out


def decode_bucket_objects(data: bytes, asked: list[int]) -> dict[int, dict[str, bytes]]:
    """bucket -> {db_id: state digest}, for buckets that were asked for."""
    entries = _entries(data, "o", len(asked))
    out: dict[int, dict[str, bytes]] = {}
    for entry in entries:
        if not (isinstance(entry, list) and len(entry) == 2 and entry[0] in asked
                and isinstance(entry[1], list)):
            raise SyncMessageError("bad bucket objects")
        objects: dict[str, bytes] = {}
        for item in entry[1]:
            if not (isinstance(item, list) and len(item) == 2 and isinstance(item[0], str)
                    and isinstance(item[1], bytes) and len(item[1]) == SUM_SIZE):
                raise SyncMessageError("bad bucket objects")
            objects[item[0]] = item[1]
        out[entry[0]] = objects
    return out


def decode_stored(data: bytes, asked: dict[str, int]) -> list[StoredIds]:
    """The update ids objects hold, for the (db_id, from) pairs that were asked for."""
    out = []
    for entry in _entries(data, "s", len(asked)):
        if not (isinstance(entry, list) and len(entry) == 4 and isinstance(entry[0], str)
                and asked.get(entry[0]) == entry[1] and isinstance(entry[2], list)
                and len(entry[2]) <= MAX_PAGE and isinstance(entry[3], bool)
                and all(isinstance(u, bytes) and len(u) == 32 for u in entry[2])):
            raise SyncMessageError("bad stored ids")
        out.append(StoredIds(entry[0], entry[1], tuple(entry[2]), entry[3]))
    return out


def _entries(data: bytes, key: str, most: int) -> list[Any]:
    entries = _unpack(data).get(key)
    if not isinstance(entries, list) or len(entries) > most:
        raise SyncMessageError(f"bad sum reply ({key})")
    return entries


def encode_log_page(page: LogPage) -> bytes:
    return msgpack.packb({"e": page.epoch, "from": page.start, "end": page.end,
                          "ids": list(page.ids), "next": page.next}, use_bin_type=True)


def decode_log_page(data: bytes) -> LogPage:
    msg = _unpack(data)
    epoch, start, end, ids = msg.get("e"), msg.get("from"), msg.get("end"), msg.get("ids")
    nxt = msg.get("next", -1)
    if not isinstance(epoch, bytes) or type(start) is not int or type(end) is not int \
            or type(nxt) is not int or not isinstance(ids, list) or len(ids) > MAX_PAGE \
            or not all(isinstance(u, bytes) and len(u) == 32 for u in ids):
        raise SyncMessageError("bad log page")
    return LogPage(epoch, start, end, tuple(ids), nxt)


def encode_updates(updates: list[bytes]) -> bytes:
    return msgpack.packb({"u": updates}, use_bin_type=True)


def decode_updates(data: bytes) -> list[bytes]:
    msg = _unpack(data)
    updates = msg.get("u")
    if not isinstance(updates, list) or not all(isinstance(u, bytes) for u in updates):
        raise SyncMessageError("bad updates reply")
    return updates


def _unpack(data: bytes) -> dict[str, Any]:
    try:
        msg = msgpack.unpackb(data, raw=False, strict_map_key=True, max_ext_len=0)
    except Exception as exc:
        raise SyncMessageError(f"not msgpack: {type(exc).__name__}") from None
    if not isinstance(msg, dict):
        raise SyncMessageError("not a map")
    return msg
