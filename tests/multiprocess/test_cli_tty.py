"""The ``dmodel`` command on a real terminal (a pty): progress bars and the hidden
passphrase prompt appear there, and only there (never with --json, never when piped)."""

from __future__ import annotations

import fcntl
import os
import pty
import select
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest

import dmodel
from dmodel.tools.driver import child_env

pytestmark = [pytest.mark.multiprocess, pytest.mark.timeout(120)]

BAR = "━"


class Person(dmodel.DModel):
    name = dmodel.DField("name", False)


class Terminal:
    """``python -m dmodel ARGS`` with a pty as stdin and stderr, and as stdout unless
    ``piped_stdout``. ``text`` is everything the terminal showed."""

    def __init__(self, *args: str, piped_stdout: bool = False) -> None:
        self.master, slave = pty.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))
        env = child_env({"TERM": "xterm-256color"})
        for name in ("TTY_COMPATIBLE", "FORCE_COLOR", "NO_COLOR", "COLUMNS"):
            env.pop(name, None)
        # A session of its own: the child's terminal is this pty, never the runner's.
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "dmodel", *args], stdin=slave, stderr=slave,
            stdout=subprocess.PIPE if piped_stdout else slave, env=env,
            start_new_session=True)
        os.close(slave)
        self._seen = b""

    @property
    def text(self) -> str:
        return self._seen.decode(errors="replace")

    def _read(self, timeout: float) -> bool:
        """Read what is there within ``timeout``; False once the child closed the pty."""
        ready, _, _ = select.select([self.master], [], [], timeout)
        if not ready:
            return True
        try:
            data = os.read(self.master, 65536)
        except OSError:  # EIO: no process holds the terminal any more
            return False
        self._seen += data
        return bool(data)

    def wait_for(self, needle: str, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while needle not in self.text:
            assert time.monotonic() < deadline, f"{needle!r} not shown: {self.text!r}"
            assert self._read(0.1), f"closed before {needle!r}: {self.text!r}"

    def type(self, line: str) -> None:
        os.write(self.master, line.encode() + b"\r")

    def finish(self, timeout: float = 60.0) -> tuple[int, str]:
        """Exit status and the terminal's text, once the child is done."""
        deadline = time.monotonic() + timeout
        while self._read(0.1) and time.monotonic() < deadline:
            if self.proc.poll() is not None and not select.select([self.master], [], [], 0)[0]:
                break
        try:
            code = self.proc.wait(max(1.0, deadline - time.monotonic()))
        finally:
            self.close()
        return code, self.text

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        os.close(self.master)


@pytest.fixture
def terminals():
    opened: list[Terminal] = []

    def start(*args: str, piped_stdout: bool = False) -> Terminal:
        opened.append(Terminal(*args, piped_stdout=piped_stdout))
        return opened[-1]

    yield start
    for terminal in opened:
        if terminal.proc.returncode is None:
            terminal.close()


@pytest.fixture
def home(tmp_path) -> tuple[Path, str]:
    # Every version kept, so that the bars have 41 updates to count.
    node = dmodel.Node(tmp_path / "h", listen="", peers=[], discovery=False, retention="all")
    try:
        person = Person([], node=node)
        for i in range(40):
            person.name = f"v{i}"
    finally:
        node.shutdown()
    return tmp_path / "h", person.db_id


def test_verify_and_history_draw_bars_on_a_terminal(terminals, home):
    path, db_id = home
    code, text = terminals("verify", "--home", str(path)).finish()
    assert code == 0 and "ok: 1 objects and 41 updates" in text
    assert BAR in text and "objects, updates" in text and "42/42" in text
    code, text = terminals("history", db_id, "--home", str(path), "--limit", "1").finish()
    assert code == 0 and "set name = 'v39'" in text
    assert "updates read" in text and "41/41" in text


@pytest.mark.parametrize("command", ["verify", "history"])
def test_no_bar_with_json_or_a_piped_stdout(terminals, home, command):
    path, db_id = home
    args = [command, *([db_id] if command == "history" else []), "--home", str(path)]
    code, text = terminals(*args, "--json").finish()
    assert code == 0 and BAR not in text and text.lstrip().startswith(("{", "["))
    piped = terminals(*args, piped_stdout=True)
    code, text = piped.finish()
    assert code == 0 and BAR not in text and "/41" not in text


def test_sync_draws_a_bar_per_peer(terminals, home, tmp_path):
    path, _ = home
    server = dmodel.Node(path, listen="tcp://127.0.0.1:*", peers=[], discovery=False)
    try:
        code, text = terminals("sync", "--home", str(tmp_path / "new"), "--peer",
                               server.network.endpoint).finish()
    finally:
        server.shutdown()
    assert code == 0, text
    assert "41 new updates" in text
    assert f"peer {server.node_id.hex()[:8]}" in text and "41/41" in text


def test_the_passphrase_prompt_hides_what_is_typed(terminals, tmp_path):
    node = dmodel.Node(tmp_path / "p", listen="", peers=[], discovery=False,
                       passphrase="right horse")
    try:
        Person([], node=node).name = "Secret keeper"
    finally:
        node.shutdown()
    terminal = terminals("ls", "--home", str(tmp_path / "p"), "--json")
    terminal.wait_for("Keyring passphrase")  # asked, since stdin is a terminal
    terminal.type("right horse")
    code, text = terminal.finish()
    assert code == 0, text
    assert "right horse" not in text and "Person:" in text
