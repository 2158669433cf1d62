"""Group commit: concurrent local writes share one decision pass and one Redis commit.

A writer queues its write and takes the apply lock. Whoever holds the lock leads: it
signs the queued writes that can share a commit (in queue order), runs them through
the pipeline as one batch and hands each writer its own result. A writer whose write
a leader already finished finds it done when it gets the lock. While one commit waits
for Redis the other threads queue theirs, so the next leader takes them all: the more
writers, the larger the groups, and a lone writer pays nothing extra.

A group holds at most one write per caller and touches each object once, so every
write is still decided against a state it could have seen alone, and a write refused
in a group leaves no later write of its caller chained to it. Authorization changes
and removals go alone. Each write is signed, chained and acknowledged only after the
commit holding it is durable, and one that fails (validation, authorization, a veto)
fails alone; a commit that fails fails every write in it.
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .. import pipeline
from ..crypto import Identity
from ..errors import ObjectNotFoundError
from ..update import FIELD_OPS, Op, Update
from . import rights

if TYPE_CHECKING:
    from ..clock import HybridClock
    from ..store.base import Store
    from .applier import Applier

GROUPED_OPS = FIELD_OPS | {"create"}
MAX_GROUP = 256  # writes signed into one commit


@dataclass(slots=True, eq=False)
class QueuedWrite:
    """One writer's request and, once a leader decided it, its outcome. ``request`` is
    the ops, or a function giving them that is called under the apply lock."""

    caller: str
    signer: Identity
    request: Sequence[Op] | Callable[[], Sequence[Op]]
    done: bool = False
    update: Update | None = None
    error: BaseException | None = None

    def finish(self, update: Update | None, error: BaseException | None) -> None:
        self.update, self.error, self.done = update, error, True

    def result(self) -> Update:
        if self.error is not None:
            raise self.error
        assert self.update is not None
        return self.update


class WriteQueue:
    """Signs and commits local writes, grouping those that arrive together."""

    def __init__(self, applier: Applier, store: Store, clock: HybridClock,
                 node_id: bytes) -> None:
        self.applier, self.store, self.clock, self.node_id = applier, store, clock, node_id
        self.lock = applier.lock
        self.heads: dict[str, bytes] = {}  # caller -> its latest update signed here
        self.commits = 0  # commits of local writes
        self.writes = 0   # signed writes in them
        self._queue: collections.deque[QueuedWrite] = collections.deque()
        self._leader: int | None = None  # the thread leading now

    def write(self, entry: QueuedWrite) -> Update:
        """Sign, decide and commit ``entry`` (with whatever else is queued)."""
        me = threading.get_ident()
        if self._leader == me:
            # A write from inside a commit (a listener's callback): it goes alone, now.
            with self.lock:
                signed = self._sign(entry, self._build(entry))
                self._commit([signed] if signed else [])
            return entry.result()
        self._queue.append(entry)
        with self.lock:
            self._leader = me
            try:
                while not entry.done:
                    self._commit(self._sign_group())
            finally:
                self._leader = None
        return entry.result()

    @property
    def queued(self) -> int:
        return len(self._queue)

    # ------------------------------------------------------------ internals
    def _sign_group(self) -> list[tuple[QueuedWrite, Update]]:
        """Sign the queued writes that can share a commit, from the front of the queue."""
        group: list[tuple[QueuedWrite, Update]] = []
        touched: set[str] = set()
        while self._queue and len(group) < MAX_GROUP:
            entry = self._queue.popleft()
            ops = self._build(entry)
            if ops is None:
                continue
            objects = {entry.caller, *(op.obj for op in ops)}
            alone = not ops or any(op.op not in GROUPED_OPS for op in ops)
            if group and (alone or not objects.isdisjoint(touched)):
                self._queue.appendleft(entry)  # it starts the next group (built again)
                break
            signed = self._sign(entry, ops)
            if signed is None:
                continue
            group.append(signed)
            touched |= objects
            if alone:
                break
        return group

    @staticmethod
    def _build(entry: QueuedWrite) -> tuple[Op, ...] | None:
        """``entry``'s ops, built now if a function (under the lock: what a build reads
        is what its write is decided against); None, and finished, if the build fails."""
        try:
            return tuple(entry.request() if callable(entry.request) else entry.request)
        except Exception as exc:
            entry.finish(None, exc)
            return None

    def _sign(self, entry: QueuedWrite, ops: tuple[Op, ...] | None
              ) -> tuple[QueuedWrite, Update] | None:
        if ops is None:
            return None
        try:
            grants = rights.grants_for(self.store, entry.caller, ops)
            head = self.heads.get(entry.caller)
            if head is None:
                head = self.store.chain_head(entry.caller, self.node_id)
            update = Update.create(entry.signer, node=self.node_id, caller=entry.caller,
                                   timestamp=self.clock.tick(), prev=head, ops=ops,
                                   grants=grants)
        except Exception as exc:
            entry.finish(None, exc)
            return None
        return entry, update

    def _commit(self, group: list[tuple[QueuedWrite, Update]]) -> None:
        if not group:
            return
        try:
            decisions = self.applier.apply_local([update for _, update in group])
        except BaseException as exc:
            for entry, _ in group:
                entry.finish(None, exc)
            if not isinstance(exc, Exception):
                raise
            return
        self.commits += 1
        self.writes += len(group)
        for (entry, update), decision in zip(group, decisions, strict=True):
            if decision.verdict == pipeline.ACCEPTED:
                self.heads[entry.caller] = update.id
                entry.finish(update, None)
            elif decision.verdict == pipeline.MISSING:
                missing = ", ".join(m if isinstance(m, str) else m.hex()
                                    for m in decision.missing)
                entry.finish(None, ObjectNotFoundError(f"not known to this node: {missing}"))
            else:
                assert decision.error is not None
                entry.finish(None, decision.error)


__all__ = ["GROUPED_OPS", "MAX_GROUP", "QueuedWrite", "WriteQueue"]
