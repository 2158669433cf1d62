"""The PyDinemic walkthrough typed into two interactive Python processes, host A and host
B, talking over real sockets on 127.0.0.1 (each with its own home and embedded Redis).

Each child runs an interactive console (``code.InteractiveConsole``) fed line by line on
stdin, as a user types into ipython; a line holding only ``\\x04`` ends a block and makes
the child print ``\\x04`` when the block has run. The one change to the walkthrough's
text is where it listens (loopback with ``listen=``; ``launch()``'s own default joins the
LAN, which tests never do) and, on B, that B is told where A is and waits for data that
is on its way instead of reading it the instant after A wrote it.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Sequence

import pytest
from helpers import wait_until
from peer_driver import add_netns, kill_redis

from dmodel.tools.driver import child_env

pytestmark = [pytest.mark.multiprocess, pytest.mark.timeout(120)]

CONSOLE = textwrap.dedent("""
    import code, sys

    class Console(code.InteractiveConsole):
        def write(self, data):  # tracebacks on stdout, in order with the prints
            sys.stdout.write(data)

    console = Console({})
    for line in sys.stdin:
        if line == "\\x04\\n":
            console.push("")
            print("\\x04", flush=True)
        else:
            console.push(line.rstrip("\\n"))
        sys.stdout.flush()
""")


class Host:
    """One interactive Python process."""

    def __init__(self, name: str, home, prefix: Sequence[str] = ()) -> None:
        self.name, self.home = name, home
        self.proc = subprocess.Popen([*prefix, sys.executable, "-u", "-c", CONSOLE],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, bufsize=1,
                                     env=child_env())
        self.out: list[str] = []
        self.err: list[str] = []
        self._cond = threading.Condition()
        self._readers = [threading.Thread(target=self._read, args=(self.proc.stdout, self.out),
                                          daemon=True),
                         threading.Thread(target=self._read, args=(self.proc.stderr, self.err),
                                          daemon=True)]
        for reader in self._readers:
            reader.start()

    def _read(self, stream, into: list[str]) -> None:
        for line in stream:
            with self._cond:
                into.append(line.rstrip("\n"))
                self._cond.notify_all()

    def type(self, text: str, timeout: float = 60.0) -> list[str]:
        """Type ``text`` (dedented); the lines it printed, once it has run."""
        with self._cond:
            start, marks = len(self.out), self.out.count("\x04")
        self.proc.stdin.write(textwrap.dedent(text).strip("\n") + "\n\n\x04\n")
        self.proc.stdin.flush()
        deadline = time.monotonic() + timeout
        with self._cond:
            while self.out.count("\x04") == marks:
                remaining = deadline - time.monotonic()
                assert remaining > 0 and self.proc.poll() is None, \
                    f"{self.name} did not finish typing:\n" + "\n".join(self.out + self.err)
                self._cond.wait(remaining)
            return [line for line in self.out[start:] if line != "\x04"]

    def close(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            self.proc.stdin.write("dmodel.shutdown()\n\x04\n")
            self.proc.stdin.close()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        for reader in self._readers:
            reader.join(5)
        kill_redis(self.home)  # only if it outlived the process (it must not)


@pytest.fixture
def hosts(tmp_path):
    started: list[Host] = []
    try:
        started = [Host("A", tmp_path / "a"), Host("B", tmp_path / "b")]
        yield started
    finally:
        for host in reversed(started):
            host.close()


PERSON = """
    class Person(dmodel.DModel):
        name = dmodel.DField('name', False)
        salary = dmodel.DField('salary', True)
"""


_runs = itertools.count()


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=15)


@pytest.fixture
def namespaced_hosts(tmp_path):
    """Hosts A and B in two network namespaces joined by a veth pair (10.79.0.1 and .2,
    a default route on it so that broadcast beacons go out): nothing leaves them, and
    ``launch()`` with no arguments runs with its real defaults (discovery on)."""
    assert "DMODEL_DISCOVERY" not in child_env()  # launch()'s real default is under test
    tag = f"{os.getpid() % 100000}x{next(_runs)}"
    names = [f"dwa{tag}", f"dwb{tag}"]
    made: list[str] = []
    started: list[Host] = []
    try:
        for name in names:
            add_netns(name)
            made.append(name)
        _ip("link", "add", f"va{tag}", "netns", names[0], "type", "veth",
            "peer", "name", f"vb{tag}", "netns", names[1])
        for i, (name, dev) in enumerate(zip(names, (f"va{tag}", f"vb{tag}"), strict=True)):
            _ip("-n", name, "link", "set", "lo", "up")
            _ip("-n", name, "addr", "add", f"10.79.0.{i + 1}/24", "dev", dev)
            _ip("-n", name, "link", "set", dev, "up")
            _ip("-n", name, "route", "add", "default", "dev", dev)
        started = [Host(label, tmp_path / label.lower(), prefix=["ip", "netns", "exec", name])
                   for label, name in zip(("A", "B"), names, strict=True)]
        yield started
    finally:
        for host in reversed(started):
            host.close()
        for name in made:  # the veth pair goes with its namespaces
            subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=15)


def test_the_walkthrough_typed_on_two_hosts(hosts) -> None:
    a, b = hosts
    (endpoint,) = a.type(f"""
        import dmodel
        node = dmodel.launch({str(a.home)!r}, listen='tcp://127.0.0.1:*')
        dmodel.set_loglevel('error')
        print(node.network.endpoint)
    """)
    assert b.type(f"""
        import dmodel
        node = dmodel.launch({str(b.home)!r}, listen='tcp://127.0.0.1:*',
                             peers=[{endpoint!r}])
        dmodel.set_loglevel('error')
    """) == []
    _walkthrough(a, b)


def test_the_walkthrough_typed_on_two_namespaced_hosts_with_plain_launch(
        namespaced_hosts) -> None:
    """As a user on two machines of one LAN: ``launch()`` with no arguments on both (the
    home from DMODEL_HOME), and B finds A by its beacons."""
    a, b = namespaced_hosts
    for host in (a, b):
        assert host.type(f"""
            import os
            os.environ['DMODEL_HOME'] = {str(host.home)!r}
            import dmodel
            node = dmodel.launch()
            dmodel.set_loglevel('error')
        """) == []
    _walkthrough(a, b)


def _walkthrough(a: Host, b: Host) -> None:
    assert a.type(PERSON) == [] and b.type(PERSON) == []

    out = a.type("""
        p = Person([])
        p.name.set('Bob')
        p.salary.set('1234')
        print(p.name.get())
        print(p.salary.get())
        print(p.get_db_id())
    """)
    assert out[:2] == ["Bob", "1234"] and out[2].startswith("Person:")
    db_id = out[2]

    # B makes the handle at once: no DoesNotExist while the data is on its way.
    out = b.type(f"""
        q = Person({db_id!r}, '')
        print(q.name.wait(value='Bob', timeout=30))
        q.salary.wait(timeout=30)
    """)
    assert out[0] == "Bob"
    assert out[-1].startswith("dmodel.errors.DecryptionError: no decryption key found"), out
    out = b.type("print(q.salary.get())")
    assert out[-1].startswith("dmodel.errors.DecryptionError: no decryption key found"), out

    (chief,) = b.type("""
        chief = Person([])
        print(chief.get_db_id())
    """)
    (worker,) = a.type(f"""
        dmodel.wait_for({chief!r}, 30)
        worker = Person([{chief!r}])
        worker.name.set('Bob')
        worker.salary.set('44321')
        print(worker.get_db_id())
    """)
    assert b.type(f"""
        my_worker = Person({worker!r}, {chief!r})
        print(my_worker.salary.wait(value='44321', timeout=30))
    """) == ["44321"]

    # The listener, as printed in the walkthrough: it fails when old_value is None,
    # and that failure is shown (an ERROR with its traceback) despite set_loglevel('error').
    b.type("""
        class ListenerPersonUpdated(dmodel.DAction):
            def on_authorized_updated(self, object_id, field, old_value, new_value):
                print("Somebody changed field " + field + " of object " + object_id
                      + " from " + old_value + " to " + new_value)

        update_listener = ListenerPersonUpdated()
        update_listener.apply('Person:[id]:*')
    """)
    a.type("""
        worker.name.set('Robert')
        newcomer = Person([])
        newcomer.name.set('Alice')
    """)
    changed = f"Somebody changed field name of object {worker} from Bob to Robert"
    wait_until(lambda: changed in b.out, timeout=30)
    wait_until(lambda: any("ListenerPersonUpdated.on_authorized_updated failed" in line
                           for line in b.err), timeout=30)
    assert any(line.startswith("TypeError: can only concatenate str") for line in b.err), b.err
