"""One place that turns a Redis URL into a redis-py client: one server, or a Redis Cluster.

``redis://``, ``rediss://`` and ``unix://`` URLs go to ``redis.Redis.from_url`` as they
always did. ``redis+cluster://[user:password@]host:port[,host:port...]`` makes a
``redis.cluster.RedisCluster`` seeded with those startup nodes (any one that answers is
enough: it gives the client the whole slot map); ``rediss+cluster://`` is the same over
TLS. The cluster client follows MOVED and ASK redirections itself.
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import unquote, urlsplit

import redis
from redis.cluster import ClusterNode, RedisCluster
from redis.exceptions import RedisClusterException

from ..errors import ConfigurationError, StoreUnavailableError

CLUSTER_SCHEMES = {"redis+cluster": False, "rediss+cluster": True}  # scheme -> TLS
_DEFAULT_PORT = 6379


def is_cluster_url(url: str) -> bool:
    """Whether ``url`` names a Redis Cluster (``redis+cluster://`` or ``rediss+cluster://``)."""
    return url.partition("://")[0].lower() in CLUSTER_SCHEMES


def connect(url: str, **options: Any) -> redis.Redis[bytes] | RedisCluster[bytes]:
    """A client for the Redis at ``url``; ``options`` go to the client (``socket_timeout``...).

    A single-server URL connects lazily, as ``redis.Redis.from_url`` does; a cluster URL
    connects now, to learn which node serves which slot. Raises ConfigurationError for a
    URL that cannot be parsed (the message names it), StoreUnavailableError when no
    startup node of a cluster answers as a cluster node.
    """
    if not is_cluster_url(url):
        try:
            return redis.Redis.from_url(url, **options)
        except ValueError as exc:
            raise _bad(url, f"{exc} (or redis+cluster:// for a Redis Cluster)") from exc
    nodes, credentials, tls = _parse_cluster_url(url)
    try:
        return RedisCluster(startup_nodes=nodes, ssl=tls, **credentials,
                            **options)
    except (RedisClusterException, redis.RedisError) as exc:
        raise StoreUnavailableError(
            f"cannot use the Redis Cluster at {_redacted(url)!r}: {exc}") from exc


def _parse_cluster_url(url: str) -> tuple[list[ClusterNode], dict[str, Any], bool]:
    """Startup nodes, credentials and TLS flag of a ``redis+cluster://`` URL."""
    try:
        parts = urlsplit(url)
    except ValueError as exc:  # an unclosed [ of an IPv6 address
        raise _bad(url, str(exc)) from exc
    if parts.query or parts.fragment or parts.path not in ("", "/", "/0"):
        raise _bad(url, "a cluster URL has no database number (other than 0) nor query")
    userinfo, _, hosts = parts.netloc.rpartition("@")
    credentials: dict[str, Any] = {}
    if userinfo:
        user, has_password, password = userinfo.partition(":")
        if user:
            credentials["username"] = unquote(user)
        if has_password:
            credentials["password"] = unquote(password)
    nodes = [_cluster_node(entry, url) for entry in hosts.split(",")]
    return nodes, credentials, CLUSTER_SCHEMES[parts.scheme.lower()]


def _redacted(url: str) -> str:
    """``url`` with its password, if any, replaced by ``***`` (for error messages)."""
    return re.sub(r"(://[^/@]*?:)[^/@]*@", r"\1***@", url)


def _bad(url: str, why: str) -> ConfigurationError:
    return ConfigurationError(f"bad redis_url {_redacted(url)!r}: {why}")


def _cluster_node(entry: str, url: str) -> ClusterNode:
    """``host``, ``host:port``, ``[v6]`` or ``[v6]:port`` as a ClusterNode."""
    if entry.startswith("["):
        host, bracket, rest = entry[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            raise _bad(url, f"{entry!r} is not host:port")
        port_text = rest[1:]
    else:
        host, _, port_text = entry.partition(":")
    if not host:
        raise _bad(url, f"{entry!r} has no host")
    try:
        port = int(port_text) if port_text else _DEFAULT_PORT
    except ValueError:
        raise _bad(url, f"{entry!r}: the port is not a number") from None
    if not 0 < port < 65536:
        raise _bad(url, f"{entry!r}: the port is out of range")
    return ClusterNode(unquote(host), port)


__all__ = ["CLUSTER_SCHEMES", "connect", "is_cluster_url"]
