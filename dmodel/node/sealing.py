"""Encrypted values: who reads an object, sealing a value for them, opening one.

A value is sealed with a fresh key wrapped for the object and each read-authorized
object, bound to its object and register (``crypto.seal``, ``crypto.place``); a
grant_read carries wraps of the current values' keys for the new reader. ``Sealer``
reads the store and the keyring and writes nothing. It runs on the thread of its
caller: a local write's (caller's thread, often under the apply lock), or the
applier's when it shows listeners decrypted values.
"""

from __future__ import annotations

import logging
from typing import Any

from .. import merge
from ..crypto import (
    EncryptedValue,
    PublicIdentity,
    open_sealed,
    open_value_key,
    place,
    seal,
    wrap_key,
)
from ..errors import DecryptionError, ObjectNotFoundError
from ..keyring import Keyring
from ..store.base import Store
from ..update import Op, pack_value, unpack_value

logger = logging.getLogger(__name__)


def live_meta(store: Store, db_id: str) -> merge.ObjectMeta:
    """Public keys and creation of a known object; ObjectNotFoundError otherwise."""
    meta = store.object_meta(db_id)
    if meta is None or meta.removed is not None:
        raise ObjectNotFoundError(f"{db_id} is {'removed' if meta else 'not known'} here")
    return meta


class Sealer:
    """The encrypted-value helpers of one node (its store and keyring)."""

    def __init__(self, store: Store, keyring: Keyring) -> None:
        self.store = store
        self.keyring = keyring

    def member_keys(self, member: str) -> PublicIdentity:
        meta = self.store.object_meta(member)
        if meta is None:
            raise ObjectNotFoundError(
                f"{member} is not known to this node; its create update must arrive first "
                "(its public key is needed to encrypt for it)")
        return meta.keys

    def readers(self, db_id: str) -> dict[str, bytes]:
        """oid -> public encryption key of everyone who may read ``db_id``'s encrypted fields."""
        meta = live_meta(self.store, db_id)
        out = {db_id.partition(":")[2]: meta.keys.box_key}
        for member in merge.current_members(self.store.auth_events(db_id, "r")):
            member_meta = self.store.object_meta(member)
            if member_meta is not None:
                out[member.partition(":")[2]] = member_meta.keys.box_key
            else:
                logger.warning("read-authorized %s of %s is unknown here; it cannot be given "
                               "the key of the new value", member, db_id)
        return out

    def seal_value(self, db_id: str, register: str, value: Any,
                   readers: dict[str, bytes] | None = None) -> dict[str, object]:
        """Encrypt a plain value (checked by the caller) for ``db_id`` and its current
        readers (or ``readers``), bound to register ``register`` of ``db_id``."""
        return seal(pack_value(value), self.readers(db_id) if readers is None else readers,
                    place(db_id, register))

    def grant_read_op(self, db_id: str, member: str, reader: str) -> Op:
        """A grant_read op that also gives ``member`` the keys of the current encrypted values.

        ``reader`` is an owned object able to open them (the object itself, usually).
        """
        box_key = self.member_keys(member).box_key
        reader_oid = reader.partition(":")[2]
        wraps: dict[bytes, bytes] = {}
        for name, reg in self.store.registers(db_id).items():
            if reg.encrypted and not reg.deleted:
                try:
                    value_key = self.value_key(db_id, name, reg, reader_oid)
                    # Only a value that opens in its own place: a sealed value someone
                    # copied here from elsewhere is never handed to a new reader.
                    open_sealed(merge.element_value(name, reg), value_key, place(db_id, name))
                except DecryptionError:
                    continue
                wraps[merge.version_ref(reg.version)] = wrap_key(value_key, box_key)
        return Op(db_id, "grant_read", "", {"id": member, "w": wraps})

    def value_key(self, db_id: str, name: str, reg: merge.Register, reader_oid: str) -> bytes:
        identity = self.keyring.get(reader_oid)
        if identity is None:
            raise DecryptionError(f"no decryption key found ({reader_oid} is not owned here)")
        envelope = merge.element_value(name, reg)
        extra = None
        if identity.oid not in (envelope.get("k") or {}):
            wrapped = self.store.wrapped_key(db_id, merge.version_ref(reg.version), identity.oid)
            extra = {identity.oid: wrapped} if wrapped else None
        return open_value_key(envelope, identity, extra)

    def open(self, db_id: str, name: str, reg: merge.Register, reader_oid: str) -> Any:
        value_key = self.value_key(db_id, name, reg, reader_oid)
        return unpack_value(open_sealed(merge.element_value(name, reg), value_key,
                                        place(db_id, name)))

    def display_value(self, db_id: str, name: str | None, reg: merge.Register | None) -> Any:
        """A register's value for listeners: decrypted if any owned key opens it."""
        if reg is None or reg.deleted:
            return None
        value = merge.element_value(name or "", reg)
        if not reg.encrypted:
            return value
        candidates = [db_id.partition(":")[2]]
        candidates += [oid for oid in (value.get("k") or {}) if oid in self.keyring]
        ref = merge.version_ref(reg.version)  # readers a later grant gave this value's key
        candidates += [key[len(ref):].decode() for key in self.store.wraps(db_id)
                       if key.startswith(ref) and key[len(ref):].decode() in self.keyring]
        for reader_oid in candidates:
            try:
                return self.open(db_id, name or "", reg, reader_oid)
            except DecryptionError:
                continue
        return EncryptedValue(db_id, name)


__all__ = ["Sealer", "live_meta"]
