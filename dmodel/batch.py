"""Pure pieces of applying a batch of updates: the overlay, bounded id maps.

A batch is decided update by update, each against the store's snapshot plus what the
earlier updates of the same batch wrote (``Overlay``); it is committed in one atomic
step. Nothing here does I/O or starts a thread: the node's ``Applier`` runs it, under
its apply lock, on whichever thread is applying (see ``dmodel.node.applier``).
"""

from __future__ import annotations

from typing import Any

from . import merge, pipeline
from .clock import physical_ms
from .update import FIELD_OPS, Op, Update, op_register


def event_field(op: Op, update: Update, index: int) -> str | None:
    """The field name listeners see for an op (None for object-level ops)."""
    if op.op in FIELD_OPS:
        return op_register(op, update.id, index)
    return None


class Bounded(dict):  # type: ignore[type-arg]
    """An insertion-ordered map that forgets its oldest entries past ``capacity``."""

    def __init__(self, capacity: int) -> None:
        super().__init__()
        self.capacity = capacity

    def add(self, key: Any, value: Any = None) -> None:
        self[key] = value
        if len(self) > self.capacity:
            del self[next(iter(self))]


class Overlay:
    """What earlier updates of a batch wrote, laid over each later update's snapshot."""

    def __init__(self) -> None:
        self.state = merge.State()
        self.seen: set[bytes] = set()
        self.chain: dict[bytes, tuple[str, bytes]] = {}
        self.heads: dict[tuple[str, bytes], int] = {}  # chain -> latest timestamp in the batch
        self.next: dict[bytes, bytes] = {}

    def add(self, update: Update, writes: list[merge.Write] | None) -> None:
        self.seen.add(update.id)
        self.chain[update.id] = (update.caller, update.node)
        chain = (update.caller, update.node)
        self.heads[chain] = max(self.heads.get(chain, -1), update.timestamp)
        if update.prev:
            self.next.setdefault(update.prev, update.id)
        ms = physical_ms(update.timestamp)
        for op in update.ops:
            if op.obj != update.caller:
                key = (op.obj, update.caller)
                self.state.last_write[key] = max(self.state.last_write.get(key, -1), ms)
        if writes:
            self.state.commit(writes)

    def patch(self, snap: pipeline.Snapshot, update: Update) -> pipeline.Snapshot:
        if not self.seen:
            return snap
        if update.id in self.seen:
            snap.seen = True
        if update.prev in self.chain:
            snap.prev_chain = self.chain[update.prev]
        elif snap.prev_chain is None:
            head = self.heads.get((update.caller, update.node), -1)
            snap.head_timestamp = max(snap.head_timestamp, head)
        if update.prev in self.next and self.next[update.prev] != update.id:
            snap.equivocation = True
        snap.stored.update(uid for uid in pipeline.linked_updates(update) if uid in self.seen)
        mine, over = snap.state, self.state
        objects, registers, auth = pipeline.needs(update)
        for db_id in objects:
            if db_id in over.objects:
                mine.objects[db_id] = over.objects[db_id]
        for key in registers:
            if key in over.registers:
                mine.registers[key] = over.registers[key]
            elif key[0] in over.objects and over.objects[key[0]].removed is not None:
                mine.registers.pop(key, None)
        for akey in auth:
            if akey in over.auth:
                mine.auth[akey] = over.auth[akey]
            if akey[1] == "u":  # a grant/revoke: did the member write earlier in the batch?
                ms = over.last_write.get((akey[0], akey[2]), -1)
                if ms > mine.last_write.get((akey[0], akey[2]), -1):
                    mine.last_write[(akey[0], akey[2])] = ms
        for wkey in pipeline.wrap_keys(update):
            if wkey in over.wraps:
                mine.wraps[wkey] = over.wraps[wkey]
        return snap


__all__ = ["Bounded", "Overlay", "event_field"]
