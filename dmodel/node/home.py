"""A node's home: its lock, node id, keyring and store (embedded Redis, or one by URL).

Opened and closed on the thread that builds and shuts down the ``Node``; nothing here
starts a thread of its own (the embedded Redis is a child process).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import NodeConfig
from ..errors import ConfigurationError, KeyringError
from ..keyring import Keyring, secure_home, write_private
from ..net.identity import derived_node_id, load_node_key
from ..store.connect import connect
from ..store.embedded import EmbeddedRedis
from ..store.redis import RedisStore, map_redis_errors
from ..update import NODE_ID_SIZE


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

    def close(self) -> None:
        """Close the store, stop the embedded Redis, release the home."""
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
    store = RedisStore(client, prefix=config.redis_prefix, unix_socket=(
        str(embedded.socket) if embedded is not None else None))
    home = Home(node_id, keyring, store, embedded, lock)
    try:
        with map_redis_errors():
            client.ping()
        store.recover()
    except BaseException:
        home.close()
        raise
    return home


__all__ = ["Home", "open_home"]
