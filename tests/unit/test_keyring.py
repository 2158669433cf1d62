"""Private keys at rest (dmodel.keyring): modes, reopening, passphrases, damage, export.

Damage detection: a sealed (passphrase) key file is authenticated, so any damage is
noticed; a plain key file is only checked by matching its signing key to its file name,
so damage to its encryption secret goes unnoticed (no checksum in the DMK0 format).
"""

from __future__ import annotations

import logging
import os
import stat

import msgpack
import nacl.pwhash
import pytest

from dmodel.crypto import Identity
from dmodel.errors import KeyringError
from dmodel.keyring import Keyring

FAST = {"opslimit": nacl.pwhash.argon2id.OPSLIMIT_MIN,
        "memlimit": nacl.pwhash.argon2id.MEMLIMIT_MIN}


def ident(i: int) -> Identity:
    return Identity.from_seed(bytes([i]) * 32)


def db(identity: Identity) -> str:
    return f"Person:{identity.oid}"


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def _flip(data: bytes, part: bytes) -> bytes:
    at = data.rindex(part)
    return data[:at] + bytes([data[at] ^ 0xFF]) + data[at + 1:]


def filled(path, passphrase=None, n: int = 3) -> Keyring:
    ring = Keyring(path, passphrase, **FAST)
    for i in range(1, n + 1):
        ring.add(ident(i), db(ident(i)))
    return ring


@pytest.mark.parametrize("passphrase", [None, "correct horse"])
def test_files_are_0600_in_a_0700_directory(tmp_path, passphrase) -> None:
    path = tmp_path / "keys"
    old_umask = os.umask(0)  # the most permissive umask: modes must not depend on it
    try:
        filled(path, passphrase)
    finally:
        os.umask(old_umask)
    assert mode(path) == 0o700
    files = list(path.iterdir())
    assert len([f for f in files if f.suffix == ".key"]) == 3
    for file in files:
        assert mode(file) == 0o600, file
    assert not [f for f in files if f.name.endswith(".tmp")]


def test_existing_directory_is_tightened(tmp_path) -> None:
    path = tmp_path / "keys"
    path.mkdir(mode=0o755)
    os.chmod(path, 0o755)
    Keyring(path)
    assert mode(path) == 0o700


def test_round_trip_through_reopen(tmp_path) -> None:
    filled(tmp_path / "keys")
    ring = Keyring(tmp_path / "keys")
    assert ring.owned() == sorted(db(ident(i)) for i in (1, 2, 3))
    for i in (1, 2, 3):
        assert ident(i).oid in ring
        assert ring.get(ident(i).oid).secret_bytes() == ident(i).secret_bytes()
    assert ring.get(ident(4).oid) is None and ident(4).oid not in ring


def test_passphrase_round_trip(tmp_path) -> None:
    filled(tmp_path / "keys", "s3cret")
    ring = Keyring(tmp_path / "keys", "s3cret")
    assert ring.get(ident(2).oid).secret_bytes() == ident(2).secret_bytes()
    assert len(ring.owned()) == 3
    ring_bytes = Keyring(tmp_path / "keys", b"s3cret")  # bytes work as well as str
    assert len(ring_bytes.owned()) == 3


def test_sealed_key_files_hold_no_secret_in_clear(tmp_path) -> None:
    filled(tmp_path / "keys", "s3cret", n=1)
    seed, box = ident(1).secret_bytes()
    data = (tmp_path / "keys" / f"{ident(1).oid}.key").read_bytes()
    assert data.startswith(b"DMK1")
    assert seed not in data and box not in data


def test_wrong_passphrase(tmp_path) -> None:
    filled(tmp_path / "keys", "s3cret")
    with pytest.raises(KeyringError, match="wrong passphrase"):
        Keyring(tmp_path / "keys", "S3cret")


@pytest.mark.parametrize("missing", [None, "", b""])
def test_missing_passphrase_on_a_protected_keyring(tmp_path, missing) -> None:
    filled(tmp_path / "keys", "s3cret")
    with pytest.raises(KeyringError, match="passphrase"):
        Keyring(tmp_path / "keys", missing)


def test_passphrase_cannot_be_added_to_an_unprotected_keyring(tmp_path) -> None:
    filled(tmp_path / "keys")
    with pytest.raises(KeyringError):
        Keyring(tmp_path / "keys", "late", **FAST)


@pytest.mark.parametrize("config", [b"", b"\x85", b"garbage!", msgpack.packb(7),
                                    msgpack.packb({"salt": b"x"}),
                                    "missing check", "check not bytes"])
def test_damaged_keyring_config_is_a_keyring_error(tmp_path, config) -> None:
    filled(tmp_path / "keys", "s3cret")
    cfg_path = tmp_path / "keys" / "keyring.cfg"
    if isinstance(config, str):
        cfg = msgpack.unpackb(cfg_path.read_bytes())
        if config == "missing check":
            del cfg["check"]
        else:
            cfg["check"] = "text"
        config = msgpack.packb(cfg, use_bin_type=True)
    cfg_path.write_bytes(config)
    with pytest.raises(KeyringError):
        Keyring(tmp_path / "keys", "s3cret")


@pytest.mark.parametrize("passphrase", [None, "s3cret"])
@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty", "header", "flip", "other"])
def test_damaged_key_file_is_skipped_with_a_warning(tmp_path, caplog, passphrase,
                                                    damage) -> None:
    filled(tmp_path / "keys", passphrase)
    victim = tmp_path / "keys" / f"{ident(2).oid}.key"
    data = victim.read_bytes()
    victim.write_bytes({
        "truncate": data[: len(data) // 2],
        "garbage": b"DMK0" + b"\xc1\xc1\xc1" if passphrase is None else b"DMK1" + bytes(60),
        "empty": b"",
        "header": b"XXXX" + data[4:],
        # sealed: any byte (the MAC notices); plain: a byte of the signing seed (the oid no
        # longer matches). A plain file has no checksum of its own, see the module note.
        "flip": _flip(data, ident(2).secret_bytes()[0] if passphrase is None else data[-1:]),
        # a valid key file of another object under this name
        "other": (tmp_path / "keys" / f"{ident(3).oid}.key").read_bytes(),
    }[damage])
    with caplog.at_level(logging.WARNING, logger="dmodel.keyring"):
        ring = Keyring(tmp_path / "keys", passphrase)
    assert ring.owned() == sorted([db(ident(1)), db(ident(3))])
    assert ident(2).oid not in ring
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and ident(2).oid in warnings[0].getMessage()


def test_export_import_round_trip(tmp_path) -> None:
    source = filled(tmp_path / "a", n=2)
    exported = source.export(ident(2).oid)
    target = Keyring(tmp_path / "b", "other", **FAST)
    assert target.import_(exported) == db(ident(2))
    assert target.get(ident(2).oid).secret_bytes() == ident(2).secret_bytes()
    reopened = Keyring(tmp_path / "b", "other")
    assert reopened.owned() == [db(ident(2))]
    assert reopened.get(ident(2).oid).secret_bytes() == ident(2).secret_bytes()


def test_export_of_an_unknown_key(tmp_path) -> None:
    with pytest.raises(KeyringError):
        filled(tmp_path / "a", n=1).export(ident(9).oid)


@pytest.mark.parametrize("data", [b"", b"junk", msgpack.packb({"id": "Person:x"}),
                                  msgpack.packb({"id": "x", "sign": bytes(32), "box": bytes(32)})])
def test_import_of_garbage(tmp_path, data) -> None:
    ring = Keyring(tmp_path / "a")
    with pytest.raises(KeyringError):
        ring.import_(data)
    assert ring.owned() == []


def test_add_checks_the_id(tmp_path) -> None:
    ring = Keyring(tmp_path / "a")
    with pytest.raises(KeyringError):
        ring.add(ident(1), db(ident(2)))
    with pytest.raises(KeyringError):
        ring.add(ident(1), "not an id")
    assert ring.owned() == []
