"""The ready-made listeners in dmodel.listeners, driven through a ListenerRegistry."""

import json
import logging
import stat
import sys
from pathlib import Path
from typing import Any

import pytest

import dmodel.listeners
from dmodel.actions import Change, Context, DAction, ListenerRegistry
from dmodel.errors import ConfigurationError, RejectedError, UnauthorizedError, VetoedError
from dmodel.listeners import AuditLog, LogChanges, ReadOnlyFields, RejectUnauthorized, RunScript

OBJ = "Person:3xk2abcdefghijklmnopqrstuvwxyz23"
CALLER = "Person:chiefchiefchiefchiefchiefchief"
UPDATE_ID = "ab" * 20


def make_change(
    kind: str,
    field: str | None = "salary",
    old_value: Any = None,
    new_value: Any = None,
    *,
    authorized: bool = True,
    owned: bool = False,
    verdict: str = "accepted",
    object_id: str = OBJ,
) -> Change:
    key = object_id if kind in ("create", "remove") else f"{object_id}:{field}"
    if kind in ("create", "remove"):
        field = None
    context = Context(
        caller_id=CALLER,
        verified=True,
        authorized=authorized,
        owned=owned,
        timestamp=1700000000000,
        update_id=UPDATE_ID,
        local=False,
        node_id="cd" * 16,
        verdict=verdict,
    )
    return Change(kind, object_id, key, field, old_value, new_value, context=context)


@pytest.fixture
def reg() -> ListenerRegistry:
    return ListenerRegistry()


def test_exports() -> None:
    assert sorted(dmodel.listeners.__all__) == [
        "AuditLog",
        "LogChanges",
        "ReadOnlyFields",
        "RejectUnauthorized",
        "RunScript",
    ]
    for name in dmodel.listeners.__all__:
        assert getattr(dmodel.listeners, name).__doc__


def test_callbacks_called_without_a_context_raise_type_error(tmp_path: Path) -> None:
    """They take ``context`` as an optional parameter (to override DAction's callbacks,
    which have none), but the registry always passes it; a direct call needs it too."""
    with AuditLog(tmp_path / "audit.jsonl") as audit:
        calls = [lambda: RejectUnauthorized().on_unauthorized_remove(OBJ),
                 lambda: LogChanges().on_created(OBJ, OBJ),
                 lambda: RunScript(["true"]).on_deleted(OBJ, "salary", 1),
                 lambda: audit.on_updated(OBJ, "salary", 1, 2)]
        for call in calls:
            with pytest.raises(TypeError, match="context"):
                call()
    change = make_change("remove")
    with pytest.raises(UnauthorizedError, match=CALLER):
        RejectUnauthorized().on_unauthorized_remove(OBJ, change.context)


# RejectUnauthorized


@pytest.mark.parametrize(
    ("kind", "callback"),
    [
        ("update", "on_unauthorized_update"),
        ("delete", "on_unauthorized_delete"),
        ("remove", "on_unauthorized_remove"),
    ],
)
def test_reject_unauthorized_vetoes(reg: ListenerRegistry, kind: str, callback: str) -> None:
    listener = RejectUnauthorized().apply("Person:*", registry=reg)
    with pytest.raises(VetoedError) as info:
        reg.before([make_change(kind, old_value=1, new_value=2, authorized=False)])
    assert info.value.listener is listener and info.value.callback == callback
    assert isinstance(info.value.__cause__, UnauthorizedError)
    assert CALLER in str(info.value)


@pytest.mark.parametrize("kind", ["create", "update", "delete", "remove"])
def test_reject_unauthorized_lets_authorized_changes_through(
    reg: ListenerRegistry, kind: str
) -> None:
    RejectUnauthorized().apply("*", registry=reg)
    later = _Seen().apply("*", registry=reg)
    reg.before([make_change(kind, authorized=True, owned=True)])
    assert later.seen == [kind]  # no veto: the before-callbacks after it ran


def test_reject_unauthorized_only_observes_rejected(reg: ListenerRegistry) -> None:
    RejectUnauthorized().apply("*", registry=reg)
    later = _Seen().apply("*", registry=reg)
    rejected = make_change("update", authorized=False, verdict="unauthorized")
    reg.observe_rejected([rejected])  # the policy already rejected it: nothing to veto
    assert later.observed == ["update"]


class _Seen(DAction):
    """Records which before-callbacks and rejected-observations reached it."""

    def __init__(self) -> None:
        self.seen: list[str] = []
        self.observed: list[str] = []

    def on_create(self, object_id: str, key: str) -> None:
        self.seen.append("create")

    def on_update(self, object_id: str, field: str, old_value: Any, new_value: Any) -> None:
        self.seen.append("update")

    def on_delete(self, object_id: str, field: str, value: Any) -> None:
        self.seen.append("delete")

    def on_remove(self, object_id: str) -> None:
        self.seen.append("remove")

    def on_unauthorized_update(self, object_id: str, field: str, old_value: Any,
                               new_value: Any) -> None:
        self.observed.append("update")


# ReadOnlyFields


def test_read_only_fields(reg: ListenerRegistry) -> None:
    ReadOnlyFields(["ssn", "tags"]).apply("Person:[id]:*", registry=reg)
    # First values are allowed (creation), and other fields are not affected.
    reg.before([make_change("update", "ssn", None, "123")])
    reg.before([make_change("update", "tags:color", None, "red")])
    reg.before([make_change("update", "name", "a", "b")])
    reg.before([make_change("delete", "name", "a")])
    reg.before([make_change("create"), make_change("remove")])
    # Once set, nobody may change or delete them, the object itself included.
    for change in [
        make_change("update", "ssn", "123", "456", owned=True),
        make_change("delete", "ssn", "123", owned=True),
        make_change("update", "tags:color", "red", "blue"),
        make_change("delete", "tags:color", "red"),
    ]:
        with pytest.raises(VetoedError, match="read-only") as info:
            reg.before([change])
        assert isinstance(info.value.__cause__, RejectedError)


def test_read_only_single_dict_entry_and_string_argument(reg: ListenerRegistry) -> None:
    ReadOnlyFields("tags:color").apply("*", registry=reg)
    reg.before([make_change("update", "tags:size", 1, 2)])
    with pytest.raises(VetoedError):
        reg.before([make_change("update", "tags:color", "red", "blue")])
    assert ReadOnlyFields("salary").fields == frozenset({"salary"})


@pytest.mark.parametrize("fields", [[], [""], "", [3]])
def test_read_only_fields_validates(fields: Any) -> None:
    with pytest.raises(ConfigurationError):
        ReadOnlyFields(fields)


# AuditLog to a file


def read_lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_audit_log_file(reg: ListenerRegistry, tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    with AuditLog(path) as audit:
        audit.apply("Person:*", registry=reg)
        assert stat.S_IMODE(path.stat().st_mode) == 0o600

        create = make_change("create", owned=True)
        update = make_change("update", "salary", 10, 20)
        delete = make_change("delete", "nick", "bob", authorized=False)
        for change in (create, update, delete):
            reg.before([change])
            assert reg.after([change]) == []
        reg.before([make_change("remove")])
        reg.observe_rejected([make_change("update", "salary", 20, 0, authorized=False,
                                          verdict="unauthorized")])

    lines = read_lines(path)
    assert [(r["verdict"], r["kind"], r["field"]) for r in lines] == [
        ("attempted", "create", None),
        ("accepted", "create", None),
        ("attempted", "update", "salary"),
        ("accepted", "update", "salary"),
        ("attempted", "delete", "nick"),
        ("accepted", "delete", "nick"),
        ("attempted", "remove", None),
        ("unauthorized", "update", "salary"),
    ]
    accepted_update = lines[3]
    assert accepted_update["object_id"] == OBJ
    assert accepted_update["caller_id"] == CALLER
    assert accepted_update["update_id"] == UPDATE_ID
    assert accepted_update["authorized"] is True
    assert (accepted_update["old_value"], accepted_update["new_value"]) == (10, 20)
    assert lines[5]["authorized"] is False and lines[5]["old_value"] == "bob"
    assert lines[7]["authorized"] is False and lines[7]["new_value"] == 0
    assert all(r["time"].endswith("+00:00") for r in lines)


def test_audit_log_records_vetoed_attempts(reg: ListenerRegistry, tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    audit = AuditLog(path).apply("*", registry=reg)
    RejectUnauthorized().apply("*", registry=reg)
    change = make_change("update", "salary", 10, 99, authorized=False)
    with pytest.raises(VetoedError):
        reg.before([change])
    audit.close()
    (line,) = read_lines(path)
    assert line["verdict"] == "attempted" and line["new_value"] == 99


def test_audit_log_without_attempts_or_values(reg: ListenerRegistry, tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    audit = AuditLog(str(path), attempts=False, values=False).apply("*", registry=reg)
    change = make_change("update", "salary", 10, 20)
    reg.before([change])
    reg.after([change])
    audit.close()
    (line,) = read_lines(path)
    assert line["verdict"] == "accepted" and "old_value" not in line


def test_audit_log_appends_and_keeps_mode(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    path.write_text('{"earlier": true}\n')
    path.chmod(0o640)
    reg = ListenerRegistry()
    with AuditLog(path) as audit:
        audit.apply("*", registry=reg)
        reg.after([make_change("create")])
    lines = read_lines(path)
    assert lines[0] == {"earlier": True} and lines[1]["kind"] == "create"
    assert stat.S_IMODE(path.stat().st_mode) == 0o640


def test_audit_log_survives_odd_values(reg: ListenerRegistry, tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"

    class Odd:
        def __repr__(self) -> str:
            return "<Odd>"

    class Broken:
        def __repr__(self) -> str:
            raise RuntimeError("no repr")

    cyclic: list[Any] = []
    cyclic.append(cyclic)
    values = [
        (b"\x00\xff", "00ff"),
        (Odd(), "<Odd>"),
        (Broken(), "<unrepresentable Broken>"),
        ({1: {2, 3}, "k": (b"\x01",)}, {"1": [2, 3], "k": ["01"]}),
        (float("nan"), "nan"),
        (10**5000, "<int of 16610 bits>"),
        ("ünï\u2028code\x85", "ünï\u2028code\x85"),
    ]
    with AuditLog(path) as audit:
        audit.apply("*", registry=reg)
        for value, _ in values:
            assert reg.after([make_change("update", "f", None, value)]) == []
        assert reg.after([make_change("update", "f", None, cyclic)]) == []
    assert path.read_bytes().isascii()
    lines = read_lines(path)
    assert [r["new_value"] for r in lines[:-1]] == [want for _, want in values]
    assert isinstance(lines[-1]["new_value"], list)


def test_audit_log_write_errors_never_veto(
    reg: ListenerRegistry, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    audit = AuditLog(tmp_path / "audit.jsonl").apply("*", registry=reg)
    audit.close()
    change = make_change("update", "salary", 1, 2)
    with caplog.at_level(logging.WARNING):
        reg.before([change])  # the attempt cannot be written: logged, not a veto
        errors = reg.after([change])  # after-callback errors go back to the node
    assert [(lst, name) for lst, name, _ in errors] == [(audit, "on_updated")]
    assert any("AuditLog could not record" in r.getMessage() for r in caplog.records)


def test_audit_log_needs_a_destination() -> None:
    with pytest.raises(ConfigurationError, match="path= or redis="):
        AuditLog()


# RunScript


RUN_SCRIPT_VARS = [
    "DMODEL_EVENT",
    "DMODEL_OBJECT_ID",
    "DMODEL_FIELD",
    "DMODEL_OLD_VALUE",
    "DMODEL_NEW_VALUE",
    "DMODEL_CALLER_ID",
    "DMODEL_UPDATE_ID",
]


def write_env_script(out: Path) -> list[str]:
    code = (
        "import json, os, sys\n"
        f"env = {{k: os.environ.get(k) for k in {RUN_SCRIPT_VARS!r}}}\n"
        "with open(sys.argv[1], 'a') as f:\n"
        "    f.write(json.dumps(env) + '\\n')\n"
    )
    return [sys.executable, "-c", code, str(out)]


def test_run_script_passes_the_change(reg: ListenerRegistry, tmp_path: Path) -> None:
    out = tmp_path / "env.jsonl"
    RunScript(write_env_script(out)).apply("Person:*", registry=reg)
    assert reg.after([make_change("update", "salary", 10, {"new": [1]})]) == []
    assert reg.after([make_change("create"), make_change("delete", "nick", "bob")]) == []
    reg.before([make_change("update", "salary", 1, 2)])  # before-callbacks run nothing

    runs = [json.loads(line) for line in out.read_text().splitlines()]
    assert runs[0] == {
        "DMODEL_EVENT": "updated",
        "DMODEL_OBJECT_ID": OBJ,
        "DMODEL_FIELD": "salary",
        "DMODEL_OLD_VALUE": "10",
        "DMODEL_NEW_VALUE": '{"new":[1]}',
        "DMODEL_CALLER_ID": CALLER,
        "DMODEL_UPDATE_ID": UPDATE_ID,
    }
    assert (runs[1]["DMODEL_EVENT"], runs[1]["DMODEL_FIELD"]) == ("created", "")
    assert (runs[2]["DMODEL_EVENT"], runs[2]["DMODEL_OLD_VALUE"]) == ("deleted", '"bob"')
    assert len(runs) == 3


def test_run_script_string_command_and_events(reg: ListenerRegistry, tmp_path: Path) -> None:
    out = tmp_path / "env out.jsonl"
    argv = write_env_script(out)
    command = " ".join(__import__("shlex").quote(a) for a in argv)
    RunScript(command, events=["deleted"]).apply("*", registry=reg)
    reg.after([make_change("update", "a", 1, 2), make_change("delete", "a", 2)])
    (run,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert run["DMODEL_EVENT"] == "deleted"


def test_run_script_failures_are_logged(
    reg: ListenerRegistry, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    RunScript([sys.executable, "-c", "import sys; sys.exit('boom')"]).apply("*", registry=reg)
    RunScript([str(tmp_path / "missing-command")]).apply("*", registry=reg)
    with caplog.at_level(logging.WARNING, logger="dmodel.listeners"):
        assert reg.after([make_change("create")]) == []
    messages = [r.getMessage() for r in caplog.records]
    assert any("exited with 1" in m and "boom" in m for m in messages)
    assert any("could not start" in m for m in messages)


def test_run_script_timeout_kills_the_process_group(
    reg: ListenerRegistry, caplog: pytest.LogCaptureFixture
) -> None:
    # The command starts a grandchild that holds our stdout/stderr pipes and blocks
    # (both wait on a pipe nobody writes). RunScript returns only once every holder
    # of those pipes is gone, so returning at all shows the whole group was killed;
    # killing just the command would leave this test hanging until pytest-timeout.
    block = "import os; r, w = os.pipe(); os.read(r, 1)"
    code = f"import subprocess, sys; subprocess.Popen([sys.executable, '-c', {block!r}]); {block}"
    RunScript([sys.executable, "-c", code], timeout=1).apply("*", registry=reg)
    with caplog.at_level(logging.WARNING, logger="dmodel.listeners"):
        assert reg.after([make_change("create")]) == []
    assert any("killed" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize(
    ("args", "message"),
    [(([],), "non-empty"), (("",), "non-empty"), (("x", 0), "positive"),
     (("x",), None)],
)
def test_run_script_validates(args: tuple[Any, ...], message: str | None) -> None:
    if message is None:
        assert RunScript(*args).argv == ["x"]
        with pytest.raises(ConfigurationError, match="events"):
            RunScript(*args, events=["updatd"])
    else:
        with pytest.raises(ConfigurationError, match=message):
            RunScript(*args)


# LogChanges


def test_log_changes(reg: ListenerRegistry, caplog: pytest.LogCaptureFixture) -> None:
    LogChanges("audit.test").apply("*", registry=reg)
    with caplog.at_level(logging.INFO, logger="audit.test"):
        reg.after([make_change("create", owned=True)])
        reg.after([make_change("update", "salary", 10, 20, authorized=False)])
        reg.after([make_change("delete", "nick", "bob")])
        reg.before([make_change("remove")])
        reg.before([make_change("update", "salary", 1, 2)])  # not yet accepted: no line
    lines = [r.getMessage() for r in caplog.records if r.name == "audit.test"]
    assert len(lines) == 4
    assert lines[0].startswith(f"{OBJ} created by {CALLER} (authorized")
    assert lines[1].startswith(f"{OBJ}.salary updated 10 -> 20 by {CALLER} (UNAUTHORIZED")
    assert lines[2].startswith(f"{OBJ}.nick deleted (was 'bob')")
    assert lines[3].startswith(f"{OBJ} removing by")


def test_log_changes_level_and_values(reg: ListenerRegistry, caplog: pytest.LogCaptureFixture):
    logger = logging.getLogger("audit.quiet")
    LogChanges(logger, level=logging.DEBUG, values=False).apply("*", registry=reg)
    with caplog.at_level(logging.DEBUG, logger="audit.quiet"):
        reg.after([make_change("update", "secret", "old", "x" * 1000)])
    (record,) = [r for r in caplog.records if r.name == "audit.quiet"]
    assert record.levelno == logging.DEBUG and "xxx" not in record.getMessage()
    caplog.clear()
    LogChanges("audit.long").apply("*", registry=reg)
    with caplog.at_level(logging.INFO, logger="audit.long"):
        reg.after([make_change("update", "bio", None, "y" * 1000)])
    (record,) = [r for r in caplog.records if r.name == "audit.long"]
    assert len(record.getMessage()) < 400
