"""The embedded redis-server never outlives its program: not on SIGKILL or SIGTERM, not
when a Node is dropped without shutdown(), not when its home was deleted, and not when
the node was opened on a thread that has ended since (the watchdog path).

Each child program opens a node, prints its redis-server's pid, and follows commands
on stdin; the parent checks by that pid, with a bounded wait, that the server is gone.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from peer_driver import kill_redis

from dmodel.tools.driver import child_env

pytestmark = [pytest.mark.multiprocess, pytest.mark.timeout(90)]

CHILD = textwrap.dedent("""
    import gc, sys, threading
    import dmodel

    home, where = sys.argv[1], sys.argv[2]
    box = []
    if where == "thread":  # opened on a thread that ends at once
        opener = threading.Thread(target=lambda: box.append(dmodel.Node(home)))
        opener.start()
        opener.join()
    else:
        box.append(dmodel.Node(home))
    print(box[0]._embedded.pid, flush=True)
    for line in sys.stdin:
        command = line.strip()
        if command == "drop":
            box.clear()
            gc.collect()
        elif command == "shutdown":
            dmodel.Node.shutdown(box[0])
        elif command == "write":
            class Person(dmodel.DModel):
                name = dmodel.DField()
            Person.create(name="x", node=box[0])
        print("done", command, flush=True)
""")


def gone(pid: int, timeout: float = 15.0) -> bool:
    """Whether process ``pid`` exits (or is a zombie) within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        try:
            if Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] == "Z":
                return True
        except OSError:
            pass
        time.sleep(0.05)
    return False


class Program:
    def __init__(self, home: Path, where: str = "main") -> None:
        self.home = home
        self.proc = subprocess.Popen([sys.executable, "-c", CHILD, str(home), where],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, env=child_env())
        self.redis_pid = int(self.proc.stdout.readline())

    def command(self, what: str) -> None:
        self.proc.stdin.write(what + "\n")
        self.proc.stdin.flush()
        assert self.proc.stdout.readline().strip() == f"done {what}", self.proc.stderr.read()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(20)
        for stream in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            stream.close()
        if not gone(self.redis_pid, 0):  # never by name: only the one this test made
            kill_redis(self.home)


@pytest.fixture
def program(tmp_path):
    started: list[Program] = []

    def start(where: str = "main") -> Program:
        started.append(Program(tmp_path / f"home{len(started)}", where))
        return started[-1]

    yield start
    for prog in started:
        prog.close()


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_the_server_dies_with_its_program(program, sig) -> None:
    prog = program()
    prog.command("write")
    assert not gone(prog.redis_pid, 0)
    prog.proc.send_signal(sig)
    prog.proc.wait(20)
    assert gone(prog.redis_pid), "redis-server outlived its program"


def test_a_node_dropped_without_shutdown_stops_its_server(program) -> None:
    prog = program()
    prog.command("drop")
    assert gone(prog.redis_pid) and prog.proc.poll() is None  # the program still runs


def test_a_node_whose_home_was_deleted_still_stops_its_server(program) -> None:
    prog = program()
    shutil.rmtree(prog.home)
    prog.command("shutdown")
    assert gone(prog.redis_pid)


def test_a_node_opened_on_an_ended_thread_keeps_its_server_until_the_program_dies(
        program) -> None:
    prog = program("thread")
    prog.command("write")  # the opening thread has ended: the server still serves
    assert not gone(prog.redis_pid, 0.5)
    prog.proc.send_signal(signal.SIGKILL)
    prog.proc.wait(20)
    assert gone(prog.redis_pid), "redis-server outlived its program (watchdog)"


def test_a_clean_exit_without_shutdown_stops_the_server(program) -> None:
    prog = program()
    prog.proc.stdin.close()  # end of input: the program ends, never calling shutdown()
    prog.proc.wait(20)
    assert gone(prog.redis_pid)
