"""The node's own key: who a peer is, proven in the handshake (Ed25519, via PyNaCl).

Every node has a *node key* (an Ed25519 pair, seed in ``<home>/node.key``, mode 0600,
next to ``node.id``; a node without a home gets a fresh key per run). A new home's
16-byte node id is :func:`derived_node_id` of that key (``dmodel/node/home.py``); a home
created before keeps the random id its ``node.id`` holds, because the id is also written
into every signed update (``Update.node``). A peer binds its node id to its key
by signing, in the handshake, a message that names both and the other side's fresh
nonce (:func:`proof_message`); so a HELLO or WELCOME proves possession of the key and
cannot be replayed on another connection.

Which key may speak for a node id. A node id equal to :func:`derived_node_id` of the
key is always accepted (a home with a derived id cannot be impersonated at all).
Any other node id is bound to the first key proven for it during the process's life
(trust on first use, :class:`KeyPins`); another key claiming it later is refused and
counted (``dropped["identity_conflict"]``). Bans, scores, gossip and relay decisions
key on proven node ids only, so nobody can get a peer banned by borrowing its id.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import nacl.exceptions
import nacl.signing

from dmodel.errors import ConfigurationError
from dmodel.update import NODE_ID_SIZE

KEY_SIZE = 32
PROOF_SIZE = 64
HANDSHAKE_NONCE_SIZE = 16
KEY_FILE = "node.key"
_CONTEXT = b"dmodel-peer-proof-v2\0"


class NodeKey:
    """A node's Ed25519 signing key (the seed never leaves this object)."""

    __slots__ = ("_signing", "public")

    def __init__(self, seed: bytes) -> None:
        if not isinstance(seed, bytes) or len(seed) != KEY_SIZE:
            raise ConfigurationError(f"a node key seed is {KEY_SIZE} bytes")
        self._signing = nacl.signing.SigningKey(seed)
        self.public = bytes(self._signing.verify_key)

    @classmethod
    def generate(cls) -> NodeKey:
        return cls(os.urandom(KEY_SIZE))

    def sign(self, message: bytes) -> bytes:
        """The 64-byte detached signature of ``message``."""
        return self._signing.sign(message).signature

    def __repr__(self) -> str:
        return f"<NodeKey {self.public.hex()[:16]}>"


def load_node_key(home: str | os.PathLike[str]) -> NodeKey:
    """The node key kept in ``<home>/node.key`` (0600), created on first use."""
    from dmodel.keyring import write_private  # the one 0600 writer

    path = Path(home) / KEY_FILE
    try:
        seed = path.read_bytes()
    except FileNotFoundError:
        seed = os.urandom(KEY_SIZE)
        write_private(path, seed)
    except OSError as exc:
        raise ConfigurationError(f"cannot read the node key {path}: {exc}") from exc
    if len(seed) != KEY_SIZE:
        raise ConfigurationError(f"{path} is not a node key ({len(seed)} bytes)")
    if path.stat().st_mode & 0o077:
        os.chmod(path, 0o600)
    return NodeKey(seed)


def derived_node_id(public: bytes) -> bytes:
    """The node id a key implies (what a new home takes, so no other key can claim it)."""
    return hashlib.blake2b(public, digest_size=NODE_ID_SIZE, person=b"dmodel-node-id").digest()


def proof_message(role: bytes, node_id: bytes, public: bytes, nonce: bytes) -> bytes:
    """What a side signs: its role (b"H" or b"W"), node id and key, and the other's nonce."""
    return _CONTEXT + role + node_id + public + nonce


def verify(public: bytes, message: bytes, signature: bytes) -> bool:
    """True if ``signature`` is ``public``'s over ``message`` (never raises)."""
    try:
        nacl.signing.VerifyKey(public).verify(message, signature)
    except (nacl.exceptions.BadSignatureError, nacl.exceptions.ValueError, TypeError):
        return False
    return True


class KeyPins:
    """Which key speaks for which node id (trust on first use, bounded; I/O thread only)."""

    def __init__(self, limit: int = 65536) -> None:
        self.limit = limit
        self._pins: dict[bytes, bytes] = {}

    def accept(self, node_id: bytes, public: bytes) -> bool:
        """True if ``public`` may speak for ``node_id`` (pinning it if it is the first)."""
        if node_id == derived_node_id(public):
            return True
        pinned = self._pins.get(node_id)
        if pinned is not None:
            return pinned == public
        if len(self._pins) >= self.limit:
            del self._pins[next(iter(self._pins))]
        self._pins[node_id] = public
        return True

    def __len__(self) -> int:
        return len(self._pins)
