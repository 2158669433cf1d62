"""Sealed values stay in their place, and keys stay sealed at rest (issue 10).

An encrypted value is bound to its object and register (authenticated data): a writer
of X who copies another value's envelope into X (a raw ``set_enc``/``dset_enc`` it signs
itself, naming its grant) gets a value that opens nowhere: not for X, not for the
owner of the original, not for a reader X grants later, and no listener, ``dmodel
show`` or ``display_value`` reveals the plaintext. Keys at rest: a plain key file in a
passphrase keyring is refused; a home others can read is tightened to 0700.
"""

from __future__ import annotations

import json
import os
import shutil
import stat

import pytest

import dmodel
from dmodel import merge
from dmodel.cli import main
from dmodel.crypto import EncryptedValue, Identity
from dmodel.keyring import Keyring
from dmodel.node import rights
from dmodel.update import Op, Update, decode

SALARY = 9_876_543
SECRET = "top-secret-plan"


class Memo(dmodel.DModel):
    title = dmodel.DField()
    note = dmodel.DField(encrypted=True)
    secret = dmodel.DField(encrypted=True)
    salary = dmodel.DField(encrypted=True)
    vault = dmodel.DDict(encrypted=True)


class Writer(dmodel.DModel):
    name = dmodel.DField()


class Seen(dmodel.DAction):
    """Every value a listener is shown."""

    def __init__(self) -> None:
        self.values: list[tuple[str, str, object]] = []

    def on_update(self, object_id, field, old_value, new_value) -> None:
        self.values += [(object_id, field, old_value), (object_id, field, new_value)]

    def on_updated(self, object_id, field, old_value, new_value) -> None:
        self.values += [(object_id, field, old_value), (object_id, field, new_value)]


def ship(src: dmodel.Node, dst: dmodel.Node) -> None:
    for raw in src.updates_since(0):
        dst.ingest(raw)


def copy_envelope(node: dmodel.Node, writer: str, target: str, op: str, field: str,
                  envelope: dict, key: str | None = None) -> Update:
    """``writer`` (update-authorized on ``target``) signs a raw op putting ``envelope``
    into ``target``, naming its grant: what a modified client can do."""
    value = envelope if key is None else [key, envelope]
    ops = [Op(target, op, field, value)]
    grant = merge.open_grant(node.store.member_events(target, "u", writer))
    assert grant is not None
    assert rights.grants_for(node.store, writer, ops) == {target: grant}
    return Update.create(node.identity(writer), node=os.urandom(16), caller=writer,
                         timestamp=node.clock.tick(), prev=b"", ops=ops,
                         grants={target: grant})


def leaks(values: object) -> bool:
    text = repr(values)
    return str(SALARY) in text or SECRET in text


def show_json(capsys, home, db_id: str, *extra: str) -> tuple[dict, str]:
    code = main(["show", db_id, "--home", str(home), "--json", *extra])
    out, err = capsys.readouterr()
    assert code == 0, err
    return json.loads(out), out


def test_copied_envelopes_open_nowhere_and_leak_nowhere(make_node, capsys) -> None:
    a, b, c = make_node("a"), make_node("b"), make_node("c")
    seen_a, seen_c = Seen().apply("Memo:*", node=a), Seen().apply("Memo:*", node=c)
    writer = Writer.create(node=b, name="writer").db_id
    reader = Writer.create(node=c, name="reader").db_id
    ship(b, a)
    ship(c, a)
    y = Memo.create(node=a, title="payroll", salary=SALARY)
    x = Memo.create(node=a, title="memo", update=[writer], secret=SECRET)
    ship(a, b)
    assert y.salary.get() == SALARY and x.secret.get() == SECRET    # where they belong

    # The writer reads the sealed registers it holds and copies them into X.
    salary_env = b.store.register(y.db_id, "salary").value
    secret_env = b.store.register(x.db_id, "secret").value
    assert y.oid in salary_env["k"] and x.oid in secret_env["k"]
    copies = [
        copy_envelope(b, writer, x.db_id, "set_enc", "note", salary_env),      # Y -> X
        copy_envelope(b, writer, x.db_id, "dset_enc", "vault", secret_env, "k"),  # field
        copy_envelope(b, writer, x.db_id, "set_enc", "salary", secret_env),    # -> field
    ]
    for update in copies:
        decision = a.ingest(update.raw)
        assert decision is not None and decision.verdict == "accepted"   # a valid write
    copied = {"note": "note", "vault:k": "vault:k", "salary": "salary"}
    for name in copied:
        reg = a.store.register(x.db_id, name)
        assert reg is not None and reg.encrypted
        assert merge.version_ref(reg.version)[:32] in {u.id for u in copies}
        for reader_id in (x.db_id, y.db_id):              # A holds both keys
            with pytest.raises(dmodel.DecryptionError):
                a.read(x.db_id, name, reader=reader_id)
        assert isinstance(a.display_value(x.db_id, name, reg), EncryptedValue)
    with pytest.raises(dmodel.DecryptionError):
        x.note.get()
    with pytest.raises(dmodel.DecryptionError):
        x.vault.get("k")
    with pytest.raises(dmodel.DecryptionError):
        x.salary.get()
    assert x.secret.get() == SECRET and y.salary.get() == SALARY     # originals intact

    # X grants read to a new reader: only the value that opens in its place is wrapped.
    x.append_read_authorized(reader)
    grant = decode(a.updates_since(a.log_length() - 1)[0]).ops[0]
    assert grant.op == "grant_read" and grant.value["id"] == reader
    secret_ref = merge.version_ref(a.store.register(x.db_id, "secret").version)
    assert set(grant.value["w"]) == {secret_ref}
    ship(a, c)
    assert c.read(x.db_id, "secret", reader=reader) == SECRET       # the legitimate one
    for name in copied:
        with pytest.raises(dmodel.DecryptionError):
            c.read(x.db_id, name, reader=reader)
        assert isinstance(c.display_value(x.db_id, name, c.store.register(x.db_id, name)),
                          EncryptedValue)

    # Listeners were shown the copies, as encrypted values only; the plaintexts appear
    # only for the fields they were sealed for, on the node that owns them.
    for seen in (seen_a, seen_c):
        shown = {(obj, name): v for obj, name, v in seen.values if v is not None
                 and (obj, name) in {(x.db_id, n) for n in copied}}
        assert set(shown) == {(x.db_id, n) for n in copied}, seen.values
        assert all(isinstance(v, EncryptedValue) for v in shown.values()), shown
    assert {(o, n) for o, n, v in seen_a.values if v == SALARY} == {(y.db_id, "salary")}
    assert {(o, n) for o, n, v in seen_a.values if v == SECRET} == {(x.db_id, "secret")}
    assert str(SALARY) not in repr(seen_c.values)   # c holds no key of Y's salary

    a.shutdown()
    c.shutdown()
    # (``show`` on c without --as: see the test below.)
    for home, extra in ((a.home, ()), (a.home, ("--as", x.db_id)), (a.home, ("--as", y.db_id)),
                        (c.home, ("--as", reader))):
        info, out = show_json(capsys, home, x.db_id, *extra)
        fields = info["fields"]
        assert fields["note"] == fields["vault:k"] == fields["salary"] == {"encrypted": True}, \
            extra
        assert fields["title"] == "memo"
        assert str(SALARY) not in out
        assert out.count(SECRET) == (0 if extra == ("--as", y.db_id) else 1)   # X.secret only
        if SECRET in out:
            assert fields["secret"] == SECRET


def test_show_without_as_opens_a_value_wrapped_for_a_later_reader(make_node, capsys) -> None:
    a, c = make_node("a"), make_node("c")
    reader = Writer.create(node=c, name="reader").db_id
    ship(c, a)
    x = Memo.create(node=a, title="memo", secret=SECRET)
    x.append_read_authorized(reader)                 # the key of the value goes in a wrap
    ship(a, c)
    assert c.read(x.db_id, "secret", reader=reader) == SECRET    # c can open it
    c.shutdown()
    info, _ = show_json(capsys, c.home, x.db_id, "--as", reader)
    assert info["fields"]["secret"] == SECRET
    info, _ = show_json(capsys, c.home, x.db_id)     # "default: any key this home holds"
    assert info["fields"]["secret"] == SECRET


# ---------------------------------------------------------------- keys at rest


def test_a_plain_key_file_in_a_passphrase_keyring_is_refused(make_node, tmp_path) -> None:
    node = make_node("sealed", passphrase="correct horse")
    mine = Writer.create(node=node, name="mine").db_id
    home = node.home
    node.shutdown()
    stranger = Identity.generate()
    plain = Keyring(tmp_path / "plain-keys")
    plain.add(stranger, f"Writer:{stranger.oid}")
    dropped = home / "keys" / f"{stranger.oid}.key"
    shutil.copy(tmp_path / "plain-keys" / f"{stranger.oid}.key", dropped)
    with pytest.raises((dmodel.KeyringError, dmodel.ConfigurationError),
                       match="not encrypted"):
        dmodel.Node(home, passphrase="correct horse")
    # The refusal left nothing running: with the file gone the node opens as before.
    dropped.unlink()
    again = dmodel.Node(home, passphrase="correct horse")
    try:
        assert again.keyring.owned() == [mine]
        assert again.read(mine, "name") == "mine"
    finally:
        again.shutdown()


def test_a_home_others_can_read_is_tightened_to_0700(make_node, tmp_path) -> None:
    fresh = tmp_path / "fresh"
    fresh.mkdir(mode=0o755)
    os.chmod(fresh, 0o755)
    node = make_node("fresh")
    assert node.home == fresh
    assert stat.S_IMODE(fresh.stat().st_mode) == 0o700
    doc = Writer.create(node=node, name="kept").db_id
    node.shutdown()
    os.chmod(fresh, 0o755)                           # loosened while the node was away
    again = dmodel.Node(fresh)
    try:
        assert stat.S_IMODE(fresh.stat().st_mode) == 0o700
        assert again.read(doc, "name") == "kept"
    finally:
        again.shutdown()
