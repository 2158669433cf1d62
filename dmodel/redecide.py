"""Pure pieces of re-deciding stored updates after a late grant or revoke.

When a grant or revoke arrives for a member whose updates of the object were already
decided, the node re-decides the affected objects' stored updates (``Applier._recompute``, which
does the store reads and the atomic rewrite). The rules it applies are here, with no
I/O: the verdict on one stored update against the complete authorization state, and
the object state that its accepted updates fold to, whatever the arrival order.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from . import merge, pipeline
from .update import Update


def verdict(update: Update, auth_of: Callable[[str], dict[str, merge.AuthEvents]],
            policy: Callable[[str], merge.Policy]) -> bool:
    """Whether ``update`` is applied, judged (``merge.is_authorized``) against the update-
    authorization events ``auth_of(db_id)`` (member -> events) of every object it changes."""
    state = merge.State()
    for op in update.ops:
        if op.obj != update.caller:
            state.auth[(op.obj, "u", update.caller)] = auth_of(op.obj).get(update.caller, ())
    return pipeline.is_applied(update, merge.is_authorized(update, state), policy)


@dataclass(slots=True)
class Rebuilt:
    """An object's derived state, folded from its accepted updates."""

    meta: merge.ObjectMeta | None
    registers: dict[str, merge.Register]
    wraps: dict[bytes, bytes]
    lists: dict[str, set[bytes]]


def rebuild(db_id: str, accepted: Iterable[Update]) -> Rebuilt:
    """The state of ``db_id`` that its accepted updates give, applied in version order."""
    state = merge.State()
    for update in sorted(accepted, key=merge.order_key):
        state.commit(merge.apply(update, state, authorized=True, events=False).writes)
    registers = {name: reg for (obj, name), reg in state.registers.items() if obj == db_id}
    wraps = {ref + oid.encode(): w for (obj, ref, oid), w in state.wraps.items()
             if obj == db_id}
    lists = {name: keys for (obj, name), keys in state.lists.items() if obj == db_id}
    return Rebuilt(state.objects.get(db_id), registers, wraps, lists)


__all__ = ["Rebuilt", "rebuild", "verdict"]
