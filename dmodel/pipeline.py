"""decide(update, snapshot) -> Decision: the checks every update passes. Pure, no I/O.

The node runs the same steps for local and remote updates:

    decode+validate (update.decode) -> replay check -> chain link -> dependencies
    (caller, objects and named grants known) -> signature -> one identity per id ->
    timestamp within the skew bound -> merge (authorization, see merge.py) -> policy

and then, outside this module, before-listeners, an atomic commit, after-listeners
and publishing. The verdict is one of ``Verdict``: accepted (with the merge outcome),
unauthorized (valid but rejected by policy), missing (waits for a dependency), held
(validly signed but timestamped beyond the skew bound: applied when its time comes),
dropped (invalid) or vetoed (a before-listener refused it; set by the node).

The skew bound is the only authority a timestamp has: an update from further in the
future than ``skew_ms`` waits, so no writer wins last-writer-wins by more than it.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, field

from . import merge
from .clock import physical_ms
from .crypto import PublicIdentity
from .errors import (
    BrokenChainUpdate,
    ConflictingCreate,
    InvalidUpdate,
    ReplayedUpdate,
    UnauthorizedError,
)
from .update import FIELD_OPS, Update, op_register

# NTP keeps hosts within milliseconds of each other, a second at worst; 5 s leaves room
# for a laptop waking from sleep. Larger tolerates worse clocks and lets a writer win
# last-writer-wins by more; smaller makes updates from fast clocks wait longer.
DEFAULT_SKEW_MS = 5_000


class Verdict(enum.StrEnum):
    """What becomes of an update (a ``str``, so it compares equal to its value)."""

    ACCEPTED = "accepted"
    UNAUTHORIZED = "unauthorized"
    MISSING = "missing"
    HELD = "held"
    DROPPED = "dropped"
    VETOED = "vetoed"


ACCEPTED, UNAUTHORIZED, MISSING = Verdict.ACCEPTED, Verdict.UNAUTHORIZED, Verdict.MISSING
HELD, DROPPED, VETOED = Verdict.HELD, Verdict.DROPPED, Verdict.VETOED


@dataclass(slots=True)
class Snapshot:
    """What ``decide`` may read: the state slice plus facts about the update's links.

    ``prev_chain`` is the (caller, node) of the update named by ``update.prev``, or None
    when that update is not stored. ``equivocation``: the chain forks at ``update.prev``
    (two updates of one caller and node name the same previous update). Both still merge.
    ``stored``: which of the updates named by ``linked_updates(update)`` are stored here.
    ``head_timestamp``: the timestamp of the latest update of the same chain stored here
    (-1: none). An update not newer than that whose link is not stored does not wait for
    the link: the chain went past it here already, so retention pruned the link (the
    update is a replay of a pruned one, which merges as a no-op, or a fork of the chain,
    which must merge like anywhere else).
    """

    state: merge.State = field(default_factory=merge.State)
    seen: bool = False
    prev_chain: tuple[str, bytes] | None = None
    equivocation: bool = False  # another update already names the same previous update
    stored: set[bytes] = field(default_factory=set)
    gap: bool = False  # decide without the chain link: it waited long enough for it
    head_timestamp: int = -1


@dataclass(slots=True)
class Decision:
    """The verdict on one update, with the merge outcome when it is applied."""

    update: Update
    verdict: Verdict
    outcome: merge.Outcome | None = None
    error: Exception | None = None
    missing: tuple[str | bytes, ...] = ()
    release_at: int = 0  # HELD: the physical ms at which it may be decided again

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
            auth.add((op.obj, "u", update.caller))  # with the grant it names (update.grants)
        elif op.op in ("grant_read", "revoke_read", "grant_update", "revoke_update"):
            # (object, "r"|"u", member); for "u" the store also reads the member's last write
            auth.add((op.obj, "r" if op.op.endswith("_read") else "u", op.value["id"]))
        elif op.op == "create":
            for member in op.value["read"]:
                auth.add((op.obj, "r", member))
            for member in op.value["update"]:
                auth.add((op.obj, "u", member))
    return objects, registers, auth


def wrap_keys(update: Update) -> list[tuple[str, bytes, str]]:
    """The key wraps ``update``'s read grants carry, as (object, value ref, reader oid):
    the store reads the wraps already held for them (see ``merge.apply``)."""
    return [(op.obj, ref, op.value["id"].partition(":")[2])
            for op in update.ops if op.op == "grant_read" for ref in op.value["w"]]


def linked_updates(update: Update) -> list[bytes]:
    """Ids of the updates ``update`` names besides its chain link: the grants it writes
    under and the inserts of the DList elements it sets. The store tells which of them
    it holds (``Snapshot.stored``)."""
    out = [ref[:32] for _, ref in update.grants]
    for op in update.ops:
        if op.op == "lset" or op.op == "lset_enc":
            out.append(element_insert(op.register))
    if not out:
        return out
    return [uid for uid in dict.fromkeys(out) if uid != update.id]


def unknown_elements(update: Update, snap: Snapshot) -> tuple[bytes, ...]:
    """Ids of the inserts of the DList elements ``update`` sets that this node has not
    stored. Such a set waits for its insert: stored now, it would leave an element with
    no position (a set may overtake its insert; one naming no element waits, bounded).
    An insert stored here without its element (refused, or re-decided away) is not
    waited for: the set is decided now and leaves no visible element. Nor is the insert
    of an element of a removed object (retention may have pruned its whole history), nor
    that of an element the update itself deletes (its delete is final, wherever the
    element is; retention may have pruned the insert of a deleted element)."""
    out = set()
    deleted = {op.register for op in update.ops if op.op == "ldel"}
    for op in update.ops:
        if op.op in ("lset", "lset_enc") and op.register not in deleted:
            meta = snap.state.objects.get(op.obj)
            if meta is not None and meta.removed is not None:
                continue
            reg = snap.state.registers.get((op.obj, op.register))
            if reg is None or (reg.value[0] is None and not reg.deleted):
                insert = element_insert(op.register)
                if insert != update.id and insert not in snap.stored:
                    out.add(insert)
    return tuple(sorted(out))


def element_insert(register: str) -> bytes:
    """The id of the update that inserted the DList element ``register`` names."""
    return bytes.fromhex(register.partition("#")[2])[:32]


def unknown_grants(update: Update, snap: Snapshot) -> tuple[bytes, ...]:
    """Ids of the updates named by ``update.grants`` that this node has not stored.

    A grant named but not found among the object's events is waited for only while its
    update is missing; once stored, it is simply not a grant of this member (refused).
    """
    return tuple(ref[:32] for obj, ref in update.grants
                 if merge.find_grant(snap.state.auth.get((obj, "u", update.caller), ()), ref)
                 is None and ref[:32] not in snap.stored)


def signing_key(update: Update,
                meta_of: Callable[[str], merge.ObjectMeta | None]) -> PublicIdentity | None:
    """The key that must have signed ``update``: the one it creates, else its caller's
    (``meta_of(db_id)`` gives what is known of an object); None if the caller is unknown."""
    keys = update.creates()
    if keys is not None:
        return keys
    meta = meta_of(update.caller)
    return meta.keys if meta is not None else None


def is_applied(update: Update, authorized: bool,
               policy: Callable[[str], merge.Policy]) -> bool:
    """Whether an update with this authorization verdict is applied under the policies."""
    if authorized:
        return True
    models = {op.obj.partition(":")[0] for op in update.ops}
    return all(merge.unauthorized_is_applied(update, policy(m)) for m in models)


def decide(update: Update, snap: Snapshot, *, now: int, skew_ms: int = DEFAULT_SKEW_MS,
           policy: Callable[[str], merge.Policy] = lambda model: "reject",
           verified: bool = False, events: bool = True) -> Decision:
    """Check and merge ``update`` against ``snap``. Never raises for bad input.

    ``verified=True`` skips the signature check, for an update the node itself just
    signed (or whose signature was checked in a batch beforehand). ``events=False``:
    the outcome carries no events (no listener would hear them).
    """
    try:
        return _decide(update, snap, now, skew_ms, policy, verified, events)
    except InvalidUpdate as exc:
        exc.update_id = update.id
        return Decision(update, DROPPED, error=exc)


def _decide(update: Update, snap: Snapshot, now: int, skew_ms: int,
            policy: Callable[[str], merge.Policy], verified: bool,
            events: bool = True) -> Decision:
    if snap.seen:
        return Decision(update, DROPPED, error=ReplayedUpdate("update already seen", update.id))
    state = snap.state
    if update.prev and not (snap.prev_chain is None and (
            snap.gap or snap.head_timestamp >= update.timestamp)):
        if snap.prev_chain is None:
            return Decision(update, MISSING, missing=(update.prev,))
        if snap.prev_chain != (update.caller, update.node):
            raise BrokenChainUpdate("previous update belongs to another caller or node")
    keys = signing_key(update, state.objects.get)
    if keys is None:
        return Decision(update, MISSING, missing=(update.caller,))
    created = {op.obj for op in update.ops if op.op == "create"}  # e.g. Model.create(**values)
    missing = tuple(sorted({op.obj for op in update.ops
                            if op.obj not in state.objects and op.obj not in created}))
    if missing:
        return Decision(update, MISSING, missing=missing)
    grants = unknown_grants(update, snap)
    if grants:
        return Decision(update, MISSING, missing=grants)
    elements = unknown_elements(update, snap)
    if elements:
        return Decision(update, MISSING, missing=elements)
    if not verified:
        update.verify(keys)
    if update.ops[0].op == "create":  # its keys are ``keys``
        known = state.objects.get(update.caller)
        if known is not None and known.keys != keys:
            raise ConflictingCreate(f"{update.caller} was created here with other keys; "
                                    "the first create seen stays")
    release_at = physical_ms(update.timestamp) - skew_ms
    if release_at > physical_ms(now):
        return Decision(update, HELD, release_at=release_at)
    outcome = merge.apply(update, state, events=events)
    if is_applied(update, outcome.authorized, policy):
        return Decision(update, ACCEPTED, outcome)
    target = next(op.obj for op in update.ops if op.obj != update.caller)
    return Decision(update, UNAUTHORIZED, outcome, error=UnauthorizedError(
        f"{update.caller} is not authorized to change {target}", db_id=target))
