"""What models and listeners need of a node, and how they find the default one.

``ModelHost`` is the protocol ``dmodel.model`` talks to (``Node`` implements it), so
model code never reaches into a node's store. ``register_model_policy`` is how a
model's ``Meta.unauthorized_policy`` reaches the node: models push it here when their
class is defined, and the node reads ``model_policy`` when it decides. Nothing here
imports ``dmodel.node``: ``default_host`` finds the default node by module name, and
if that module was never loaded, no node can be running. No I/O, no threads.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from . import merge
from .errors import NodeNotRunningError
from .update import Op, Update

if TYPE_CHECKING:
    from .actions import ListenerRegistry

_policies: dict[str, merge.Policy] = {}
_R = TypeVar("_R")


def register_model_policy(model: str, policy: merge.Policy | None) -> None:
    """Set (or, with None, clear) the unauthorized-update policy of ``model``."""
    if policy is None:
        _policies.pop(model, None)
    else:
        _policies[model] = policy


def model_policy(model: str) -> merge.Policy | None:
    """The policy the latest definition of ``model`` declares, if any."""
    return _policies.get(model)


class ModelHost(Protocol):
    """The node as models see it: reads, sealing, and signed local writes."""

    @property
    def home(self) -> object: ...  # where the node keeps its data (shown in messages)
    @property
    def closed(self) -> bool: ...
    @property
    def node_id(self) -> bytes: ...  # this node's id (DList positions differ per node)
    @property
    def listeners(self) -> ListenerRegistry: ...  # what DAction.apply registers with

    def exists(self, db_id: str) -> bool: ...
    def object_state(self, db_id: str) -> str: ...
    def wait(self, predicate: Callable[[], _R | None], timeout: float = 10.0,
             what: str = "the condition") -> _R: ...
    def is_owned(self, db_id: str) -> bool: ...
    def object_ids(self, model: str | None = None, *, owned: bool = False) -> list[str]: ...
    def read(self, db_id: str, name: str, *, reader: str | None = None,
             verified: bool = False, default: Any = None) -> Any: ...
    def read_all(self, db_id: str) -> dict[str, merge.Register]: ...
    def raw_register(self, db_id: str, name: str) -> merge.Register | None: ...
    def members(self, db_id: str, kind: str) -> set[str]: ...
    def list_length(self, db_id: str, name: str) -> int: ...
    def list_range(self, db_id: str, name: str, start: int = 0,
                   stop: int = -1) -> list[bytes]: ...
    def list_keys_range(self, db_id: str, name: str, start: int, stop: int) -> list[bytes]: ...
    def list_key_below(self, db_id: str, name: str, position: bytes) -> bytes | None: ...
    def index_range(self, model: str, field: str, low: bytes, high: bytes, *,
                    reverse: bool = False, offset: int = 0,
                    count: int = -1) -> list[bytes]: ...
    def index_count(self, model: str, field: str, low: bytes, high: bytes) -> int: ...
    def field_registers(self, db_ids: Sequence[str],
                        name: str) -> list[merge.Register | None]: ...
    def history(self, db_id: str, field: str | None = None, *,
                include_rejected: bool = False) -> list[Any]: ...
    def seal_value(self, db_id: str, register: str, value: Any,
                   readers: dict[str, bytes] | None = None) -> dict[str, object]: ...
    def grant_read_op(self, db_id: str, member: str, reader: str) -> Op: ...
    def revoke_update_op(self, db_id: str, member: str) -> Op: ...
    def write(self, caller: str, ops: Sequence[Op] | Callable[[], Sequence[Op]]) -> Update: ...
    def create(self, model: str, *, read: Iterable[str] = (), update: Iterable[str] = (),
               fields: Callable[[str, dict[str, bytes]], Sequence[Op]] | None = None) -> str: ...


def default_host() -> ModelHost:
    """The node started by ``dmodel.launch()``; NodeNotRunningError if there is none."""
    module = sys.modules.get("dmodel.node")
    lookup: Callable[[], ModelHost] | None = getattr(module, "default_node", None)
    if lookup is None:
        raise NodeNotRunningError("call dmodel.launch() first")
    return lookup()


__all__ = ["ModelHost", "default_host", "model_policy", "register_model_policy"]
