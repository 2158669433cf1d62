"""CURVE transport encryption settings for the bus and the broker.

The simplest model that keeps outsiders out: every node of a cluster holds the same
*cluster key pair*. Listening sockets (ROUTER, XPUB, the broker's XSUB/XPUB) are
CURVE servers with that pair; connecting sockets (DEALER, SUB) are CURVE clients
that by default authenticate with the same pair. A ZAP handler on each bus's own
context accepts only client public keys in the allow-list, which always holds the
cluster public key, so a node must know the cluster *secret* to connect at all.
Per-node client keys are possible: give each node its own ``client_*`` pair and
list every node's client public key in ``allowed_clients``.

Keys are z85 text (40 characters). Files use the ZeroMQ certificate format
(``zmq.auth.load_certificate`` reads them) and are written with mode 0600.
"""

from __future__ import annotations

import datetime
import logging
import os
import stat
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import zmq
import zmq.auth

from dmodel.errors import ConfigurationError

if TYPE_CHECKING:
    from zmq.auth.thread import ThreadAuthenticator

ZAP_DOMAIN = "dmodel"
_Z85_KEY_SIZE = 40


def _key(value: bytes | str, what: str) -> bytes:
    if isinstance(value, str):
        value = value.encode("ascii", "replace")
    if not isinstance(value, bytes) or len(value) != _Z85_KEY_SIZE:
        raise ConfigurationError(f"{what} must be a {_Z85_KEY_SIZE}-character z85 key")
    try:
        zmq.utils.z85.decode(value)
    except Exception as exc:  # z85 raises ValueError/KeyError on bad characters
        raise ConfigurationError(f"{what} is not valid z85") from exc
    return value


@dataclass(frozen=True)
class CurveConfig:
    """Keys for CURVE on every bus link (z85 bytes).

    Use :meth:`cluster` (or :meth:`generate`) for the shared-key model; the
    constructor takes the full set for per-node client keys.
    """

    server_public: bytes
    server_secret: bytes
    client_public: bytes | None = None
    client_secret: bytes | None = None
    allowed_clients: frozenset[bytes] = field(default_factory=frozenset)

    def __post_init__(self) -> None:
        set_ = object.__setattr__  # frozen dataclass: normalize in place once
        set_(self, "server_public", _key(self.server_public, "server_public"))
        set_(self, "server_secret", _key(self.server_secret, "server_secret"))
        public, secret = self.client_public, self.client_secret
        if (public is None) != (secret is None):
            raise ConfigurationError("give both client_public and client_secret, or neither")
        if public is None or secret is None:
            public, secret = self.server_public, self.server_secret
        else:
            public, secret = _key(public, "client_public"), _key(secret, "client_secret")
        set_(self, "client_public", public)
        set_(self, "client_secret", secret)
        if zmq.curve_public(self.server_secret) != self.server_public:
            raise ConfigurationError("server_public does not match server_secret")
        if zmq.curve_public(secret) != public:
            raise ConfigurationError("client_public does not match client_secret")
        allowed = {_key(k, "allowed client key") for k in self.allowed_clients}
        set_(self, "allowed_clients", frozenset(allowed))

    @classmethod
    def cluster(cls, public: bytes | str, secret: bytes | str) -> CurveConfig:
        """The shared cluster key pair, used both as server and as client keys."""
        return cls(server_public=_key(public, "public"), server_secret=_key(secret, "secret"))

    @classmethod
    def generate(cls) -> CurveConfig:
        """A fresh cluster key pair (``zmq.curve_keypair()``)."""
        public, secret = zmq.curve_keypair()
        return cls.cluster(public, secret)

    def with_allowed(self, keys: Iterable[bytes | str]) -> CurveConfig:
        """A copy that also accepts the given client public keys."""
        extra = frozenset(_key(k, "allowed client key") for k in keys)
        return CurveConfig(
            self.server_public,
            self.server_secret,
            self.client_public,
            self.client_secret,
            self.allowed_clients | extra,
        )

    def is_allowed(self, client_public: bytes) -> bool:
        """True if a client presenting this z85 public key may connect."""
        return (
            client_public == self.server_public
            or client_public == self.client_public
            or client_public in self.allowed_clients
        )

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the cluster key pair as a ZeroMQ secret certificate, mode 0600."""
        write_key_file(path, self.server_public, self.server_secret)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> CurveConfig:
        """Read a cluster key pair written by :meth:`save` (or by zmq.auth)."""
        public, secret = read_key_file(path)
        if secret is None:
            raise ConfigurationError(f"{path} holds no secret key")
        return cls.cluster(public, secret)


class AllowList:
    """ZAP credentials provider: accept the client keys a CurveConfig allows."""

    def __init__(self, config: CurveConfig) -> None:
        self._config = config

    def callback(self, domain: str, key: bytes) -> bool:
        return self._config.is_allowed(key)


def start_authenticator(ctx: zmq.SyncContext, config: CurveConfig,
                        log: logging.Logger) -> ThreadAuthenticator:
    """A started ZAP authenticator on ``ctx`` enforcing ``config``'s allow-list.

    It runs its own thread; the caller stops it (``.stop()``) after closing its sockets.
    """
    from zmq.auth.thread import ThreadAuthenticator

    auth = ThreadAuthenticator(ctx, log=log)
    auth.start()
    auth.configure_curve_callback(domain=ZAP_DOMAIN, credentials_provider=AllowList(config))
    return auth


def make_server(sock: zmq.SyncSocket, config: CurveConfig | None) -> None:
    """Make a listening socket a CURVE server with the cluster pair (no-op without CURVE)."""
    if config is not None:
        sock.curve_server = True
        sock.curve_secretkey = config.server_secret
        sock.curve_publickey = config.server_public
        sock.zap_domain = ZAP_DOMAIN.encode()


def make_client(sock: zmq.SyncSocket, config: CurveConfig | None) -> None:
    """Make a connecting socket a CURVE client (no-op without CURVE)."""
    if config is not None:
        sock.curve_serverkey = config.server_public
        sock.curve_publickey = config.client_public
        sock.curve_secretkey = config.client_secret


def write_key_file(
    path: str | os.PathLike[str], public: bytes, secret: bytes | None = None
) -> None:
    """Write a key pair (or a public key alone) in ZeroMQ certificate format.

    A file with a secret key is created with mode 0600 (and reset to it if it exists).
    """
    public = _key(public, "public")
    lines = [
        f"#   ****  Generated on {datetime.datetime.now(datetime.UTC).isoformat()} by dmodel  ****",
        "#   ZeroMQ CURVE " + ("**Secret** Certificate" if secret else "Public Certificate"),
        "#   DO NOT PROVIDE THIS FILE TO OTHER USERS nor change its permissions."
        if secret
        else "#   Exchange securely, or use a secure mechanism to verify the contents",
        "",
        "metadata",
        "curve",
        f'    public-key = "{public.decode("ascii")}"',
    ]
    if secret is not None:
        lines.append(f'    secret-key = "{_key(secret, "secret").decode("ascii")}"')
    data = ("\n".join(lines) + "\n").encode("ascii")
    mode = 0o600 if secret is not None else 0o644
    fd = os.open(os.fspath(path), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.fchmod(fd, mode)
        os.write(fd, data)
    finally:
        os.close(fd)


def read_key_file(path: str | os.PathLike[str]) -> tuple[bytes, bytes | None]:
    """Read (public, secret or None) from a ZeroMQ certificate file.

    Refuses a file holding a secret key that group or others can read, like ssh does.
    """
    p = Path(path)
    try:
        public, secret = zmq.auth.load_certificate(p)
    except (OSError, ValueError) as exc:
        raise ConfigurationError(f"cannot read CURVE keys from {p}: {exc}") from exc
    if secret is not None:
        mode = stat.S_IMODE(p.stat().st_mode)
        if mode & 0o077:
            raise ConfigurationError(f"{p} holds a secret key but has mode {mode:o}; use 0600")
        secret = _key(secret, "secret")
    return _key(public, "public"), secret
