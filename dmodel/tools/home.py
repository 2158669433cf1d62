"""Where a home keeps its embedded Redis, for tools that look at a home from outside.

``dmodel.store.embedded.EmbeddedRedis`` creates this layout when a node starts:
``HOME/redis/`` holds the data, ``redis.pid`` and the unix socket ``redis.sock``, or,
when that path would be too long for a unix socket, a ``socket-dir`` symlink to a
short directory holding ``redis.sock``. This module only reads it (it creates nothing),
so the CLI, the demo and the test drivers find a running peer's server the same way.
"""

from __future__ import annotations

import contextlib
import os
import signal
from dataclasses import dataclass
from pathlib import Path

import redis


@dataclass(frozen=True, slots=True)
class RedisLayout:
    """The embedded-Redis paths of one home."""

    dir: Path
    pidfile: Path
    socket: Path

    @classmethod
    def of(cls, home: str | os.PathLike[str]) -> RedisLayout:
        rdir = Path(home) / "redis"
        link = rdir / "socket-dir"
        sock = Path(os.readlink(link)) / "redis.sock" if link.is_symlink() else rdir / "redis.sock"
        return cls(rdir, rdir / "redis.pid", sock)

    @property
    def url(self) -> str:
        return f"unix://{self.socket}"

    def pid(self) -> int | None:
        """The pid in the pid file (the server may have exited since)."""
        try:
            return int(self.pidfile.read_text().strip())
        except (OSError, ValueError):
            return None

    def running_pid(self) -> int | None:
        """The pid of the home's redis-server if that process runs (checked on /proc)."""
        pid = self.pid()
        if pid is None:
            return None
        try:
            if b"redis-server" not in Path(f"/proc/{pid}/cmdline").read_bytes():
                return None  # a stale pid file whose pid was reused
        except FileNotFoundError:
            return None
        except OSError:  # no procfs: ask the kernel only
            try:
                os.kill(pid, 0)
            except OSError:
                return None
        return pid

    def client(self, timeout: float = 2.0) -> redis.Redis[bytes]:
        return redis.Redis(unix_socket_path=str(self.socket), socket_timeout=timeout)

    def live_url(self) -> str | None:
        """``unix://`` URL of the server if it runs and answers, else None."""
        if self.running_pid() is None:
            return None
        try:
            self.client().ping()
        except (redis.RedisError, OSError):
            return None
        return self.url

    def shutdown(self, timeout: float = 5.0) -> None:
        """Stop the server through its socket, saving first (a killed peer's leftover);
        nothing happens if none answers there."""
        with contextlib.suppress(redis.RedisError, OSError):
            self.client(timeout).shutdown(nosave=False)

    def kill(self) -> bool:
        """SIGKILL the server by the pid in its pid file (never by name). True if killed."""
        pid = self.running_pid()
        if pid is None:
            return False
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            return False
        return True


__all__ = ["RedisLayout"]
