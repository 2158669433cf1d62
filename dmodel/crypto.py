"""Identities, object ids, signatures and field encryption (thin wrappers over PyNaCl).

An object *is* a key pair: an Ed25519 signing key and an X25519 encryption key.
Its ``oid`` is the lowercase base32 (no padding) of BLAKE2b-160 of the public
signing key, so every id is self-certifying: ``oid_for(verify_key) == oid``.

Encrypted values are sealed with a fresh random 32-byte key (``crypto_secretbox``);
that key is wrapped with a ``SealedBox`` for each reader's X25519 public key.
"""

from __future__ import annotations

import base64
import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass

import nacl.bindings
import nacl.exceptions
import nacl.public
import nacl.signing
import nacl.utils

from .errors import DecryptionError, ForgedUpdate, MalformedUpdate

KEY_SIZE = 32
SIGNATURE_SIZE = 64
OID_LENGTH = 32  # base32 of 20 bytes, no padding


def oid_for(verify_key: bytes) -> str:
    """Return the object id derived from a public signing key."""
    digest = hashlib.blake2b(verify_key, digest_size=20).digest()
    return base64.b32encode(digest).decode("ascii").lower()


_OID = re.compile(r"[a-z2-7]{32}")


def is_oid(text: str) -> bool:
    """Whether ``text`` has the shape of an object id."""
    return _OID.fullmatch(text) is not None


def split_db_id(db_id: str) -> tuple[str, str]:
    """Split ``"Model:oid"`` into ``(model, oid)``; raise MalformedUpdate on a bad shape."""
    model, sep, oid = db_id.partition(":")
    if not sep or not model or not is_oid(oid) or not _is_model_name(model):
        raise MalformedUpdate(f"not an object id of the form Model:oid: {db_id[:80]!r}")
    return model, oid


def _is_model_name(name: str) -> bool:
    return name.isidentifier() and len(name) <= 64


@dataclass(frozen=True, slots=True)
class PublicIdentity:
    """The public half of an object's keys."""

    verify_key: bytes
    box_key: bytes

    def __post_init__(self) -> None:
        if not (isinstance(self.verify_key, bytes) and len(self.verify_key) == KEY_SIZE):
            raise MalformedUpdate("public signing key must be 32 bytes")
        if not (isinstance(self.box_key, bytes) and len(self.box_key) == KEY_SIZE):
            raise MalformedUpdate("public encryption key must be 32 bytes")

    @property
    def oid(self) -> str:
        return oid_for(self.verify_key)

    def verify(self, message: bytes, signature: bytes) -> None:
        """Raise ForgedUpdate unless ``signature`` is this key's signature of ``message``."""
        try:
            nacl.signing.VerifyKey(self.verify_key).verify(message, signature)
        except (nacl.exceptions.BadSignatureError, nacl.exceptions.ValueError, ValueError) as exc:
            raise ForgedUpdate("signature does not verify") from exc


class Identity:
    """An object's private keys. Keep it in the keyring; never send it."""

    __slots__ = ("_signing", "_box", "public", "_signer")

    def __init__(self, signing_seed: bytes, box_secret: bytes) -> None:
        self._signing = nacl.signing.SigningKey(signing_seed)
        self._box = nacl.public.PrivateKey(box_secret)
        self.public = PublicIdentity(bytes(self._signing.verify_key), bytes(self._box.public_key))

    @classmethod
    def generate(cls) -> Identity:
        """A new random identity."""
        return cls(nacl.utils.random(KEY_SIZE), nacl.utils.random(KEY_SIZE))

    @classmethod
    def from_seed(cls, seed: bytes) -> Identity:
        """A deterministic identity from a 32-byte seed (tests, known-answer vectors)."""
        if len(seed) != KEY_SIZE:
            raise ValueError("seed must be 32 bytes")
        box = hashlib.blake2b(seed, digest_size=32, person=b"dmodel-x25519").digest()
        return cls(seed, box)

    @property
    def oid(self) -> str:
        return self.public.oid

    def secret_bytes(self) -> tuple[bytes, bytes]:
        """(signing seed, box secret): for the keyring only."""
        return bytes(self._signing), bytes(self._box)

    def sign(self, message: bytes) -> bytes:
        """Detached Ed25519 signature of ``message``."""
        return self._signing.sign(message).signature

    def unwrap(self, wrapped: bytes) -> bytes:
        """Open a key sealed for this identity; raise DecryptionError if it was not."""
        try:
            return nacl.public.SealedBox(self._box).decrypt(wrapped)
        except nacl.exceptions.CryptoError as exc:
            raise DecryptionError("no decryption key found") from exc

    def __repr__(self) -> str:
        return f"<Identity {self.oid}>"


def new_value_key() -> bytes:
    """A fresh symmetric key for one encrypted value."""
    return nacl.utils.random(nacl.bindings.crypto_aead_xchacha20poly1305_ietf_KEYBYTES)


def wrap_key(value_key: bytes, box_key: bytes) -> bytes:
    """Seal ``value_key`` for the holder of the X25519 private key matching ``box_key``."""
    return nacl.public.SealedBox(nacl.public.PublicKey(box_key)).encrypt(value_key)


def place(db_id: str, register: str) -> bytes:
    """The place an encrypted value is bound to: its object and register.

    A DList element is bound to its list (``field#``): an insert cannot know its own
    element id, which is the hash of the update that carries the sealed value.
    """
    name, sep, _element = register.partition("#")
    return b"dmodel-sealed-v2\0" + db_id.encode() + b"\0" + (name + sep).encode()


_NONCE = nacl.bindings.crypto_aead_xchacha20poly1305_ietf_NPUBBYTES


def seal(plaintext: bytes, readers: Mapping[str, bytes], where: bytes) -> dict[str, object]:
    """Encrypt ``plaintext`` for every reader (oid -> box public key), bound to ``where``.

    Returns the envelope stored in the update: ``{"b": nonce || ciphertext, "k": {oid:
    wrapped key}}``. The ciphertext is XChaCha20-Poly1305 with ``where`` (see ``place``)
    as authenticated data, so the envelope copied into another object or register does
    not open there.
    """
    value_key = new_value_key()
    nonce = nacl.utils.random(_NONCE)
    ciphertext = nacl.bindings.crypto_aead_xchacha20poly1305_ietf_encrypt(
        plaintext, where, nonce, value_key)
    return {"b": nonce + ciphertext,
            "k": {oid: wrap_key(value_key, box) for oid, box in readers.items()}}


def open_value_key(envelope: Mapping[str, object], reader: Identity,
                   extra_wraps: Mapping[str, bytes] | None = None) -> bytes:
    """The symmetric key of an envelope, unwrapped by ``reader``."""
    wraps = envelope.get("k")
    wrapped = wraps.get(reader.oid) if isinstance(wraps, dict) else None
    if wrapped is None and extra_wraps:
        wrapped = extra_wraps.get(reader.oid)
    if not isinstance(wrapped, bytes):
        raise DecryptionError("no decryption key found")
    return reader.unwrap(wrapped)


def open_sealed(envelope: Mapping[str, object], value_key: bytes, where: bytes) -> bytes:
    """Decrypt an envelope's ciphertext with its symmetric key, at place ``where``.

    Envelopes of protocol version 1 (``"c"``, secretbox) were not bound to their place,
    so anyone who could write a field could copy one there; they are refused.
    """
    if "c" in envelope:
        raise DecryptionError("encrypted value uses the format of protocol version 1, which "
                              "is not bound to its field; its owner must write it again")
    sealed = envelope.get("b")
    if not isinstance(sealed, bytes) or len(sealed) < _NONCE:
        raise DecryptionError("encrypted value is damaged")
    try:
        return nacl.bindings.crypto_aead_xchacha20poly1305_ietf_decrypt(
            sealed[_NONCE:], where, sealed[:_NONCE], value_key)
    except (nacl.exceptions.CryptoError, ValueError, TypeError) as exc:
        raise DecryptionError("encrypted value does not open here (damaged, or copied from "
                              "another field or object)") from exc


class EncryptedValue:
    """Stands for an encrypted value this node cannot open (passed to listeners)."""

    __slots__ = ("object_id", "field")

    def __init__(self, object_id: str, field: str | None) -> None:
        self.object_id = object_id
        self.field = field

    def __repr__(self) -> str:
        return "<encrypted>"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, EncryptedValue) and (self.object_id, self.field) == (
            other.object_id, other.field)

    def __hash__(self) -> int:
        return hash((self.object_id, self.field))
