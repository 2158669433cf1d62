"""The parent side of ``dmodel peer --stdin-commands``: one child process and its channel.

:class:`PeerProcess` starts the child, reads the ``endpoint <ep>`` line it prints first,
sends requests of the JSON-lines protocol (:mod:`dmodel.tools.peer`) and reads each
answer with a deadline, and stops the child by its own handle (``quit``, then SIGTERM,
then SIGKILL). The demo, the multiprocess tests and the benchmarks all drive their
peers with it. Two reader threads per child drain its stdout and stderr, so a chatty
child never blocks on a full pipe.

A failure of the channel (no answer in time, the child exited) or a failed answer
through :meth:`PeerProcess.ok` raises :class:`dmodel.errors.CommandError`.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import json
import os
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, Any

from ..errors import CommandError
from .home import RedisLayout

_STDERR_KEPT = 10_000


def child_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The parent's environment minus DMODEL_*: a child is configured by its argv only
    (a DMODEL_REDIS_URL or DMODEL_PEERS meant for the user's own node must not leak)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DMODEL_")}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


def peer_argv(home: str | os.PathLike[str], *, name: str = "peer",
              listen: str = "tcp://127.0.0.1:*", peers: Sequence[str] = (),
              models: Sequence[str] = (), options: Sequence[str] = (),
              prefix: Sequence[str] = (), log_level: str = "warning") -> list[str]:
    """argv of ``dmodel peer --stdin-commands`` (no discovery, no status lines).

    ``prefix`` goes before the command, e.g. ``["ip", "netns", "exec", "dm-a"]``.
    """
    argv = [*prefix, sys.executable, "-m", "dmodel", "peer", "--stdin-commands",
            "--home", str(home), "--name", name, "--listen", listen, "--no-discovery",
            "--status-interval", "0", "--log-level", log_level]
    for spec in models:
        argv += ["--models", spec]
    argv += list(options)
    for endpoint in peers:
        argv += ["--peer", endpoint]
    return argv


class PeerProcess:
    """One child speaking the ``dmodel peer --stdin-commands`` protocol.

    ``timeout`` bounds the start and every answer; a request with a ``timeout``
    argument (``wait``, ``wait_peers`` ...) gets that much longer.
    """

    def __init__(self, argv: Sequence[str], *, name: str = "peer",
                 home: Path | None = None, timeout: float = 30.0,
                 env: Mapping[str, str] | None = None) -> None:
        self.name = name
        self.home = home
        self.timeout = timeout
        self._ids = itertools.count(1)
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._early: dict[int, dict[str, Any]] = {}
        self._stderr: collections.deque[str] = collections.deque(maxlen=_STDERR_KEPT)
        self._stderr_lock = threading.Lock()
        self.proc = subprocess.Popen(list(argv), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, bufsize=1,
                                     env=child_env(env))
        self._readers = [
            threading.Thread(target=self._read_stdout, args=(self.proc.stdout,), daemon=True,
                             name=f"dmodel-driver-{name}-out"),
            threading.Thread(target=self._read_stderr, args=(self.proc.stderr,), daemon=True,
                             name=f"dmodel-driver-{name}-err"),
        ]
        for reader in self._readers:
            reader.start()
        try:
            first = self._next_line(time.monotonic() + timeout, "its endpoint")
            if not first.startswith("endpoint "):
                raise CommandError("ProtocolError",
                                   f"{name} printed {first!r} instead of its endpoint")
        except BaseException:
            self.close()  # the caller never gets a handle to stop it with
            raise
        self.endpoint = first.split(None, 1)[1].strip()

    @property
    def pid(self) -> int:
        return self.proc.pid

    # ------------------------------------------------------------ streams
    def _read_stdout(self, stream: IO[str]) -> None:
        for line in stream:
            self._lines.put(line)
        self._lines.put(None)

    def _read_stderr(self, stream: IO[str]) -> None:
        for line in stream:
            with self._stderr_lock:
                self._stderr.append(line.rstrip("\n"))

    def stderr_lines(self) -> list[str]:
        """What the child wrote on stderr so far (the last 10,000 lines)."""
        with self._stderr_lock:
            return list(self._stderr)

    def stderr_tail(self, n: int = 15) -> str:
        return "\n".join(f"  {self.name}| {line}" for line in self.stderr_lines()[-n:])

    def _next_line(self, deadline: float, what: str) -> str:
        try:
            line = self._lines.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            raise CommandError("Timeout", f"{self.name} gave no {what} in time\n"
                                          f"{self.stderr_tail()}") from None
        if line is None:
            self._lines.put(None)  # every later read sees the end too
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(5)
            raise CommandError("Exited", f"{self.name} exited ({self.proc.returncode}) "
                                         f"before giving {what}\n{self.stderr_tail()}")
        return line

    # ----------------------------------------------------------- requests
    def send(self, op: str, **args: Any) -> int:
        """Send one request without waiting; its id, for :meth:`recv`."""
        request_id = next(self._ids)
        try:
            assert self.proc.stdin is not None
            self.proc.stdin.write(json.dumps({"op": op, "id": request_id, **args}) + "\n")
            self.proc.stdin.flush()
        except (OSError, ValueError):
            raise CommandError("Exited", f"{self.name} is gone\n{self.stderr_tail()}") from None
        return request_id

    def recv(self, request_id: int, timeout: float, what: str = "an answer") -> dict[str, Any]:
        """The answer to request ``request_id`` (``ok`` true or false)."""
        if request_id in self._early:
            return self._early.pop(request_id)
        deadline = time.monotonic() + timeout
        while True:
            answer = json.loads(self._next_line(deadline, what))
            if answer.get("id") == request_id:
                return answer  # type: ignore[no-any-return]
            if isinstance(answer.get("id"), int):
                self._early[answer["id"]] = answer

    def call(self, op: str, *, reply_timeout: float | None = None,
             **args: Any) -> dict[str, Any]:
        """Send one request and return its answer (``ok`` true or false)."""
        if reply_timeout is None:
            reply_timeout = self.timeout + float(args.get("timeout") or 0)
        return self.recv(self.send(op, **args), reply_timeout, f"answer to {op!r}")

    def ok(self, op: str, *, reply_timeout: float | None = None,
           **args: Any) -> dict[str, Any]:
        """Like :meth:`call`, but a failed answer raises CommandError (its ``error`` code)."""
        return self.check(self.call(op, reply_timeout=reply_timeout, **args), op)

    def check(self, answer: dict[str, Any], op: str = "request") -> dict[str, Any]:
        """``answer`` if it is ok, else CommandError."""
        if not answer.get("ok"):
            raise CommandError(str(answer.get("error")),
                               f"{self.name}: {op} failed: {answer.get('error')}: "
                               f"{answer.get('message')}")
        return answer

    def wait(self, db_id: str, field: str | None = None, timeout: float = 15.0,
             **match: Any) -> float:
        """Wait in the child (a bounded loop there) until the object, field or value is
        there; the seconds waited."""
        args: dict[str, Any] = {"db_id": db_id, "timeout": timeout, **match}
        if field is not None:
            args["field"] = field
        return float(self.ok("wait", **args)["waited"])

    def stats(self) -> dict[str, Any]:
        return self.ok("stats")["stats"]  # type: ignore[no-any-return]

    # ------------------------------------------------------------ stopping
    def kill(self) -> None:
        """SIGKILL the child by its handle (its embedded redis-server then stops too)."""
        self.proc.kill()
        self.proc.wait(10)
        self._close_streams()

    def close(self, timeout: float = 10.0) -> bool:
        """``quit``, then SIGTERM, then SIGKILL, each with a deadline; True if it had to
        be killed. Idempotent."""
        killed = stop_child(self.proc, timeout)
        if killed and self.home is not None:
            # A killed peer's Redis stops by its death signal; should one still run (a
            # watchdog killed too), stop it through this home's socket, the one we know
            # is ours.
            RedisLayout.of(self.home).shutdown()
        self._close_streams()
        return killed

    def _close_streams(self) -> None:
        for stream in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            with contextlib.suppress(OSError, ValueError):
                if stream is not None:
                    stream.close()
        for reader in self._readers:
            reader.join(2)

    def __enter__(self) -> PeerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def stop_child(proc: subprocess.Popen[str], timeout: float = 10.0) -> bool:
    """Stop a ``dmodel peer --stdin-commands`` child by its handle: ``quit``, then
    SIGTERM, then SIGKILL, each with a deadline. True if it had to be killed."""
    if proc.poll() is not None:
        return False
    try:
        assert proc.stdin is not None
        proc.stdin.write(json.dumps({"op": "quit"}) + "\n")
        proc.stdin.flush()
    except (OSError, ValueError):
        pass
    try:
        proc.wait(timeout)
        return False
    except subprocess.TimeoutExpired:
        proc.terminate()
    try:
        proc.wait(timeout)
        return False
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout)
        return True


__all__ = ["PeerProcess", "child_env", "peer_argv", "stop_child"]
