"""The ``dmodel`` command: each command's happy path and its one-line errors.

Most tests call ``dmodel.cli.main([...])`` in-process on homes filled by real nodes;
the peer, broker and sync tests run ``python -m dmodel`` as real subprocesses.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import queue
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import click
import pytest
from helpers import wait_until

import dmodel
from dmodel import merge
from dmodel.cli import cli, main
from dmodel.tools.demo import BREAKABLE
from dmodel.tools.peer import parse_listener

pytestmark = pytest.mark.timeout(120)


class Person(dmodel.DModel):
    name = dmodel.DField("name", False)
    salary = dmodel.DField("salary", True)


def ship(src: dmodel.Node, dst: dmodel.Node) -> None:
    for raw in src.updates_since(0):
        dst.ingest(raw)


@pytest.fixture
def homes(tmp_path):
    """Two homes, closed: A owns a worker (name, salary); B owns its chief and holds copies."""
    a = dmodel.Node(tmp_path / "a", listen="", peers=[], discovery=False)
    b = dmodel.Node(tmp_path / "b", listen="", peers=[], discovery=False)
    try:
        chief = Person([], node=b)
        chief.name = "Chief"
        ship(b, a)
        worker = Person([chief.db_id], node=a)
        worker.name = "Bob"
        worker.salary = "44321"
        ship(a, b)
    finally:
        a.shutdown()
        b.shutdown()
    return {"a": tmp_path / "a", "b": tmp_path / "b", "worker": worker.db_id,
            "chief": chief.db_id}


@pytest.fixture(autouse=True)
def restore_logging():
    """`dmodel peer` in-process points the root logger at the stderr of its test."""
    root, ours = logging.getLogger(), logging.getLogger("dmodel")
    handlers, levels = root.handlers[:], (root.level, ours.level)
    yield
    root.handlers[:] = handlers
    root.setLevel(levels[0])
    ours.setLevel(levels[1])


def run(capsys, *args: str) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code: int, out: str, err: str, *needles: str) -> None:
    assert code != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ")
    assert "Traceback" not in out + err
    for needle in needles:
        assert needle in lines[0]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------ help


def _commands(group: click.Group, prefix: tuple[str, ...] = ()):
    for name, command in group.commands.items():
        yield (*prefix, name)
        if isinstance(command, click.Group):
            yield from _commands(command, (*prefix, name))


@pytest.mark.parametrize("path", [(), *_commands(cli)], ids=lambda p: " ".join(p) or "dmodel")
def test_every_command_has_help(capsys, path):
    code, out, _ = run(capsys, *path, "--help")
    assert code == 0
    assert "Usage: dmodel" in out


def test_hidden_break_option_is_not_in_help(capsys):
    _, out, _ = run(capsys, "demo", "--help")
    assert "--break" not in out
    option = next(p for p in cli.commands["demo"].params if p.name == "break_step")
    assert tuple(option.type.choices) == BREAKABLE


# ------------------------------------------------------------------ inspection


def test_status(capsys, homes):
    code, out, _ = run(capsys, "status", "--home", homes["a"], "--json")
    assert code == 0
    info = json.loads(out)
    assert info["objects"] == 2 and info["models"] == {"Person": 2}
    assert info["owned"] == 1
    assert info["updates"] >= 4
    code, out, _ = run(capsys, "status", "--home", homes["a"])
    assert code == 0 and "objects" in out


def test_status_says_served_by_a_running_peer_only_when_one_runs(capsys, homes):
    from dmodel.store.embedded import EmbeddedRedis

    server = EmbeddedRedis(homes["a"])  # a live server, but no node holds the home
    try:
        code, out, _ = run(capsys, "status", "--home", homes["a"], "--json")
        assert code == 0 and json.loads(out)["store"] == "embedded"
    finally:
        server.stop()
    node = dmodel.Node(homes["a"])
    try:
        code, out, _ = run(capsys, "status", "--home", homes["a"], "--json")
        assert code == 0 and json.loads(out)["store"] == "embedded, served by a running peer"
    finally:
        node.shutdown()


def test_status_reads_dmodel_home_from_the_environment(capsys, homes, monkeypatch):
    monkeypatch.setenv("DMODEL_HOME", str(homes["b"]))
    code, out, _ = run(capsys, "status", "--json")
    assert code == 0 and json.loads(out)["home"] == str(homes["b"])


def test_inspection_never_starts_networking(capsys, homes, monkeypatch):
    monkeypatch.setenv("DMODEL_PEERS", "tcp://127.0.0.1:1")
    monkeypatch.setenv("DMODEL_LISTEN", "not-an-endpoint")
    code, _, err = run(capsys, "ls", "--home", homes["a"])
    assert code == 0, err


def test_ls(capsys, homes):
    code, out, _ = run(capsys, "ls", "--home", homes["b"], "--json")
    rows = {r["db_id"]: r for r in json.loads(out)}
    assert code == 0 and set(rows) == {homes["worker"], homes["chief"]}
    assert rows[homes["chief"]]["owned"] and not rows[homes["worker"]]["owned"]
    code, out, _ = run(capsys, "ls", "Person:*", "--home", homes["b"], "--owned", "--json")
    assert [r["db_id"] for r in json.loads(out)] == [homes["chief"]]
    code, out, _ = run(capsys, "ls", "Nobody:*", "--home", homes["b"], "--json")
    assert code == 0 and json.loads(out) == []
    code, out, _ = run(capsys, "ls", "--home", homes["b"])
    assert homes["worker"] in out


def test_ls_of_a_model_name_means_its_objects(capsys, homes):
    code, out, _ = run(capsys, "ls", "--home", homes["a"], "--json", "Person")
    assert code == 0
    assert sorted(r["db_id"] for r in json.loads(out)) == sorted([homes["worker"],
                                                                  homes["chief"]])


def test_show_decrypts_where_the_keyring_allows(capsys, homes):
    code, out, _ = run(capsys, "show", homes["worker"], "--home", homes["a"], "--json")
    assert code == 0
    info = json.loads(out)
    assert info["fields"] == {"name": "Bob", "salary": "44321"} and info["owned"]
    assert info["read_authorized"] == [homes["chief"]]

    # On B the worker is not owned, but B owns the chief, whom the worker authorized.
    code, out, _ = run(capsys, "show", homes["worker"], "--home", homes["b"], "--json")
    assert json.loads(out)["fields"]["salary"] == "44321"
    code, out, _ = run(capsys, "show", homes["worker"], "--home", homes["b"], "--as",
                       homes["chief"], "--json", "--verified")
    assert code == 0 and json.loads(out)["fields"]["salary"] == "44321"


def test_show_encrypted_when_no_key_opens_it(capsys, homes, tmp_path):
    b = dmodel.Node(homes["b"], listen="", peers=[], discovery=False)
    c = dmodel.Node(tmp_path / "c", listen="", peers=[], discovery=False)
    try:
        ship(b, c)
    finally:
        b.shutdown()
        c.shutdown()
    code, out, _ = run(capsys, "show", homes["worker"], "--home", tmp_path / "c", "--json")
    assert code == 0
    assert json.loads(out)["fields"] == {"name": "Bob", "salary": {"encrypted": True}}
    code, out, _ = run(capsys, "show", homes["worker"], "--home", tmp_path / "c")
    assert "<encrypted>" in out and "'Bob'" in out


def test_show_as_a_caller_not_owned_here(capsys, homes):
    code, out, err = run(capsys, "show", homes["worker"], "--home", homes["a"], "--as",
                         homes["chief"])
    assert_one_line_error(code, out, err, "not owned")


def test_history(capsys, homes):
    code, out, _ = run(capsys, "history", homes["worker"], "--home", homes["a"], "--json")
    assert code == 0
    rows = json.loads(out)
    changes = [op for row in rows for op in row["ops"]]
    assert changes[0] == {"op": "create", "read": [homes["chief"]], "update": [homes["chief"]]}
    assert {"op": "set", "field": "name", "value": "Bob"} in changes
    assert {"op": "set", "field": "salary", "encrypted": True} in changes
    assert all(row["verdict"] == "accepted" for row in rows)
    code, out, _ = run(capsys, "history", homes["worker"], "--home", homes["a"])
    assert code == 0 and "set name = 'Bob'" in out and "set salary = <encrypted>" in out


@pytest.mark.parametrize("command", ["show", "history"])
def test_unknown_id_is_a_one_line_error(capsys, homes, command):
    code, out, err = run(capsys, command, "Person:nosuchobject", "--home", homes["a"])
    assert_one_line_error(code, out, err, "Person:nosuchobject")


def test_missing_home_is_a_one_line_error(capsys, tmp_path):
    code, out, err = run(capsys, "ls", "--home", tmp_path / "nowhere")
    assert_one_line_error(code, out, err, "no dmodel home")
    assert not (tmp_path / "nowhere").exists()


# ------------------------------------------------------------------ passphrase


@pytest.fixture
def protected_home(tmp_path):
    node = dmodel.Node(tmp_path / "p", listen="", peers=[], discovery=False,
                       passphrase="right horse")
    try:
        Person([], node=node).name = "Secret keeper"
    finally:
        node.shutdown()
    return tmp_path / "p"


def test_passphrase_from_option_and_environment(capsys, protected_home, monkeypatch):
    code, out, _ = run(capsys, "ls", "--home", protected_home, "--passphrase", "right horse",
                       "--json")
    assert code == 0 and len(json.loads(out)) == 1
    monkeypatch.setenv("DMODEL_PASSPHRASE", "right horse")
    code, out, _ = run(capsys, "keys", "list", "--home", protected_home, "--json")
    assert code == 0 and len(json.loads(out)) == 1


def test_passphrase_from_a_file(capsys, protected_home, tmp_path):
    secret = tmp_path / "passphrase"
    secret.write_text("right horse\nthe second line is not read\n")
    secret.chmod(0o600)
    for command in (["ls"], ["keys", "list"]):
        code, out, err = run(capsys, *command, "--home", protected_home, "--passphrase-file",
                             secret, "--json")
        assert code == 0 and len(json.loads(out)) == 1, err
    code, out, err = run(capsys, "ls", "--home", protected_home, "--passphrase-file",
                         tmp_path / "missing")
    assert_one_line_error(code, out, err, "--passphrase-file")


def test_passphrase_prompt_does_not_echo(protected_home):
    from click.testing import CliRunner

    from dmodel.cli import cli

    result = CliRunner().invoke(cli, ["ls", "--home", str(protected_home), "--json",
                                      "--passphrase-prompt"], input="right horse\n")
    assert result.exit_code == 0, result.output
    assert "Keyring passphrase" in result.output and "right horse" not in result.output
    assert len(json.loads(result.output.partition("\n")[2])) == 1


def test_passphrase_file_and_prompt_are_exclusive(capsys, protected_home, tmp_path):
    (tmp_path / "pw").write_text("right horse")
    (tmp_path / "pw").chmod(0o600)
    code, out, err = run(capsys, "ls", "--home", protected_home, "--passphrase-prompt",
                         "--passphrase-file", tmp_path / "pw")
    assert_one_line_error(code, out, err, "not both")


def assert_no_store_running(home: Path) -> None:
    # redis-server removes its pidfile when it stops.
    assert not (home / "redis" / "redis.pid").exists()


@pytest.mark.parametrize("command", [["ls"], ["status"], ["keys", "list"], ["peer"]])
def test_wrong_passphrase_is_a_one_line_error(capsys, protected_home, command):
    code, out, err = run(capsys, *command, "--home", protected_home, "--passphrase", "wrong")
    assert_one_line_error(code, out, err, "wrong passphrase")
    assert_no_store_running(protected_home)


def test_missing_passphrase_is_a_one_line_error(capsys, protected_home):
    code, out, err = run(capsys, "ls", "--home", protected_home)
    assert_one_line_error(code, out, err, "passphrase")
    assert_no_store_running(protected_home)


# ------------------------------------------------------------------ verify


def test_verify_ok(capsys, homes):
    code, out, _ = run(capsys, "verify", "--home", homes["b"])
    assert code == 0 and out.startswith("ok:")
    code, out, _ = run(capsys, "verify", "--home", homes["b"], "--json")
    assert json.loads(out)["ok"] is True


def test_verify_detects_a_value_altered_in_redis(capsys, homes):
    node = dmodel.Node(homes["a"], listen="", peers=[], discovery=False)
    try:
        key = node.store.k_reg(homes["worker"])
        assert key == f"dm:r:{{{homes['worker']}}}"
        reg = merge.Register.unpack(node.store.client.hget(key, "name"))
        forged = merge.Register(reg.version, "Mallory", reg.encrypted, reg.deleted)
        node.store.client.hset(key, "name", forged.pack())
    finally:
        node.shutdown()
    code, out, err = run(capsys, "verify", "--home", homes["a"])
    assert code == 1
    assert "TAMPERING DETECTED" in err and f"{homes['worker']}:name" in err
    assert "Traceback" not in out + err
    code, out, _ = run(capsys, "verify", "--home", homes["a"], "--json")
    report = json.loads(out)
    assert code == 1 and not report["ok"] and len(report["problems"]) == 1


def test_verify_detects_a_deleted_log_entry(capsys, homes):
    node = dmodel.Node(homes["a"], listen="", peers=[], discovery=False)
    try:
        uid = node.store.log_range()[-1]
        assert node.store.client.hdel("dm:{dm:}u", uid) == 1
    finally:
        node.shutdown()
    code, out, err = run(capsys, "verify", "--home", homes["a"])
    assert code == 1
    assert uid.hex()[:12] in err and "missing update" in err


# ------------------------------------------------------------------ keys


def test_keys_export_import(capsys, homes, tmp_path):
    code, out, _ = run(capsys, "keys", "list", "--home", homes["a"])
    assert code == 0 and out.split() == [homes["worker"]]

    code, out, err = run(capsys, "keys", "export", homes["worker"], "--home", homes["a"])
    assert_one_line_error(code, out, err, "--i-know-what-i-am-doing")
    assert out == ""

    code, out, err = run(capsys, "keys", "export", homes["worker"], "--home", homes["a"],
                         "--i-know-what-i-am-doing")
    assert code == 0 and "warning" in err
    exported = tmp_path / "worker.b64"
    exported.write_text(out)
    assert base64.b64decode(out.strip())

    (tmp_path / "other").mkdir()
    code, out, _ = run(capsys, "keys", "import", exported, "--home", tmp_path / "other")
    assert code == 0 and homes["worker"] in out
    code, out, _ = run(capsys, "keys", "list", "--home", tmp_path / "other", "--json")
    assert json.loads(out) == [homes["worker"]]


def test_keys_export_to_a_private_file(capsys, homes, tmp_path):
    target = tmp_path / "worker.key"
    code, out, err = run(capsys, "keys", "export", homes["worker"], "--home", homes["a"],
                         "--i-know-what-i-am-doing", "-o", target)
    assert code == 0 and out == "" and "warning" in err
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    (tmp_path / "other").mkdir()
    code, out, _ = run(capsys, "keys", "import", target, "--home", tmp_path / "other")
    assert code == 0 and homes["worker"] in out


def test_keys_export_of_an_object_not_owned(capsys, homes):
    code, out, err = run(capsys, "keys", "export", homes["worker"], "--home", homes["b"],
                         "--i-know-what-i-am-doing")
    assert_one_line_error(code, out, err)


def test_keys_import_of_garbage(capsys, homes, tmp_path):
    junk = tmp_path / "junk"
    junk.write_bytes(b"\x00not a key")
    code, out, err = run(capsys, "keys", "import", junk, "--home", homes["a"])
    assert_one_line_error(code, out, err)


# ------------------------------------------------------------------ bad options


@pytest.mark.parametrize("spec, needle", [
    ("nosuchmodule.Guard:Person:*", "cannot import nosuchmodule"),
    ("dmodel.listeners.LogChanges", "a filter must follow"),
    ("dmodel.listeners.NoSuchListener:*", "not a DAction class"),
    ("dmodel.listeners.ReadOnlyFields:*", "without arguments"),
    ("dmodel.listeners.LogChanges:Person:[oid]", "placeholder"),
    ("LogChanges:*", "expected"),
    ("missing.py:Guard:*", "no such file"),
])
def test_bad_listener_spec_is_a_one_line_error(capsys, tmp_path, spec, needle):
    code, out, err = run(capsys, "peer", "--home", tmp_path / "h", "--listener", spec)
    assert_one_line_error(code, out, err, "bad listener spec", needle)
    assert not (tmp_path / "h").exists()  # refused before any node started


def test_listener_from_a_file(tmp_path):
    source = tmp_path / "guards.py"
    source.write_text("import dmodel\n"
                      "class Guard(dmodel.DAction):\n"
                      "    def on_update(self, object_id, field, old, new):\n"
                      "        raise PermissionError('no')\n")
    listener, pattern = parse_listener(f"{source}:Guard:Person:[id]:*")
    assert type(listener).__name__ == "Guard" and pattern == "Person:[id]:*"


@pytest.mark.parametrize("args, needle", [
    (["peer", "--status-interval", "-1"], "--status-interval"),
    (["peer", "--unauthorized-policy", "sometimes"], "--unauthorized-policy"),
    (["peer", "--peer", "not-an-endpoint"], "not-an-endpoint"),
    (["peer", "--listen", "udp://nowhere"], "udp://nowhere"),
    (["peer", "--models", "nosuchmodule:Person"], "bad model spec"),
    (["demo", "--updates", "0"], "--updates"),
    (["nosuchcommand"], "nosuchcommand"),
])
def test_bad_option_values_are_one_line_errors(capsys, tmp_path, args, needle):
    code, out, err = run(capsys, *args, *(["--home", tmp_path / "h"]
                                          if args[0] == "peer" else []))
    assert_one_line_error(code, out, err, needle)


def test_unreachable_peer_is_a_one_line_error(capsys, homes):
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    code, out, err = run(capsys, "sync", "--home", homes["a"], "--peer", endpoint,
                         "--timeout", "1")
    assert_one_line_error(code, out, err, "cannot reach peer", endpoint)


# ------------------------------------------------------------------ real processes


class Child:
    """A ``python -m dmodel ...`` subprocess, read line by line with deadlines."""

    def __init__(self, *args: str) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("DMODEL_")}
        self.proc = subprocess.Popen([sys.executable, "-m", "dmodel", *args],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, bufsize=1, env=env)
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.errors: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()
        threading.Thread(target=lambda: self.errors.extend(self.proc.stderr),
                         daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def line(self, timeout: float = 30.0) -> str:
        line = self.lines.get(timeout=timeout)
        assert line is not None, f"exited {self.proc.poll()}: {''.join(self.errors)}"
        return line.strip()

    def ask(self, **request) -> dict:
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        return json.loads(self.line())

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        for stream in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            stream.close()


@pytest.fixture
def children():
    started: list[Child] = []

    def start(*args: str) -> Child:
        child = Child(*args)
        started.append(child)
        return child

    yield start
    for child in reversed(started):
        child.close()


def peer_args(home: Path, *extra: str) -> list[str]:
    return ["peer", "--home", str(home), "--listen", "tcp://127.0.0.1:*", "--no-discovery",
            "--status-interval", "0", "--models", "dmodel.tools.demo:Person", *extra]


def test_peer_speaks_the_stdin_protocol(children, tmp_path):
    peer = children(*peer_args(tmp_path / "p", "--stdin-commands"))
    first = peer.line()
    assert first.startswith("endpoint tcp://127.0.0.1:")
    assert peer.ask(op="ping", id=7)["id"] == 7
    db_id = peer.ask(op="create", model="Person",
                     fields={"name": "Bob", "salary": "1"})["db_id"]
    assert peer.ask(op="get", db_id=db_id, field="salary") == {"ok": True, "value": "1"}
    anonymous = peer.ask(op="get", db_id=db_id, field="salary", caller="")
    assert anonymous["error"] == "DecryptionError"
    assert peer.ask(op="fill", db_id=db_id, field="visits", count=5)["count"] == 5
    assert peer.ask(op="wait", db_id=db_id, field="visits", value=5)["ok"]
    assert peer.ask(op="ls", filter="Person:*")["ids"] == [db_id]
    assert peer.ask(op="stats")["stats"]["local"] == 7
    assert peer.ask(op="nonsense")["error"] == "ProtocolError"
    assert peer.ask(op="get", db_id="Person:nobody", field="name")["error"] == \
        "ObjectNotFoundError"
    assert peer.ask(op="quit") == {"ok": True}
    assert peer.proc.wait(20) == 0


@pytest.mark.parametrize("request_", [
    {"op": "wait_peers", "n": 1e400}, {"op": "wait_peers", "n": 1, "timeout": 1e400},
    {"op": "wait_peers", "n": -1}, {"op": "wait_peers", "n": 1.5}, {"op": "wait_peers",
                                                                    "n": "two"},
    {"op": "wait", "db_id": "Person:x", "timeout": float("nan")},
    {"op": "fill", "db_id": "Person:x", "field": "f", "count": True}, [1, 2], "text", 1e400,
], ids=repr)
def test_peer_answers_every_bad_request_and_keeps_serving(children, tmp_path, request_):
    peer = children(*peer_args(tmp_path / "p", "--stdin-commands"))
    peer.line()
    peer.proc.stdin.write(json.dumps(request_) + "\n")
    peer.proc.stdin.flush()
    answer = json.loads(peer.line())
    assert answer["ok"] is False and answer["error"] == "ProtocolError", answer
    assert peer.ask(op="ping")["ok"]
    assert peer.ask(op="quit") == {"ok": True}
    assert peer.proc.wait(20) == 0


def test_an_abnormal_stop_of_the_peer_exits_non_zero(children, tmp_path):
    commands = tmp_path / "crash.py"
    commands.write_text("class Crash:\n    def __init__(self, peer):\n        pass\n"
                        "    def op_crash(self, request):\n"
                        "        raise SystemExit('the channel dies')\n")
    peer = children(*peer_args(tmp_path / "p", "--stdin-commands", "--commands",
                               f"{commands}:Crash"))
    peer.line()
    peer.proc.stdin.write(json.dumps({"op": "crash"}) + "\n")
    peer.proc.stdin.flush()
    assert peer.proc.wait(20) != 0
    assert "stopped abnormally" in "".join(peer.errors)


def test_peer_stops_cleanly_on_sigterm_and_sigint(children, tmp_path):
    for sig in (signal.SIGTERM, signal.SIGINT):
        peer = children(*peer_args(tmp_path / "p"))
        assert peer.line().startswith("endpoint ")
        redis_pid = int((tmp_path / "p" / "redis" / "redis.pid").read_text())
        peer.proc.send_signal(sig)
        assert peer.proc.wait(20) == 0
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # its embedded Redis stops too
            try:
                os.kill(redis_pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.05)
        else:
            pytest.fail("the peer's redis-server outlived it")


def test_peer_status_line_and_listener(children, tmp_path):
    peer = children(*peer_args(tmp_path / "p", "--stdin-commands", "--status-interval",
                               "0.2", "--listener", "dmodel.listeners.LogChanges:Person:*",
                               "--name", "alpha"))
    peer.line()
    db_id = peer.ask(op="create", model="Person", fields={"name": "Bob"})["db_id"]
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        text = "".join(peer.errors)
        if "status peers=0" in text and f"{db_id}.name updated" in text:
            break
        time.sleep(0.05)
    text = "".join(peer.errors)
    assert " alpha INFO dmodel.tools.peer: status peers=0 in=0 local=2" in text
    assert f"{db_id}.name updated None -> 'Bob'" in text


def test_two_peers_and_sync(children, tmp_path, capsys):
    a = children(*peer_args(tmp_path / "a", "--stdin-commands"))
    endpoint = a.line().split()[1]
    b = children(*peer_args(tmp_path / "b", "--stdin-commands", "--peer", endpoint))
    b.line()
    assert b.ask(op="wait_peers", n=1, timeout=20)["ready"]
    db_id = a.ask(op="create", model="Person", fields={"name": "Bob"})["db_id"]
    assert b.ask(op="wait", db_id=db_id, field="name", value="Bob", timeout=20)["ok"]

    # A third home, offline so far, pulls everything once with `dmodel sync`.
    (tmp_path / "c").mkdir()
    code, out, err = run(capsys, "sync", "--home", tmp_path / "c", "--peer", endpoint)
    assert code == 0, err
    assert "2 new updates" in out
    code, out, _ = run(capsys, "show", db_id, "--home", tmp_path / "c", "--json")
    assert json.loads(out)["fields"] == {"name": "Bob"}


def test_inspecting_the_home_of_a_running_peer_leaves_it_running(children, tmp_path, capsys):
    peer = children(*peer_args(tmp_path / "p", "--stdin-commands"))
    peer.line()
    db_id = peer.ask(op="create", model="Person", fields={"name": "Bob"})["db_id"]
    code, out, _ = run(capsys, "status", "--home", tmp_path / "p", "--json")
    assert code == 0 and "running peer" in json.loads(out)["store"]
    code, out, _ = run(capsys, "show", db_id, "--home", tmp_path / "p", "--json")
    assert json.loads(out)["fields"] == {"name": "Bob"}
    peer.ask(op="set", db_id=db_id, field="name", value="Robert")
    assert peer.ask(op="get", db_id=db_id, field="name")["value"] == "Robert"


@pytest.mark.parametrize("command", ["peer", "sync"])
def test_a_second_node_on_a_home_in_use_is_refused(children, tmp_path, capsys, command):
    peer = children(*peer_args(tmp_path / "p", "--stdin-commands"))
    endpoint = peer.line().split()[1]
    code, out, err = run(capsys, command, "--home", tmp_path / "p", "--peer", endpoint)
    assert_one_line_error(code, out, err, "already running")
    assert peer.ask(op="ping")["ok"]


def test_a_peer_restarts_on_the_home_of_a_killed_one(children, tmp_path):
    first = children(*peer_args(tmp_path / "p", "--stdin-commands"))
    first.line()
    db_id = first.ask(op="create", model="Person", fields={"name": "Bob"})["db_id"]
    first.proc.kill()  # its embedded Redis gets SIGTERM and flushes its AOF
    first.proc.wait(10)
    second = children(*peer_args(tmp_path / "p", "--stdin-commands"))
    assert second.line().startswith("endpoint ")
    assert second.ask(op="get", db_id=db_id, field="name")["value"] == "Bob"
    assert second.ask(op="quit")["ok"] and second.proc.wait(20) == 0
    assert not (tmp_path / "p" / "redis" / "redis.pid").exists()


def test_broker_runs_until_sigterm(children):
    broker = children("broker")
    assert broker.line().startswith("frontend tcp://127.0.0.1:")
    assert broker.line().startswith("backend tcp://127.0.0.1:")
    broker.proc.send_signal(signal.SIGTERM)
    assert broker.proc.wait(20) == 0
    broker = children("broker", "--json")
    endpoints = json.loads(broker.line())
    assert set(endpoints) == {"frontend", "backend"}
    assert all(e.startswith("tcp://127.0.0.1:") for e in endpoints.values())
    broker.proc.send_signal(signal.SIGTERM)
    assert broker.proc.wait(20) == 0


def test_broker_endpoint_slip_has_a_hint(capsys):
    code, out, err = run(capsys, "broker", "--frontend", "127.0.0.1:7700")
    assert_usage_error(code, out, err, "--frontend", "did you mean tcp://127.0.0.1:7700?")


def test_python_dash_m_dmodel_errors_without_traceback(tmp_path):
    result = subprocess.run([sys.executable, "-m", "dmodel", "show", "Person:x", "--home",
                             str(tmp_path / "none")], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 2
    assert result.stderr.startswith("error: no dmodel home") and "Traceback" not in result.stderr


# ------------------------------------------------------------------ long work (issue 14.7)


@pytest.fixture
def long_history(tmp_path):
    """A home whose object has 12 updates, each in its own millisecond."""
    node = dmodel.Node(tmp_path / "h", listen="", peers=[], discovery=False)
    try:
        person = Person([], node=node)
        for i in range(11):
            time.sleep(0.002)  # distinct times, so --since can fall between two updates
            person.name = f"v{i}"
        entries = node.history(person.db_id)
    finally:
        node.shutdown()
    return tmp_path / "h", person.db_id, entries


def history_rows(capsys, home, db_id, *extra):
    code, out, err = run(capsys, "history", db_id, "--home", home, "--json", *extra)
    assert code == 0, err
    return json.loads(out)


def test_history_entry_datetime_is_utc_from_the_hlc_timestamp(long_history):
    from datetime import UTC

    from dmodel import clock

    _, _, entries = long_history
    for entry in entries:
        assert entry.datetime.tzinfo is UTC
        assert round(entry.datetime.timestamp() * 1000) == clock.physical_ms(entry.timestamp)
    assert [e.datetime for e in entries] == sorted(e.datetime for e in entries)


def test_history_times_are_iso_8601_utc(capsys, long_history):
    from datetime import datetime

    home, db_id, entries = long_history
    rows = history_rows(capsys, home, db_id)
    assert [r["update_id"] for r in rows] == [e.update_id for e in entries]
    for row, entry in zip(rows, entries, strict=True):
        assert row["time"].endswith("Z") and "T" in row["time"]
        assert datetime.fromisoformat(row["time"]) == entry.datetime
        assert row["timestamp"] == entry.timestamp
    code, out, _ = run(capsys, "history", db_id, "--home", home)
    assert code == 0 and rows[-1]["time"][:19] + "Z" in out


def test_history_limit_keeps_the_latest(capsys, long_history):
    home, db_id, entries = long_history
    rows = history_rows(capsys, home, db_id, "--limit", "3")
    assert [r["update_id"] for r in rows] == [e.update_id for e in entries[-3:]]
    assert [op["value"] for r in rows for op in r["ops"]] == ["v8", "v9", "v10"]
    assert len(history_rows(capsys, home, db_id, "--limit", "100")) == len(entries)


def test_history_since_a_date_time(capsys, long_history):
    home, db_id, entries = long_history
    everything = history_rows(capsys, home, db_id)
    cut = everything[5]["time"]  # the sixth update's millisecond, e.g. ...T12:00:00.123Z
    rows = history_rows(capsys, home, db_id, "--since", cut)
    assert rows == [r for r in everything if r["time"] >= cut] == everything[5:]
    # A naive time is UTC; the same wall time with an offset is another instant.
    assert history_rows(capsys, home, db_id, "--since", cut[:-1]) == everything[5:]
    assert history_rows(capsys, home, db_id, "--since", f"{cut[:-1]}+00:00") == everything[5:]
    assert history_rows(capsys, home, db_id, "--since", f"{cut[:-1]}+02:00") == everything
    assert history_rows(capsys, home, db_id, "--since", f"{cut[:-1]}-02:00") == []
    assert history_rows(capsys, home, db_id, "--since", "2000-01-01") == everything
    assert history_rows(capsys, home, db_id, "--since", "9999-12-31") == []
    rows = history_rows(capsys, home, db_id, "--since", cut, "--limit", "2")
    assert rows == everything[-2:]


def test_history_since_a_duration(capsys, long_history):
    home, db_id, entries = long_history
    assert len(history_rows(capsys, home, db_id, "--since", "3d")) == len(entries)
    assert len(history_rows(capsys, home, db_id, "--since", "2h")) == len(entries)
    time.sleep(0.01)  # the last update is now more than 0 s old
    assert history_rows(capsys, home, db_id, "--since", "0s") == []


@pytest.mark.parametrize("args, needle", [
    (["--since", "yesterday"], "--since"), (["--since", "10 minutes"], "duration"),
    (["--limit", "0"], "--limit"),
])
def test_history_bad_since_or_limit_is_a_usage_error(capsys, long_history, args, needle):
    home, db_id, _ = long_history
    code, out, err = run(capsys, "history", db_id, "--home", home, *args)
    assert_one_line_error(code, out, err, needle)
    assert code == 2


def test_json_ops_and_encrypted_values_are_structured(capsys, homes, tmp_path):
    # A stored string that reads "<encrypted>" is a value like any other in JSON.
    a = dmodel.Node(homes["a"], listen="", peers=[], discovery=False)
    c = dmodel.Node(tmp_path / "c", listen="", peers=[], discovery=False)
    try:
        Person(homes["worker"], node=a).name = "<encrypted>"
        ship(a, c)
    finally:
        a.shutdown()
        c.shutdown()
    code, out, _ = run(capsys, "show", homes["worker"], "--home", tmp_path / "c", "--json")
    assert json.loads(out)["fields"] == {"name": "<encrypted>", "salary": {"encrypted": True}}
    rows = history_rows(capsys, tmp_path / "c", homes["worker"])
    ops = [op for row in rows for op in row["ops"]]
    assert ops[-1] == {"op": "set", "field": "name", "value": "<encrypted>"}
    assert {"op": "set", "field": "salary", "encrypted": True} in ops
    assert all("value" not in op for op in ops if op.get("encrypted"))


# Progress bars: rich draws them when it sees terminals. TTY_COMPATIBLE=1 tells it that
# stdout and stderr are ones (tests/multiprocess/test_cli_tty.py uses a real pty).

BAR = "━"


@pytest.fixture
def terminal(monkeypatch):
    monkeypatch.setenv("TTY_COMPATIBLE", "1")


def test_verify_draws_a_bar_on_a_terminal(capsys, homes, terminal):
    code, out, err = run(capsys, "verify", "--home", homes["b"])
    assert code == 0 and out.startswith("ok: 2 objects and ")
    updates = int(out.split(" and ")[1].split()[0])
    assert BAR in err and f"{2 + updates}/{2 + updates}" in err  # objects, then log entries


def test_history_draws_a_bar_on_a_terminal(capsys, long_history, terminal):
    home, db_id, entries = long_history
    code, out, err = run(capsys, "history", db_id, "--home", home)
    assert code == 0 and "set name = 'v10'" in out
    assert "updates read" in err and f"{len(entries)}/{len(entries)}" in err


@pytest.mark.parametrize("command", ["verify", "history"])
def test_no_bar_with_json_or_when_piped(capsys, long_history, monkeypatch, command):
    home, db_id, _ = long_history
    args = [command, *([db_id] if command == "history" else []), "--home", home]
    monkeypatch.setenv("TTY_COMPATIBLE", "1")
    code, out, err = run(capsys, *args, "--json")
    assert code == 0 and err == "" and json.loads(out)
    monkeypatch.delenv("TTY_COMPATIBLE")  # capsys's streams are not terminals
    code, out, err = run(capsys, *args)
    assert code == 0 and err == "" and BAR not in out


def test_verify_store_reports_progress(homes):
    from dmodel.node import audit

    node = dmodel.Node(homes["a"], listen="", peers=[], discovery=False)
    try:
        seen: list[tuple[int, int]] = []
        assert audit.verify_store(node.store, progress=lambda *p: seen.append(p)) == []
        total = len(node.store.object_ids()) + node.log_length()
        assert seen == [(i, total) for i in range(1, total + 1)]
        read: list[tuple[int, int]] = []
        entries = audit.history(node.store, homes["worker"], progress=lambda *p: read.append(p))
        assert read == [(i, len(entries)) for i in range(1, len(entries) + 1)]
    finally:
        node.shutdown()


# sync against a live in-process node


@pytest.fixture
def serving(tmp_path):
    """A node with networking on loopback, holding an object with 20 updates."""
    node = dmodel.Node(tmp_path / "server", listen="tcp://127.0.0.1:*", peers=[],
                       discovery=False)
    person = Person([], node=node)
    for i in range(20):
        person.name = f"v{i}"
    yield node, person.db_id
    node.shutdown()


def test_sync_makes_a_new_home_and_reports_json(capsys, serving, tmp_path):
    server, db_id = serving
    new = tmp_path / "not" / "yet"
    code, out, err = run(capsys, "sync", "--home", new, "--peer", server.network.endpoint,
                         "--json")
    assert code == 0, err
    report = json.loads(out)
    live = len(server.updates_since(0))  # what retention left of its log: the live updates
    assert report == {"home": str(new), "peers": [server.node_id.hex()],
                      "pulled": live, "log_length": live}
    assert err == ""  # no bar in JSON mode
    code, out, _ = run(capsys, "show", db_id, "--home", new, "--json")
    assert json.loads(out)["fields"] == {"name": "v19"}


def test_sync_draws_a_bar_per_peer_on_a_terminal(capsys, serving, tmp_path, terminal):
    server, _ = serving
    code, out, err = run(capsys, "sync", "--home", tmp_path / "new", "--peer",
                         server.network.endpoint)
    assert code == 0, err
    assert f"{len(server.updates_since(0))} new updates" in out
    total = server.log_length()  # the bar walks log positions, pruned ones included
    assert f"peer {server.node_id.hex()[:8]}" in err and f"{total}/{total}" in err


# one-line errors with a hint, exit status 2


def assert_usage_error(code, out, err, *needles):
    assert_one_line_error(code, out, err, *needles)
    assert code == 2


@pytest.mark.parametrize("command", [["ls"], ["status"], ["verify"], ["keys", "list"],
                                     ["history", "Person:x"]])
def test_missing_home_has_a_hint(capsys, tmp_path, command):
    code, out, err = run(capsys, *command, "--home", tmp_path / "nowhere")
    assert_usage_error(code, out, err, "no dmodel home", "hint:", "dmodel sync --home")
    assert not (tmp_path / "nowhere").exists()


@pytest.mark.parametrize("command", [["ls"], ["status"], ["keys", "list"], ["peer"],
                                     ["sync", "--peer", "tcp://127.0.0.1:1"],
                                     ["cluster", "join", "cluster.key"]])
def test_a_file_as_home(capsys, tmp_path, monkeypatch, command):
    monkeypatch.chdir(tmp_path)
    if command[0] == "cluster":
        assert run(capsys, "cluster", "init")[0] == 0
    (tmp_path / "afile").write_text("not a home")
    code, out, err = run(capsys, *command, "--home", tmp_path / "afile")
    assert_usage_error(code, out, err, "is a file, not a directory", "hint:")
    monkeypatch.setenv("DMODEL_HOME", str(tmp_path / "afile"))
    code, out, err = run(capsys, *command)
    assert_usage_error(code, out, err, "is a file")


def run_unshared_read_only(home: Path, *args: str) -> subprocess.CompletedProcess:
    """``python -m dmodel ARGS`` with ``home`` bind-mounted read-only (in a user and mount
    namespace of its own, so even root cannot write there)."""
    script = (f'mount --bind "{home}" "{home}" && mount -o remount,bind,ro "{home}" && '
              f'exec "{sys.executable}" -m dmodel "$@"')
    env = {k: v for k, v in os.environ.items() if not k.startswith("DMODEL_")}
    return subprocess.run(["unshare", "-rm", "sh", "-c", script, "sh", *args],
                          capture_output=True, text=True, timeout=60, env=env)


def _can_unshare() -> bool:
    try:
        return subprocess.run(["unshare", "-rm", "true"], capture_output=True,
                              timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.mark.skipif(not _can_unshare(), reason="needs unshare -rm (user namespaces)")
@pytest.mark.parametrize("command", [["ls"], ["status"], ["verify"], ["keys", "list"]])
def test_a_read_only_home(homes, command):
    result = run_unshared_read_only(homes["a"], *command, "--home", str(homes["a"]))
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: the home "), result.stderr
    assert "is read-only" in lines[0] and "hint:" in lines[0]
    assert_no_store_running(homes["a"])


def test_a_new_home_under_a_file_or_read_only_parent(capsys, tmp_path):
    (tmp_path / "afile").write_text("")
    code, out, err = run(capsys, "sync", "--home", tmp_path / "afile" / "h", "--peer",
                         "tcp://127.0.0.1:1")
    assert_usage_error(code, out, err, "cannot make the home", "afile is a file", "hint:")


@pytest.mark.parametrize("args, needles", [
    (["peer", "--peer", "tcp://127.0.0.1:1 tcp://127.0.0.1:2"],
     ["holds several endpoints", "hint: give one per --peer"]),
    (["peer", "--peer", "tcp://127.0.0.1:1,tcp://127.0.0.1:2"], ["holds several endpoints"]),
    (["sync", "--peer", "tcp://127.0.0.1:1 tcp://127.0.0.1:2"], ["holds several endpoints"]),
    (["peer", "--peer", "10.0.0.1:7600"], ["not a ZeroMQ endpoint",
                                            "did you mean tcp://10.0.0.1:7600?"]),
    (["sync", "--peer", "10.0.0.1:7600"], ["did you mean tcp://10.0.0.1:7600?"]),
    (["peer", "--listen", "0.0.0.0:7600"], ["--listen", "did you mean tcp://0.0.0.0:7600?"]),
    (["peer", "--peer", "somewhere"], ["not a ZeroMQ endpoint", "tcp://HOST:PORT"]),
])
def test_endpoint_slips_have_a_hint(capsys, tmp_path, args, needles):
    code, out, err = run(capsys, *args, "--home", tmp_path / "h")
    assert_usage_error(code, out, err, *needles)
    assert not (tmp_path / "h").exists()  # refused before any node started


@pytest.mark.parametrize("command", ["peer", "sync"])
def test_dmodel_peers_as_one_string_has_a_hint(capsys, tmp_path, monkeypatch, command):
    monkeypatch.setenv("DMODEL_PEERS", "tcp://127.0.0.1:1 tcp://127.0.0.1:2")
    code, out, err = run(capsys, command, "--home", tmp_path / "h")
    assert_usage_error(code, out, err, "DMODEL_PEERS", "holds several endpoints",
                       "hint: separate them with commas: DMODEL_PEERS=tcp://")


def test_a_passphrase_file_others_may_read_is_refused(capsys, protected_home, tmp_path):
    secret = tmp_path / "passphrase"
    secret.write_text("right horse\n")
    secret.chmod(0o644)
    code, out, err = run(capsys, "ls", "--home", protected_home, "--passphrase-file", secret)
    assert_usage_error(code, out, err, "open to other users", "0644", f"chmod 600 {secret}")
    assert_no_store_running(protected_home)
    secret.chmod(0o600)
    code, out, err = run(capsys, "ls", "--home", protected_home, "--passphrase-file", secret,
                         "--json")
    assert code == 0 and len(json.loads(out)) == 1, err


# `dmodel peer --json` and its status objects (real processes)


def json_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def test_peer_json_status_lists_connected_peers_by_hex_id(children, tmp_path):
    a = children(*peer_args(tmp_path / "a", "--stdin-commands", "--json"))
    first = json.loads(a.line())
    assert set(first) == {"endpoint", "node_id"} and first["endpoint"].startswith("tcp://")
    b = children(*peer_args(tmp_path / "b", "--stdin-commands", "--json", "--peer",
                            first["endpoint"], "--status-interval", "0.2", "--name", "beta"))
    b_id = json.loads(b.line())["node_id"]
    assert b.ask(op="wait_peers", n=1, timeout=20)["ready"]
    assert b.ask(op="stats")["stats"]["connected"] == [first["node_id"]]

    def connected_status():
        # Every stderr line is one JSON object; the status ones carry "status".
        found = [r for r in json_lines("".join(b.errors)) if "status" in r]
        return [r for r in found if r["status"]["connected"] == [first["node_id"]]]

    records = wait_until(connected_status, timeout=20)
    record = records[-1]
    assert record["name"] == "beta" and record["level"] == "info"
    assert record["time"].endswith("Z")
    assert record["message"].startswith("status peers=1 ")
    assert record["message"].endswith(f"connected={first['node_id'][:8]}")
    assert set(record["status"]) == {"peers", "connected", "in", "local", "out", "rejected",
                                     "dropped", "pending", "log"}
    assert a.ask(op="stats")["stats"]["connected"] == [b_id]
    assert all(isinstance(r, dict) for r in json_lines("".join(b.errors)))


def test_peer_text_status_line_names_connected_peers(children, tmp_path):
    a = children(*peer_args(tmp_path / "a", "--stdin-commands"))
    endpoint = a.line().split()[1]
    a_id = a.ask(op="ping")["node_id"]
    b = children(*peer_args(tmp_path / "b", "--stdin-commands", "--peer", endpoint,
                            "--status-interval", "0.2"))
    b.line()
    assert b.ask(op="wait_peers", n=1, timeout=20)["ready"]
    wait_until(lambda: f"connected={a_id[:8]}" in "".join(b.errors), timeout=20)


def test_status_lists_the_peers_a_running_peer_is_connected_to(children, tmp_path, capsys):
    a = children(*peer_args(tmp_path / "a", "--stdin-commands"))
    endpoint = a.line().split()[1]
    b = children(*peer_args(tmp_path / "b", "--stdin-commands", "--peer", endpoint))
    b.line()
    assert b.ask(op="wait_peers", n=1, timeout=20)["ready"]
    b_id = b.ask(op="ping")["node_id"]

    def listed():
        code, out, _ = run(capsys, "status", "--home", tmp_path / "a", "--json")
        assert code == 0
        return json.loads(out)["connected_peers"] == [b_id]

    wait_until(listed, timeout=20)
    code, out, _ = run(capsys, "status", "--home", tmp_path / "a")
    assert code == 0 and b_id in out
    assert a.ask(op="quit")["ok"] and a.proc.wait(20) == 0
    code, out, _ = run(capsys, "status", "--home", tmp_path / "a", "--json")
    assert code == 0 and json.loads(out)["connected_peers"] == []
