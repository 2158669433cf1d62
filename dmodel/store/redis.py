"""The Redis store: snapshot reads for the pipeline, atomic commits, log and history.

Key layout (``P`` is the prefix, ``dm:`` by default; ``db_id`` is ``Model:oid``)::

    P u                HASH  update id -> raw signed update (every stored update)
    P ch               HASH  update id -> node id (16 bytes) + caller db_id   (chain links)
    P head             HASH  caller db_id + "|" + node hex -> id of the latest update of that chain
    P log              LIST  update ids in the order this node stored them (sequence = index)
    P o:{db_id}        STR   packed ObjectMeta (public keys, create version, removal version)
    P r:{db_id}        HASH  register name -> packed Register (value + version + update ref)
    P a:{db_id}        HASH  "r:"/"u:" + member db_id -> packed authorization events
    P w:{db_id}        HASH  value ref (34 bytes) + reader oid -> wrapped key (later read grants)
    P h:{db_id}        LIST  ids of accepted updates touching the object (history)
    P x:{db_id}        LIST  ids of held (unauthorized) updates touching the object, capped
    P lw:{db_id}       ZSET  caller db_id -> greatest timestamp (ms) of its ops on the object,
                             for callers other than the object itself (late-grant detection)
    P next             HASH  update id -> id of the update that named it as previous
    P l:{db_id}#{field} ZSET live DList elements: members position + 0x00 + element id, all
                             with score 0, so lexicographic order is list order
    P lf:{db_id}       SET   names of the object's DList fields
    P m:{Model}        SET   oids of known objects of that model
    P models           SET   model names
    P meta             HASH  "hlc" -> greatest timestamp, "node" -> node id

Each update is committed with its log entries in one MULTI/EXEC block, so a crash
never leaves half an update. The register keeps the update's version, whose last 34
bytes are the update id and op index: that is how any read is verified against the
signed update (``verified=True`` reads, ``dmodel verify``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import Any

import redis

from .. import merge
from ..errors import StoreError, StoreUnavailableError
from ..pipeline import Snapshot, needs
from ..update import Update

HELD_CAP = 1000


@contextlib.contextmanager
def map_redis_errors() -> Iterator[None]:
    """Translate redis-py exceptions into StoreError subclasses."""
    try:
        yield
    except (redis.ConnectionError, redis.TimeoutError, FileNotFoundError) as exc:
        raise StoreUnavailableError(f"Redis is unreachable: {exc}") from exc
    except redis.RedisError as exc:
        raise StoreError(f"Redis error: {exc}") from exc


class RedisStore:
    """dmodel's state in one Redis database."""

    def __init__(self, client: redis.Redis, prefix: str = "dm:") -> None:
        self.client = client
        self.prefix = prefix
        p = prefix
        self.k_updates, self.k_chain, self.k_head = f"{p}u", f"{p}ch", f"{p}head"
        self.k_log, self.k_models, self.k_meta = f"{p}log", f"{p}models", f"{p}meta"
        self.k_next = f"{p}next"

    # ------------------------------------------------------------------ keys
    def k_obj(self, db_id: str) -> str:
        return f"{self.prefix}o:{db_id}"

    def k_reg(self, db_id: str) -> str:
        return f"{self.prefix}r:{db_id}"

    def k_auth(self, db_id: str) -> str:
        return f"{self.prefix}a:{db_id}"

    def k_wrap(self, db_id: str) -> str:
        return f"{self.prefix}w:{db_id}"

    def k_hist(self, db_id: str) -> str:
        return f"{self.prefix}h:{db_id}"

    def k_held(self, db_id: str) -> str:
        return f"{self.prefix}x:{db_id}"

    def k_last(self, db_id: str) -> str:
        return f"{self.prefix}lw:{db_id}"

    def k_list(self, db_id: str, name: str) -> str:
        return f"{self.prefix}l:{db_id}#{name}"

    def k_lists(self, db_id: str) -> str:
        return f"{self.prefix}lf:{db_id}"

    def k_model(self, model: str) -> str:
        return f"{self.prefix}m:{model}"

    # ------------------------------------------------------------- pipeline
    def snapshot(self, update: Update) -> Snapshot:
        """Read everything ``decide`` needs for ``update`` in one round trip."""
        objects, registers, auth = needs(update)
        objects_l, regs_l, auth_l = sorted(objects), sorted(registers), sorted(auth)
        with map_redis_errors():
            pipe = self.client.pipeline(transaction=False)
            pipe.hexists(self.k_updates, update.id)
            if update.prev:
                pipe.hget(self.k_chain, update.prev)
            for db_id in objects_l:
                pipe.get(self.k_obj(db_id))
            for db_id, name in regs_l:
                pipe.hget(self.k_reg(db_id), name)
            for db_id, kind, member in auth_l:
                pipe.hget(self.k_auth(db_id), f"{kind}:{member}")
                if kind == "u":
                    pipe.zscore(self.k_last(db_id), member)
            if update.prev:
                pipe.hget(self.k_next, update.prev)
            results = iter(pipe.execute())
        snap = Snapshot(seen=bool(next(results)))
        if update.prev:
            link = next(results)
            if link:
                snap.prev_chain = (link[16:].decode(), link[:16])
        state = snap.state
        for db_id in objects_l:
            data = next(results)
            if data:
                state.objects[db_id] = merge.ObjectMeta.unpack(data)
        for key in regs_l:
            data = next(results)
            if data:
                state.registers[key] = merge.Register.unpack(data)
        for key in auth_l:
            state.auth[key] = merge.unpack_auth(next(results))
            if key[1] == "u":
                last = next(results)
                if last is not None:
                    state.last_write[(key[0], key[2])] = int(last)
        if update.prev:
            sibling = next(results)
            snap.equivocation = sibling is not None and sibling != update.id
        return snap

    def commit(self, update: Update, writes: list[merge.Write] | None, *, hlc: int) -> int:
        """Store ``update`` atomically with its writes (None = held as unauthorized).

        Returns the update's sequence number in the log.
        """
        uid = update.id
        touched = sorted({op.obj for op in update.ops})
        with map_redis_errors():
            dropped = [w.db_id for w in writes or () if w.kind == "drop"]
            list_keys = self._list_keys(dropped) if dropped else []
            pipe = self.client.pipeline(transaction=True)
            pipe.hset(self.k_updates, uid, update.raw)
            pipe.hset(self.k_chain, uid, update.node + update.caller.encode())
            pipe.hset(self.k_head, f"{update.caller}|{update.node.hex()}", uid)
            pipe.rpush(self.k_log, uid)
            if update.prev:
                pipe.hsetnx(self.k_next, update.prev, uid)
            ms = update.timestamp >> 16
            for db_id in {op.obj for op in update.ops if op.obj != update.caller}:
                pipe.zadd(self.k_last(db_id), {update.caller: ms}, gt=True)
            if writes is None:
                for db_id in touched:
                    pipe.rpush(self.k_held(db_id), uid)
                    pipe.ltrim(self.k_held(db_id), -HELD_CAP, -1)
            else:
                for db_id in touched:
                    pipe.rpush(self.k_hist(db_id), uid)
                for w in writes:
                    self._queue_write(pipe, w)
            if list_keys:
                pipe.delete(*list_keys)
            pipe.hset(self.k_meta, "hlc", hlc)
            return int(pipe.execute()[3])

    def _list_keys(self, db_ids: list[str]) -> list[str]:
        # Read outside MULTI; safe because the node's apply lock serializes its writers.
        keys = []
        for db_id in db_ids:
            names = self.client.smembers(self.k_lists(db_id))
            keys.extend(self.k_list(db_id, n.decode()) for n in names)
            keys.append(self.k_lists(db_id))
        return keys

    def _queue_write(self, pipe: Any, w: merge.Write) -> None:
        if w.kind == "register":
            pipe.hset(self.k_reg(w.db_id), w.name, w.data.pack())
        elif w.kind == "object":
            pipe.set(self.k_obj(w.db_id), w.data.pack())
            model, _, oid = w.db_id.partition(":")
            pipe.sadd(self.k_model(model), oid)
            pipe.sadd(self.k_models, model)
        elif w.kind == "auth":
            pipe.hset(self.k_auth(w.db_id), w.name, merge.pack_auth(w.data))
        elif w.kind == "wrap":
            pipe.hset(self.k_wrap(w.db_id), w.name, w.data)
        elif w.kind == "list_add":
            pipe.zadd(self.k_list(w.db_id, w.name), {w.data: 0})
            pipe.sadd(self.k_lists(w.db_id), w.name)
        elif w.kind == "list_del":
            pipe.zrem(self.k_list(w.db_id, w.name), w.data)
        elif w.kind == "drop":
            pipe.delete(self.k_reg(w.db_id), self.k_wrap(w.db_id))  # list keys: see commit
        else:  # pragma: no cover - merge only emits the kinds above
            raise ValueError(f"unknown write kind {w.kind}")

    def replace_object(self, db_id: str, meta: merge.ObjectMeta | None,
                       registers: dict[str, merge.Register], wraps: dict[bytes, bytes],
                       lists: dict[str, set[bytes]], accepted: list[bytes],
                       held: list[bytes]) -> None:
        """Atomically rewrite an object's derived state (after re-deciding its updates)."""
        with map_redis_errors():
            old_lists = self._list_keys([db_id])
            pipe = self.client.pipeline(transaction=True)
            pipe.delete(self.k_reg(db_id), self.k_wrap(db_id), self.k_hist(db_id),
                        self.k_held(db_id), *old_lists)
            for name, members in lists.items():
                if members:
                    pipe.zadd(self.k_list(db_id, name), dict.fromkeys(members, 0))
                    pipe.sadd(self.k_lists(db_id), name)
            if meta is not None:
                pipe.set(self.k_obj(db_id), meta.pack())
            if registers:
                pipe.hset(self.k_reg(db_id), mapping={k: r.pack() for k, r in registers.items()})
            if wraps:
                pipe.hset(self.k_wrap(db_id), mapping=wraps)
            if accepted:
                pipe.rpush(self.k_hist(db_id), *accepted)
            if held:
                pipe.rpush(self.k_held(db_id), *held[-HELD_CAP:])
            pipe.execute()

    # ---------------------------------------------------------------- reads
    def object_meta(self, db_id: str) -> merge.ObjectMeta | None:
        with map_redis_errors():
            data = self.client.get(self.k_obj(db_id))
        return merge.ObjectMeta.unpack(data) if data else None

    def register(self, db_id: str, name: str) -> merge.Register | None:
        with map_redis_errors():
            data = self.client.hget(self.k_reg(db_id), name)
        return merge.Register.unpack(data) if data else None

    def registers(self, db_id: str) -> dict[str, merge.Register]:
        with map_redis_errors():
            data = self.client.hgetall(self.k_reg(db_id))
        return {k.decode(): merge.Register.unpack(v) for k, v in data.items()}

    def auth_events(self, db_id: str, kind: str) -> dict[str, merge.AuthEvents]:
        """member -> events, for kind "r" (read) or "u" (update)."""
        with map_redis_errors():
            data = self.client.hgetall(self.k_auth(db_id))
        out = {}
        for key, value in data.items():
            k, _, member = key.decode().partition(":")
            if k == kind:
                out[member] = merge.unpack_auth(value)
        return out

    def list_length(self, db_id: str, name: str) -> int:
        with map_redis_errors():
            return int(self.client.zcard(self.k_list(db_id, name)))

    def list_range(self, db_id: str, name: str, start: int = 0, stop: int = -1) -> list[bytes]:
        """Element ids of a DList in list order, ``start``..``stop`` inclusive."""
        with map_redis_errors():
            keys = self.client.zrange(self.k_list(db_id, name), start, stop)
        return [key[-34:] for key in keys]

    def list_keys_range(self, db_id: str, name: str, start: int, stop: int) -> list[bytes]:
        """Order keys (position + 0x00 + element id) of a DList, ``start``..``stop``."""
        with map_redis_errors():
            return self.client.zrange(self.k_list(db_id, name), start, stop)

    def wrapped_key(self, db_id: str, ref: bytes, oid: str) -> bytes | None:
        with map_redis_errors():
            return self.client.hget(self.k_wrap(db_id), ref + oid.encode())

    def raw_update(self, uid: bytes) -> bytes | None:
        with map_redis_errors():
            return self.client.hget(self.k_updates, uid)

    def raw_updates(self, uids: Iterable[bytes]) -> list[bytes | None]:
        uids = list(uids)
        if not uids:
            return []
        with map_redis_errors():
            return self.client.hmget(self.k_updates, uids)

    def has_update(self, uid: bytes) -> bool:
        with map_redis_errors():
            return bool(self.client.hexists(self.k_updates, uid))

    def chain_head(self, caller: str, node: bytes) -> bytes:
        with map_redis_errors():
            return self.client.hget(self.k_head, f"{caller}|{node.hex()}") or b""

    def log_length(self) -> int:
        with map_redis_errors():
            return int(self.client.llen(self.k_log))

    def log_range(self, start: int = 0, stop: int = -1) -> list[bytes]:
        """Update ids in store order, ``start``..``stop`` inclusive (LRANGE semantics)."""
        with map_redis_errors():
            return self.client.lrange(self.k_log, start, stop)

    def history(self, db_id: str, held: bool = False) -> list[bytes]:
        with map_redis_errors():
            return self.client.lrange(self.k_held(db_id) if held else self.k_hist(db_id), 0, -1)

    def models(self) -> list[str]:
        with map_redis_errors():
            return sorted(m.decode() for m in self.client.smembers(self.k_models))

    def object_ids(self, model: str | None = None) -> list[str]:
        """db_ids of known objects (removed ones included; see object_meta)."""
        models = [model] if model else self.models()
        out = []
        with map_redis_errors():
            for m in models:
                out.extend(f"{m}:{oid.decode()}" for oid in self.client.smembers(self.k_model(m)))
        return sorted(out)

    def last_hlc(self) -> int:
        with map_redis_errors():
            return int(self.client.hget(self.k_meta, "hlc") or 0)

    def meta(self, key: str) -> bytes | None:
        with map_redis_errors():
            return self.client.hget(self.k_meta, key)

    def set_meta(self, key: str, value: bytes | str) -> None:
        with map_redis_errors():
            self.client.hset(self.k_meta, key, value)

    def close(self) -> None:
        with contextlib.suppress(redis.RedisError):
            self.client.close()
