"""The catch-up messages (dmodel.net.sync): valid ones round-trip, anything else is a
SyncMessageError (network input: never another exception)."""

from __future__ import annotations

import os

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from dmodel.buckets import BUCKETS, BUCKETS_PER_GROUP, GROUPS, bucket_of
from dmodel.net import sync

_msgpack_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**63, 2**64 - 1) | st.binary(max_size=40)
    | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=5)
    | st.dictionaries(st.text(max_size=5), inner, max_size=5),
    max_leaves=20)
_kinds = st.sampled_from(["log", "get", "obj", "sum", "sumg", "sumb", "stored", "x"])


def test_sum_requests_round_trip() -> None:
    assert sync.decode_request(sync.encode_sum_request("sum")) == sync.SumRequest("sum")
    assert sync.decode_request(sync.encode_sum_request("sumg", [0, GROUPS - 1])) == \
        sync.SumRequest("sumg", (0, GROUPS - 1))
    assert sync.decode_request(sync.encode_sum_request("sumb", [BUCKETS - 1])).ids == \
        (BUCKETS - 1,)
    assert sync.decode_request(sync.encode_sum_request("stored", [("M:x", 3)])).ids == \
        (("M:x", 3),)


@pytest.mark.parametrize("kind, ids", [
    ("sumg", [GROUPS]), ("sumg", [-1]), ("sumg", ["0"]), ("sumb", [BUCKETS]),
    ("sumb", list(range(sync.MAX_SUM_IDS + 1))), ("stored", [["M:x", -1]]),
    ("stored", [["M:x"]]), ("stored", [[b"M:x", 0]]), ("sumg", "not a list")])
def test_bad_sum_requests_are_refused(kind, ids) -> None:
    with pytest.raises(sync.SyncMessageError):
        sync.decode_request(msgpack.packb({"q": kind, "ids": ids}))


def test_sum_replies_round_trip_and_answer_only_what_was_asked() -> None:
    top = sync.SumTop(b"e" * 16, 42, tuple(os.urandom(16) for _ in range(GROUPS)))
    assert sync.decode_sum_top(sync.encode_sum_top(top)) == top
    assert sync.decode_sum_top(sync.encode_sum_top(None)) is None
    sums = [os.urandom(16) for _ in range(BUCKETS_PER_GROUP)]
    reply = sync.encode_sum_reply("sumg", [[3, sums]])
    assert sync.decode_group_buckets(reply, [3]) == {3: tuple(sums)}
    with pytest.raises(sync.SyncMessageError):
        sync.decode_group_buckets(reply, [4])  # not asked for
    db_id = "M:abc"
    reply = sync.encode_sum_reply("sumb", [[bucket_of(db_id), [[db_id, b"d" * 16]]]])
    assert sync.decode_bucket_objects(reply, [bucket_of(db_id)]) == {
        bucket_of(db_id): {db_id: b"d" * 16}}
    reply = sync.encode_sum_reply("stored", [[db_id, 0, [b"u" * 32], True]])
    assert sync.decode_stored(reply, {db_id: 0}) == [
        sync.StoredIds(db_id, 0, (b"u" * 32,), True)]
    with pytest.raises(sync.SyncMessageError):
        sync.decode_stored(reply, {db_id: 5})  # from another position than asked
    with pytest.raises(sync.SyncMessageError):  # a short sum
        sync.decode_sum_top(msgpack.packb({"e": b"e", "end": 1, "g": [b"x"] * GROUPS}))


@given(kind=_kinds, body=_msgpack_values)
def test_any_request_is_parsed_or_refused(kind, body) -> None:
    for data in (msgpack.packb({"q": kind, "ids": body, "e": body, "from": body,
                                "max": body}), msgpack.packb(body)):
        try:
            sync.decode_request(data)
        except sync.SyncMessageError:
            pass


@given(body=_msgpack_values, asked=st.lists(st.integers(0, BUCKETS - 1), max_size=4))
def test_any_reply_is_parsed_or_refused(body, asked) -> None:
    for key in ("e", "g", "b", "o", "s", "u", "ids"):
        data = msgpack.packb({key: body, "end": 1, "e": b"e", "from": 0})
        for decode in (sync.decode_sum_top, sync.decode_log_page, sync.decode_updates,
                       lambda d: sync.decode_group_buckets(d, asked),
                       lambda d: sync.decode_bucket_objects(d, asked),
                       lambda d: sync.decode_stored(d, {"M:x": 0})):
            try:
                decode(data)
            except sync.SyncMessageError:
                pass
    for decode in (sync.decode_sum_top, sync.decode_log_page):
        with pytest.raises(sync.SyncMessageError):
            decode(b"\xc1 not msgpack")
