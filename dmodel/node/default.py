"""The default node of the PyDinemic-style global API: ``launch()``, ``default_node()``,
``shutdown()``. Module globals behind one lock; any thread may call them.

``launch()`` with no network argument joins the LAN as PyDinemic did (discovery on,
listening on all interfaces); ``launch(network=False)`` or ``DMODEL_DISCOVERY=0`` keep
it off the network. ``Node()`` itself starts no network unless asked.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Any

from ..config import LAN_HOST, LAN_PORT, LAN_PORTS, NodeConfig
from ..errors import ConfigurationError, NetworkError, NodeNotRunningError
from .core import Node

logger = logging.getLogger(__name__)

_default: Node | None = None
_default_lock = threading.Lock()

# launch() options that NodeConfig.resolve takes; the rest go to Node.
_CONFIG_OPTIONS = ("listen", "peers", "discovery", "redis_url", "unauthorized_policy",
                   "passphrase", "skew", "redis_prefix")
_NETWORK_OPTIONS = ("listen", "peers", "discovery", "broker")


def default_node() -> Node:
    """The node started by ``dmodel.launch()``; NodeNotRunningError if there is none."""
    node = _default
    if node is None or node.closed:
        raise NodeNotRunningError("no dmodel node is running: call dmodel.launch() first "
                                  "(or pass node=...)")
    return node


def start_lan_network(node: Node, **options: Any) -> Any:
    """Start ``node``'s network on ``tcp://0.0.0.0:7600``, or the next free port of the
    20 after it; returns ``node.network``. NetworkError if none is free."""
    error: NetworkError | None = None
    for port in range(LAN_PORT, LAN_PORT + LAN_PORTS):
        try:
            return node.start_network(listen=f"tcp://{LAN_HOST}:{port}", **options)
        except NetworkError as exc:  # that port is taken: the next one
            error = exc
    raise NetworkError(f"no free port in {LAN_PORT}..{LAN_PORT + LAN_PORTS - 1} to listen "
                       f"on ({error}); give listen='tcp://0.0.0.0:PORT'") from error


def launch(home: str | os.PathLike[str] | None = None, *, network: bool = True,
           **options: Any) -> Node:
    """Start the default node (PyDinemic's ``launch()``); see ``Node`` for the options.

    With no network option (``listen``, ``peers``, ``discovery``, ``broker``) the node
    joins the LAN: it listens on ``tcp://0.0.0.0:7600`` (or the next free port), finds
    peers by UDP beacons, and logs its endpoint at INFO. ``network=False`` or
    ``DMODEL_DISCOVERY=0`` keep it off the network (``DMODEL_LISTEN``/``DMODEL_PEERS``
    still apply with the latter).
    """
    global _default
    config_options = {k: options.pop(k) for k in _CONFIG_OPTIONS if k in options}
    if not network:
        config_options.update(listen="", peers=[], discovery=False)
        options.pop("broker", None)
    lan = network and not any(k in config_options or k in options for k in _NETWORK_OPTIONS)
    config = NodeConfig.resolve(home, lan=lan, **config_options)
    with _default_lock:
        if _default is not None and not _default.closed:
            raise ConfigurationError("a default node is already running; call shutdown() first")
        if not config.lan:
            _default = Node(config=config, **options)
            return _default
        start = options.pop("start_network", True)
        node = Node(config=config, start_network=False, **options)
        if start:
            try:
                start_lan_network(node)
            except BaseException:
                node.shutdown()
                raise
            logger.info("joined the LAN: listening on %s with discovery on (peers on other "
                        "hosts find this node; launch(network=False) or DMODEL_DISCOVERY=0 "
                        "to stay off the network)", node.network.endpoint)
        _default = node
        return node


def shutdown() -> None:
    """Stop the default node, if any."""
    global _default
    with _default_lock:
        node, _default = _default, None
    if node is not None:
        node.shutdown()


__all__ = ["default_node", "launch", "shutdown", "start_lan_network"]
