"""A lean RESP connection for the store's hot path (one unix socket per thread).

redis-py spends most of a small command's client time in its own layers (connection
pool, retry policy, response callbacks). For the calls every update and every field
read makes (a batch of reads, a MULTI/EXEC batch of writes, one HGET), this sends the
packed commands in one write on a plain socket and parses the replies with hiredis,
at about half the client CPU of redis-py and less server time than a script.
Everything else keeps using redis-py. Only for servers reachable by a unix socket
without authentication: the embedded one.
"""

from __future__ import annotations

import socket
import threading
import weakref
from typing import Any

import hiredis

from ..errors import StoreError, StoreUnavailableError

_MULTI = hiredis.pack_command(("MULTI",))
_EXEC = hiredis.pack_command(("EXEC",))


class Wire:
    """Per-thread connections to one Redis unix socket."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._local = threading.local()
        self._all: weakref.WeakSet[socket.socket] = weakref.WeakSet()  # a dead thread's
        # socket is closed when its thread-local goes
        self._lock = threading.Lock()
        self._closed = False

    def _connection(self) -> tuple[socket.socket, Any]:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            if self._closed:
                raise StoreUnavailableError("the store is closed")
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(self.path)
            except OSError as exc:
                sock.close()
                raise StoreUnavailableError(f"Redis is unreachable: {exc}") from exc
            conn = self._local.conn = (sock, hiredis.Reader())
            with self._lock:
                self._all.add(sock)
        return conn

    def call(self, *args: Any) -> Any:
        """Send one command and return its reply; a server error reply is returned as
        ``hiredis.ReplyError`` (for the caller to decide), a broken link raises."""
        return self._exchange([hiredis.pack_command(args)])[0]

    def pipeline(self, cmds: list[tuple[Any, ...]], *, atomic: bool) -> list[Any]:
        """Send ``cmds`` in one write and read their replies; ``atomic`` wraps them in
        MULTI/EXEC (applied all together, and written to the AOF as one unit)."""
        packed = [hiredis.pack_command(cmd) for cmd in cmds]
        if atomic:
            packed.insert(0, _MULTI)
            packed.append(_EXEC)
        replies = self._exchange(packed)
        if not atomic:
            return replies
        for reply in replies[:-1]:
            self.check(reply)  # MULTI's OK and each QUEUED; an error here aborts EXEC
        result = self.check(replies[-1])
        if result is None:
            raise StoreError("Redis aborted the transaction")
        for item in result:
            self.check(item)
        return list(result)

    def _exchange(self, packed: list[bytes]) -> list[Any]:
        """Send packed commands in one write; read one reply for each."""
        sock, reader = self._connection()
        replies: list[Any] = []
        try:
            sock.sendall(b"".join(packed))
            while len(replies) < len(packed):
                reply = reader.gets()
                if reply is False:
                    data = sock.recv(1 << 16)
                    if not data:
                        raise ConnectionError("Redis closed the connection")
                    reader.feed(data)
                    continue
                replies.append(reply)
        except (OSError, hiredis.ProtocolError) as exc:
            self._drop(sock)
            raise StoreUnavailableError(f"Redis is unreachable: {exc}") from exc
        except BaseException:
            self._drop(sock)  # replies may be left unread: never reuse this connection
            raise
        return replies

    def check(self, reply: Any) -> Any:
        """Raise StoreError for an error reply."""
        if isinstance(reply, hiredis.ReplyError):
            raise StoreError(f"Redis error: {reply}")
        return reply

    def _drop(self, sock: socket.socket) -> None:
        self._local.conn = None
        with self._lock:
            self._all.discard(sock)
        sock.close()

    def close(self) -> None:
        """Close every thread's connection."""
        self._closed = True
        with self._lock:
            socks = list(self._all)
            self._all.clear()
        for sock in socks:
            sock.close()
