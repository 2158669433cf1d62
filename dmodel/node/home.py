"""A node's home: its lock, node id, keyring and store (embedded Redis, or one by URL).

Opened and closed on the thread that builds and shuts down the ``Node``. The embedded
Redis is a child process; a Redis given by URL is held with an expiring lock key, kept
fresh by one small daemon thread (``StoreLock``).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import NodeConfig
from ..errors import ConfigurationError, KeyringError, StoreError, StoreInUseError
from ..keyring import Keyring, secure_home, write_private
from ..net.identity import derived_node_id, load_node_key
from ..store.connect import connect
from ..store.embedded import EmbeddedRedis
from ..store.redis import RedisStore, map_redis_errors
from ..update import NODE_ID_SIZE

logger = logging.getLogger(__name__)

LOCK_TTL = 15.0  # seconds a store lock outlives its holder; refreshed every third of it

# Refresh (ARGV[2] ms) or release (no ARGV[2]) the lock, only if ARGV[1] still holds it.
_LOCK_LUA = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
if ARGV[2] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return redis.call('DEL', KEYS[1])
"""


class StoreLock:
    """One node per Redis database and prefix: the store's lock key (``SET NX`` with
    the holder's node id, pid and host, expiring after ``ttl`` seconds unless
    refreshed). A holder that died without releasing it is taken over once it expires."""

    def __init__(self, store: RedisStore, node_id: bytes, ttl: float = LOCK_TTL) -> None:
        self.store, self.ttl = store, ttl
        self.holder = f"node {node_id.hex()} pid {os.getpid()} on {socket.gethostname()}"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def acquire(self) -> None:
        """Take the lock, or raise StoreInUseError naming its holder."""
        client, key = self.store.client, self.store.k_lock
        with map_redis_errors():
            if not client.set(key, self.holder, nx=True, px=int(self.ttl * 1000)):
                holder = (client.get(key) or b"a node that just left").decode(errors="replace")
                raise StoreInUseError(
                    f"the Redis store with prefix {self.store.prefix!r} is in use by "
                    f"{holder} (one node per database and prefix: stop that node, or give "
                    f"this one another redis_prefix; a dead holder's lock expires within "
                    f"{self.ttl:g} s)")
        self._thread = threading.Thread(target=self._refresh, name="dmodel-store-lock",
                                        daemon=True)
        self._thread.start()

    def _call(self, *args: Any) -> Any:
        return self.store.client.execute_command("EVAL", _LOCK_LUA, 1, self.store.k_lock,
                                                 self.holder, *args)

    def _refresh(self) -> None:
        while not self._stop.wait(self.ttl / 3):
            try:
                with map_redis_errors():
                    if not self._call(int(self.ttl * 1000)):
                        logger.warning("the store lock %s is no longer held by this node",
                                       self.store.k_lock)
            except StoreError as exc:  # Redis away for a while: try again later
                logger.warning("cannot refresh the store lock: %s", exc)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None
            try:
                with map_redis_errors():
                    self._call()
            except StoreError as exc:
                logger.warning("cannot release the store lock (it expires by itself): %s",
                               exc)


def _lock_home(home: Path) -> Any:
    """Hold an exclusive lock on ``home`` for this node's life (released if it dies)."""
    import fcntl

    handle = open(home / "node.lock", "a+")  # noqa: SIM115 - held until shutdown
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.close()
        raise ConfigurationError(f"the home {home} is in use by another running node "
                                 "(one node per home)") from None
    return handle


def _load_node_id(home: Path) -> bytes:
    """The id in ``<home>/node.id``; a new home's is derived from its node key.

    A derived id cannot be claimed by another key in the handshake
    (``identity.KeyPins``). A home created before ids were derived keeps its random
    id (bound to its key by trust on first use), so its signed updates stay its own.
    """
    path = home / "node.id"
    try:
        data = path.read_bytes()
        if len(data) == NODE_ID_SIZE:
            return data
    except FileNotFoundError:
        pass
    data = derived_node_id(load_node_key(home).public)
    write_private(path, data)
    return data


@dataclass
class Home:
    """What a node holds open under its home directory."""

    node_id: bytes
    keyring: Keyring
    store: RedisStore
    embedded: EmbeddedRedis | None
    lock: Any
    store_lock: StoreLock | None = None

    def close(self) -> None:
        """Release the store's lock, close the store, stop the embedded Redis, release
        the home."""
        if self.store_lock is not None:
            self.store_lock.release()
            self.store_lock = None
        self.store.close()
        if self.embedded is not None:
            self.embedded.stop()
        self.unlock()

    def unlock(self) -> None:
        if self.lock is not None:
            self.lock.close()
            self.lock = None


def open_home(config: NodeConfig) -> Home:
    """Lock the home, load its node id and keyring, and connect the store (pinged)."""
    try:
        secure_home(config.home)
    except KeyringError as exc:
        raise ConfigurationError(str(exc)) from None
    redis_url = config.redis_url
    # The embedded Redis of a home belongs to one node at a time; a Redis given by URL
    # is the operator's to share out (one node per database or prefix).
    lock = _lock_home(config.home) if not redis_url else None
    try:
        node_id = _load_node_id(config.home)
        keyring = Keyring(config.home / "keys", config.passphrase)
    except BaseException:
        if lock is not None:
            lock.close()
        raise
    embedded: EmbeddedRedis | None = None
    if redis_url:
        client = connect(redis_url)
    else:
        try:
            embedded = EmbeddedRedis(config.home)
        except BaseException:
            if lock is not None:
                lock.close()
            raise
        client = embedded.client()
    try:
        store = RedisStore(client, prefix=config.redis_prefix, unix_socket=(
            str(embedded.socket) if embedded is not None else None),
            shards=config.redis_shards)
    except BaseException:
        if embedded is not None:
            embedded.stop()
        if lock is not None:
            lock.close()
        raise
    home = Home(node_id, keyring, store, embedded, lock)
    try:
        with map_redis_errors():
            client.ping()
        if redis_url:
            home.store_lock = StoreLock(store, node_id)
            home.store_lock.acquire()
        store.recover()
    except BaseException:
        home.close()
        raise
    return home


__all__ = ["Home", "open_home"]
