"""Property tests of the Update codec: round trips, and nothing but InvalidUpdate on bad input."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from strategies import create_op, db_id, dict_keys, field_names, ident, values

from dmodel import crypto
from dmodel.errors import ForgedUpdate, InvalidUpdate
from dmodel.update import REF_SIZE, Op, Update, decode

SIGNERS = [ident(i) for i in range(1, 5)]
OTHERS = [db_id(s) for s in SIGNERS] + [f"Company:{SIGNERS[0].oid}"]

envelopes = st.builds(
    lambda c, readers: {"b": c, "k": {s.oid: w for s, w in readers}},
    st.binary(max_size=64),
    st.lists(st.tuples(st.sampled_from(SIGNERS), st.binary(min_size=1, max_size=80)),
             max_size=3),
)


def field_op(obj: str) -> st.SearchStrategy[Op]:
    return st.one_of(
        st.builds(lambda f, v: Op(obj, "set", f, v), field_names, values),
        st.builds(lambda f, e: Op(obj, "set_enc", f, e), field_names, envelopes),
        st.builds(lambda f: Op(obj, "del", f), field_names),
        st.builds(lambda f, k, v: Op(obj, "dset", f, [k, v]), field_names, dict_keys, values),
        st.builds(lambda f, k, e: Op(obj, "dset_enc", f, [k, e]), field_names, dict_keys,
                  envelopes),
        st.builds(lambda f, k: Op(obj, "ddel", f, k), field_names, dict_keys),
    )


def auth_op(obj: str) -> st.SearchStrategy[Op]:
    return st.one_of(
        st.builds(lambda m, w: Op(obj, "grant_read", "", {"id": m, "w": w}),
                  st.sampled_from(OTHERS),
                  st.dictionaries(st.binary(min_size=REF_SIZE, max_size=REF_SIZE),
                                  st.binary(max_size=80), max_size=2)),
        *(st.builds(lambda m, k=kind: Op(obj, k, "", {"id": m, "f": []} if k == "revoke_update"
                                                 else {"id": m}), st.sampled_from(OTHERS))
          for kind in ("revoke_read", "grant_update", "revoke_update")),
        st.just(Op(obj, "remove")),
    )


@st.composite
def updates(draw: st.DrawFn) -> Update:
    signer = draw(st.sampled_from(SIGNERS))
    me = db_id(signer)
    with_auth = draw(st.booleans())
    if with_auth:  # grants and revokes: one object only
        ops = draw(st.lists(st.one_of(field_op(me), auth_op(me)), min_size=1, max_size=4))
    else:
        ops = draw(st.lists(st.sampled_from(OTHERS).flatmap(field_op), min_size=1, max_size=4))
    if draw(st.booleans()):
        members = st.lists(st.sampled_from(OTHERS), max_size=3)
        ops = [create_op(signer, read=draw(members), update=draw(members)), *ops]
    return Update.create(
        signer, node=draw(st.binary(min_size=16, max_size=16)), caller=me,
        timestamp=draw(st.integers(min_value=1, max_value=(1 << 63) - 1)),
        prev=draw(st.one_of(st.just(b""), st.binary(min_size=32, max_size=32))), ops=ops)


@given(updates())
def test_decode_inverts_create(update: Update) -> None:
    back = decode(update.raw)
    assert back == update
    assert back.raw == update.raw
    back.verify(SIGNERS[[db_id(s) for s in SIGNERS].index(update.caller)].public)


def _decode_or_invalid(data: bytes) -> Update | None:
    try:
        return decode(data)
    except InvalidUpdate:
        return None  # any other exception fails the test


@given(st.binary(max_size=512))
def test_random_bytes_decode_or_are_invalid(data: bytes) -> None:
    _decode_or_invalid(data)


@given(st.binary(max_size=300).map(lambda b: bytes(64) + b))
def test_random_bodies_decode_or_are_invalid(data: bytes) -> None:
    _decode_or_invalid(data)


mutations = st.lists(
    st.tuples(st.sampled_from(["flip", "insert", "delete", "set"]),
              st.integers(min_value=0, max_value=1 << 20), st.integers(0, 255)),
    min_size=1, max_size=4,
)


def mutate(raw: bytes, steps: list[tuple[str, int, int]]) -> bytes:
    data = bytearray(raw)
    for kind, position, byte in steps:
        if kind == "insert":
            data.insert(position % (len(data) + 1), byte)
        elif not data:
            continue
        elif kind == "flip":
            data[position % len(data)] ^= 1 << (byte % 8)
        elif kind == "set":
            data[position % len(data)] = byte
        else:
            del data[position % len(data)]
    return bytes(data)


@given(updates(), mutations)
def test_mutated_updates_decode_or_are_invalid(update: Update, steps) -> None:
    _decode_or_invalid(mutate(update.raw, steps))


@given(updates(), mutations, st.integers(min_value=64))
def test_mutated_body_positions_decode_or_are_invalid(update: Update, steps, offset) -> None:
    # Aim the mutations at the body (past the 64-byte signature), where the parser works.
    steps = [(kind, 64 + (pos + offset) % max(1, len(update.raw) - 64), b)
             for kind, pos, b in steps]
    _decode_or_invalid(mutate(update.raw, steps))


@given(updates(), mutations)
def test_mutated_update_never_decodes_and_verifies(update: Update, steps) -> None:
    data = mutate(update.raw, steps)
    decoded = _decode_or_invalid(data)
    if decoded is None:
        return
    signer = SIGNERS[[db_id(s) for s in SIGNERS].index(update.caller)]
    if data == update.raw:
        decoded.verify(signer.public)
        return
    for key in [s.public for s in SIGNERS]:  # the signer's key, or any other known key
        try:
            decoded.verify(key)
        except ForgedUpdate:
            continue
        raise AssertionError(f"mutated update verifies under {crypto.oid_for(key.verify_key)}")
