"""The examples run as their docstrings and READMEs say, without a terminal.

- ``examples/walkthrough.py`` and ``examples/listeners.py``: exit 0 and print the story.
- ``examples/chat/chat.py``: two participants as child processes driven through pipes
  (alice listens on ``tcp://127.0.0.1:*`` and prints the port she got; bob is given it
  with ``--peer``); lines cross both ways, ``/quit`` ends both with status 0, and a bob
  who left and comes back with the same home is shown what alice said meanwhile.
- ``examples/multihost/multihost.py``: run for real (root, ``ip netns``) with a prefix
  and subnet of this test's own; exits 0 and leaves no namespace or link behind.

Every child gets a temporary home (``TMPDIR`` too, so what an example keeps in its own
temporary directory lands under the test's), and is stopped by its handle with a
deadline when a test fails halfway.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from helpers import wait_until

pytestmark = [pytest.mark.multiprocess]

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
STEP = 20.0  # seconds any one expected line or exit may take


def child_env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DMODEL_")}
    env["PYTHONUNBUFFERED"] = "1"
    tmp = tmp_path / "tmp"
    tmp.mkdir(exist_ok=True)
    env["TMPDIR"] = str(tmp)
    return env


def run_example(tmp_path: Path, script: Path, *args: str,
                timeout: float = 40.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(script), *args], cwd=tmp_path,
                          capture_output=True, text=True, timeout=timeout,
                          env=child_env(tmp_path), stdin=subprocess.DEVNULL)


def assert_no_store_left_running(under: Path) -> None:
    """redis-server removes its pidfile on a clean shutdown; one left means it still runs."""
    for pidfile in under.rglob("redis/redis.pid"):
        pid = int(pidfile.read_text().strip() or 0)
        if pid <= 0:
            continue
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            continue
        pytest.fail(f"{pidfile.parent.parent} left redis-server {pid} running")


def assert_in_order(out: str, expected: list[str]) -> None:
    pos = 0
    for text in expected:
        found = out.find(text, pos)
        assert found >= 0, f"{text!r} missing (or out of order) in:\n{out}"
        pos = found + len(text)


# -- the two single-process scripts ---------------------------------------------------


@pytest.mark.timeout(60)
def test_walkthrough_prints_the_story(tmp_path):
    result = run_example(tmp_path, EXAMPLES / "walkthrough.py")
    out = result.stdout
    assert result.returncode == 0, out + result.stderr
    assert "Traceback" not in out + result.stderr
    assert_in_order(out, [
        "== First script",
        "A: name   = Bob",
        "A: salary = 1234",
        "B: name   = Bob",
        "B: salary -> DecryptionError:",
        "== Accessing encrypted data of another object",
        "B: worker salary read as chief = 44321",
        "== Unauthorized changes",
        "B: intruder's change rejected:",
        "A: worker name is still Bob",
    ])
    assert "this is wrong" not in out
    assert_no_store_left_running(tmp_path)


@pytest.mark.timeout(60)
def test_listeners_example_shows_the_listener_messages(tmp_path):
    result = run_example(tmp_path, EXAMPLES / "listeners.py")
    out = result.stdout
    assert result.returncode == 0, out + result.stderr
    assert "Traceback" not in out + result.stderr
    assert_in_order(out, [
        "== A creates Bob; B's listeners hear about it",
        "Greeter: Hey! New object was created. Its ID is: Person:",
        "ChangeReporter: somebody changed name of Person:",
        "from None to 'Bob'",
        "ChangeReporter: somebody changed salary of Person:",
        "== An intruder on A renames Bob; A takes it, B's Guard refuses it",
        "Guard: Ops! Somebody wanted to make an unauthorized change",
        "name on A: 'Mallory'; on B: 'Bob'; B's rejected: {'VetoedError': 1}",
        "== ReadOnlyFields: on A, a name once set stays (even for its owner)",
        "VetoedError:",
        "is read-only",
        "== The audit log of B (audit.jsonl), one JSON line per change",
        '{"time":',
    ])
    # LogChanges writes through logging, which the example routes to stdout.
    assert "dmodel.listeners.log: Person:" in out
    assert re.search(r"\.name updated None -> 'Bob' by Person:", out), out
    # The intruder's rename reached B's Guard but none of B's after-listeners.
    assert "to 'Mallory'" not in out
    assert_no_store_left_running(tmp_path)


# -- the chat -------------------------------------------------------------------------


class Chat:
    """One ``chat.py`` child: lines go in through stdin, its output is read in a thread."""

    def __init__(self, tmp_path: Path, home: Path, nick: str, *args: str) -> None:
        self.nick = nick
        self.lines: list[str] = []
        self.cond = threading.Condition()
        self.eof = False
        self.proc = subprocess.Popen(
            [sys.executable, str(EXAMPLES / "chat" / "chat.py"), "--home", str(home),
             "--nick", nick, *args],
            cwd=tmp_path, env=child_env(tmp_path), text=True, bufsize=1,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self.cond:
                self.lines.append(line.rstrip("\n"))
                self.cond.notify_all()
        with self.cond:
            self.eof = True
            self.cond.notify_all()

    def output(self) -> str:
        with self.cond:
            return "\n".join(self.lines)

    def expect(self, pattern: str, timeout: float = STEP) -> re.Match[str]:
        """Wait for a line matching the regex ``pattern``; fail quoting the output."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                for line in self.lines:
                    if m := regex.search(line):
                        return m
                left = deadline - time.monotonic()
                if self.eof or left <= 0:
                    break
                self.cond.wait(min(left, 0.5))
        pytest.fail(f"{self.nick} did not show /{pattern}/ "
                    f"({'exited' if self.eof else 'in time'}); output:\n{self.output()}")

    def endpoint(self) -> str:
        return self.expect(r"listening on (tcp://\S+)").group(1)

    def say(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def quit(self, timeout: float = STEP) -> int:
        self.say("/quit")
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{self.nick} did not end after /quit; output:\n{self.output()}")
        self.reader.join(5)
        return code

    def close(self) -> None:
        """Stop the child if it still runs: end of input, then SIGTERM, then SIGKILL."""
        proc = self.proc
        if proc.poll() is None:
            try:
                assert proc.stdin is not None
                proc.stdin.close()
            except OSError:
                pass
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.terminate()
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(10)
        for stream in (proc.stdin, proc.stdout):
            try:
                if stream is not None:
                    stream.close()
            except OSError:
                pass


@pytest.fixture
def chat(tmp_path):
    """``chat(name, *args)``: start a participant with home ``tmp_path/name``."""
    started: list[Chat] = []

    def _start(name: str, *args: str) -> Chat:
        c = Chat(tmp_path, tmp_path / name, name, *args)
        started.append(c)
        return c

    yield _start
    for c in reversed(started):
        c.close()
    assert_no_store_left_running(tmp_path)


def clean_exit(c: Chat) -> None:
    code = c.quit()
    out = c.output()
    assert code == 0, f"{c.nick} exited with {code}:\n{out}"
    assert "Traceback" not in out, out


@pytest.mark.timeout(60)
def test_chat_two_participants_talk_through_pipes(chat):
    alice = chat("alice", "--listen", "tcp://127.0.0.1:*")
    endpoint = alice.endpoint()
    assert re.fullmatch(r"tcp://127\.0\.0\.1:\d+", endpoint), endpoint
    bob = chat("bob", "--peer", endpoint)
    bob.expect(r"^\* you are bob \(Member:")
    alice.expect(r"^\* bob joined$")
    bob.expect(r"^\* alice joined$")

    bob.say("hello from bob")
    alice.expect(r"^\[\d\d:\d\d\] <bob> hello from bob$")
    alice.say("hi bob, alice here")
    bob.expect(r"^\[\d\d:\d\d\] <alice> hi bob, alice here$")

    bob.say("/nick robert")
    alice.expect(r"^\* bob is now known as robert$")

    clean_exit(bob)
    clean_exit(alice)
    # Nobody is shown their own lines back.
    assert "<alice>" not in alice.output()
    assert "<bob>" not in bob.output() and "<robert>" not in bob.output()


@pytest.mark.timeout(60)
def test_chat_catches_up_what_a_returning_participant_missed(chat):
    alice = chat("alice", "--listen", "tcp://127.0.0.1:*")
    endpoint = alice.endpoint()
    bob = chat("bob", "--peer", endpoint)
    alice.expect(r"^\* bob joined$")
    bob.say("see you later")
    alice.expect(r"<bob> see you later$")
    clean_exit(bob)

    alice.say("you missed this one")
    alice.say("and this one")

    back = chat("bob", "--peer", endpoint)  # the same --home as before
    back.expect(r"^\* you are bob \(Member:")
    back.expect(r"<alice> you missed this one$")
    back.expect(r"<alice> and this one$")
    # His own earlier line comes back as history, once.
    back.expect(r"<bob> see you later$")
    back.say("back again")
    alice.expect(r"<bob> back again$")

    clean_exit(back)
    clean_exit(alice)
    out = back.output()
    assert out.count("<alice> you missed this one") == 1, out
    assert out.count("<bob> see you later") == 1, out
    assert out.index("you missed this one") < out.index("and this one"), out


# -- three hosts in network namespaces ------------------------------------------------


def _b36(n: int) -> str:
    digits = "0123456789abcdefghijklmnopqrstuvwxyz"
    s = ""
    while True:
        n, r = divmod(n, 36)
        s = digits[r] + s
        if not n:
            return s


def _netns_names() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True,
                         timeout=15).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def _link_names() -> set[str]:
    out = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True,
                         timeout=15).stdout
    # "12: name@peer: <...>" -> name
    return {line.split(":", 2)[1].strip().split("@")[0] for line in out.splitlines()
            if line.count(":") >= 2}


@pytest.fixture
def multihost_names():
    """A prefix and subnet of this test's own; whatever carries the prefix is removed
    afterwards, even if the script was killed halfway."""
    if shutil.which("ip") is None:
        pytest.skip("no `ip` command (iproute2) to create network namespaces")
    if os.geteuid() != 0:
        pytest.skip("examples/multihost needs root to create network namespaces")
    pid = os.getpid()
    prefix = f"dx{_b36(pid)}"  # at most 7 characters: "<prefix>-a-out" fits in 15
    subnet = f"10.{70 + pid % 10}.{pid // 10 % 256}"
    yield prefix, subnet
    mine = f"{prefix}-"
    for ns in sorted(n for n in _netns_names() if n.startswith(mine)):
        subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=15)
    for link in sorted(n for n in _link_names() if n.startswith(mine)):
        subprocess.run(["ip", "link", "del", link], capture_output=True, timeout=15)


@pytest.mark.timeout(90)
def test_multihost_runs_in_namespaces_and_cleans_up(tmp_path, multihost_names):
    prefix, subnet = multihost_names
    assert len(prefix) <= 8
    proc = subprocess.Popen(
        [sys.executable, str(EXAMPLES / "multihost" / "multihost.py"), "--prefix", prefix,
         "--subnet", subnet, "--timeout", "20"],
        cwd=tmp_path, env=child_env(tmp_path), text=True, stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=55)
    except subprocess.TimeoutExpired:
        # Ctrl-C, as a user would: the script tears its network down on the way out.
        os.killpg(proc.pid, signal.SIGINT)
        try:
            out, err = proc.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate(timeout=5)
        pytest.fail(f"multihost.py did not finish in time:\n{out}\n{err}")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)

    if proc.returncode != 0 and re.search(
            r"^error: ip (netns add|link add) .*(not permitted|denied)", err, re.M):
        pytest.skip(f"cannot create network namespaces here: {err.strip()}")
    assert proc.returncode == 0, out + err
    assert "Traceback" not in out + err
    assert_in_order(out, [
        "setting up the network:",
        f"ip netns add {prefix}-a",
        "the story:",
        f"host A  tcp://{subnet}.1:7600  (namespace {prefix}-a)",
        f"host B  tcp://{subnet}.2:7600",
        f"host C  tcp://{subnet}.3:7600",
        "every host sees the two others",
        "A: Bob created, salary readable by the chief on C",
        "B: name -> 'Bob'",
        "C: name -> 'Bob'",
        "B: salary -> DecryptionError; C as the chief: salary -> '44321'",
        "done in",
        "tearing down:",
        f"ip netns del {prefix}-c",
        f"ip link del {prefix}-br0",
    ])
    # The script itself removed everything it made (the fixture's sweep is for failures).
    mine = f"{prefix}-"
    assert not sorted(n for n in _netns_names() if n.startswith(mine))
    # The kernel tears a deleted namespace down asynchronously, and the outer end of
    # its veth with it: give that a moment.
    wait_until(lambda: not [n for n in _link_names() if n.startswith(mine)], timeout=15,
               interval=0.2)
    tmp = tmp_path / "tmp"
    assert not list(tmp.glob("dmodel-multihost-*")), list(tmp.iterdir())
    assert_no_store_left_running(tmp_path)
