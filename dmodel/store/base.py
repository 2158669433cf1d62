"""The Store protocol (what the node uses of a store) and an in-memory store for pure tests.

``RedisStore`` (store/redis.py) is the store of a running node. ``MemoryStore`` keeps
the same derived state in dicts (a ``merge.State`` plus the log, chains and history),
with no Redis, no I/O and no threads, so the applier can be tested on its own. It
follows the Redis store's reply shapes (LRANGE-style inclusive ranges, the log
position a commit returns) but not its persistence, cache or cluster layout.

A store has no lock: the node's apply lock serializes commits; reads may come from any
thread (the network's I/O thread serves catch-up straight from the store).
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from .. import merge, query
from ..clock import physical_ms
from ..pipeline import Snapshot, linked_updates, needs, wrap_keys
from ..update import Update

HELD_CAP = 1000  # held (unauthorized) update ids kept per object


def pack_versions(versions: list[bytes]) -> bytes:
    """Versions kept by retention, as one value (all versions have one length)."""
    return b"".join(versions)


def unpack_versions(data: bytes | None) -> list[bytes]:
    if not data:
        return []
    size = merge.VERSION_SIZE
    return [data[i:i + size] for i in range(0, len(data), size)]


@dataclass(frozen=True, slots=True)
class ObjectState:
    """An object's derived state as stored: what a state digest covers."""

    meta: merge.ObjectMeta | None
    registers: dict[str, merge.Register]
    lists: dict[str, list[bytes]]  # DList field -> element ids in list order
    auth: dict[str, dict[str, merge.AuthEvents]]  # "r"/"u" -> member -> events
    wraps: dict[bytes, bytes]


def read_object_state(store: Store, db_id: str) -> ObjectState:
    """One object's state through the Store protocol's single reads."""
    registers = store.registers(db_id)
    lists = {name: store.list_range(db_id, name)
             for name in sorted({n.partition("#")[0] for n in registers if "#" in n})}
    return ObjectState(store.object_meta(db_id), registers, lists,
                       {kind: store.auth_events(db_id, kind) for kind in ("r", "u")},
                       store.wraps(db_id))


@runtime_checkable
class Store(Protocol):
    """What the node reads and writes; ``RedisStore`` and ``MemoryStore`` implement it."""

    # pipeline
    def snapshots(self, updates: Sequence[Update], *, local: bool = False,
                  registers: bool = True) -> list[Snapshot]:
        """What ``decide`` needs for each update, each as if alone."""

    def commit_many(self, items: list[tuple[Update, list[merge.Write] | None]], *,
                    hlc: int) -> list[int]:
        """Store updates (writes None: held as unauthorized) atomically; their log positions."""

    def replace_object(self, db_id: str, meta: merge.ObjectMeta | None,
                       registers: dict[str, merge.Register], wraps: dict[bytes, bytes],
                       lists: dict[str, set[bytes]], accepted: list[bytes],
                       held: list[bytes]) -> None:
        """Atomically rewrite an object's derived state (after re-deciding its updates)."""

    # state reads
    def object_meta(self, db_id: str) -> merge.ObjectMeta | None: ...
    def register(self, db_id: str, name: str) -> merge.Register | None: ...
    def registers(self, db_id: str) -> dict[str, merge.Register]: ...
    def auth_events(self, db_id: str, kind: str) -> dict[str, merge.AuthEvents]: ...
    def member_events(self, db_id: str, kind: str, member: str) -> merge.AuthEvents: ...
    def wraps(self, db_id: str) -> dict[bytes, bytes]: ...
    def wrapped_key(self, db_id: str, ref: bytes, oid: str) -> bytes | None: ...
    def object_states(self, db_ids: Sequence[str]) -> list[ObjectState]: ...
    def list_length(self, db_id: str, name: str) -> int: ...
    def list_range(self, db_id: str, name: str, start: int = 0,
                   stop: int = -1) -> list[bytes]: ...
    def list_keys_range(self, db_id: str, name: str, start: int, stop: int) -> list[bytes]: ...
    def list_key_below(self, db_id: str, name: str, position: bytes) -> bytes | None: ...
    def models(self) -> list[str]: ...
    def object_ids(self, model: str | None = None) -> list[str]: ...

    # updates, log, history
    def raw_update(self, uid: bytes) -> bytes | None: ...
    def raw_updates(self, uids: Iterable[bytes]) -> list[bytes | None]: ...
    def missing(self, uids: Sequence[bytes]) -> list[bytes]: ...
    def has_update(self, uid: bytes) -> bool: ...
    def chain_head(self, caller: str, node: bytes) -> bytes: ...
    def chain_heads(self) -> dict[str, bytes]: ...
    def chain_links(self) -> dict[bytes, bytes]: ...
    def log_length(self) -> int: ...
    def log_range(self, start: int = 0, stop: int = -1) -> list[bytes]: ...
    def log_page(self, start: int, limit: int) -> tuple[list[bytes], int]: ...
    def update_ids(self) -> Iterator[bytes]: ...
    def history(self, db_id: str, held: bool = False) -> list[bytes]: ...
    def stored_ids(self, db_ids: Sequence[str]) -> list[list[bytes]]: ...

    # value indexes (see dmodel/query.py); ensure_index runs under the apply lock
    def indexes(self) -> set[tuple[str, str]]: ...
    def has_index(self, model: str, field: str) -> bool: ...
    def ensure_index(self, model: str, field: str) -> None: ...
    def index_range(self, model: str, field: str, low: bytes, high: bytes, *,
                    reverse: bool = False, offset: int = 0,
                    count: int = -1) -> list[bytes]: ...
    def index_count(self, model: str, field: str, low: bytes, high: bytes) -> int: ...
    def index_entries(self, db_id: str) -> dict[str, bytes]: ...
    def field_registers(self, db_ids: Sequence[str],
                        name: str) -> list[merge.Register | None]: ...

    # retention (see node/pruner.py)
    def retention_reads(self, pairs: Sequence[tuple[str, str]],
                        chains: Sequence[tuple[str, bytes]] = ()
                        ) -> tuple[list[list[bytes]], list[merge.Register | None],
                                   list[bytes]]: ...
    def prune(self, kept: dict[tuple[str, str], list[bytes]], updates: Sequence[Update],
              heads: set[bytes], removed: Sequence[str] = ()) -> None: ...
    def pruned_count(self, db_id: str) -> int: ...

    # updates held for their future timestamps (kept across restarts)
    def hold_future(self, uid: bytes, raw: bytes) -> None: ...
    def release_future(self, uids: Sequence[bytes]) -> None: ...
    def future_updates(self) -> list[bytes]: ...

    # node metadata
    def last_hlc(self) -> int: ...
    def meta(self, key: str) -> bytes | None: ...
    def set_meta(self, key: str, value: bytes | str) -> None: ...
    def settle(self) -> None: ...
    def close(self) -> None: ...


def _inclusive(items: Sequence[bytes], start: int, stop: int) -> list[bytes]:
    """``items[start..stop]``, both ends included, negatives from the end (LRANGE/ZRANGE)."""
    n = len(items)
    start, stop = start + n if start < 0 else start, stop + n if stop < 0 else stop
    start = max(start, 0)
    if start >= n or start > stop:
        return []
    return list(items[start:min(stop, n - 1) + 1])


class MemoryStore:
    """A ``Store`` in dicts, for tests of the applier without Redis."""

    def __init__(self) -> None:
        self.state = merge.State()
        self.updates: dict[bytes, bytes] = {}
        self.chain: dict[bytes, tuple[str, bytes]] = {}  # update id -> (caller, node)
        self.next: dict[bytes, bytes] = {}  # update id -> the update that named it as prev
        self.heads: dict[tuple[str, bytes], bytes] = {}
        self.head_ts: dict[tuple[str, bytes], int] = {}
        self.log: list[bytes] = []
        self.hist: dict[str, list[bytes]] = {}
        self.held: dict[str, list[bytes]] = {}
        self.model_oids: dict[str, set[str]] = {}
        self.node_meta: dict[str, bytes] = {}
        self.future: dict[bytes, bytes] = {}
        self.kept: dict[tuple[str, str], list[bytes]] = {}
        self.pruned: dict[str, int] = {}
        self.index: dict[tuple[str, str], list[bytes]] = {}  # sorted members
        self.entries: dict[str, dict[str, bytes]] = {}  # db_id -> field -> member
        self.closed = False

    # ------------------------------------------------------------- pipeline
    def snapshots(self, updates: Sequence[Update], *, local: bool = False,
                  registers: bool = True) -> list[Snapshot]:
        state, snaps = self.state, []
        for update in updates:
            objects, regs, auth = needs(update)
            snap = Snapshot(seen=False if local else update.id in self.updates)
            if update.prev and not local:
                snap.prev_chain = self.chain.get(update.prev)
                if snap.prev_chain is None:
                    snap.head_timestamp = self.head_ts.get((update.caller, update.node), -1)
                sibling = self.next.get(update.prev)
                snap.equivocation = sibling is not None and sibling != update.id
            mine = snap.state
            mine.objects.update({o: state.objects[o] for o in objects if o in state.objects})
            mine.registers.update({r: state.registers[r] for r in regs if r in state.registers})
            mine.auth.update({a: state.auth.get(a, ()) for a in auth})
            for db_id, kind, member in auth:  # as RedisStore: see its snapshots()
                if kind == "u" and (not local or member != update.caller) \
                        and (db_id, member) in state.last_write:
                    mine.last_write[(db_id, member)] = state.last_write[(db_id, member)]
            mine.wraps.update({w: state.wraps[w] for w in wrap_keys(update) if w in state.wraps})
            if not local:
                snap.stored = {uid for uid in linked_updates(update) if uid in self.updates}
            snaps.append(snap)
        return snaps

    def commit_many(self, items: list[tuple[Update, list[merge.Write] | None]], *,
                    hlc: int) -> list[int]:
        positions = []
        for update, writes in items:
            uid = update.id
            self.updates[uid] = update.raw
            self.chain[uid] = (update.caller, update.node)
            chain = (update.caller, update.node)
            if self.head_ts.get(chain, -1) < update.timestamp:  # as RedisStore's HEADMAX
                replaced = self.heads.get(chain)
                if replaced is not None and replaced not in self.updates:
                    self.chain.pop(replaced, None)  # a pruned head's link goes with it
                self.heads[chain], self.head_ts[chain] = uid, update.timestamp
            self.log.append(uid)
            positions.append(len(self.log))
            if update.prev:
                self.next.setdefault(update.prev, uid)
            ms = physical_ms(update.timestamp)
            for db_id in {op.obj for op in update.ops if op.obj != update.caller}:
                key = (db_id, update.caller)
                self.state.last_write[key] = max(self.state.last_write.get(key, -1), ms)
            touched = sorted({op.obj for op in update.ops})
            if writes is None:
                for db_id in touched:
                    held = self.held.setdefault(db_id, [])
                    held.append(uid)
                    del held[:-HELD_CAP]
                continue
            for db_id in touched:
                self.hist.setdefault(db_id, []).append(uid)
            self.state.commit(writes)
            indexed = self.indexes()
            current = {d: dict(self.entries.get(d, {}))
                       for d in query.needs_entries(writes, indexed)}
            self._apply_index(query.index_changes(writes, indexed, current))
            for w in writes:
                if w.kind == "object":
                    model, _, oid = w.db_id.partition(":")
                    self.model_oids.setdefault(model, set()).add(oid)
        self.node_meta["hlc"] = str(hlc).encode()
        return positions

    def replace_object(self, db_id: str, meta: merge.ObjectMeta | None,
                       registers: dict[str, merge.Register], wraps: dict[bytes, bytes],
                       lists: dict[str, set[bytes]], accepted: list[bytes],
                       held: list[bytes]) -> None:
        self.state.commit([merge.Write("drop", db_id)])
        if meta is not None:
            self.state.objects[db_id] = meta
        writes = [merge.Write("list_add", db_id, name, key)
                  for name, keys in lists.items() for key in sorted(keys)]
        writes += [merge.Write("register", db_id, name, reg) for name, reg in registers.items()]
        writes += [merge.Write("wrap", db_id, name, wrapped) for name, wrapped in wraps.items()]
        self.state.commit(writes)
        self.hist[db_id] = list(accepted)
        self.held[db_id] = list(held[-HELD_CAP:])
        live = meta is not None and meta.removed is None
        self._apply_index(query.object_changes(db_id, live, registers, self.indexes(),
                                               dict(self.entries.get(db_id, {}))))

    # ------------------------------------------------------------ value indexes
    def indexes(self) -> set[tuple[str, str]]:
        return set(self.index)

    def has_index(self, model: str, field: str) -> bool:
        return (model, field) in self.index

    def ensure_index(self, model: str, field: str) -> None:
        if (model, field) in self.index:
            return
        self.index[(model, field)] = []
        for db_id in self.object_ids(model):
            meta = self.state.objects.get(db_id)
            live = meta is not None and meta.removed is None
            reg = self.register(db_id, field)
            self._apply_index(query.object_changes(db_id, live, {field: reg} if reg else {},
                                                    {(model, field)}, {}))

    def index_range(self, model: str, field: str, low: bytes, high: bytes, *,
                    reverse: bool = False, offset: int = 0, count: int = -1) -> list[bytes]:
        found = [m for m in self.index.get((model, field), ())
                 if query.above(m, low) and query.below(m, high)]
        if reverse:
            found.reverse()
        return found[offset:] if count < 0 else found[offset:offset + count]

    def index_count(self, model: str, field: str, low: bytes, high: bytes) -> int:
        return len(self.index_range(model, field, low, high))

    def index_entries(self, db_id: str) -> dict[str, bytes]:
        return dict(self.entries.get(db_id, {}))

    def field_registers(self, db_ids: Sequence[str], name: str) -> list[merge.Register | None]:
        return [self.register(db_id, name) for db_id in db_ids]

    def _apply_index(self, changes: list[query.IndexChange]) -> None:
        for c in changes:
            members = self.index[(c.model, c.field)]
            at = bisect.bisect_left(members, c.old or b"")
            if c.old is not None and at < len(members) and members[at] == c.old:
                del members[at]
            entries = self.entries.setdefault(c.db_id, {})
            if c.new is not None:
                bisect.insort(members, c.new)
                entries[c.field] = c.new
            else:
                entries.pop(c.field, None)

    # ------------------------------------------------------------ state reads
    def object_meta(self, db_id: str) -> merge.ObjectMeta | None:
        return self.state.objects.get(db_id)

    def register(self, db_id: str, name: str) -> merge.Register | None:
        return self.state.registers.get((db_id, name))

    def registers(self, db_id: str) -> dict[str, merge.Register]:
        return {name: reg for (obj, name), reg in self.state.registers.items() if obj == db_id}

    def auth_events(self, db_id: str, kind: str) -> dict[str, merge.AuthEvents]:
        return {member: events for (obj, k, member), events in self.state.auth.items()
                if obj == db_id and k == kind and events}

    def member_events(self, db_id: str, kind: str, member: str) -> merge.AuthEvents:
        return self.state.auth.get((db_id, kind, member), ())

    def wraps(self, db_id: str) -> dict[bytes, bytes]:
        return {ref + oid.encode(): w for (obj, ref, oid), w in self.state.wraps.items()
                if obj == db_id}

    def object_states(self, db_ids: Sequence[str]) -> list[ObjectState]:
        return [read_object_state(self, db_id) for db_id in db_ids]

    def wrapped_key(self, db_id: str, ref: bytes, oid: str) -> bytes | None:
        return self.state.wraps.get((db_id, ref, oid))

    def _keys(self, db_id: str, name: str) -> list[bytes]:
        return sorted(self.state.lists.get((db_id, name), ()))

    def list_length(self, db_id: str, name: str) -> int:
        return len(self.state.lists.get((db_id, name), ()))

    def list_range(self, db_id: str, name: str, start: int = 0, stop: int = -1) -> list[bytes]:
        return [key[-34:] for key in self.list_keys_range(db_id, name, start, stop)]

    def list_keys_range(self, db_id: str, name: str, start: int, stop: int) -> list[bytes]:
        return _inclusive(self._keys(db_id, name), start, stop)

    def list_key_below(self, db_id: str, name: str, position: bytes) -> bytes | None:
        below = [key for key in self._keys(db_id, name) if key < position + b"\0"]
        return below[-1] if below else None

    def models(self) -> list[str]:
        return sorted(self.model_oids)

    def object_ids(self, model: str | None = None) -> list[str]:
        models = [model] if model else self.models()
        return sorted(f"{m}:{oid}" for m in models for oid in self.model_oids.get(m, ()))

    # ------------------------------------------------------ updates, log, history
    def raw_update(self, uid: bytes) -> bytes | None:
        return self.updates.get(uid)

    def raw_updates(self, uids: Iterable[bytes]) -> list[bytes | None]:
        return [self.updates.get(uid) for uid in uids]

    def missing(self, uids: Sequence[bytes]) -> list[bytes]:
        return [uid for uid in uids if uid not in self.updates]

    def has_update(self, uid: bytes) -> bool:
        return uid in self.updates

    def chain_head(self, caller: str, node: bytes) -> bytes:
        return self.heads.get((caller, node), b"")

    def chain_heads(self) -> dict[str, bytes]:
        return {f"{caller}|{node.hex()}": uid + self.head_ts[(caller, node)].to_bytes(8, "big")
                for (caller, node), uid in self.heads.items()}

    def chain_links(self) -> dict[bytes, bytes]:
        return {uid: node + caller.encode() for uid, (caller, node) in self.chain.items()}

    def log_length(self) -> int:
        return len(self.log)

    def log_range(self, start: int = 0, stop: int = -1) -> list[bytes]:
        if start < 0:  # counted from the end among stored updates, like RedisStore
            return _inclusive([uid for uid in self.log if uid], start, stop)
        return [uid for uid in _inclusive(self.log, start, stop) if uid]

    def update_ids(self) -> Iterator[bytes]:
        return iter(list(self.updates))

    def log_page(self, start: int, limit: int) -> tuple[list[bytes], int]:
        ids: list[bytes] = []
        pos = start
        while pos < len(self.log) and len(ids) < limit:
            if self.log[pos]:
                ids.append(self.log[pos])
            pos += 1
        return ids, pos if len(ids) == limit else len(self.log)

    def history(self, db_id: str, held: bool = False) -> list[bytes]:
        return list((self.held if held else self.hist).get(db_id, ()))


    def stored_ids(self, db_ids: Sequence[str]) -> list[list[bytes]]:
        """Per object: the ids of its stored updates, accepted then held."""
        return [self.history(db_id) + self.history(db_id, held=True) for db_id in db_ids]
    def retention_reads(self, pairs: Sequence[tuple[str, str]],
                        chains: Sequence[tuple[str, bytes]] = ()
                        ) -> tuple[list[list[bytes]], list[merge.Register | None], list[bytes]]:
        return ([list(self.kept.get(p, ())) for p in pairs],
                [self.state.registers.get(p) for p in pairs],
                [self.heads.get(c, b"") for c in chains])

    def prune(self, kept: dict[tuple[str, str], list[bytes]], updates: Sequence[Update],
              heads: set[bytes], removed: Sequence[str] = ()) -> None:
        for db_id in removed:
            for key in [k for k in self.kept if k[0] == db_id]:
                del self.kept[key]
        for key, versions in kept.items():
            if versions:
                self.kept[key] = list(versions)
            else:
                self.kept.pop(key, None)
        for update in updates:
            uid = update.id
            self.updates.pop(uid, None)
            self.next.pop(uid, None)
            if uid not in heads:
                self.chain.pop(uid, None)
            if uid in self.log:
                self.log[self.log.index(uid)] = b""  # a gap: positions never move
            for db_id in {op.obj for op in update.ops}:
                self.hist[db_id] = [u for u in self.hist.get(db_id, []) if u != uid]
                self.pruned[db_id] = self.pruned.get(db_id, 0) + 1

    def pruned_count(self, db_id: str) -> int:
        return self.pruned.get(db_id, 0)

    def hold_future(self, uid: bytes, raw: bytes) -> None:
        self.future[uid] = raw

    def release_future(self, uids: Sequence[bytes]) -> None:
        for uid in uids:
            self.future.pop(uid, None)

    def future_updates(self) -> list[bytes]:
        return list(self.future.values())

    # ------------------------------------------------------------ node metadata
    def last_hlc(self) -> int:
        return int(self.node_meta.get("hlc", b"0"))

    def meta(self, key: str) -> bytes | None:
        return self.node_meta.get(key)

    def set_meta(self, key: str, value: bytes | str) -> None:
        self.node_meta[key] = value.encode() if isinstance(value, str) else value

    def settle(self) -> None:
        """Nothing is deferred here."""

    def close(self) -> None:
        self.closed = True


__all__ = ["HELD_CAP", "MemoryStore", "Store"]
