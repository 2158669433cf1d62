"""decide(update, snapshot) -> Decision: the checks every update passes. Pure, no I/O.

The node runs the same steps for local and remote updates:

    decode+validate (update.decode) -> replay check -> freshness -> chain link ->
    dependencies (caller and objects known) -> signature -> merge (authorization as of
    the update's version) -> policy

and then, outside this module, before-listeners, an atomic commit, after-listeners
and publishing. A Decision is one of: accepted (with the merge outcome), unauthorized
(valid but rejected by policy), missing (waits for a dependency) or dropped (invalid).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from . import merge
from .clock import physical_ms
from .errors import (
    BrokenChainUpdate,
    InvalidUpdate,
    ReplayedUpdate,
    StaleUpdate,
    UnauthorizedError,
)
from .update import FIELD_OPS, Update, op_register

DEFAULT_SKEW_MS = 60_000

ACCEPTED, UNAUTHORIZED, MISSING, DROPPED = "accepted", "unauthorized", "missing", "dropped"


@dataclass(slots=True)
class Snapshot:
    """What ``decide`` may read: the state slice plus facts about the update's links.

    ``prev_chain`` is the (caller, node) of the update named by ``update.prev``, or None
    when that update is not stored. ``equivocation``: the chain forks at ``update.prev``
    (two updates of one caller and node name the same previous update). Both still merge.
    """

    state: merge.State = field(default_factory=merge.State)
    seen: bool = False
    prev_chain: tuple[str, bytes] | None = None
    equivocation: bool = False  # another update already names the same previous update


@dataclass(slots=True)
class Decision:
    """The verdict on one update, with the merge outcome when it is applied."""

    update: Update
    verdict: str
    outcome: merge.Outcome | None = None
    error: Exception | None = None
    missing: tuple[str | bytes, ...] = ()

    @property
    def applied(self) -> bool:
        return self.verdict == ACCEPTED

    @property
    def authorized(self) -> bool:
        return self.outcome is not None and self.outcome.authorized


def needs(update: Update) -> tuple[set[str], set[tuple[str, str]], set[tuple[str, str, str]]]:
    """What to read for ``update``: object ids, (object, register) and (object, kind, caller)."""
    objects = {update.caller}
    registers: set[tuple[str, str]] = set()
    auth: set[tuple[str, str, str]] = set()
    for index, op in enumerate(update.ops):
        objects.add(op.obj)
        if op.op in FIELD_OPS:
            registers.add((op.obj, op_register(op, update.id, index)))
        if op.obj != update.caller:
            auth.add((op.obj, "u", update.caller))
        elif op.op in ("grant_read", "revoke_read", "grant_update", "revoke_update"):
            # (object, "r"|"u", member); for "u" the store also reads the member's last write
            auth.add((op.obj, "r" if op.op.endswith("_read") else "u", op.value["id"]))
        elif op.op == "create":
            for member in op.value["read"]:
                auth.add((op.obj, "r", member))
            for member in op.value["update"]:
                auth.add((op.obj, "u", member))
    return objects, registers, auth


def is_applied(update: Update, authorized: bool,
               policy: Callable[[str], merge.Policy]) -> bool:
    """Whether an update with this authorization verdict is applied under the policies."""
    if authorized:
        return True
    models = {op.obj.partition(":")[0] for op in update.ops}
    return all(merge.unauthorized_is_applied(update, policy(m)) for m in models)


def decide(update: Update, snap: Snapshot, *, now: int, skew_ms: int = DEFAULT_SKEW_MS,
           policy: Callable[[str], merge.Policy] = lambda model: "reject",
           verified: bool = False) -> Decision:
    """Check and merge ``update`` against ``snap``. Never raises for bad input.

    ``verified=True`` skips the signature check, for an update the node itself just
    signed (or whose signature was checked in a batch beforehand).
    """
    try:
        return _decide(update, snap, now, skew_ms, policy, verified)
    except InvalidUpdate as exc:
        exc.update_id = update.id
        return Decision(update, DROPPED, error=exc)


def _decide(update: Update, snap: Snapshot, now: int, skew_ms: int,
            policy: Callable[[str], merge.Policy], verified: bool) -> Decision:
    if snap.seen:
        return Decision(update, DROPPED, error=ReplayedUpdate("update already seen", update.id))
    if physical_ms(update.timestamp) > physical_ms(now) + skew_ms:
        raise StaleUpdate(f"timestamp is more than {skew_ms / 1000:g} s in the future")
    state = snap.state
    if update.prev:
        if snap.prev_chain is None:
            return Decision(update, MISSING, missing=(update.prev,))
        if snap.prev_chain != (update.caller, update.node):
            raise BrokenChainUpdate("previous update belongs to another caller or node")
    keys = update.creates()
    if keys is None:
        caller = state.objects.get(update.caller)
        if caller is None:
            return Decision(update, MISSING, missing=(update.caller,))
        keys = caller.keys
    created = {op.obj for op in update.ops if op.op == "create"}  # e.g. Model.create(**values)
    missing = tuple(sorted({op.obj for op in update.ops
                            if op.obj not in state.objects and op.obj not in created}))
    if missing:
        return Decision(update, MISSING, missing=missing)
    if not verified:
        update.verify(keys)
    outcome = merge.apply(update, state)
    if is_applied(update, outcome.authorized, policy):
        return Decision(update, ACCEPTED, outcome)
    target = next(op.obj for op in update.ops if op.obj != update.caller)
    return Decision(update, UNAUTHORIZED, outcome, error=UnauthorizedError(
        f"{update.caller} is not authorized to change {target}", db_id=target))
