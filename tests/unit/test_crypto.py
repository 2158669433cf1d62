"""Identities, object ids, signatures and field encryption (dmodel.crypto)."""

from __future__ import annotations

import base64
import hashlib

import pytest

from dmodel import crypto
from dmodel.crypto import Identity, PublicIdentity
from dmodel.errors import DecryptionError, ForgedUpdate, MalformedUpdate

ALPHABET = set("abcdefghijklmnopqrstuvwxyz234567")


def ident(i: int) -> Identity:
    return Identity.from_seed(bytes([i]) * 32)


@pytest.mark.parametrize("i", [0, 1, 7, 255])
def test_oid_derivation(i: int) -> None:
    identity = ident(i)
    key = identity.public.verify_key
    expected = base64.b32encode(hashlib.blake2b(key, digest_size=20).digest()).decode().lower()
    assert identity.oid == crypto.oid_for(key) == identity.public.oid == expected
    assert len(identity.oid) == crypto.OID_LENGTH == 32
    assert set(identity.oid) <= ALPHABET
    assert "=" not in identity.oid
    assert crypto.is_oid(identity.oid)


def test_known_oid() -> None:
    # Pins the seed -> key -> id derivation (Ed25519 from the seed, BLAKE2b-160, base32).
    assert ident(0x11).oid == "j623n3g3jshajibkzm6n745uxqcruref"


def test_from_seed_is_deterministic_and_distinct() -> None:
    assert ident(1).secret_bytes() == ident(1).secret_bytes()
    assert ident(1).public == ident(1).public
    assert ident(1).oid != ident(2).oid
    assert ident(1).public.box_key != ident(2).public.box_key
    signing, box = ident(1).secret_bytes()
    assert signing == bytes([1]) * 32 and box != signing  # the box key is derived, not reused
    with pytest.raises(ValueError):
        Identity.from_seed(bytes(31))


def test_generate_is_random() -> None:
    assert Identity.generate().oid != Identity.generate().oid


@pytest.mark.parametrize("text", ["", "a" * 31, "a" * 33, "A" * 32, "1" * 32, "a" * 31 + "=",
                                  "a" * 31 + "8"])
def test_is_oid_rejects(text: str) -> None:
    assert not crypto.is_oid(text)


def test_split_db_id() -> None:
    oid = ident(1).oid
    assert crypto.split_db_id(f"Person:{oid}") == ("Person", oid)
    for bad in ["Person", f"Person:{oid}:x", f":{oid}", f"1x:{oid}", "Person:short"]:
        with pytest.raises(MalformedUpdate):
            crypto.split_db_id(bad)


def test_public_identity_checks_key_sizes() -> None:
    with pytest.raises(MalformedUpdate):
        PublicIdentity(bytes(31), bytes(32))
    with pytest.raises(MalformedUpdate):
        PublicIdentity(bytes(32), b"x")
    with pytest.raises(MalformedUpdate):
        PublicIdentity("k" * 32, bytes(32))  # type: ignore[arg-type]


def test_sign_and_verify() -> None:
    a, b = ident(1), ident(2)
    sig = a.sign(b"message")
    assert len(sig) == crypto.SIGNATURE_SIZE
    a.public.verify(b"message", sig)
    with pytest.raises(ForgedUpdate):
        a.public.verify(b"messagE", sig)
    with pytest.raises(ForgedUpdate):
        b.public.verify(b"message", sig)
    with pytest.raises(ForgedUpdate):
        a.public.verify(b"message", sig[:-1])  # wrong length: still ForgedUpdate, no nacl error
    with pytest.raises(ForgedUpdate):
        a.public.verify(b"message", bytes(64))


HERE = crypto.place("Person:x", "salary")


def test_seal_opens_for_every_reader_and_nobody_else() -> None:
    a, b, c, d = ident(1), ident(2), ident(3), ident(4)
    envelope = crypto.seal(b"secret", {a.oid: a.public.box_key, b.oid: b.public.box_key,
                                       c.oid: c.public.box_key}, HERE)
    assert set(envelope["k"]) == {a.oid, b.oid, c.oid}
    assert b"secret" not in envelope["b"]
    for reader in (a, b, c):
        key = crypto.open_value_key(envelope, reader)
        assert crypto.open_sealed(envelope, key, HERE) == b"secret"
    with pytest.raises(DecryptionError, match="no decryption key found"):
        crypto.open_value_key(envelope, d)


def test_each_seal_uses_a_fresh_key() -> None:
    a = ident(1)
    e1 = crypto.seal(b"same", {a.oid: a.public.box_key}, HERE)
    e2 = crypto.seal(b"same", {a.oid: a.public.box_key}, HERE)
    assert e1["b"] != e2["b"]
    assert crypto.open_value_key(e1, a) != crypto.open_value_key(e2, a)


def test_wrapped_key_under_the_wrong_name_does_not_open() -> None:
    a, d = ident(1), ident(4)
    envelope = crypto.seal(b"secret", {a.oid: a.public.box_key}, HERE)
    envelope["k"][d.oid] = envelope["k"][a.oid]  # a's wrap, filed under d's id
    with pytest.raises(DecryptionError):
        crypto.open_value_key(envelope, d)


def test_extra_wraps_grant_a_later_reader() -> None:
    a, d = ident(1), ident(4)
    envelope = crypto.seal(b"secret", {a.oid: a.public.box_key}, HERE)
    value_key = crypto.open_value_key(envelope, a)
    extra = {d.oid: crypto.wrap_key(value_key, d.public.box_key)}
    opened = crypto.open_sealed(envelope, crypto.open_value_key(envelope, d, extra), HERE)
    assert opened == b"secret"
    with pytest.raises(DecryptionError):
        crypto.open_value_key(envelope, ident(5), extra)


def test_damaged_envelopes_raise_decryption_error() -> None:
    a = ident(1)
    envelope = crypto.seal(b"secret", {a.oid: a.public.box_key}, HERE)
    key = crypto.open_value_key(envelope, a)
    damaged = dict(envelope, b=envelope["b"][:-1] + bytes([envelope["b"][-1] ^ 1]))
    with pytest.raises(DecryptionError):
        crypto.open_sealed(damaged, key, HERE)
    with pytest.raises(DecryptionError):
        crypto.open_sealed({"k": {}}, key, HERE)
    with pytest.raises(DecryptionError):
        crypto.open_sealed({"b": b"short", "k": {}}, key, HERE)
    with pytest.raises(DecryptionError):
        crypto.open_sealed(envelope, bytes(32), HERE)
    with pytest.raises(DecryptionError):
        crypto.open_value_key({"c": b"", "k": {a.oid: b"garbage"}}, a)
    with pytest.raises(DecryptionError):
        crypto.open_value_key({"c": b"", "k": "not a map"}, a)
    with pytest.raises(DecryptionError):
        a.unwrap(b"")


def test_encrypted_value_placeholder() -> None:
    e = crypto.EncryptedValue("Person:x", "salary")
    assert str(e) == repr(e) == "<encrypted>"
    assert e == crypto.EncryptedValue("Person:x", "salary")
    assert e != crypto.EncryptedValue("Person:x", "name")
    assert hash(e) == hash(crypto.EncryptedValue("Person:x", "salary"))


def test_a_sealed_value_opens_only_in_its_place() -> None:
    a = ident(1)
    envelope = crypto.seal(b"secret", {a.oid: a.public.box_key}, HERE)
    key = crypto.open_value_key(envelope, a)
    assert crypto.open_sealed(envelope, key, crypto.place("Person:x", "salary")) == b"secret"
    for elsewhere in (crypto.place("Person:y", "salary"), crypto.place("Person:x", "note"),
                      crypto.place("Person:x", "salary:k"), crypto.place("Person:xs", "alary")):
        with pytest.raises(DecryptionError, match="copied from another field"):
            crypto.open_sealed(envelope, key, elsewhere)


def test_list_values_are_bound_to_their_list() -> None:
    assert crypto.place("P:x", "items#" + "ab" * 34) == crypto.place("P:x", "items#")
    assert crypto.place("P:x", "items#") != crypto.place("P:x", "items")
    assert crypto.place("P:x", "tags:colour") != crypto.place("P:x", "tags:size")


def test_protocol_1_envelopes_are_refused() -> None:
    with pytest.raises(DecryptionError, match="protocol version 1"):
        crypto.open_sealed({"c": bytes(40), "k": {}}, bytes(32), HERE)
