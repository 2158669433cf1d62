"""The default node of the PyDinemic-style global API: ``launch()``, ``default_node()``,
``shutdown()``. Module globals behind one lock; any thread may call them."""

from __future__ import annotations

import os
import threading
from typing import Any

from ..errors import ConfigurationError, NodeNotRunningError
from .core import Node

_default: Node | None = None
_default_lock = threading.Lock()


def default_node() -> Node:
    """The node started by ``dmodel.launch()``; NodeNotRunningError if there is none."""
    node = _default
    if node is None or node.closed:
        raise NodeNotRunningError("no dmodel node is running: call dmodel.launch() first "
                                  "(or pass node=...)")
    return node


def launch(home: str | os.PathLike[str] | None = None, **options: Any) -> Node:
    """Start the default node (PyDinemic's ``launch()``); see ``Node`` for the options."""
    global _default
    with _default_lock:
        if _default is not None and not _default.closed:
            raise ConfigurationError("a default node is already running; call shutdown() first")
        _default = Node(home, **options)
        return _default


def shutdown() -> None:
    """Stop the default node, if any."""
    global _default
    with _default_lock:
        node, _default = _default, None
    if node is not None:
        node.shutdown()


__all__ = ["default_node", "launch", "shutdown"]
