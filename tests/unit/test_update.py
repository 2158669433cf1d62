"""The Update codec: round trips of every operation, and every way decode must refuse input."""

from __future__ import annotations

import msgpack
import pytest
from strategies import NODE, T0, body_raw, create_op, db_id, ident, signed

from dmodel import crypto
from dmodel.errors import ForgedUpdate, InvalidUpdate, MalformedUpdate, OversizedUpdate
from dmodel.update import (
    MAX_AUTH_IDS,
    MAX_NESTING,
    MAX_OPS,
    MAX_UPDATE_SIZE,
    MAX_VALUE_SIZE,
    PROTOCOL_VERSION,
    REF_SIZE,
    Op,
    Update,
    decode,
    update_id,
)

A, B = ident(1), ident(2)
A_ID, B_ID = db_id(A), db_id(B)
ENVELOPE = crypto.seal(b"\x92\x01\x02", {A.oid: A.public.box_key, B.oid: B.public.box_key},
                       crypto.place("Person:x", "salary"))


def nested(depth: int) -> object:
    value: object = 1
    for _ in range(depth):
        value = [value]
    return value


def good_body(**changes: object) -> dict:
    """A valid body (as a plain dict) with some keys replaced (or removed when set to ...)."""
    body = {"v": PROTOCOL_VERSION, "n": NODE, "c": A_ID, "t": T0, "p": b"",
            "o": [[A_ID, "set", "name", "Bob"]]}
    for key, value in changes.items():
        if value is ...:
            del body[key]
        else:
            body[key] = value
    return body


def test_good_body_helper_decodes() -> None:
    # The rejection tests below change one thing of this body; it must be valid as it is.
    update = decode(body_raw(good_body()))
    assert update.ops == (Op(A_ID, "set", "name", "Bob"),)
    assert update.caller == A_ID and update.node == NODE and update.timestamp == T0


# ------------------------------------------------------------------ round trips

ROUND_TRIP_OPS = {
    "create": [create_op(A, read=[B_ID], update=[B_ID])],
    "create_plain": [create_op(A)],
    "set": [Op(A_ID, "set", "name", "Bob")],
    "set_none": [Op(A_ID, "set", "name", None)],
    "set_structured": [Op(A_ID, "set", "data", {"a": [1, -2, 3.5, True, None, b"\x00"],
                                                 "b": {"c": "d"}})],
    "set_int_bounds": [Op(A_ID, "set", "lo", -(1 << 63)), Op(A_ID, "set", "hi", (1 << 64) - 1)],
    "set_enc": [Op(A_ID, "set_enc", "salary", ENVELOPE)],
    "del": [Op(A_ID, "del", "name")],
    "dset": [Op(A_ID, "dset", "tags", ["colour", "red"])],
    "dset_enc": [Op(A_ID, "dset_enc", "secrets", ["pin", ENVELOPE])],
    "ddel": [Op(A_ID, "ddel", "tags", "colour")],
    "grant_read": [Op(A_ID, "grant_read", "", {"id": B_ID, "w": {bytes(REF_SIZE): b"w" * 80,
                                                                   b"\x01" * REF_SIZE: b"x"}})],
    "grant_read_no_wraps": [Op(A_ID, "grant_read", "", {"id": B_ID, "w": {}})],
    "revoke_read": [Op(A_ID, "revoke_read", "", {"id": B_ID})],
    "grant_update": [Op(A_ID, "grant_update", "", {"id": B_ID})],
    "revoke_update": [Op(A_ID, "revoke_update", "", {"id": B_ID, "f": [bytes(32)]})],
    "remove": [Op(A_ID, "remove")],
    "transaction": [create_op(A), Op(A_ID, "set", "name", "Bob"),
                    Op(A_ID, "set_enc", "salary", ENVELOPE), Op(A_ID, "dset", "tags", ["k", 1]),
                    Op(A_ID, "grant_update", "", {"id": B_ID}), Op(A_ID, "del", "old")],
    "transaction_two_objects": [Op(A_ID, "set", "name", "Bob"), Op(B_ID, "set", "boss", A_ID),
                                Op(B_ID, "ddel", "tags", "k"), Op(A_ID, "remove")],
}


def test_grants_and_revokes_touch_one_object() -> None:
    with pytest.raises(MalformedUpdate, match="one object"):
        signed(A, [Op(A_ID, "grant_update", "", {"id": B_ID}), Op(B_ID, "set", "x", 1)])
    body = good_body(o=[[A_ID, "revoke_read", "", {"id": B_ID}], [B_ID, "set", "x", 1]])
    with pytest.raises(MalformedUpdate, match="one object"):
        decode(body_raw(body))


@pytest.mark.parametrize("kind", sorted(ROUND_TRIP_OPS))
def test_round_trip(kind: str) -> None:
    update = signed(A, ROUND_TRIP_OPS[kind], prev=b"\x07" * 32)
    back = decode(update.raw)
    assert back == update
    assert back.ops == tuple(ROUND_TRIP_OPS[kind])
    assert back.raw == update.raw
    assert back.id == update_id(update.body) and len(back.id) == 32
    assert back.prev == b"\x07" * 32
    back.verify(A.public)  # does not raise


def test_round_trip_accepts_bytearray_and_memoryview() -> None:
    update = signed(A, [Op(A_ID, "set", "name", "Bob")])
    assert decode(bytearray(update.raw)) == update
    assert decode(memoryview(update.raw)) == update


def test_create_exposes_public_keys() -> None:
    update = signed(A, [create_op(A)])
    assert update.creates() == A.public
    assert signed(A, [Op(A_ID, "set", "name", "x")]).creates() is None


def test_register_names() -> None:
    assert Op(A_ID, "set", "name", 1).register == "name"
    assert Op(A_ID, "dset", "tags", ["k", 1]).register == "tags:k"
    assert Op(A_ID, "ddel", "tags", "k").register == "tags:k"


def test_values_up_to_the_value_limit_survive_decoding() -> None:
    # Anything an Op accepts locally must be accepted by every peer's decode: long lists and
    # wide maps of small items stay far below MAX_VALUE_SIZE bytes.
    ops = [Op(A_ID, "set", "many", list(range(5000))),
           Op(A_ID, "set", "wide", {f"k{i}": i for i in range(3000)})]
    update = signed(A, ops)
    assert decode(update.raw) == update


def test_update_with_the_maximum_op_count_decodes() -> None:
    ops = [Op(A_ID, "set", f"f{i}", i) for i in range(MAX_OPS)]
    update = signed(A, ops)
    assert decode(update.raw) == update


def test_create_with_the_maximum_authorization_lists_decodes() -> None:
    members = [f"Person:{crypto.oid_for(i.to_bytes(32, 'big'))}" for i in range(MAX_AUTH_IDS)]
    update = signed(A, [create_op(A, read=members, update=members)])
    assert decode(update.raw) == update


# ------------------------------------------------------------------ rejections


@pytest.mark.parametrize("data", ["text", None, 12, [b"x"]])
def test_decode_rejects_non_bytes(data: object) -> None:
    with pytest.raises(MalformedUpdate):
        decode(data)  # type: ignore[arg-type]


@pytest.mark.parametrize("data", [b"", b"\x00", bytes(64)])
def test_decode_rejects_too_short(data: bytes) -> None:
    with pytest.raises(MalformedUpdate, match="too short"):
        decode(data)


@pytest.mark.parametrize("tail", [b"\xc1", b"\x81", b"\x85\xa1v", b"\xdf\xff\xff\xff\xff",
                                  b"\x80\x00", b"\xc7\x01\x01x"])
def test_decode_rejects_garbage(tail: bytes) -> None:
    with pytest.raises(MalformedUpdate):
        decode(bytes(64) + tail)


@pytest.mark.parametrize("body", [[1, 2], "v", 5, None, b"body"])
def test_decode_rejects_non_map_body(body: object) -> None:
    with pytest.raises(MalformedUpdate):
        decode(body_raw(body))


def test_body_errors_carry_the_update_id() -> None:
    raw = body_raw(good_body(v=3))
    with pytest.raises(MalformedUpdate) as info:
        decode(raw)
    assert info.value.update_id == update_id(raw[64:])


@pytest.mark.parametrize("changes", [{"x": 1}, {"v": ...}, {"n": ...}, {"c": ...}, {"t": ...},
                                     {"p": ...}, {"o": ...}])
def test_decode_rejects_extra_or_missing_keys(changes: dict) -> None:
    with pytest.raises(MalformedUpdate, match="keys"):
        decode(body_raw(good_body(**changes)))


def test_decode_rejects_binary_keys() -> None:
    body = good_body()
    body[b"v"] = body.pop("v")
    with pytest.raises(MalformedUpdate):
        decode(body_raw(body))


@pytest.mark.parametrize("version", [0, 3, True, "1", 1.0, None])
def test_decode_rejects_wrong_version(version: object) -> None:
    with pytest.raises(MalformedUpdate, match="version"):
        decode(body_raw(good_body(v=version)))


@pytest.mark.parametrize("node", [b"", bytes(15), bytes(17), "0123456789abcdef", None])
def test_decode_rejects_bad_node_id(node: object) -> None:
    with pytest.raises(MalformedUpdate, match="node id"):
        decode(body_raw(good_body(n=node)))


@pytest.mark.parametrize("ts", [0, -1, 1 << 63, (1 << 64) - 1, "1", 1.5, True, None])
def test_decode_rejects_bad_timestamp(ts: object) -> None:
    with pytest.raises(MalformedUpdate, match="timestamp"):
        decode(body_raw(good_body(t=ts)))


@pytest.mark.parametrize("prev", [bytes(1), bytes(31), bytes(33), None, "x" * 32])
def test_decode_rejects_bad_prev(prev: object) -> None:
    with pytest.raises(MalformedUpdate, match="previous"):
        decode(body_raw(good_body(p=prev)))


@pytest.mark.parametrize("ops", [[], None, "ops", {"a": 1}])
def test_decode_rejects_empty_or_non_list_ops(ops: object) -> None:
    with pytest.raises(MalformedUpdate, match="operations"):
        decode(body_raw(good_body(o=ops)))


@pytest.mark.parametrize("item", [[A_ID, "set", "name"], [A_ID, "set", "name", 1, 2], "op",
                                  {"obj": A_ID}])
def test_decode_rejects_bad_op_shape(item: object) -> None:
    with pytest.raises(MalformedUpdate, match="operation"):
        decode(body_raw(good_body(o=[item])))


@pytest.mark.parametrize("op", ["frobnicate", "", "SET", 1, None, b"set"])
def test_decode_rejects_unknown_op(op: object) -> None:
    with pytest.raises(MalformedUpdate, match="unknown operation"):
        decode(body_raw(good_body(o=[[A_ID, op, "name", 1]])))


@pytest.mark.parametrize("name", ["", "1abc", "a-b", "a:b", "a b", "é", "a" * 65, 5, None,
                                  b"name"])
def test_decode_rejects_bad_field_names(name: object) -> None:
    with pytest.raises(MalformedUpdate, match="field name"):
        decode(body_raw(good_body(o=[[A_ID, "set", name, 1]])))


def test_field_name_limits() -> None:
    assert decode(body_raw(good_body(o=[[A_ID, "set", "a" * 64, 1]]))).ops[0].field == "a" * 64
    assert decode(body_raw(good_body(o=[[A_ID, "set", "_A9", 1]]))).ops[0].field == "_A9"


@pytest.mark.parametrize("op,value", [("grant_update", {"id": B_ID}), ("remove", None),
                                      ("create", None)])
def test_decode_rejects_field_name_on_object_ops(op: str, value: object) -> None:
    with pytest.raises(MalformedUpdate, match="no field name"):
        decode(body_raw(good_body(o=[[A_ID, op, "name", value]])))


BAD_DB_IDS = [
    "Person", "Person:", f":{A.oid}", f"Person:{A.oid[:-1]}", f"Person:{A.oid}x",
    f"Person:{A.oid.upper()}", f"Person:{A.oid[:-1]}1", f"1Person:{A.oid}", f"Per son:{A.oid}",
    f"{'P' * 65}:{A.oid}", f"Person:{A.oid}:name", 5, None, b"Person:" + A.oid.encode(),
]


@pytest.mark.parametrize("bad", BAD_DB_IDS)
def test_decode_rejects_bad_object_ids(bad: object) -> None:
    with pytest.raises(MalformedUpdate):
        decode(body_raw(good_body(o=[[bad, "set", "name", 1]])))


@pytest.mark.parametrize("bad", BAD_DB_IDS)
def test_decode_rejects_bad_caller_ids(bad: object) -> None:
    with pytest.raises(MalformedUpdate):
        decode(body_raw(good_body(c=bad)))


@pytest.mark.parametrize("bad", BAD_DB_IDS)
def test_decode_rejects_bad_member_ids(bad: object) -> None:
    with pytest.raises(MalformedUpdate):
        decode(body_raw(good_body(o=[[A_ID, "grant_update", "", {"id": bad}]])))
    create = create_op(A).value | {"read": [bad]}
    with pytest.raises(MalformedUpdate):
        decode(body_raw(good_body(o=[[A_ID, "create", "", create]])))


def test_model_name_length_limit() -> None:
    longest = f"{'P' * 64}:{A.oid}"
    assert decode(body_raw(good_body(o=[[longest, "set", "x", 1]]))).ops[0].obj == longest


def test_decode_rejects_create_not_first() -> None:
    body = good_body(o=[[A_ID, "set", "name", 1], list(_create_item(A))])
    with pytest.raises(MalformedUpdate, match="first"):
        decode(body_raw(body))


def test_decode_rejects_create_of_another_object() -> None:
    body = good_body(c=B_ID, o=[list(_create_item(A))])
    with pytest.raises(MalformedUpdate, match="created by itself"):
        decode(body_raw(body))


def test_create_not_first_or_not_self_cannot_be_built() -> None:
    with pytest.raises(MalformedUpdate):
        signed(A, [Op(A_ID, "set", "name", 1), create_op(A)])
    with pytest.raises(MalformedUpdate):
        signed(B, [create_op(A)])


def test_create_with_mismatched_oid_is_forged() -> None:
    # B's db_id carrying A's public keys: oid != H(key).
    value = create_op(A).value
    body = good_body(c=B_ID, o=[[B_ID, "create", "", value]])
    with pytest.raises(ForgedUpdate):
        decode(body_raw(body))
    with pytest.raises(ForgedUpdate):
        Update.create(B, node=NODE, caller=B_ID, timestamp=T0, prev=b"",
                      ops=[Op(B_ID, "create", "", value)])


@pytest.mark.parametrize("value", [
    None, {}, {"sign": bytes(32), "box": bytes(32), "read": []},
    {"sign": bytes(31), "box": bytes(32), "read": [], "update": []},
    {"sign": bytes(32), "box": "x" * 32, "read": [], "update": []},
    {"sign": bytes(32), "box": bytes(32), "read": "x", "update": []},
    {"sign": bytes(32), "box": bytes(32), "read": [], "update": [], "extra": 1},
])
def test_decode_rejects_bad_create_values(value: object) -> None:
    with pytest.raises(MalformedUpdate):
        decode(body_raw(good_body(o=[[A_ID, "create", "", value]])))


def test_create_authorization_lists_are_bounded() -> None:
    members = [B_ID] * (MAX_AUTH_IDS + 1)
    value = create_op(A).value | {"update": members}
    with pytest.raises(OversizedUpdate):
        decode(body_raw(good_body(o=[[A_ID, "create", "", value]])))


@pytest.mark.parametrize("op,value", [
    ("set_enc", "x"), ("set_enc", {"c": b"x"}), ("set_enc", {"c": "x", "k": {}}),
    ("set_enc", {"c": b"x", "k": {A.oid: "not bytes"}}),
    ("set_enc", {"c": b"x", "k": {A.oid: b"k" * 129}}),
    ("set_enc", {"c": b"x", "k": {"o" * 33: b"k"}}),
    ("del", 1), ("remove", "x"),
    ("dset", "x"), ("dset", ["k"]), ("dset", ["k", 1, 2]), ("dset", ["", 1]), ("dset", [1, 1]),
    ("dset", ["k" * 257, 1]), ("dset_enc", ["k", "plain"]),
    ("ddel", ""), ("ddel", None), ("ddel", "k" * 257),
    ("grant_read", {"id": B_ID}), ("grant_read", {"id": B_ID, "w": []}),
    ("grant_read", {"id": B_ID, "w": {b"short": b"k"}}),
    ("grant_read", {"id": B_ID, "w": {bytes(REF_SIZE): "k"}}),
    ("grant_read", {"id": B_ID, "w": {bytes(REF_SIZE): b"k" * 129}}),
    ("grant_update", {"id": B_ID, "w": {}}), ("revoke_read", B_ID), ("revoke_update", {}),
])
def test_decode_rejects_bad_op_values(op: str, value: object) -> None:
    name = "f" if op in ("set_enc", "del", "dset", "dset_enc", "ddel") else ""
    with pytest.raises(MalformedUpdate):
        decode(body_raw(good_body(o=[[A_ID, op, name, value]])))


@pytest.mark.parametrize("value", [object(), {1, 2}, 1j, Op, ValueError("x"),
                                   {"a": object()}, [1, object()], {1: "int key"},
                                   {b"bin": "key"}])
def test_ops_reject_unsupported_value_types(value: object) -> None:
    with pytest.raises(MalformedUpdate):
        Op(A_ID, "set", "name", value)
    with pytest.raises(MalformedUpdate):
        Op(A_ID, "dset", "tags", ["k", value])


def test_decode_rejects_unsupported_msgpack_types() -> None:
    ext = msgpack.ExtType(1, b"data")
    with pytest.raises(MalformedUpdate):
        decode(body_raw(good_body(o=[[A_ID, "set", "name", ext]])))
    raw = bytes(64) + msgpack.packb(good_body(o=[[A_ID, "set", "name", {1: 2}]]),
                                    use_bin_type=True, strict_types=False)
    with pytest.raises(MalformedUpdate):
        decode(raw)
    with pytest.raises(MalformedUpdate):
        decode(body_raw(good_body(o=[[A_ID, "set", "name", {b"k": 2}]])))


def test_nesting_limit() -> None:
    assert decode(body_raw(good_body(o=[[A_ID, "set", "x", nested(MAX_NESTING)]])))
    with pytest.raises(MalformedUpdate, match="nested"):
        decode(body_raw(good_body(o=[[A_ID, "set", "x", nested(MAX_NESTING + 1)]])))
    with pytest.raises(MalformedUpdate, match="nested"):
        Op(A_ID, "set", "x", nested(MAX_NESTING + 1))
    deep_dict: object = 1
    for _ in range(MAX_NESTING + 1):
        deep_dict = {"k": deep_dict}
    with pytest.raises(MalformedUpdate, match="nested"):
        Op(A_ID, "dset", "x", ["k", deep_dict])


def test_very_deep_msgpack_is_malformed_not_a_crash() -> None:
    body = good_body()
    raw = body_raw(body)
    deep = b"\x91" * 100_000 + b"\x01"
    tampered = raw[:-4] + deep  # replaces the last value "Bob" (a3 42 6f 62) with a deep list
    with pytest.raises(MalformedUpdate):
        decode(tampered)


def test_int_beyond_64_bits() -> None:
    for value in (1 << 64, -(1 << 63) - 1, 10**30):
        with pytest.raises(MalformedUpdate, match="64 bits"):
            Op(A_ID, "set", "n", value)
        with pytest.raises(MalformedUpdate, match="64 bits"):
            Op(A_ID, "set", "n", [1, {"x": value}])


def test_oversize_value() -> None:
    Op(A_ID, "set", "x", "x" * (MAX_VALUE_SIZE - 8))  # fits
    with pytest.raises(OversizedUpdate):
        Op(A_ID, "set", "x", "x" * MAX_VALUE_SIZE)
    with pytest.raises(OversizedUpdate):
        Op(A_ID, "set", "x", b"x" * MAX_VALUE_SIZE)
    with pytest.raises(OversizedUpdate):
        Op(A_ID, "set", "x", ["x" * 1000] * (MAX_VALUE_SIZE // 1000))
    with pytest.raises(OversizedUpdate):
        Op(A_ID, "dset", "x", ["k", "x" * MAX_VALUE_SIZE])
    with pytest.raises(OversizedUpdate):
        decode(body_raw(good_body(o=[[A_ID, "set", "x", "x" * MAX_VALUE_SIZE]])))
    with pytest.raises(OversizedUpdate):
        decode(body_raw(good_body(o=[[A_ID, "set_enc", "x",
                                      {"c": bytes(MAX_VALUE_SIZE + 65), "k": {}}]])))


def test_oversize_update() -> None:
    chunk = "x" * (MAX_VALUE_SIZE - 16)
    ops = [Op(A_ID, "set", f"f{i}", chunk) for i in range(MAX_UPDATE_SIZE // MAX_VALUE_SIZE + 1)]
    with pytest.raises(OversizedUpdate):
        signed(A, ops)
    with pytest.raises(OversizedUpdate):
        decode(bytes(MAX_UPDATE_SIZE + 1))
    raw = body_raw(good_body(o=[[A_ID, "set", f"f{i}", chunk] for i in range(5)]))
    assert len(raw) > MAX_UPDATE_SIZE
    with pytest.raises(OversizedUpdate):
        decode(raw)


def test_too_many_ops() -> None:
    items = [[A_ID, "set", "f", i] for i in range(MAX_OPS + 1)]
    with pytest.raises(OversizedUpdate):
        decode(body_raw(good_body(o=items)))
    with pytest.raises(OversizedUpdate):
        signed(A, [Op(A_ID, "set", "f", i) for i in range(MAX_OPS + 1)])


def test_updates_must_have_operations() -> None:
    with pytest.raises(MalformedUpdate):
        signed(A, [])


@pytest.mark.parametrize("changes", [
    {"node": bytes(15)}, {"node": "n" * 16}, {"ts": 0}, {"ts": 1 << 63}, {"ts": True},
    {"prev": bytes(31)}, {"prev": None}, {"caller": "Person"},
])
def test_create_refuses_what_decode_refuses(changes: dict) -> None:
    # An Update that exists is well-formed: the signer gets the error, not every peer.
    args = {"node": NODE, "caller": A_ID, "ts": T0, "prev": b""} | changes
    with pytest.raises(InvalidUpdate):
        Update.create(A, node=args["node"], caller=args["caller"], timestamp=args["ts"],
                      prev=args["prev"], ops=[Op(A_ID, "set", "name", 1)])


# ------------------------------------------------------------------ signatures


def test_signature_verifies_for_the_signer_only() -> None:
    update = signed(A, [Op(A_ID, "set", "name", "Bob")])
    update.verify(A.public)
    with pytest.raises(ForgedUpdate):
        update.verify(B.public)


def test_tampered_body_byte_is_forged() -> None:
    update = signed(A, [Op(A_ID, "set", "name", "Bob")])
    raw = update.raw
    assert raw.count(b"Bob") == 1
    tampered = decode(raw.replace(b"Bob", b"Bib"))  # still a well-formed update
    assert tampered.ops[0].value == "Bib"
    assert tampered.id != update.id
    with pytest.raises(ForgedUpdate):
        tampered.verify(A.public)


def test_tampered_signature_byte_is_forged() -> None:
    update = signed(A, [Op(A_ID, "set", "name", "Bob")])
    for index in (0, 31, 63):
        raw = bytearray(update.raw)
        raw[index] ^= 0x01
        tampered = decode(bytes(raw))
        assert tampered.id == update.id  # the id covers the body, not the signature
        with pytest.raises(ForgedUpdate):
            tampered.verify(A.public)


def test_signature_of_another_key_is_forged() -> None:
    update = signed(A, [Op(A_ID, "set", "name", "Bob")])
    other = decode(B.sign(update.body) + update.body)
    with pytest.raises(ForgedUpdate):
        other.verify(A.public)
    other.verify(B.public)  # it is B's signature, over A's body


def test_timestamps_and_prev_are_signed() -> None:
    u1 = signed(A, [Op(A_ID, "set", "name", "Bob")], ts=T0)
    u2 = signed(A, [Op(A_ID, "set", "name", "Bob")], ts=T0 + 1)
    u3 = signed(A, [Op(A_ID, "set", "name", "Bob")], prev=u1.id)
    assert len({u1.id, u2.id, u3.id}) == 3
    swapped = decode(u1.signature + u2.body)
    with pytest.raises(ForgedUpdate):
        swapped.verify(A.public)


def _create_item(identity) -> tuple:
    op = create_op(identity)
    return (op.obj, op.op, op.field, op.value)


def _raw_of_size(size: int) -> bytes:
    """A valid raw update (dummy signature) of exactly ``size`` bytes."""
    chunk = "x" * 100_000

    def build(pad: int) -> bytes:
        ops = [[A_ID, "set", f"f{i}", chunk] for i in range(4)]
        return body_raw(good_body(o=[*ops, [A_ID, "set", "pad", "y" * pad]]))

    pad = 100_000
    for _ in range(3):  # msgpack headers grow in steps: converge on the exact size
        pad += size - len(build(pad))
    raw = build(pad)
    assert len(raw) == size
    return raw


def test_update_size_limit_boundary() -> None:
    update = decode(_raw_of_size(MAX_UPDATE_SIZE))  # exactly the limit passes
    assert len(update.raw) == MAX_UPDATE_SIZE
    with pytest.raises(OversizedUpdate):
        decode(_raw_of_size(MAX_UPDATE_SIZE + 1))  # one byte more does not


def test_pack_value_gives_packb_bytes_from_several_threads_at_once() -> None:
    # Each pack takes a reused Packer for itself: the bytes are packb's, whatever
    # the other threads pack meanwhile.
    import threading

    from dmodel.update import pack_value

    failures: list[object] = []

    def pack_many(seed: int) -> None:
        for k in range(5000):
            value = [seed, k, "s" * (k % 300), {"b": bytes(k % 40)}, [1.5, None, True]]
            if pack_value(value) != msgpack.packb(value, use_bin_type=True):
                failures.append(value)

    threads = [threading.Thread(target=pack_many, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert failures == []
