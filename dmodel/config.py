"""NodeConfig: the one place where the ``DMODEL_*`` environment variables and defaults are read.

    DMODEL_HOME                 keyring + embedded data (default under the user's data dir)
    DMODEL_LISTEN               endpoint to bind, e.g. ``tcp://0.0.0.0:7600``
    DMODEL_PEERS                comma-separated endpoints
    DMODEL_DISCOVERY            ``0``/``1`` (also true/false, yes/no, on/off); ``0`` keeps
                                ``launch()`` off the LAN
    DMODEL_REDIS_URL            a Redis server instead of the embedded one
    DMODEL_REDIS_SHARDS         ``1`` or ``64``: the key layout of a new store (default 64
                                on a Redis Cluster, 1 on one server; a store keeps its own)
    DMODEL_PASSPHRASE           the keyring's passphrase
    DMODEL_UNAUTHORIZED_POLICY  ``reject`` (default) or ``listeners``

An explicit argument always wins over the variable; an empty variable counts as unset.
``dmodel.launch()`` given no network argument joins the LAN as PyDinemic did
(``resolve(lan=True)``: discovery on, listening on ``tcp://0.0.0.0:7600`` or the next
free port) unless ``DMODEL_DISCOVERY=0``; ``Node()`` starts no network unless asked.
Reading the environment is all this module does (no files, no threads).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from . import merge
from .errors import ConfigurationError
from .retention import Retention

# Seconds an update's timestamp may run ahead of this node's clock before it is held
# (see pipeline.DEFAULT_SKEW_MS for the trade-off).
DEFAULT_SKEW = 5.0
DEFAULT_PREFIX = "dm:"
# Where launch() listens when it joins the LAN: this port, else the next free one.
LAN_HOST = "0.0.0.0"
LAN_PORT = 7600
LAN_PORTS = 20


def default_home(environ: Mapping[str, str] | None = None) -> Path:
    """``$DMODEL_HOME``, else ``$XDG_DATA_HOME/dmodel`` or ``~/.local/share/dmodel``."""
    env = os.environ if environ is None else environ
    home = env.get("DMODEL_HOME")
    if home:
        return Path(home).expanduser()
    base = env.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(base) / "dmodel"


def env_bool(name: str, environ: Mapping[str, str] | None = None) -> bool | None:
    """A ``0``/``1`` variable; None when unset or empty; ConfigurationError otherwise."""
    value = (os.environ if environ is None else environ).get(name)
    if value is None or value == "":
        return None
    if value.lower() in ("1", "true", "yes", "on"):
        return True
    if value.lower() in ("0", "false", "no", "off"):
        return False
    raise ConfigurationError(f"{name} must be 0 or 1, not {value!r}")


def env_peers(environ: Mapping[str, str] | None = None) -> list[str]:
    """``DMODEL_PEERS`` split on commas, blanks left out."""
    value = (os.environ if environ is None else environ).get("DMODEL_PEERS", "")
    return [p.strip() for p in value.split(",") if p.strip()]


def check_policy(policy: str) -> merge.Policy:
    if policy not in merge.POLICIES:
        raise ConfigurationError(
            f"unauthorized_policy must be 'reject' or 'listeners', not {policy!r}")
    return policy  # type: ignore[return-value]


@dataclass(frozen=True, slots=True)
class NodeConfig:
    """Everything a node is configured with; build it with ``NodeConfig.resolve(...)``."""

    home: Path
    listen: str | None = None
    peers: tuple[str, ...] = ()
    discovery: bool = False
    redis_url: str | None = None
    unauthorized_policy: merge.Policy = "reject"
    passphrase: str | None = None
    skew: float = DEFAULT_SKEW
    retention: Retention = field(default_factory=Retention)
    redis_prefix: str = DEFAULT_PREFIX
    redis_shards: int | None = None
    """The key layout of a new store (see ``dmodel.store.redis``); None: the default."""
    lan: bool = False
    """``listen`` is the LAN default: the node binds LAN_PORT or the next free port."""

    @property
    def skew_ms(self) -> int:
        return int(self.skew * 1000)

    @classmethod
    def resolve(cls, home: str | os.PathLike[str] | None = None, *,
                listen: str | None = None, peers: Iterable[str] | None = None,
                discovery: bool | None = None, redis_url: str | None = None,
                unauthorized_policy: str | None = None, passphrase: str | None = None,
                skew: float | None = None, redis_prefix: str = DEFAULT_PREFIX,
                retention: object = None, lan: bool = False,
                environ: Mapping[str, str] | None = None) -> NodeConfig:
        """Arguments given win; the rest come from ``environ`` (default ``os.environ``).

        ``lan=True`` (what ``launch()`` passes when given no network argument): discovery
        defaults to on, and with it ``listen`` to ``tcp://0.0.0.0:7600`` (or the next free
        port), unless ``DMODEL_DISCOVERY`` says otherwise.
        Raises ConfigurationError for a bad policy or ``DMODEL_DISCOVERY`` value.
        """
        env = os.environ if environ is None else environ
        path = (Path(home).expanduser() if home is not None else default_home(env)).absolute()
        if listen is None:
            listen = env.get("DMODEL_LISTEN")
        if isinstance(peers, str):
            raise ConfigurationError(f"peers is a list of endpoints, not one string: "
                                     f"peers=[{peers!r}]")
        peer_list = env_peers(env) if peers is None else [p.strip() for p in peers]
        for peer in peer_list:
            check_endpoint(peer)
        if discovery is None:
            env_discovery = env_bool("DMODEL_DISCOVERY", env)
            discovery = lan if env_discovery is None else env_discovery
        lan = lan and discovery and not listen
        if lan:
            listen = f"tcp://{LAN_HOST}:{LAN_PORT}"
        policy = check_policy(unauthorized_policy or env.get("DMODEL_UNAUTHORIZED_POLICY")
                              or "reject")
        if redis_url is None:
            redis_url = env.get("DMODEL_REDIS_URL")
        if skew is None:
            try:
                skew = float(env.get("DMODEL_SKEW") or DEFAULT_SKEW)
            except ValueError:
                raise ConfigurationError("DMODEL_SKEW must be a number of seconds") from None
        shards_text = env.get("DMODEL_REDIS_SHARDS") or None
        if shards_text not in (None, "1", "64"):
            raise ConfigurationError(f"DMODEL_REDIS_SHARDS must be 1 or 64, not {shards_text!r}")
        if not 0 < skew <= 3600:
            raise ConfigurationError(f"skew must be more than 0 and at most 3600 s, not {skew}")
        return cls(home=path, listen=listen or None, peers=tuple(peer_list),
                   discovery=discovery, redis_url=redis_url or None,
                   unauthorized_policy=policy,
                   passphrase=passphrase or env.get("DMODEL_PASSPHRASE") or None,
                   skew=skew, redis_prefix=redis_prefix, lan=lan,
                   redis_shards=int(shards_text) if shards_text else None,
                   retention=Retention.parse(retention if retention is not None
                                             else env.get("DMODEL_RETENTION") or None))


def check_endpoint(endpoint: str) -> str:
    """``endpoint`` if it has a transport (``tcp://10.0.0.1:7600``); ConfigurationError with
    the fix otherwise."""
    if not isinstance(endpoint, str) or "://" not in endpoint:
        hint = f" (did you mean 'tcp://{endpoint}'?)" if isinstance(endpoint, str) \
            and ":" in endpoint else ""
        raise ConfigurationError(f"a peer endpoint is transport://address, e.g. "
                                 f"tcp://10.0.0.1:7600, not {endpoint!r}{hint}")
    return endpoint


__all__ = ["LAN_PORT", "NodeConfig", "check_endpoint", "default_home", "env_bool", "env_peers"]
