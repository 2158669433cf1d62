"""Private keys at rest: one file per owned object under ``<home>/keys``.

Files are created with mode 0600 in a 0700 directory and written atomically
(temporary file, fsync, rename). With a passphrase, a master key is derived once
with Argon2id (``nacl.pwhash``) and every key file is sealed with it (secretbox);
``keys/keyring.cfg`` holds the salt, the cost parameters and a check value, so a
wrong passphrase is reported as such instead of as a damaged file.

File format: ``b"DMK0" + msgpack`` (plain) or ``b"DMK1" + secretbox(msgpack)``,
where the msgpack map is ``{"id": db_id, "sign": seed, "box": secret}``. A
passphrase-protected keyring refuses to open when it finds a plain key file (someone
put it there, or it was copied in by hand): keys at rest are all sealed or all plain.
``secure_home`` tightens a node's home to 0700.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

import msgpack
import nacl.exceptions
import nacl.pwhash
import nacl.secret
import nacl.utils

from .crypto import Identity, split_db_id
from .errors import KeyringError, MalformedUpdate

logger = logging.getLogger(__name__)

_PLAIN, _SEALED = b"DMK0", b"DMK1"
_CHECK = b"dmodel keyring check"


def write_private(path: Path, data: bytes, *, sync: bool = True) -> None:
    """Write ``data`` to ``path`` atomically with mode 0600 (``sync``: on disk before
    the rename)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            if sync:
                fh.flush()
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def secure_home(home: Path) -> None:
    """Create ``home`` as 0700, or tighten an existing one that others can read.

    A home holds the keyring and the store's data: nobody but its user should list it.
    Raises KeyringError when the mode cannot be set (a home owned by someone else).
    """
    try:
        home.mkdir(parents=True, exist_ok=True, mode=0o700)
        mode = home.stat().st_mode & 0o777
        if mode & 0o077:
            os.chmod(home, mode & 0o700 | 0o700)
            logger.warning("home %s was readable by others (mode %o); tightened to 700",
                           home, mode)
    except OSError as exc:
        raise KeyringError(f"cannot secure home {home}: {exc}; it must be a directory "
                           "that only its user can read (chmod 700)") from exc


class Keyring:
    """The private keys of the objects this node owns."""

    def __init__(self, path: str | os.PathLike[str], passphrase: str | bytes | None = None,
                 *, opslimit: int | None = None, memlimit: int | None = None) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._cache: dict[str, Identity] = {}
        self._ids: dict[str, str] = {}  # oid -> db_id
        try:
            self.path.mkdir(parents=True, exist_ok=True, mode=0o700)
            os.chmod(self.path, 0o700)
        except OSError as exc:
            raise KeyringError(f"cannot create keyring directory {self.path}: {exc}") from exc
        self._box = self._open_master(passphrase, opslimit, memlimit)
        self._scan()

    def _open_master(self, passphrase: str | bytes | None, opslimit: int | None,
                     memlimit: int | None) -> nacl.secret.SecretBox | None:
        cfg_path = self.path / "keyring.cfg"
        if isinstance(passphrase, str):
            passphrase = passphrase.encode()
        if cfg_path.exists():
            if not passphrase:
                raise KeyringError(f"the keyring at {self.path} is passphrase-protected: "
                                   "pass passphrase= or set DMODEL_PASSPHRASE")
            try:
                cfg = msgpack.unpackb(cfg_path.read_bytes(), raw=False)
                key = nacl.pwhash.argon2id.kdf(nacl.secret.SecretBox.KEY_SIZE, passphrase,
                                               cfg["salt"], opslimit=cfg["ops"],
                                               memlimit=cfg["mem"])
                check = cfg["check"]
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise KeyringError(f"keyring config {cfg_path} is unreadable: {exc}") from exc
            box = nacl.secret.SecretBox(key)
            try:
                if box.decrypt(check) != _CHECK:
                    raise nacl.exceptions.CryptoError
            except nacl.exceptions.CryptoError:
                raise KeyringError(f"wrong passphrase for the keyring at {self.path}") from None
            return box
        if not passphrase:
            return None
        if any(self.path.glob("*.key")):
            raise KeyringError(f"the keyring at {self.path} holds unprotected keys; "
                               "a passphrase can only be set on a new keyring")
        ops = opslimit or nacl.pwhash.argon2id.OPSLIMIT_INTERACTIVE
        mem = memlimit or nacl.pwhash.argon2id.MEMLIMIT_INTERACTIVE
        salt = nacl.utils.random(nacl.pwhash.argon2id.SALTBYTES)
        key = nacl.pwhash.argon2id.kdf(nacl.secret.SecretBox.KEY_SIZE, passphrase, salt,
                                       opslimit=ops, memlimit=mem)
        box = nacl.secret.SecretBox(key)
        cfg = {"salt": salt, "ops": ops, "mem": mem, "check": bytes(box.encrypt(_CHECK))}
        write_private(cfg_path, msgpack.packb(cfg, use_bin_type=True))
        return box

    def _scan(self) -> None:
        for file in self.path.glob("*.key"):
            oid = file.stem
            self._refuse_plain(file)
            try:
                identity, db_id = self._load(file)
            except KeyringError as exc:
                logger.warning("skipping key file %s: %s", file, exc)
                continue
            if identity.oid != oid:
                logger.warning("skipping key file %s: it holds the key of %s", file, identity.oid)
                continue
            self._cache[oid] = identity
            self._ids[oid] = db_id

    def _refuse_plain(self, file: Path) -> None:
        """A plain key file in a sealed keyring is refused, never skipped quietly."""
        if self._box is None:
            return
        try:
            with open(file, "rb") as fh:
                head = fh.read(4)
        except OSError:
            return  # reported by _load
        if head == _PLAIN:
            raise KeyringError(
                f"{file} is not encrypted, but the keyring at {self.path} is "
                "passphrase-protected: move the file away, then add the key with "
                "'dmodel keys import' so that it is sealed like the others")

    def _load(self, file: Path) -> tuple[Identity, str]:
        try:
            data = file.read_bytes()
        except OSError as exc:
            raise KeyringError(f"cannot read {file}: {exc}") from exc
        head, body = data[:4], data[4:]
        if head == _SEALED:
            if self._box is None:
                raise KeyringError(f"{file} is passphrase-protected")
            try:
                body = self._box.decrypt(body)
            except nacl.exceptions.CryptoError:
                raise KeyringError(f"{file} does not open with this passphrase") from None
        elif head != _PLAIN:
            raise KeyringError(f"{file} is not a dmodel key file")
        try:
            item = msgpack.unpackb(body, raw=False)
            return Identity(item["sign"], item["box"]), item["id"]
        except Exception as exc:
            raise KeyringError(f"{file} is damaged: {exc}") from exc

    def add(self, identity: Identity, db_id: str) -> None:
        """Store the private keys of ``db_id`` (whose oid must match the identity)."""
        try:
            _, oid = split_db_id(db_id)
        except MalformedUpdate as exc:
            raise KeyringError(str(exc)) from exc
        if oid != identity.oid:
            raise KeyringError(f"{db_id} is not the id of this key")
        sign, box = identity.secret_bytes()
        body = msgpack.packb({"id": db_id, "sign": sign, "box": box}, use_bin_type=True)
        data = _PLAIN + body if self._box is None else _SEALED + bytes(self._box.encrypt(body))
        with self._lock:
            write_private(self.path / f"{oid}.key", data)
            self._cache[oid] = identity
            self._ids[oid] = db_id

    def discard(self, oid: str) -> None:
        """Forget the keys of ``oid`` and delete its key file (for a create that was refused)."""
        with self._lock:
            self._cache.pop(oid, None)
            self._ids.pop(oid, None)
            (self.path / f"{oid}.key").unlink(missing_ok=True)

    def get(self, oid: str) -> Identity | None:
        """The identity of an owned object, or None."""
        return self._cache.get(oid)

    def __contains__(self, oid: object) -> bool:
        return oid in self._cache

    def owned(self) -> list[str]:
        """db_ids of every owned object."""
        return sorted(self._ids.values())

    def export(self, oid: str) -> bytes:
        """The object's private keys in clear (msgpack). Handle with care."""
        identity = self._cache.get(oid)
        if identity is None:
            raise KeyringError(f"no private key for {oid} in this keyring")
        sign, box = identity.secret_bytes()
        return msgpack.packb({"id": self._ids[oid], "sign": sign, "box": box},
                             use_bin_type=True)

    def import_(self, data: bytes) -> str:
        """Add keys produced by ``export``; returns the db_id."""
        db_id: str
        try:
            item = msgpack.unpackb(data, raw=False)
            identity, db_id = Identity(item["sign"], item["box"]), item["id"]
        except Exception as exc:
            raise KeyringError(f"not an exported dmodel key: {exc}") from exc
        self.add(identity, db_id)
        return db_id
