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
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgpack

from ..errors import ProtocolError

MAX_PAGE = 2000
MAX_IDS = 1000


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


def decode_request(data: bytes) -> LogRequest | FetchRequest:
    """Parse a request; raise SyncMessageError on anything else."""
    msg = _unpack(data)
    kind = msg.get("q")
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
