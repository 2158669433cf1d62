"""Known-answer vectors for the wire format and the signing bytes.

If this test fails, the bytes dmodel signs or sends have changed: every stored log and
every peer running the previous version would disagree with this one. Do not regenerate
tests/data/golden_updates.json to make it pass; change the format on purpose, bump
update.PROTOCOL_VERSION, and only then write new vectors (``python
tests/unit/test_golden.py --write``). The vectors of earlier versions stay, in
golden_updates_v<N>.json, and must still decode and verify.

The vectors come from fixed inputs (Identity.from_seed, node id, timestamp, prev) and the
operations built by ``VECTOR_OPS`` below; Ed25519 signatures are deterministic, so
``Update.create`` must reproduce the stored raw bytes exactly.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dmodel.crypto import Identity
from dmodel.update import PROTOCOL_VERSION, Op, Update, decode

DATA = Path(__file__).resolve().parent.parent / "data" / "golden_updates.json"
DATA_V1 = DATA.with_name("golden_updates_v1.json")


def _identity(seed_hex: str) -> Identity:
    return Identity.from_seed(bytes.fromhex(seed_hex))


def _encrypted_ops(me_id: str, envelope: dict) -> list[Op]:
    return [Op(me_id, "set_enc", "salary", envelope),
            Op(me_id, "dset", "tags", ["colour", "red"]),
            Op(me_id, "dset_enc", "secrets", ["pin", envelope]),
            Op(me_id, "ddel", "tags", "size"), Op(me_id, "del", "nickname")]


def _ops(name: str, me: Identity, other: Identity) -> list[Op]:
    me_id, other_id = f"Person:{me.oid}", f"Person:{other.oid}"
    if name == "create":
        return [Op(me_id, "create", "", {"sign": me.public.verify_key, "box": me.public.box_key,
                                         "read": [other_id], "update": [other_id]})]
    if name == "set_values":
        return [Op(me_id, "set", "name", "Bob"), Op(me_id, "set", "age", 42),
                Op(me_id, "set", "ratio", 0.5), Op(me_id, "set", "ok", True),
                Op(me_id, "set", "blob", b"\x00\xff"), Op(me_id, "set", "none", None),
                Op(me_id, "set", "big", (1 << 64) - 1), Op(me_id, "set", "neg", -(1 << 63)),
                Op(me_id, "set", "doc", {"tags": ["a", "b"], "n": {"x": 1}})]
    if name == "encrypted_and_dict":
        wraps = {me.oid: bytes(80), other.oid: b"\x01" * 80}
        return _encrypted_ops(me_id, {"b": bytes(range(64)), "k": wraps})
    if name == "authorization":
        return [Op(me_id, "grant_read", "", {"id": other_id, "w": {bytes(34): b"\x02" * 80}}),
                Op(me_id, "revoke_update", "", {"id": other_id, "f": [bytes(32), b"\x03" * 32]})]
    if name == "write_other":
        return [Op(other_id, "set", "boss", me_id)]
    if name == "remove":
        return [Op(me_id, "remove")]
    raise KeyError(name)


def _grants(name: str, other: Identity) -> dict[str, bytes] | None:
    if name == "write_other":
        return {f"Person:{other.oid}": b"\x04" * 32 + b"\x00\x01"}
    return None


def _ops_v1(name: str, me: Identity, other: Identity) -> list[Op]:
    me_id, other_id = f"Person:{me.oid}", f"Person:{other.oid}"
    if name == "encrypted_and_dict":
        wraps = {me.oid: bytes(80), other.oid: b"\x01" * 80}
        return _encrypted_ops(me_id, {"c": bytes(range(40)), "k": wraps})
    if name == "authorization":
        return [Op(me_id, "grant_read", "", {"id": other_id, "w": {bytes(34): b"\x02" * 80}}),
                Op(me_id, "revoke_update", "", {"id": other_id})]
    return _ops(name, me, other)
NAMES = {"create", "set_values", "encrypted_and_dict", "authorization", "write_other",
         "remove"}
VECTORS = json.loads(DATA.read_text())["vectors"]
VECTORS_V1 = json.loads(DATA_V1.read_text())["vectors"]


def _build(vector: dict, ops: list[Op], grants: dict[str, bytes] | None) -> Update:
    me = _identity(vector["seed"])
    return Update.create(me, node=bytes.fromhex(vector["node"]), caller=f"Person:{me.oid}",
                         timestamp=vector["timestamp"], prev=bytes.fromhex(vector["prev"]),
                         ops=ops, grants=grants)


def test_files_cover_the_vectors() -> None:
    assert json.loads(DATA.read_text())["protocol_version"] == PROTOCOL_VERSION
    assert json.loads(DATA_V1.read_text())["protocol_version"] == 1
    assert {v["name"] for v in VECTORS} == {v["name"] for v in VECTORS_V1} == NAMES


@pytest.mark.parametrize("vector", VECTORS, ids=[v["name"] for v in VECTORS])
def test_golden_vector(vector: dict) -> None:
    me, other = _identity(vector["seed"]), _identity(vector["other_seed"])
    assert me.oid == vector["oid"]
    raw, uid = bytes.fromhex(vector["raw"]), bytes.fromhex(vector["id"])

    rebuilt = _build(vector, _ops(vector["name"], me, other), _grants(vector["name"], other))
    assert rebuilt.raw.hex() == vector["raw"]  # the encoding and the signature are unchanged
    assert rebuilt.id == uid

    decoded = decode(raw)
    decoded.verify(me.public)
    assert decoded.id == uid
    assert decoded == rebuilt


@pytest.mark.parametrize("vector", VECTORS_V1, ids=[v["name"] for v in VECTORS_V1])
def test_protocol_1_still_decodes(vector: dict) -> None:
    me, other = _identity(vector["seed"]), _identity(vector["other_seed"])
    decoded = decode(bytes.fromhex(vector["raw"]))
    decoded.verify(me.public)
    assert decoded.id == bytes.fromhex(vector["id"])
    assert decoded.version == 1 and decoded.grants == ()
    assert list(decoded.ops) == _ops_v1(vector["name"], me, other)


def _write() -> None:  # pragma: no cover - run by hand after a deliberate format change
    base = json.loads(DATA_V1.read_text())["vectors"]
    out = []
    for vector in base:
        me, other = _identity(vector["seed"]), _identity(vector["other_seed"])
        update = _build(vector, _ops(vector["name"], me, other), _grants(vector["name"], other))
        out.append(dict(vector, id=update.id.hex(), raw=update.raw.hex()))
    DATA.write_text(json.dumps({"protocol_version": PROTOCOL_VERSION, "vectors": out},
                               indent=1) + "\n")


if __name__ == "__main__":  # pragma: no cover
    import sys

    if sys.argv[1:] == ["--write"]:
        _write()
