"""The Redis store: snapshot reads for the pipeline, atomic commits, log and history.

Key layout. ``P`` is the prefix (``dm:`` by default; no ``{`` or ``}`` in it), ``G`` is
``P{P}`` (e.g. ``dm:{dm:}``: the store's global keys all share the hash tag ``{P}``, so
on a Redis Cluster they live in one slot), and ``db_id`` is ``Model:oid``: every key of
one object carries the hash tag ``{db_id}``, so one object's keys share a slot too::

    G u                HASH  update id -> raw signed update (every stored update)
    G ch               HASH  update id -> node id (16 bytes) + caller db_id   (chain links; a
                             pruned update keeps its link while it is its chain's head)
    G head             HASH  caller db_id + "|" + node hex -> id of the latest update of that chain
                             + its timestamp (8 bytes, big-endian)
    G log              ZSET  update id -> its sequence number here (store order); pruned
                             updates leave a gap, so positions never move
    G pc               HASH  db_id -> number of its updates pruned by retention
    G next             HASH  update id -> id of the update that named it as previous
    G m:{Model}        SET   oids of known objects of that model
    G models           SET   model names
    G ix               SET   "Model#field" of each value index this store keeps up
    G i:{Model}#{field} ZSET value index: members order-preserving value key + 0x00 + oid,
                             all with score 0 (see dmodel/query.py)
    G fut              HASH  update id -> raw update held for its future timestamp
    G meta             HASH  "hlc" -> greatest timestamp, "seq" -> next log position,
                             "epoch" -> random id of this store
                             (catch-up), "cursor:<peer hex>" -> [epoch, position] read
                             so far in that peer's log
    G jr               HASH  commit id -> the per-slot writes of a commit spanning slots,
                             until they are all applied (the journal; cluster only)
    G done             STR   id of the last commit step applied in the global slot
    G lock             STR   node id, pid and host of the node using this store (expiring)
    P kv:{db_id}       HASH  register name -> superseded versions kept by retention (packed)
    P o:{db_id}        STR   packed ObjectMeta (public keys, create version, removal version)
    P r:{db_id}        HASH  register name -> packed Register (value + version + update ref)
    P a:{db_id}        HASH  "r:"/"u:" + member db_id -> packed authorization events
    P w:{db_id}        HASH  value ref (34 bytes) + reader oid -> wrapped key (later read grants)
    P h:{db_id}        LIST  ids of accepted updates touching the object (history)
    P x:{db_id}        LIST  ids of held (unauthorized) updates touching the object, capped
    P lw:{db_id}       ZSET  caller db_id -> greatest timestamp (ms) of its ops on the object,
                             for callers other than the object itself (late-grant detection)
    P l:{db_id}#{field} ZSET live DList elements: members position + 0x00 + element id, all
                             with score 0, so lexicographic order is list order
    P lf:{db_id}       SET   names of the object's DList fields
    P ie:{db_id}       HASH  indexed field -> the object's member in that index
    P jd:{db_id}       STR   id of the last commit step applied in this object's slot (cluster)

(The braces are literal: ``dm:r:{Person:abc...}``.) A store written with the layout
before hash tags (``dm:r:Person:abc...``, ``dm:u``...) is renamed key by key into this one
when it is opened (``RedisStore.recover``), which is safe to cut short and run again.

Commits. All the writes of an update (or a batch) are decided first, then sent as one
script call (``_WRITE_LUA``) that checks the type of every key it writes before the first
write, so a commit either happens whole or not at all: a hand-edited key of the wrong
type fails it with nothing written, and ``maxmemory`` refuses a script at its first
write. The script also records the commit step's id (``G done``, ``P jd:{db_id}``) and
skips a step already applied, so a call re-sent after a lost reply changes nothing. On
one Redis every commit is that one atomic step (it reaches the AOF as one unit, so a
crash never leaves half an update). On a Redis Cluster the writes are grouped by slot:
when they span several, the step of the global slot (log, chain, raw update) also
writes the other slots' steps into the journal ``G jr``; then each slot's step runs
(atomic in its slot, idempotent); the finished entry goes with the next commit's global
step (or at ``settle``/``close``), never after a later step in another slot, so a replay
never re-runs a step behind a newer one. A node killed in between finishes the update
when it opens the store again (``recover``; a finished entry's steps are skipped by
their guards), and any later commit first finishes one left pending. A reader may thus
see one object's part of a multi-object update before another's, never a part of one
object's writes. The
register keeps the update's version, whose last 34 bytes are the update id and op
index: that is how any read is verified against the signed update (``verified=True``
reads, ``dmodel verify``).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import msgpack
import redis
from redis.cluster import RedisCluster
from redis.crc import key_slot
from redis.exceptions import RedisClusterException

from .. import merge, query
from ..clock import physical_ms
from ..crypto import is_oid
from ..errors import ConfigurationError, StoreError, StoreUnavailableError
from ..pipeline import Snapshot, linked_updates, needs, wrap_keys
from ..update import Update, op_register
from .base import HELD_CAP, ObjectState, pack_versions, unpack_versions
from .wire import Wire

# Over redis-py (a Redis given by URL): runs a list of commands, given as one msgpack
# argument, and returns their replies as one msgpack reply. A script runs atomically
# and reaches the AOF as one unit, like MULTI/EXEC, in one round trip; one argument in
# and one out spares redis-py its per-command packing and parsing. (The embedded
# server is reached through wire.py instead, with plain pipelines and MULTI/EXEC.)
_BATCH_LUA = """
local out = {}
for i, cmd in ipairs(cmsgpack.unpack(ARGV[1])) do out[i] = redis.call(unpack(cmd)) end
return cmsgpack.pack(out)
"""
_BATCH_SHA = hashlib.sha1(_BATCH_LUA.encode()).hexdigest()

# One commit step (see the module docstring). KEYS[1]: the step's guard (a string), then
# every key it writes; ARGV[1]: one letter per written key, the type it must have if it
# exists (h hash, z zset, s set, l list, "." any); ARGV[2]: the step's id; then each
# command as its argument count followed by its arguments. Nothing is written unless
# every key has its type; a step whose id the guard already holds is skipped.
# One command is the script's own: HEADMAX head chain value updates links sets the chain
# head ``value`` (update id + 8-byte big-endian timestamp) only if it is newer than the
# head there, and drops the chain link of a replaced head that retention pruned (its
# link was kept only while it was the head).
_WRITE_LUA = """
local function newer(cur, new)
  if not cur or #cur < 40 then return true end
  for j = 33, 40 do
    local a, b = string.byte(cur, j), string.byte(new, j)
    if a ~= b then return a < b end
  end
  return false
end
if redis.call('GET', KEYS[1]) == ARGV[2] then return 0 end
local kinds = {h = 'hash', z = 'zset', s = 'set', l = 'list'}
for i = 2, #KEYS do
  local kind = kinds[string.sub(ARGV[1], i - 1, i - 1)]
  if kind then
    local found = redis.call('TYPE', KEYS[i])['ok']
    if found ~= 'none' and found ~= kind then
      return redis.error_reply('WRONGTYPE ' .. KEYS[i] .. ' holds a ' .. found ..
                               ', not a ' .. kind .. ': nothing was written')
    end
  end
end
local i = 3
while i <= #ARGV do
  local n = tonumber(ARGV[i])
  if ARGV[i + 1] == 'HEADMAX' then
    local cur = redis.call('HGET', ARGV[i + 2], ARGV[i + 3])
    if newer(cur, ARGV[i + 4]) then
      redis.call('HSET', ARGV[i + 2], ARGV[i + 3], ARGV[i + 4])
      if cur and #cur >= 32 and redis.call('HEXISTS', ARGV[i + 5], string.sub(cur, 1, 32)) == 0 then
        redis.call('HDEL', ARGV[i + 6], string.sub(cur, 1, 32))
      end
    end
  else
    redis.call(unpack(ARGV, i + 1, i + n))
  end
  i = i + n + 1
end
redis.call('SET', KEYS[1], ARGV[2])
return 1
"""
_WRITE_SHA = hashlib.sha1(_WRITE_LUA.encode()).hexdigest()

# The type each written command needs of its key ("." for any).
_KEY_KIND = {"HEADMAX": "h", "HSET": "h", "HSETNX": "h", "HDEL": "h", "HINCRBY": "h", "ZADD": "z",
             "ZREM": "z", "SADD": "s", "SREM": "s", "RPUSH": "l", "LTRIM": "l",
             "LREM": "l", "SET": ".", "DEL": "."}

# A commit step's keys, their type letters and its flat command list (see _WRITE_LUA).
Step = tuple[list[str], str, list[Any]]

# Cluster replies a client may get while slots move or a master fails over: the step is
# sent again after a short pause (it is idempotent), for at most _RETRY_SECONDS.
_RETRY_SECONDS = 15.0
_TRANSIENT = (redis.exceptions.TryAgainError, redis.exceptions.AskError,
              redis.exceptions.ClusterError, redis.ConnectionError, redis.TimeoutError,
              redis.exceptions.SlotNotCoveredError)

_OLD_GLOBALS = ("u", "ch", "head", "log", "next", "meta", "pc", "fut", "models", "ix")
_OLD_OBJECT_KINDS = ("kv", "o", "r", "a", "w", "h", "x", "lw", "lf", "ie")


def _trim(cache: dict[Any, Any], limit: int) -> None:
    """Drop the oldest entries past ``limit`` (tolerating another thread doing the same)."""
    while len(cache) >= limit:
        try:
            del cache[next(iter(cache))]
        except (KeyError, StopIteration, RuntimeError):
            return


_CACHED_VALUE = 256  # bytes: a register with a longer value is read from Redis each time
_CACHED_REGISTERS = 50_000


class StoreCache:
    """Object metadata, authorization events and small field registers, as last read or
    written by this node.

    Valid because one node is the only writer of its keys (its prefix in its Redis) and
    every write goes through ``note`` under the node's apply lock. Readers outside the
    lock only ``fill_object`` an empty slot, so a value read before a commit can never
    replace the one the commit noted. Registers are cached only as commits write them
    (so a snapshot of a field this node wrote lately needs no read). Bounded: past
    ``limit`` entries (``_CACHED_REGISTERS`` registers) the oldest go.
    """

    def __init__(self, limit: int = 200_000) -> None:
        self.limit = limit
        self.objects: dict[str, merge.ObjectMeta] = {}
        self.auth: dict[tuple[str, str, str], merge.AuthEvents] = {}
        self.heads: dict[str, int] = {}  # chain ("caller|node hex") -> head's timestamp
        self.registers: dict[tuple[str, str], merge.Register] = {}

    def put_object(self, db_id: str, meta: merge.ObjectMeta) -> merge.ObjectMeta:
        _trim(self.objects, self.limit)
        self.objects[db_id] = meta
        return meta

    def fill_object(self, db_id: str, meta: merge.ObjectMeta) -> merge.ObjectMeta:
        """Cache what a reader found, unless a writer has noted the object meanwhile."""
        _trim(self.objects, self.limit)
        return self.objects.setdefault(db_id, meta)

    def put_auth(self, key: tuple[str, str, str], events: merge.AuthEvents) -> merge.AuthEvents:
        _trim(self.auth, self.limit)
        self.auth[key] = events
        return events

    def put_head(self, chain: str, timestamp: int) -> None:
        _trim(self.heads, self.limit)
        self.heads[chain] = max(timestamp, self.heads.get(chain, -1))

    def note(self, w: merge.Write) -> None:
        """Keep the cache equal to the store after a committed write."""
        if w.kind == "object":
            self.put_object(w.db_id, w.data)
        elif w.kind == "auth":
            kind, _, member = w.name.partition(":")
            self.put_auth((w.db_id, kind, member), w.data)
        elif w.kind == "register":
            key = (w.db_id, w.name)
            value = w.data.value
            if "#" in w.name or not isinstance(value, (bytes, str, int, float, bool, type(None))) \
                    or (isinstance(value, (bytes, str)) and len(value) > _CACHED_VALUE):
                self.registers.pop(key, None)  # DList elements and big values: not kept
            else:
                self.registers.pop(key, None)  # re-inserted last: the newest go last
                _trim(self.registers, _CACHED_REGISTERS)
                self.registers[key] = w.data
        elif w.kind == "drop":
            self.forget_registers(w.db_id)

    def forget_registers(self, db_id: str) -> None:
        for key in [k for k in self.registers if k[0] == db_id]:
            del self.registers[key]

    def forget(self, db_id: str) -> None:
        self.objects.pop(db_id, None)
        for key in [k for k in self.auth if k[0] == db_id]:
            del self.auth[key]
        self.forget_registers(db_id)


def _as_map(reply: Any) -> dict[str, bytes]:
    """An HGETALL reply as a dict, whichever connection gave it (a dict or a flat list)."""
    return {(k.decode() if isinstance(k, bytes) else k): v for k, v in _as_raw_map(reply).items()}


def _as_raw_map(reply: Any) -> dict[Any, bytes]:
    """An HGETALL reply as a dict of the fields as sent (bytes)."""
    return dict(reply) if isinstance(reply, dict) else dict(
        zip(reply[::2], reply[1::2], strict=True))


@contextlib.contextmanager
def map_redis_errors() -> Iterator[None]:
    """Translate redis-py exceptions into StoreError subclasses."""
    try:
        yield
    except (redis.ConnectionError, redis.TimeoutError, FileNotFoundError) as exc:
        raise StoreUnavailableError(f"Redis is unreachable: {exc}") from exc
    except (redis.exceptions.SlotNotCoveredError, redis.exceptions.ClusterDownError) as exc:
        raise StoreUnavailableError(f"the Redis Cluster cannot serve: {exc}") from exc
    except (redis.RedisError, RedisClusterException) as exc:
        raise StoreError(f"Redis error: {exc}") from exc


def _retrying(call: Callable[[], Any], cluster: bool) -> Any:
    """``call()``, sent again after a short pause while a cluster answers that its slots
    are moving or a master is away (bounded); at once otherwise."""
    if not cluster:
        return call()
    deadline = time.monotonic() + _RETRY_SECONDS
    pause = 0.02
    while True:
        try:
            return call()
        except _TRANSIENT:
            if time.monotonic() > deadline:
                raise
        time.sleep(pause)
        pause = min(pause * 2, 0.5)


def _glob_escape(text: str) -> str:
    """``text`` with the glob characters of SCAN MATCH escaped."""
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)


def _single_key(cmds: Iterable[tuple[Any, ...]]) -> Iterator[tuple[Any, ...]]:
    """The commands, a DEL of several keys split into one DEL per key."""
    for cmd in cmds:
        if cmd[0] == "DEL" and len(cmd) > 2:
            yield from (("DEL", key) for key in cmd[1:])
        else:
            yield cmd


def _step(guard: str, cmds: Iterable[tuple[Any, ...]]) -> Step:
    """The commit step of ``cmds`` (all in one slot) guarded by ``guard``."""
    kinds: dict[str, str] = {}
    flat: list[Any] = []
    for cmd in cmds:
        for key in cmd[1:] if cmd[0] == "DEL" else cmd[1:2]:
            kinds.setdefault(key, _KEY_KIND[cmd[0]])  # the first use decides: after
            # a DEL, any type will do
        flat.append(len(cmd))
        flat.extend(cmd)
    return [guard, *kinds], "".join(kinds.values()), flat


def _tag(key: str) -> str:
    """The hash tag of one of the store's keys (what lies between its first braces)."""
    start = key.index("{") + 1
    return key[start:key.index("}", start)]


class RedisStore:
    """dmodel's state in one Redis database, or spread over a Redis Cluster.

    (The ``type: ignore`` comments below mark calls that redis-py's ``RedisCluster``
    has but the types-redis stubs leave out or leave untyped.)
    """

    def __init__(self, client: redis.Redis[bytes] | RedisCluster[bytes], prefix: str = "dm:",
                 unix_socket: str | None = None) -> None:
        if "{" in prefix or "}" in prefix:
            raise ConfigurationError(f"the Redis prefix {prefix!r} may not hold braces "
                                     "(the store's keys use them as hash tags)")
        self.client = client
        self.cluster = isinstance(client, RedisCluster)
        # The hot path (one script call per batch, one HGET per field read) goes over a
        # lean connection when the server is a local unix socket (see wire.py).
        self.wire = Wire(unix_socket) if unix_socket else None
        self.prefix = prefix
        p = self.k_global = f"{prefix}{{{prefix}}}"
        self.k_updates, self.k_chain, self.k_head = f"{p}u", f"{p}ch", f"{p}head"
        self.k_log, self.k_models, self.k_meta = f"{p}log", f"{p}models", f"{p}meta"
        self.k_next, self.k_future = f"{p}next", f"{p}fut"
        self.k_pruned = f"{p}pc"
        self.k_indexes = f"{p}ix"
        self.k_journal, self.k_done, self.k_lock = f"{p}jr", f"{p}done", f"{p}lock"
        self._global_slot = key_slot(self.k_done.encode())
        self._indexes: set[tuple[str, str]] | None = None  # loaded from k_indexes
        self.cache = StoreCache()
        self._script_sha = _BATCH_SHA
        self._seq: int | None = None  # next log position; this node is the only writer
        self._journal_pending = True  # until recover() or the first commit looked
        # Journal entries whose steps have all run: deleted by the next commit's global
        # step (one round trip fewer per commit), or by settle() and close().
        self._finished: list[bytes] = []
        # Called between a journaled commit's global step and its other slots' steps
        # (tests make it raise, or kill the process, to check recovery).
        self.after_journal: Callable[[], None] | None = None

    def _next_seq(self) -> int:
        if self._seq is None:
            with map_redis_errors():
                if self.client.type(self.k_log) == b"list":  # type: ignore[no-untyped-call]
                    self._migrate_log()
                self._seq = int(self.client.hget(self.k_meta, "seq") or 0)
        return self._seq

    def _migrate_log(self) -> None:
        """A log written as a LIST (before pruning existed) becomes the position ZSET."""
        uids = self.client.lrange(self.k_log, 0, -1)
        pipe = self.client.pipeline(transaction=True)
        pipe.delete(self.k_log)
        for start in range(0, len(uids), 10_000):
            pipe.zadd(self.k_log, {uid: start + i
                                   for i, uid in enumerate(uids[start:start + 10_000])})
        pipe.hset(self.k_meta, "seq", len(uids))
        pipe.execute()

    def recover(self) -> None:
        """Make the store ready for use on open: rename the keys of a store written with
        the layout before hash tags, and finish a commit a killed node left half done."""
        with map_redis_errors():
            if not self.cluster and self.client.exists(f"{self.prefix}meta"):
                self._migrate_layout()
        self.replay_journal()
        with map_redis_errors():
            if self.client.hget(self.k_meta, "links") != b"1":
                self._drop_stale_links()

    def _drop_stale_links(self) -> None:
        """Drop the chain links that stores written before HEADMAX kept for heads that
        have since been replaced (their updates pruned); once per store."""
        heads = {value[:32] for value in self.chain_heads().values()}
        stale: list[bytes] = []
        batch: list[bytes] = []

        def check() -> None:
            held = self._run([("HEXISTS", self.k_updates, uid) for uid in batch])
            stale.extend(uid for uid, there in zip(batch, held, strict=True) if not there)
            batch.clear()

        for uid in self.chain_links():
            if uid not in heads:
                batch.append(uid)
                if len(batch) >= 1000:
                    check()
        if batch:
            check()
        for start in range(0, len(stale), 1000):
            self._write([("HDEL", self.k_chain, *stale[start:start + 1000])])
        self.client.hset(self.k_meta, "links", b"1")

    def _migrate_layout(self) -> None:
        """Rename every key of the old layout (``P r:Model:oid``...) to its hash-tagged
        name. Each RENAME is atomic and the old meta hash goes last, so a migration cut
        short is picked up where it stopped at the next open."""
        old_meta = f"{self.prefix}meta"
        batch: list[tuple[bytes, str]] = []
        for raw in self.client.scan_iter(match=_glob_escape(self.prefix) + "*", count=1000):
            new = self._new_name(raw.decode(errors="replace"))
            if new is not None and new != self.k_meta:
                batch.append((raw, new))
            if len(batch) >= 1000:
                self._rename(batch)
        self._rename(batch)
        self.client.rename(old_meta, self.k_meta)  # type: ignore[no-untyped-call]

    def _rename(self, batch: list[tuple[bytes, str]]) -> None:
        pipe = self.client.pipeline(transaction=False)
        for old, new in batch:
            pipe.rename(old, new)
        pipe.execute()
        batch.clear()

    def _new_name(self, key: str) -> str | None:
        """The hash-tagged name of a key of the old layout, None for any other key (a
        new one, or another prefix's that happens to start with ours)."""
        rest = key[len(self.prefix):]
        if "{" in rest or "}" in rest:
            return None
        if rest in _OLD_GLOBALS:
            return self.k_global + rest
        kind, _, name = rest.partition(":")
        if kind == "m" and name.isidentifier():
            return self.k_global + rest
        if kind == "i":
            model, _, field = name.partition("#")
            return self.k_global + rest if model.isidentifier() and field else None
        if kind == "l":
            name, _, field = name.partition("#")
            if not field:
                return None
        elif kind not in _OLD_OBJECT_KINDS:
            return None
        model, _, oid = name.partition(":")
        if not (model.isidentifier() and is_oid(oid)):
            return None
        return f"{self.prefix}{kind}:{{{name}}}" + (f"#{field}" if kind == "l" else "")

    # ------------------------------------------------------------------ keys
    def k_obj(self, db_id: str) -> str:
        return f"{self.prefix}o:{{{db_id}}}"

    def k_reg(self, db_id: str) -> str:
        return f"{self.prefix}r:{{{db_id}}}"

    def k_auth(self, db_id: str) -> str:
        return f"{self.prefix}a:{{{db_id}}}"

    def k_wrap(self, db_id: str) -> str:
        return f"{self.prefix}w:{{{db_id}}}"

    def k_hist(self, db_id: str) -> str:
        return f"{self.prefix}h:{{{db_id}}}"

    def k_held(self, db_id: str) -> str:
        return f"{self.prefix}x:{{{db_id}}}"

    def k_last(self, db_id: str) -> str:
        return f"{self.prefix}lw:{{{db_id}}}"

    def k_list(self, db_id: str, name: str) -> str:
        return f"{self.prefix}l:{{{db_id}}}#{name}"

    def k_lists(self, db_id: str) -> str:
        return f"{self.prefix}lf:{{{db_id}}}"

    def k_model(self, model: str) -> str:
        return f"{self.k_global}m:{model}"

    def k_kept(self, db_id: str) -> str:
        return f"{self.prefix}kv:{{{db_id}}}"

    def k_index(self, model: str, field: str) -> str:
        return f"{self.k_global}i:{model}#{field}"

    def k_entries(self, db_id: str) -> str:
        return f"{self.prefix}ie:{{{db_id}}}"

    def k_guard(self, tag: str) -> str:
        """The guard of commit steps in the slot of hash tag ``tag`` (see _WRITE_LUA)."""
        return self.k_done if tag == self.prefix else f"{self.prefix}jd:{{{tag}}}"

    # --------------------------------------------------------------- commits
    def _write(self, cmds: list[tuple[Any, ...]]) -> None:
        """Apply ``cmds`` whole or not at all: one atomic step when their keys are on one
        server, else journaled steps per slot (see the module docstring)."""
        if self._journal_pending:
            self.replay_journal()
        commit_id = time.time_ns().to_bytes(8, "big") + os.urandom(4)
        if not self.cluster:
            self._apply(_step(self.k_done, cmds), commit_id)
            return
        groups: dict[int, tuple[str, list[tuple[Any, ...]]]] = {}
        for cmd in _single_key(cmds):
            tag = _tag(cmd[1])
            slot = key_slot(tag.encode())
            guard = self.k_done if slot == self._global_slot else self.k_guard(tag)
            groups.setdefault(slot, (guard, []))[1].append(cmd)
        finished = self._finished
        if len(groups) == 1:
            ((slot, (guard, group)),) = groups.items()
            if finished and slot == self._global_slot:
                group.append(("HDEL", self.k_journal, *finished))
            elif finished:
                self.settle()  # before a step in another slot: a replay must not follow it
            self._apply(_step(guard, group), commit_id)
            if slot == self._global_slot:
                self._finished = []
            return
        _, global_cmds = groups.pop(self._global_slot, (self.k_done, []))
        steps = [_step(guard, group) for guard, group in groups.values()]
        global_cmds.append(("HSET", self.k_journal, commit_id,
                            msgpack.packb(steps, use_bin_type=True)))
        if finished:  # after the HSET: a key emptied and written again in one script is
            # "a non local key" to Redis while its slot migrates (it exists nowhere)
            global_cmds.append(("HDEL", self.k_journal, *finished))
        self._journal_pending = True
        self._apply(_step(self.k_done, global_cmds), commit_id)
        self._finished = []
        if self.after_journal is not None:
            self.after_journal()
        self._finish(commit_id, steps, lazy=True)

    def _finish(self, commit_id: bytes, steps: Sequence[Step], lazy: bool = False) -> None:
        """Run a journaled commit's slot steps, then drop its journal entry (``lazy``:
        with the next commit's global step). An entry is dropped before any later step
        runs in another slot, so a replay never re-runs a step after a newer one there."""
        for step in steps:
            self._apply(step, commit_id)
        self._journal_pending = False
        if lazy:
            self._finished.append(commit_id)
            return
        with map_redis_errors():
            _retrying(lambda: self.client.hdel(self.k_journal, commit_id), self.cluster)

    def settle(self) -> None:
        """Drop the journal entries of finished commits now (cluster only)."""
        if self._finished:
            finished, self._finished = self._finished, []
            with map_redis_errors():
                _retrying(lambda: self.client.hdel(self.k_journal, *finished), self.cluster)

    def replay_journal(self) -> None:
        """Finish every commit the journal still holds (in commit order; each step is
        idempotent, so a step applied before the interruption is skipped)."""
        with map_redis_errors():
            entries = _retrying(lambda: self.client.hgetall(self.k_journal), self.cluster)
        for commit_id in sorted(entries):
            steps = msgpack.unpackb(entries[commit_id], raw=False)
            self._finish(commit_id, [(keys, kinds, flat) for keys, kinds, flat in steps])
        self._journal_pending = False

    def _apply(self, step: Step, commit_id: bytes) -> None:
        """Run one commit step with _WRITE_LUA (loading the script where it is missing)."""
        keys, kinds, flat = step
        args = ("EVALSHA", _WRITE_SHA, len(keys), *keys, kinds, commit_id, *flat)
        if self.wire is not None:
            reply = self.wire.call(*args)
            if str(reply).startswith("NOSCRIPT"):
                self.wire.check(self.wire.call("SCRIPT", "LOAD", _WRITE_LUA))
                reply = self.wire.call(*args)
            self.wire.check(reply)
            return

        def call() -> Any:
            try:
                return self.client.execute_command(*args)
            except redis.exceptions.NoScriptError:
                # on every master of a cluster
                self.client.script_load(_WRITE_LUA)  # type: ignore[union-attr]
                return self.client.execute_command(*args)

        with map_redis_errors():
            _retrying(call, self.cluster)

    # ------------------------------------------------------------ retention
    def retention_reads(self, pairs: Sequence[tuple[str, str]],
                        chains: Sequence[tuple[str, bytes]] = ()
                        ) -> tuple[list[list[bytes]], list[merge.Register | None], list[bytes]]:
        """For each (object, register): the superseded versions kept and the register now;
        for each (caller, node): its chain head. One round trip."""
        cmds: list[tuple[Any, ...]] = []
        for db_id, name in pairs:
            cmds.append(("HGET", self.k_kept(db_id), name))
            cmds.append(("HGET", self.k_reg(db_id), name))
        cmds.extend(("HGET", self.k_head, f"{caller}|{node.hex()}") for caller, node in chains)
        with map_redis_errors():
            out = self._run(cmds) if cmds else []
        kept = [unpack_versions(v) for v in out[0:2 * len(pairs):2]]
        regs = [merge.Register.unpack(v) if v else None for v in out[1:2 * len(pairs):2]]
        return kept, regs, [(h or b"")[:32] for h in out[2 * len(pairs):]]

    def prune(self, kept: dict[tuple[str, str], list[bytes]], updates: Sequence[Update],
              heads: set[bytes], removed: Sequence[str] = ()) -> None:
        """Atomically record the kept versions and delete ``updates`` (pruned): their raw
        bytes, log and history entries and chain links (a chain head keeps its link, so
        that its successor can still be chained). Registers are never touched."""
        cmds: list[tuple[Any, ...]] = []
        for db_id in removed:
            cmds.append(("DEL", self.k_kept(db_id)))
        for (db_id, name), versions in kept.items():
            if versions:
                cmds.append(("HSET", self.k_kept(db_id), name, pack_versions(versions)))
            else:
                cmds.append(("HDEL", self.k_kept(db_id), name))
        for update in updates:
            uid = update.id
            cmds.append(("HDEL", self.k_updates, uid))
            cmds.append(("ZREM", self.k_log, uid))
            cmds.append(("HDEL", self.k_next, uid))
            if uid not in heads:
                cmds.append(("HDEL", self.k_chain, uid))
            for db_id in sorted({op.obj for op in update.ops}):
                cmds.append(("LREM", self.k_hist(db_id), 0, uid))
                cmds.append(("HINCRBY", self.k_pruned, db_id, 1))
        if cmds:
            with map_redis_errors():
                self._write(cmds)

    def pruned_count(self, db_id: str) -> int:
        """How many updates of ``db_id`` retention pruned here."""
        with map_redis_errors():
            return int(self.client.hget(self.k_pruned, db_id) or 0)

    # ------------------------------------------------------------- pipeline
    def snapshots(self, updates: Sequence[Update], *, local: bool = False,
                  registers: bool = True) -> list[Snapshot]:
        """What ``decide`` needs for each update, read in one round trip (each as if alone).

        Object metadata and authorization events come from the cache when present. For
        ``local`` updates (just signed here, so new, correctly chained, and newer than
        every stored version because the node's clock is ahead of all it stored) the
        replay, chain and late-grant reads are skipped, and with ``registers=False`` so
        are the current values of plain fields (only listeners need those).
        """
        cache = self.cache
        cmds: list[tuple[Any, ...]] = []
        plans = []
        for update in updates:
            objects, regs, auth = needs(update)
            known_objects = {o: cache.objects[o] for o in objects if o in cache.objects}
            known_auth = {a: cache.auth[a] for a in auth if a in cache.auth}
            objects_l = sorted(objects - known_objects.keys())
            if local and not registers:
                fresh = {(op.obj, op_register(op, update.id, i))
                         for i, op in enumerate(update.ops) if op.op.startswith("lins")}
                # set/delete of a list element needs its position; a new element does not
                regs = {r for r in regs if "#" in r[1] and r not in fresh}
            known_regs = {r: cache.registers[r] for r in regs if r in cache.registers}
            regs_l = sorted(regs - known_regs.keys())
            auth_l = sorted(auth - known_auth.keys())
            # Which members wrote the object (a grant or revoke re-decides their updates);
            # for a local update only its own grants and revokes need it.
            last_l = sorted(a for a in auth if a[1] == "u"
                            and (not local or a[2] != update.caller))
            grants_l = [] if local else linked_updates(update)
            check_chain = bool(update.prev) and not local
            if not local:
                cmds.append(("HEXISTS", self.k_updates, update.id))
            if check_chain:
                cmds.append(("HGET", self.k_chain, update.prev))
                cmds.append(("HGET", self.k_next, update.prev))
                cmds.append(("HGET", self.k_head, f"{update.caller}|{update.node.hex()}"))
            cmds.extend(("GET", self.k_obj(db_id)) for db_id in objects_l)
            cmds.extend(("HGET", self.k_reg(db_id), name) for db_id, name in regs_l)
            cmds.extend(("HGET", self.k_auth(db_id), f"{kind}:{member}")
                        for db_id, kind, member in auth_l)
            cmds.extend(("ZSCORE", self.k_last(db_id), member) for db_id, _, member in last_l)
            cmds.extend(("HEXISTS", self.k_updates, uid) for uid in grants_l)
            wraps_l = wrap_keys(update)
            cmds.extend(("HGET", self.k_wrap(db_id), ref + oid.encode())
                        for db_id, ref, oid in wraps_l)
            plans.append((update, known_objects, known_auth, known_regs, objects_l, regs_l,
                          auth_l, last_l, grants_l, wraps_l, check_chain))
        with map_redis_errors():
            results = iter(self._run(cmds)) if cmds else iter(())
        snaps = []
        for (update, known_objects, known_auth, known_regs, objects_l, regs_l, auth_l, last_l,
             grants_l, wraps_l, check_chain) in plans:
            # A local update's seen/chain facts come from the applier's local rule.
            snap = Snapshot(seen=False if local else bool(next(results)))
            if check_chain:
                link, sibling, head = next(results), next(results), next(results)
                if link:
                    snap.prev_chain = (link[16:].decode(), link[:16])
                elif head and len(head) == 40:
                    snap.head_timestamp = int.from_bytes(head[32:], "big")
                    cache.put_head(f"{update.caller}|{update.node.hex()}", snap.head_timestamp)
                snap.equivocation = sibling is not None and sibling != update.id
            state = snap.state
            state.objects.update(known_objects)
            for db_id in objects_l:
                data = next(results)
                if data:
                    state.objects[db_id] = cache.put_object(db_id, merge.ObjectMeta.unpack(data))
            state.registers.update(known_regs)
            for key in regs_l:
                data = next(results)
                if data:
                    state.registers[key] = merge.Register.unpack(data)
            state.auth.update(known_auth)
            for akey in auth_l:
                state.auth[akey] = cache.put_auth(akey, merge.unpack_auth(next(results)))
            for db_id, _, member in last_l:
                last = next(results)
                if last is not None:
                    state.last_write[(db_id, member)] = int(last)
            for uid in grants_l:
                if next(results):
                    snap.stored.add(uid)
            for wkey in wraps_l:
                wrapped = next(results)
                if wrapped is not None:
                    state.wraps[wkey] = wrapped
            snaps.append(snap)
        return snaps

    def commit_many(self, items: list[tuple[Update, list[merge.Write] | None]], *,
                    hlc: int) -> list[int]:
        """Store several updates and their writes in one atomic step (one Lua call).

        Returns each update's sequence number in the log.
        """
        cmds: list[tuple[Any, ...]] = []
        log_positions = []
        added: dict[str, set[str]] = {}  # list fields created by earlier items of this batch
        seq = self._next_seq()
        with map_redis_errors():
            for update, writes in items:
                for w in writes or ():
                    if w.kind == "list_add":
                        added.setdefault(w.db_id, set()).add(w.name)
                dropped = [w.db_id for w in writes or () if w.kind == "drop"]
                list_keys = self._list_keys(dropped) if dropped else []
                for db_id in dropped:
                    list_keys.extend(self.k_list(db_id, n) for n in added.pop(db_id, ()))
                log_positions.append(seq)
                self._update_commands(cmds, update, writes, list_keys, seq)
                seq += 1
            cmds.extend(self._index_commands([w for _, ws in items for w in ws or ()]))
            cmds.append(("HSET", self.k_meta, "hlc", hlc))
            cmds.append(("HSET", self.k_meta, "seq", seq))
            try:
                self._write(cmds)
            except BaseException:
                self._seq = None  # read again: the commit may or may not have happened
                for _, writes in items:
                    for w in writes or ():
                        self.cache.registers.pop((w.db_id, w.name), None)
                raise
        self._seq = seq
        for update, writes in items:
            self.cache.put_head(f"{update.caller}|{update.node.hex()}", update.timestamp)
            for w in writes or ():
                self.cache.note(w)
        return [p + 1 for p in log_positions]

    def _update_commands(self, cmds: list[tuple[Any, ...]], update: Update,
                         writes: list[merge.Write] | None, list_keys: list[str],
                         seq: int) -> None:
        uid = update.id
        touched = sorted({op.obj for op in update.ops})
        cmds.append(("HSET", self.k_updates, uid, update.raw))
        cmds.append(("HSET", self.k_chain, uid, update.node + update.caller.encode()))
        chain = f"{update.caller}|{update.node.hex()}"
        if self.cache.heads.get(chain, -1) < update.timestamp:  # else it is not newer
            cmds.append(("HEADMAX", self.k_head, chain, uid + update.timestamp.to_bytes(8, "big"),
                         self.k_updates, self.k_chain))
        cmds.append(("ZADD", self.k_log, seq, uid))
        if update.prev:
            cmds.append(("HSETNX", self.k_next, update.prev, uid))
        ms = physical_ms(update.timestamp)
        for db_id in sorted({op.obj for op in update.ops if op.obj != update.caller}):
            cmds.append(("ZADD", self.k_last(db_id), "GT", ms, update.caller))
        if writes is None:
            for db_id in touched:
                cmds.append(("RPUSH", self.k_held(db_id), uid))
                cmds.append(("LTRIM", self.k_held(db_id), -HELD_CAP, -1))
            return
        for db_id in touched:
            cmds.append(("RPUSH", self.k_hist(db_id), uid))
        for w in writes:
            self._write_commands(cmds, w)
        if list_keys:
            cmds.append(("DEL", *list_keys))

    def _write_commands(self, cmds: list[tuple[Any, ...]], w: merge.Write) -> None:
        if w.kind == "register":
            cmds.append(("HSET", self.k_reg(w.db_id), w.name, w.data.pack()))
        elif w.kind == "object":
            cmds.append(("SET", self.k_obj(w.db_id), w.data.pack()))
            model, _, oid = w.db_id.partition(":")
            cmds.append(("SADD", self.k_model(model), oid))
            cmds.append(("SADD", self.k_models, model))
        elif w.kind == "auth":
            cmds.append(("HSET", self.k_auth(w.db_id), w.name, merge.pack_auth(w.data)))
        elif w.kind == "wrap":
            cmds.append(("HSET", self.k_wrap(w.db_id), w.name, w.data))
        elif w.kind == "list_add":
            cmds.append(("ZADD", self.k_list(w.db_id, w.name), 0, w.data))
            cmds.append(("SADD", self.k_lists(w.db_id), w.name))
        elif w.kind == "list_del":
            cmds.append(("ZREM", self.k_list(w.db_id, w.name), w.data))
        elif w.kind == "drop":
            cmds.append(("DEL", self.k_reg(w.db_id), self.k_wrap(w.db_id)))  # lists: see above
        else:  # pragma: no cover - merge only emits the kinds above
            raise ValueError(f"unknown write kind {w.kind}")

    def _run(self, cmds: list[tuple[Any, ...]]) -> list[Any]:
        """Run the read commands ``cmds`` in one round trip (one per master on a cluster);
        their replies in order."""
        if self.wire is not None:
            return self.wire.pipeline(cmds, atomic=False)
        if self.cluster:
            def call() -> list[Any]:
                pipe = self.client.pipeline(transaction=False)
                for cmd in cmds:
                    pipe.execute_command(*cmd)
                return list(pipe.execute())
            return list(_retrying(call, True))
        # Integers go as text: Lua numbers are doubles and would lose digits.
        packed = msgpack.packb([[str(a) if type(a) is int else a for a in cmd] for cmd in cmds],
                               use_bin_type=False)
        try:
            reply = self.client.evalsha(self._script_sha, 0, packed)  # type: ignore[union-attr]
        except redis.exceptions.NoScriptError:
            self._script_sha = self.client.script_load(_BATCH_LUA)  # type: ignore[union-attr]
            reply = self.client.evalsha(self._script_sha, 0, packed)  # type: ignore[union-attr]
        return [None if r is False else r for r in msgpack.unpackb(reply, raw=True)]

    def _list_keys(self, db_ids: list[str]) -> list[str]:
        # Read before the atomic step; safe because the node's apply lock serializes writers.
        keys: list[str] = []
        for db_id in db_ids:
            names = self.client.smembers(self.k_lists(db_id))
            keys.extend(self.k_list(db_id, n.decode()) for n in names)
            keys.append(self.k_lists(db_id))
        return keys

    def replace_object(self, db_id: str, meta: merge.ObjectMeta | None,
                       registers: dict[str, merge.Register], wraps: dict[bytes, bytes],
                       lists: dict[str, set[bytes]], accepted: list[bytes],
                       held: list[bytes]) -> None:
        """Atomically rewrite an object's derived state (after re-deciding its updates)."""
        self.cache.forget(db_id)
        with map_redis_errors():
            old_lists = self._list_keys([db_id])
        cmds: list[tuple[Any, ...]] = [("DEL", self.k_reg(db_id), self.k_wrap(db_id),
                                        self.k_hist(db_id), self.k_held(db_id), *old_lists)]
        writes = [merge.Write("list_add", db_id, name, key)
                  for name, keys in lists.items() for key in sorted(keys)]
        if meta is not None:
            cmds.append(("SET", self.k_obj(db_id), meta.pack()))
        writes += [merge.Write("register", db_id, name, reg) for name, reg in registers.items()]
        writes += [merge.Write("wrap", db_id, name, wrapped) for name, wrapped in wraps.items()]
        for w in writes:
            self._write_commands(cmds, w)
        if accepted:
            cmds.append(("RPUSH", self.k_hist(db_id), *accepted))
        if held:
            cmds.append(("RPUSH", self.k_held(db_id), *held[-HELD_CAP:]))
        with map_redis_errors():
            cmds.extend(self._reindex_commands(db_id, meta, registers))
        self._write(cmds)

    # --------------------------------------------------------- value indexes
    def indexes(self) -> set[tuple[str, str]]:
        """The (model, field) value indexes this store keeps up."""
        if self._indexes is None:
            with map_redis_errors():
                names: Any = self.client.smembers(self.k_indexes)
            found = [n.decode().partition("#") for n in names]
            self._indexes = {(model, field) for model, _, field in found}
        return self._indexes

    def has_index(self, model: str, field: str) -> bool:
        return (model, field) in self.indexes()

    def ensure_index(self, model: str, field: str) -> None:
        """Keep an index of ``model.field`` from now on, built from the registers first
        (under the node's apply lock: the build reads, then writes)."""
        if self.has_index(model, field):
            return
        indexed = {(model, field)}
        key = self.k_index(model, field)
        with map_redis_errors():
            self.client.delete(key)  # what a build cut short left
            members: Any = self.client.smembers(self.k_model(model))
            oids = sorted(o.decode() for o in members)
            for start in range(0, len(oids), 5000):
                db_ids = [f"{model}:{oid}" for oid in oids[start:start + 5000]]
                reads: list[tuple[Any, ...]] = []
                for db_id in db_ids:
                    reads += [("GET", self.k_obj(db_id)), ("HGET", self.k_reg(db_id), field),
                              ("HGET", self.k_entries(db_id), field)]
                out = self._run(reads)
                cmds: list[tuple[Any, ...]] = []
                for i, db_id in enumerate(db_ids):
                    meta, reg, old = out[3 * i:3 * i + 3]
                    live = bool(meta) and merge.ObjectMeta.unpack(meta).removed is None
                    regs = {field: merge.Register.unpack(reg)} if reg else {}
                    self._change_commands(cmds, query.object_changes(
                        db_id, live, regs, indexed, {field: old} if old else {}))
                if cmds:
                    self._write(cmds)
            self.client.sadd(self.k_indexes, f"{model}#{field}")
        self.indexes().add((model, field))

    def index_range(self, model: str, field: str, low: bytes, high: bytes, *,
                    reverse: bool = False, offset: int = 0, count: int = -1) -> list[bytes]:
        """Members of an index between two ZRANGEBYLEX bounds, in order (or backwards)."""
        key = self.k_index(model, field)
        limit = ("LIMIT", offset, count) if offset or count >= 0 else ()
        if reverse:
            return list(self._call("ZREVRANGEBYLEX", key, high, low, *limit))
        return list(self._call("ZRANGEBYLEX", key, low, high, *limit))

    def index_count(self, model: str, field: str, low: bytes, high: bytes) -> int:
        return int(self._call("ZLEXCOUNT", self.k_index(model, field), low, high))

    def index_entries(self, db_id: str) -> dict[str, bytes]:
        """The object's member in each index (field -> member)."""
        with map_redis_errors():
            return _as_map(self.client.hgetall(self.k_entries(db_id)))

    def field_registers(self, db_ids: Sequence[str], name: str) -> list[merge.Register | None]:
        """Register ``name`` of each object (one round trip per 10,000)."""
        out: list[merge.Register | None] = []
        with map_redis_errors():
            for start in range(0, len(db_ids), 10_000):
                cmds = [("HGET", self.k_reg(db_id), name)
                        for db_id in db_ids[start:start + 10_000]]
                out += [merge.Register.unpack(d) if d else None
                        for d in self._run(cmds)]
        return out

    def _index_commands(self, writes: list[merge.Write]) -> list[tuple[Any, ...]]:
        """The index commands of a commit's writes; reads the objects' current entries
        first (safe: the node's apply lock makes it the only writer)."""
        indexed = self.indexes()
        if not indexed:
            return []
        db_ids = query.needs_entries(writes, indexed)
        if not db_ids:
            return []
        current = self._entries(db_ids)
        cmds: list[tuple[Any, ...]] = []
        self._change_commands(cmds, query.index_changes(writes, indexed, current))
        return cmds

    def _reindex_commands(self, db_id: str, meta: merge.ObjectMeta | None,
                          registers: dict[str, merge.Register]) -> list[tuple[Any, ...]]:
        indexed = self.indexes()
        if not any(m == db_id.partition(":")[0] for m, _ in indexed):
            return []
        live = meta is not None and meta.removed is None
        cmds: list[tuple[Any, ...]] = []
        self._change_commands(cmds, query.object_changes(
            db_id, live, registers, indexed, self._entries([db_id]).get(db_id, {})))
        return cmds

    def _entries(self, db_ids: list[str]) -> dict[str, dict[str, bytes]]:
        out = self._run([("HGETALL", self.k_entries(db_id)) for db_id in db_ids])
        return {db_id: _as_map(reply) for db_id, reply in zip(db_ids, out, strict=True)}

    def _change_commands(self, cmds: list[tuple[Any, ...]],
                         changes: list[query.IndexChange]) -> None:
        for c in changes:
            key = self.k_index(c.model, c.field)
            if c.old:
                cmds.append(("ZREM", key, c.old))
            if c.new is not None:
                cmds.append(("ZADD", key, 0, c.new))
                cmds.append(("HSET", self.k_entries(c.db_id), c.field, c.new))
            else:
                cmds.append(("HDEL", self.k_entries(c.db_id), c.field))

    # ---------------------------------------------------------------- reads
    def _call(self, *cmd: Any) -> Any:
        """One command whose reply is a value or a list (the two connections shape maps
        differently); over the lean connection when there is one (see wire.py)."""
        if self.wire is not None:
            return self.wire.check(self.wire.call(*cmd))
        with map_redis_errors():
            return self.client.execute_command(*cmd)

    def object_meta(self, db_id: str) -> merge.ObjectMeta | None:
        meta = self.cache.objects.get(db_id)
        if meta is not None:
            return meta
        data = self._call("GET", self.k_obj(db_id))
        return self.cache.fill_object(db_id, merge.ObjectMeta.unpack(data)) if data else None

    def register(self, db_id: str, name: str) -> merge.Register | None:
        data = self._call("HGET", self.k_reg(db_id), name)
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

    def member_events(self, db_id: str, kind: str, member: str) -> merge.AuthEvents:
        """The authorization events of one member (cached like the snapshots' reads)."""
        key = (db_id, kind, member)
        if key in self.cache.auth:
            return self.cache.auth[key]
        return self.cache.put_auth(key, merge.unpack_auth(
            self._call("HGET", self.k_auth(db_id), f"{kind}:{member}")))

    def hold_future(self, uid: bytes, raw: bytes) -> None:
        """Keep an update whose timestamp is beyond the skew bound, until it is released."""
        self._call("HSET", self.k_future, uid, raw)

    def release_future(self, uids: Sequence[bytes]) -> None:
        if uids:
            self._call("HDEL", self.k_future, *uids)

    def future_updates(self) -> list[bytes]:
        """The held future-dated updates (kept across restarts)."""
        with map_redis_errors():
            return list(self.client.hvals(self.k_future))

    def list_length(self, db_id: str, name: str) -> int:
        return int(self._call("ZCARD", self.k_list(db_id, name)))

    def list_range(self, db_id: str, name: str, start: int = 0, stop: int = -1) -> list[bytes]:
        """Element ids of a DList in list order, ``start``..``stop`` inclusive."""
        return [key[-34:] for key in self.list_keys_range(db_id, name, start, stop)]

    def list_keys_range(self, db_id: str, name: str, start: int, stop: int) -> list[bytes]:
        """Order keys (position + 0x00 + element id) of a DList, ``start``..``stop``."""
        return list(self._call("ZRANGE", self.k_list(db_id, name), start, stop))

    def list_key_below(self, db_id: str, name: str, position: bytes) -> bytes | None:
        """The order key of the last element whose position is below ``position``."""
        keys = self._call("ZREVRANGEBYLEX", self.k_list(db_id, name), b"(" + position + b"\0",
                          b"-", "LIMIT", 0, 1)
        return keys[0] if keys else None

    def wraps(self, db_id: str) -> dict[bytes, bytes]:
        """Key wraps given by later read grants: value ref + reader oid -> wrapped key."""
        with map_redis_errors():
            return dict(self.client.hgetall(self.k_wrap(db_id)))

    def object_states(self, db_ids: Sequence[str]) -> list[ObjectState]:
        """Several objects' states in two round trips (one per master on a cluster)."""
        if not db_ids:
            return []
        cmds: list[tuple[Any, ...]] = []
        for db_id in db_ids:
            cmds += [("GET", self.k_obj(db_id)), ("HGETALL", self.k_reg(db_id)),
                     ("HGETALL", self.k_auth(db_id)), ("HGETALL", self.k_wrap(db_id))]
        with map_redis_errors():
            replies = self._run(cmds)
        parts = []
        for i, db_id in enumerate(db_ids):
            meta, regs, auth, wraps = replies[4 * i:4 * i + 4]
            registers = {k: merge.Register.unpack(v) for k, v in _as_map(regs).items()}
            names = sorted({n.partition("#")[0] for n in registers if "#" in n})
            events: dict[str, dict[str, merge.AuthEvents]] = {"r": {}, "u": {}}
            for key, value in _as_map(auth).items():
                kind, _, member = key.partition(":")
                if kind in events:
                    events[kind][member] = merge.unpack_auth(value)
            wrapped = _as_raw_map(wraps)
            parts.append((db_id, meta, registers, names, events, wrapped))
        lists = [(db_id, name) for db_id, _, _, names, _, _ in parts for name in names]
        with map_redis_errors():
            ranges = self._run([("ZRANGE", self.k_list(d, n), 0, -1) for d, n in lists])
        order = {pair: [key[-34:] for key in keys] for pair, keys in zip(lists, ranges,
                                                                            strict=True)}
        return [ObjectState(merge.ObjectMeta.unpack(meta) if meta else None, registers,
                            {name: order[(db_id, name)] for name in names}, events, wrapped)
                for db_id, meta, registers, names, events, wrapped in parts]

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
        return list(self._call("HMGET", self.k_updates, *uids))

    def missing(self, uids: Sequence[bytes]) -> list[bytes]:
        """The ids among ``uids`` this store does not hold, in order."""
        if not uids:
            return []
        held = self._run([("HEXISTS", self.k_updates, uid) for uid in uids])
        return [uid for uid, present in zip(uids, held, strict=True) if not present]

    def has_update(self, uid: bytes) -> bool:
        with map_redis_errors():
            return bool(self.client.hexists(self.k_updates, uid))

    def chain_head(self, caller: str, node: bytes) -> bytes:
        with map_redis_errors():
            return (self.client.hget(self.k_head, f"{caller}|{node.hex()}") or b"")[:32]

    def chain_heads(self) -> dict[str, bytes]:
        """Every chain head as stored: "caller|node hex" -> update id + its timestamp
        (8 bytes, big-endian), unchecked (``verify`` checks them)."""
        with map_redis_errors():
            return {(k.decode() if isinstance(k, bytes) else k): v
                    for k, v in self.client.hscan_iter(self.k_head, count=1000)}

    def chain_links(self) -> dict[bytes, bytes]:
        """Every chain link as stored: update id -> node id (16 bytes) + caller db_id."""
        with map_redis_errors():
            return dict(self.client.hscan_iter(self.k_chain, count=1000))

    def log_length(self) -> int:
        """The next log position: how many updates this store ever stored."""
        return self._next_seq()

    def log_range(self, start: int = 0, stop: int = -1) -> list[bytes]:
        """Ids of the updates at log positions ``start``..``stop`` (inclusive; -1: to the
        end), in store order. Positions of pruned updates are gaps. A negative ``start``
        counts stored updates from the end (``log_range(-1)``: the last one)."""
        self._next_seq()  # migrates an old LIST log first
        if start < 0:
            return list(self._call("ZRANGE", self.k_log, start, stop))
        return list(self._call("ZRANGEBYSCORE", self.k_log, start,
                               "+inf" if stop < 0 else stop))

    def update_ids(self) -> Iterator[bytes]:
        """The ids of every stored update, in no order (one HKEYS: ~32 bytes per id)."""
        with map_redis_errors():
            return iter(self.client.hkeys(self.k_updates))

    def log_page(self, start: int, limit: int) -> tuple[list[bytes], int]:
        """Up to ``limit`` stored update ids from log position ``start`` on (skipping the
        gaps retention left), and the position to ask from next: past the last id given,
        or the log's end when the page reaches it."""
        end = self._next_seq()
        if end <= start:
            return [], start
        # Only positions below the end read first: a commit running meanwhile (on the
        # apply thread) is in Redis before ``_seq`` moves past it, and a page must not
        # list ids beyond the end it reports.
        out = self._call("ZRANGEBYSCORE", self.k_log, start, f"({end}", "WITHSCORES",
                         "LIMIT", 0, limit)
        if out and isinstance(out[0], list | tuple):  # the cluster client gives pairs
            out = [item for pair in out for item in pair]
        ids, scores = list(out[0::2]), out[1::2]
        if len(ids) < limit or not scores:
            return ids, max(end, start)
        return ids, int(float(scores[-1])) + 1

    def history(self, db_id: str, held: bool = False) -> list[bytes]:
        with map_redis_errors():
            return self.client.lrange(self.k_held(db_id) if held else self.k_hist(db_id), 0, -1)


    def stored_ids(self, db_ids: Sequence[str]) -> list[list[bytes]]:
        """Per object: the ids of its stored updates, accepted then held (one round trip)."""
        if not db_ids:
            return []
        cmds: list[tuple[Any, ...]] = []
        for db_id in db_ids:
            cmds += [("LRANGE", self.k_hist(db_id), 0, -1), ("LRANGE", self.k_held(db_id), 0, -1)]
        with map_redis_errors():
            out = self._run(cmds)
        return [list(out[2 * i]) + list(out[2 * i + 1]) for i in range(len(db_ids))]
    def models(self) -> list[str]:
        with map_redis_errors():
            return sorted(m.decode() for m in self.client.smembers(self.k_models))

    def object_ids(self, model: str | None = None) -> list[str]:
        """db_ids of known objects (removed ones included; see object_meta)."""
        models = [model] if model else self.models()
        out: list[str] = []
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
        with contextlib.suppress(StoreError, redis.RedisError):
            self.settle()
        if self.wire is not None:
            self.wire.close()
        with contextlib.suppress(redis.RedisError):
            self.client.close()
