"""The Redis store: snapshot reads for the pipeline, atomic commits, log and history.

Key layout. ``P`` is the prefix (``dm:`` by default; no ``{`` or ``}`` in it). A store
is laid out in one shard or in 64 (``RedisStore.shards``): one on a single server (the
layout every store had before shards), 64 for a new store on a Redis Cluster (or
``DMODEL_REDIS_SHARDS=64``). The count is recorded in the store's meta hash and never
changes in place. Shard ``s`` is the bucket group of the objects in it
(``dmodel.buckets``: ``bucket_of(db_id) // 64``), its hash tag ``T`` is ``P`` with one
shard and ``P<s>`` with 64 (``dm:17``), and ``S`` is ``P{T}``. An object's keys carry its
shard's tag, and an update belongs to its signer's shard, so every key a signed update
of one object writes is in one slot: a commit of it is one atomic step there. With one
shard, an object's keys carry the object itself as tag (``{db_id}``; ``S`` is then the
global ``P{P}``, so nothing changed for stores of one server)::

    S u                HASH  update id -> raw signed update (the shard's signers' updates)
    S ch               HASH  update id -> node id (16 bytes) + caller db_id   (chain links; a
                             pruned update keeps its link while it is its chain's head)
    S head             HASH  caller db_id + "|" + node hex -> id of the latest update of that chain
                             + its timestamp (8 bytes, big-endian)
    S log              ZSET  update id -> its position here (store order, one sequence over
                             all shards); pruned updates leave a gap, so positions never move
    S pc               HASH  db_id -> number of its updates pruned by retention
    S next             HASH  update id -> id of the update that named it as previous
    S m:{Model}        SET   oids of the shard's known objects of that model
    S models           SET   model names of the shard's objects
    S i:{Model}#{field} ZSET value index of the shard's objects: members order-preserving
                             value key + 0x00 + oid, all with score 0 (see dmodel/query.py)
    S meta             HASH  "hlc" -> greatest timestamp committed there, "seq" -> next log
                             position after its last commit (the store's: their maxima)
    S jr               HASH  commit id -> the other slots' steps of a commit spanning slots
                             that led here, until they are all applied (the journal)
    S done             STR   id of the last commit step applied in this slot
    P{P} meta          HASH  "epoch" -> random id of this store, "shards", "links",
                             "cursor:<peer hex>" -> [epoch, position] read so far in that
                             peer's log (catch-up); with one shard also "hlc" and "seq"
    P{P} ix            SET   "Model#field" of each value index this store keeps up
    P{P} fut           HASH  update id -> raw update held for its future timestamp
    P{P} lock          STR   node id, pid and host of the node using this store (expiring)
    P kv:{T}db_id      HASH  register name -> superseded versions kept by retention (packed)
    P o:{T}db_id       STR   packed ObjectMeta (public keys, create version, removal version)
    P r:{T}db_id       HASH  register name -> packed Register (value + version + update ref)
    P a:{T}db_id       HASH  "r:"/"u:" + member db_id -> packed authorization events
    P w:{T}db_id       HASH  value ref (34 bytes) + reader oid -> wrapped key (later read grants)
    P h:{T}db_id       LIST  ids of accepted updates touching the object (history)
    P x:{T}db_id       LIST  ids of held (unauthorized) updates touching the object, capped
    P lw:{T}db_id      ZSET  caller db_id -> greatest timestamp (ms) of its ops on the object,
                             for callers other than the object itself (late-grant detection)
    P l:{T}db_id#{field} ZSET live DList elements: members position + 0x00 + element id, all
                             with score 0, so lexicographic order is list order
    P lf:{T}db_id      SET   names of the object's DList fields
    P ie:{T}db_id      HASH  indexed field -> the object's member in that index
    P jd:{db_id}       STR   (one shard, cluster) id of the last step applied in the slot

(The braces are literal: ``dm:r:{dm:17}Person:abc...``, or ``dm:r:{Person:abc...}`` with
one shard.) Reads that span shards run as one pipeline (one round trip per master): a
log page merges the shards' logs by position, a query merges the shards' index ranges,
and a read of an update by id alone goes to the shard that commits and log reads noted
for it, or to every shard. A store written with the layout before hash tags
(``dm:r:Person:abc...``, ``dm:u``...) is renamed key by key into the one-shard layout
when it is opened (``RedisStore.recover``), which is safe to cut short and run again.

Commits. All the writes of an update (or a batch) are decided first, then sent as one
script call (``_WRITE_LUA``) that checks the type of every key it writes before the first
write, so a commit either happens whole or not at all: a hand-edited key of the wrong
type fails it with nothing written, and ``maxmemory`` refuses a script at its first
write. The script also records the commit step's id (the slot's guard, ``S done``) and
skips a step already applied, so a call re-sent after a lost reply changes nothing. On
one Redis every commit is that one atomic step (it reaches the AOF as one unit, so a
crash never leaves half an update). On a Redis Cluster the writes are grouped by slot.
A write to one object is one step. An update over objects in several slots (a
transaction over several objects, a grant, a batch applied at a peer), a pruning pass
or an index build is journaled: the lead step (the first slot's, holding the journal)
also writes the other slots' steps into its journal; then each slot's step runs (atomic
in its slot, idempotent; together in one pipeline, a step it could not run again alone);
the finished entry goes with the next commit's step in that slot (or at
``settle``/``close``), never after a later step in another slot, so a replay never
re-runs a step behind a newer one. A node killed in between finishes the
update when it opens the store again (``recover`` replays every shard's journal in
commit order; a finished entry's steps are skipped by their guards), and any later
commit first finishes one left pending. A reader may thus see one object's part of a
multi-object update before another's, never a part of one object's writes. The
register keeps the update's version, whose last 34 bytes are the update id and op
index: that is how any read is verified against the signed update (``verified=True``
reads, ``dmodel verify``).
"""

from __future__ import annotations

import contextlib
import hashlib
import heapq
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
from ..buckets import BUCKETS_PER_GROUP, GROUPS, bucket_of
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
_ARGS_PER_COMMAND = 1000  # ids in one command of a commit step (Lua unpacks ~8,000 at most)


def _chunks(items: list[Any], size: int = _ARGS_PER_COMMAND) -> Iterator[list[Any]]:
    """``items`` in slices of at most ``size`` (one command's worth)."""
    for at in range(0, len(items), size):
        yield items[at:at + size]


_SCALARS = frozenset({int, float, bool, type(None)})  # exact types: a subclass is read again


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
        kind = w.kind
        if kind == "register":
            registers, key = self.registers, (w.db_id, w.name)
            registers.pop(key, None)  # re-inserted last: the newest go last
            value = w.data.value
            kept = type(value) in _SCALARS or (
                type(value) in (bytes, str) and len(value) <= _CACHED_VALUE)
            if kept and "#" not in w.name:  # DList elements and big values: not kept
                if len(registers) >= _CACHED_REGISTERS:
                    _trim(registers, _CACHED_REGISTERS)
                registers[key] = w.data
        elif kind == "object":
            self.put_object(w.db_id, w.data)
        elif kind == "auth":
            member_kind, _, member = w.name.partition(":")
            self.put_auth((w.db_id, member_kind, member), w.data)
        elif kind == "drop":
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
                 unix_socket: str | None = None, shards: int | None = None) -> None:
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
        self.k_meta, self.k_future, self.k_indexes = f"{p}meta", f"{p}fut", f"{p}ix"
        self.k_journal, self.k_done, self.k_lock = f"{p}jr", f"{p}done", f"{p}lock"
        self.shards = self._shard_count(shards)
        # The hash tag of each shard (one: the global tag) and its keys' common start.
        self._tags = [prefix] if self.shards == 1 else [f"{prefix}{s}" for s in range(self.shards)]
        self._g = [f"{prefix}{{{tag}}}" for tag in self._tags]
        self._journal_tags = set(self._tags) | {prefix}
        # On one shard, the per-shard keys are the global ones (the layout before shards).
        self.k_updates, self.k_chain, self.k_head = f"{p}u", f"{p}ch", f"{p}head"
        self.k_log, self.k_models, self.k_next, self.k_pruned = (
            f"{p}log", f"{p}models", f"{p}next", f"{p}pc")
        self._shard_cache: dict[str, int] = {}
        # Which shard holds an update (by id), as commits and log reads here saw it: a
        # read by id alone tries that shard first, and every shard when it is not known.
        self._homes: dict[bytes, int] = {}
        self._indexes: set[tuple[str, str]] | None = None  # loaded from k_indexes
        self.cache = StoreCache()
        self._script_sha = _BATCH_SHA
        self._seq: int | None = None  # next log position; this node is the only writer
        self._journal_pending = True  # until recover() or the first commit looked
        # Journal entries whose steps have all run, and the journal holding them: deleted
        # by the next commit's step in that journal's slot (one round trip fewer per
        # commit), or by settle() and close().
        self._finished: list[bytes] = []
        self._finished_journal = self.k_journal
        # Called between a journaled commit's lead step and its other slots' steps
        # (tests make it raise, or kill the process, to check recovery).
        self.after_journal: Callable[[], None] | None = None

    def _shard_count(self, wanted: int | None) -> int:
        """How many shards this store's layout has: as recorded in its meta hash (a store
        keeps its layout; ``wanted`` is for a new one), else ``wanted``, else 64 for a new
        store on a cluster and 1 on one server. A store written before shards has one."""
        if wanted not in (None, 1, GROUPS):
            raise ConfigurationError(f"a store has 1 or {GROUPS} shards, not {wanted}")
        with map_redis_errors():
            found = _retrying(lambda: self.client.hget(self.k_meta, "shards"), self.cluster)
            if found is None:
                if wanted in (None, 1) and not self.cluster:
                    return 1  # (not recorded: the layout of every store before shards)
                existing = _retrying(lambda: self.client.exists(self.k_meta), self.cluster)
                count = 1 if existing else (wanted or GROUPS)
                _retrying(lambda: self.client.hsetnx(self.k_meta, "shards", count), self.cluster)
                found = _retrying(lambda: self.client.hget(self.k_meta, "shards"), self.cluster)
        return int(found or 1)

    def shard_of(self, db_id: str) -> int:
        """The shard of an object: its keys, and those of the updates it signs, live in
        that shard's slot (its bucket group, as the state sums group objects)."""
        if self.shards == 1:
            return 0
        shard = self._shard_cache.get(db_id)
        if shard is None:
            _trim(self._shard_cache, 200_000)
            shard = self._shard_cache[db_id] = bucket_of(db_id) // BUCKETS_PER_GROUP
        return shard

    def _key(self, shard: int, name: str) -> str:
        """A per-shard key: ``u``, ``ch``, ``head``, ``log``, ``next``, ``meta``, ``pc``,
        ``models``, ``m:Model``, ``i:Model#field``, ``jr`` or ``done``."""
        return self._g[shard] + name

    def _home(self, update: Update) -> int:
        """The shard holding an update: its signer's."""
        return self.shard_of(update.caller)

    def _note_home(self, uid: bytes, shard: int) -> None:
        if self.shards > 1:
            _trim(self._homes, 200_000)
            self._homes[uid] = shard

    def _next_seq(self) -> int:
        if self._seq is None:
            with map_redis_errors():
                if self.shards == 1:
                    if self.client.type(self.k_log) == b"list":  # type: ignore[no-untyped-call]
                        self._migrate_log()
                    self._seq = int(self.client.hget(self.k_meta, "seq") or 0)
                else:  # each commit notes the next position in the shards it logs in
                    self._seq = max(int(v or 0) for v in self._run(
                        [("HGET", k, "seq") for k in self._shard_metas()]))
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
        with map_redis_errors():  # (a store of shards was written with HEADMAX from the start)
            if self.shards == 1 and self.client.hget(self.k_meta, "links") != b"1":
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
        for part in _chunks(stale):
            self._write([("HDEL", self.k_chain, *part)])
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
    def _okey(self, kind: str, db_id: str) -> str:
        """A key of one object: tagged with the object on one shard, else its shard."""
        if self.shards == 1:
            return f"{self.prefix}{kind}:{{{db_id}}}"
        return f"{self.prefix}{kind}:{{{self._tags[self.shard_of(db_id)]}}}{db_id}"

    def k_obj(self, db_id: str) -> str:
        return self._okey("o", db_id)

    def k_reg(self, db_id: str) -> str:
        return self._okey("r", db_id)

    def k_auth(self, db_id: str) -> str:
        return self._okey("a", db_id)

    def k_wrap(self, db_id: str) -> str:
        return self._okey("w", db_id)

    def k_hist(self, db_id: str) -> str:
        return self._okey("h", db_id)

    def k_held(self, db_id: str) -> str:
        return self._okey("x", db_id)

    def k_last(self, db_id: str) -> str:
        return self._okey("lw", db_id)

    def k_list(self, db_id: str, name: str) -> str:
        return f"{self._okey('l', db_id)}#{name}"

    def k_lists(self, db_id: str) -> str:
        return self._okey("lf", db_id)

    def k_model(self, model: str, shard: int = 0) -> str:
        return self._key(shard, f"m:{model}")

    def k_kept(self, db_id: str) -> str:
        return self._okey("kv", db_id)

    def k_index(self, model: str, field: str, shard: int = 0) -> str:
        return self._key(shard, f"i:{model}#{field}")

    def k_entries(self, db_id: str) -> str:
        return self._okey("ie", db_id)

    def k_guard(self, tag: str) -> str:
        """The guard of commit steps in the slot of hash tag ``tag`` (see _WRITE_LUA)."""
        if tag in self._journal_tags:
            return f"{self.prefix}{{{tag}}}done"
        return f"{self.prefix}jd:{{{tag}}}"

    def journal_keys(self) -> list[str]:
        """Every journal of the store: the global slot's, and each shard's."""
        return list(dict.fromkeys([self.k_journal, *(self._key(s, "jr")
                                                     for s in range(self.shards))]))

    def journal_size(self) -> int:
        """How many journal entries the store holds (commits across slots not yet
        finished or not yet dropped; always 0 on one server)."""
        with map_redis_errors():
            return sum(int(n) for n in self._run([("HLEN", k) for k in self.journal_keys()]))

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
        groups: dict[int, tuple[list[str], list[tuple[Any, ...]]]] = {}  # slot -> tags, cmds
        for cmd in _single_key(cmds):
            tag = _tag(cmd[1])
            tags, group = groups.setdefault(key_slot(tag.encode()), ([], []))
            if tag not in tags:
                tags.append(tag)
            group.append(cmd)
        finished, journal = self._finished, self._finished_journal
        finished_slot = key_slot(_tag(journal).encode())
        if len(groups) == 1:
            ((slot, (tags, group)),) = groups.items()
            if finished and slot == finished_slot:
                group.append(("HDEL", journal, *finished))
            elif finished:
                self.settle()  # before a step in another slot: a replay must not follow it
            self._apply(_step(self.k_guard(tags[0]), group), commit_id)
            if slot == finished_slot:
                self._finished = []
            return
        # The lead step writes the other steps into its slot's journal, then they run.
        if finished and finished_slot in groups:
            lead, lead_tag = finished_slot, _tag(journal)
        else:
            if finished:
                self.settle()
            lead_tag = next((t for tags, _ in groups.values() for t in tags
                             if t in self._journal_tags), self.prefix)
            lead = key_slot(lead_tag.encode())  # on one shard, the global slot leads
            journal = f"{self.prefix}{{{lead_tag}}}jr"
        _, lead_cmds = groups.pop(lead, ([lead_tag], []))
        steps = [_step(self.k_guard(tags[0]), group) for tags, group in groups.values()]
        lead_cmds.append(("HSET", journal, commit_id, msgpack.packb(steps, use_bin_type=True)))
        if self._finished:  # after the HSET: a key emptied and written again in one script
            # is "a non local key" to Redis while its slot migrates (it exists nowhere)
            lead_cmds.append(("HDEL", journal, *self._finished))
        self._journal_pending = True
        self._apply(_step(self.k_guard(lead_tag), lead_cmds), commit_id)
        self._finished, self._finished_journal = [], journal
        if self.after_journal is not None:
            self.after_journal()
        self._finish(journal, commit_id, steps, lazy=True)

    def _finish(self, journal: str, commit_id: bytes, steps: Sequence[Step],
                lazy: bool = False) -> None:
        """Run a journaled commit's slot steps, then drop its journal entry (``lazy``:
        with the next commit's step in that journal's slot). An entry is dropped before
        any later step runs in another slot, so a replay never re-runs a step after a
        newer one there."""
        self._apply_all(steps, commit_id)
        self._journal_pending = False
        if lazy:
            self._finished.append(commit_id)
            return
        with map_redis_errors():
            _retrying(lambda: self.client.hdel(journal, commit_id), self.cluster)

    def settle(self) -> None:
        """Drop the journal entries of finished commits now (cluster only)."""
        if self._finished:
            finished, self._finished = self._finished, []
            with map_redis_errors():
                _retrying(lambda: self.client.hdel(self._finished_journal, *finished),
                          self.cluster)

    def replay_journal(self) -> None:
        """Finish every commit the journals still hold (in commit order; each step is
        idempotent, so a step applied before the interruption is skipped)."""
        journals = self.journal_keys()
        with map_redis_errors():
            replies = self._run([("HGETALL", k) for k in journals])
        entries = sorted((commit_id, journal, steps) for journal, reply in
                         zip(journals, replies, strict=True)
                         for commit_id, steps in _as_raw_map(reply).items())
        for commit_id, journal, packed in entries:
            steps = msgpack.unpackb(packed, raw=False)
            self._finish(journal, commit_id, [(keys, kinds, flat) for keys, kinds, flat in steps])
        self._journal_pending = False

    def _apply_all(self, steps: Sequence[Step], commit_id: bytes) -> None:
        """Run the steps of one commit, each in its own slot: in one pipeline on a
        cluster (one round trip per master, not one per step). They are independent and
        each is idempotent, so a step the pipeline did not complete (a moving slot, a
        master without the script) is simply run again on its own."""
        if len(steps) < 2 or not self.cluster or self.wire is not None:
            for step in steps:
                self._apply(step, commit_id)
            return
        pipe = self.client.pipeline(transaction=False)
        for keys, kinds, flat in steps:
            pipe.execute_command("EVALSHA", _WRITE_SHA, len(keys), *keys, kinds, commit_id,
                                 *flat)
        try:
            replies = pipe.execute(raise_on_error=False)
        except (redis.RedisError, OSError):
            replies = [None] * len(steps)  # (each step again, on its own)
        for step, reply in zip(steps, replies, strict=True):
            if reply is None or isinstance(reply, Exception):
                self._apply(step, commit_id)

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
        cmds.extend(("HGET", self._key(self.shard_of(caller), "head"), f"{caller}|{node.hex()}")
                    for caller, node in chains)
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
        # One command per shard and kind, naming every pruned update (not four each).
        gone: dict[str, list[bytes]] = {}  # shard prefix -> pruned ids
        unlinked: dict[str, list[bytes]] = {}  # ... of them, those whose link goes too
        counts: dict[str, int] = {}  # object -> its updates pruned now
        for update in updates:
            uid, g = update.id, self._g[self._home(update)]
            gone.setdefault(g, []).append(uid)
            if uid not in heads:
                unlinked.setdefault(g, []).append(uid)
            for db_id in sorted({op.obj for op in update.ops}):
                cmds.append(("LREM", self.k_hist(db_id), 0, uid))
                counts[db_id] = counts.get(db_id, 0) + 1
        for g, uids in gone.items():
            for part in _chunks(uids):
                cmds += [("HDEL", g + "u", *part), ("ZREM", g + "log", *part),
                         ("HDEL", g + "next", *part)]
        for g, uids in unlinked.items():
            cmds.extend(("HDEL", g + "ch", *part) for part in _chunks(uids))
        cmds.extend(("HINCRBY", self._key(self.shard_of(db_id), "pc"), db_id, n)
                    for db_id, n in counts.items())
        if cmds:
            with map_redis_errors():
                self._write(cmds)

    def pruned_count(self, db_id: str) -> int:
        """How many updates of ``db_id`` retention pruned here."""
        with map_redis_errors():
            return int(self.client.hget(self._key(self.shard_of(db_id), "pc"), db_id) or 0)

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
            g = self._g[self._home(update)]  # the chain's (prev has the same signer)
            if not local:
                cmds.append(("HEXISTS", g + "u", update.id))
            if check_chain:
                cmds.append(("HGET", g + "ch", update.prev))
                cmds.append(("HGET", g + "next", update.prev))
                cmds.append(("HGET", g + "head", f"{update.caller}|{update.node.hex()}"))
            cmds.extend(("GET", self.k_obj(db_id)) for db_id in objects_l)
            cmds.extend(("HGET", self.k_reg(db_id), name) for db_id, name in regs_l)
            cmds.extend(("HGET", self.k_auth(db_id), f"{kind}:{member}")
                        for db_id, kind, member in auth_l)
            cmds.extend(("ZSCORE", self.k_last(db_id), member) for db_id, _, member in last_l)
            grants_n = []
            for uid in grants_l:
                held_checks = self._held_commands(uid)
                grants_n.append(len(held_checks))
                cmds.extend(held_checks)
            wraps_l = wrap_keys(update)
            cmds.extend(("HGET", self.k_wrap(db_id), ref + oid.encode())
                        for db_id, ref, oid in wraps_l)
            plans.append((update, known_objects, known_auth, known_regs, objects_l, regs_l,
                          auth_l, last_l, list(zip(grants_l, grants_n, strict=True)), wraps_l,
                          check_chain))
        with map_redis_errors():
            results = iter(self._run(cmds)) if cmds else iter(())
        snaps = []
        # A previous update of the same caller in this batch is linked by the batch
        # itself (batch.py), so only the others are looked for in the other shards.
        unlinked: list[tuple[Snapshot, Update]] = []
        batch_callers = {u.id: u.caller for u in updates} if self.shards > 1 else {}
        for (update, known_objects, known_auth, known_regs, objects_l, regs_l, auth_l, last_l,
             grant_checks, wraps_l, check_chain) in plans:
            # A local update's seen/chain facts come from the applier's local rule.
            snap = Snapshot(seen=False if local else bool(next(results)))
            if check_chain:
                link, sibling, head = next(results), next(results), next(results)
                if link:
                    snap.prev_chain = (link[16:].decode(), link[:16])
                elif self.shards > 1 and batch_callers.get(update.prev) != update.caller:
                    unlinked.append((snap, update))
                if not link and head and len(head) == 40:
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
            for uid, checks in grant_checks:
                if any([next(results) for _ in range(checks)]):
                    snap.stored.add(uid)
            for wkey in wraps_l:
                wrapped = next(results)
                if wrapped is not None:
                    state.wraps[wkey] = wrapped
            snaps.append(snap)
        if unlinked:
            self._foreign_links(unlinked)
        return snaps

    def _foreign_links(self, unlinked: list[tuple[Snapshot, Update]]) -> None:
        """The chain links of previous updates not in their successor's shard: an update
        naming another signer's update as its previous one (its chain is broken, and
        ``decide`` must see that, not wait for a previous update that is here)."""
        cmds: list[tuple[Any, ...]] = []
        spans = []
        for _, update in unlinked:
            home = self._home(update)
            shards = [s for s in self._candidate_shards(update.prev) if s != home]
            spans.append(len(shards))
            cmds.extend(("HGET", self._key(s, "ch"), update.prev) for s in shards)
        with map_redis_errors():
            results = iter(self._run(cmds)) if cmds else iter(())
        for (snap, _), span in zip(unlinked, spans, strict=True):
            links = [link for link in [next(results) for _ in range(span)] if link]
            if links:
                snap.prev_chain = (links[0][16:].decode(), links[0][:16])

    def commit_many(self, items: list[tuple[Update, list[merge.Write] | None]], *,
                    hlc: int) -> list[int]:
        """Store several updates and their writes in one atomic step (one Lua call).

        Returns each update's sequence number in the log.
        """
        cmds: list[tuple[Any, ...]] = []
        log_positions = []
        added: dict[str, set[str]] = {}  # list fields created by earlier items of this batch
        appends: dict[tuple[str, str], list[Any]] = {}  # (command, key) -> its arguments
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
                self._update_commands(cmds, appends, update, writes, list_keys, seq)
                seq += 1
            # The log entries of the whole batch: one command per key, in commit order
            # (what each appends is read by no other command of the step).
            grouped: list[tuple[Any, ...]] = []
            for (command, key), args in appends.items():
                per = _ARGS_PER_COMMAND if command == "RPUSH" else _ARGS_PER_COMMAND * 2
                grouped.extend((command, key, *part) for part in _chunks(args, per))
            cmds[:0] = grouped
            cmds.extend(self._index_commands([w for _, ws in items for w in ws or ()]))
            for shard in sorted({self._home(update) for update, _ in items}):
                cmds.append(("HSET", self._key(shard, "meta"), "hlc", hlc, "seq", seq))
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
            self._note_home(update.id, self._home(update))
            self.cache.put_head(f"{update.caller}|{update.node.hex()}", update.timestamp)
            for w in writes or ():
                self.cache.note(w)
        return [p + 1 for p in log_positions]

    def _update_commands(self, cmds: list[tuple[Any, ...]],
                         appends: dict[tuple[str, str], list[Any]], update: Update,
                         writes: list[merge.Write] | None, list_keys: list[str],
                         seq: int) -> None:
        """The commands storing ``update``: into ``cmds``, and what it adds to the log
        keys (raw bytes, chain link, log position, history) into ``appends``."""
        uid, g = update.id, self._g[self._home(update)]
        touched = sorted({op.obj for op in update.ops})
        appends.setdefault(("HSET", g + "u"), []).extend((uid, update.raw))
        appends.setdefault(("HSET", g + "ch"), []).extend(
            (uid, update.node + update.caller.encode()))
        appends.setdefault(("ZADD", g + "log"), []).extend((seq, uid))
        chain = f"{update.caller}|{update.node.hex()}"
        if self.cache.heads.get(chain, -1) < update.timestamp:  # else it is not newer
            cmds.append(("HEADMAX", g + "head", chain, uid + update.timestamp.to_bytes(8, "big"),
                         g + "u", g + "ch"))
        if update.prev:
            cmds.append(("HSETNX", g + "next", update.prev, uid))
        ms = physical_ms(update.timestamp)
        for db_id in sorted({op.obj for op in update.ops if op.obj != update.caller}):
            cmds.append(("ZADD", self.k_last(db_id), "GT", ms, update.caller))
        if writes is None:
            for db_id in touched:
                cmds.append(("RPUSH", self.k_held(db_id), uid))
                cmds.append(("LTRIM", self.k_held(db_id), -HELD_CAP, -1))
            return
        for db_id in touched:
            appends.setdefault(("RPUSH", self.k_hist(db_id)), []).append(uid)
        self._writes_commands(cmds, writes)
        if list_keys:
            cmds.append(("DEL", *list_keys))

    def _writes_commands(self, cmds: list[tuple[Any, ...]], writes: list[merge.Write]) -> None:
        """The commands of ``writes`` in order; a run of register writes to one object is
        one HSET (a transaction of many fields costs Redis one command, not one each)."""
        at, end = 0, len(writes)
        while at < end:
            w = writes[at]
            if w.kind != "register":
                self._write_commands(cmds, w)
                at += 1
                continue
            fields: list[Any] = []
            db_id = w.db_id
            while at < end and (w := writes[at]).kind == "register" and w.db_id == db_id \
                    and len(fields) < _ARGS_PER_COMMAND:
                fields += (w.name, w.data.pack())
                at += 1
            cmds.append(("HSET", self.k_reg(db_id), *fields))

    def _write_commands(self, cmds: list[tuple[Any, ...]], w: merge.Write) -> None:
        if w.kind == "register":
            cmds.append(("HSET", self.k_reg(w.db_id), w.name, w.data.pack()))
        elif w.kind == "object":
            cmds.append(("SET", self.k_obj(w.db_id), w.data.pack()))
            model, _, oid = w.db_id.partition(":")
            shard = self.shard_of(w.db_id)
            cmds.append(("SADD", self.k_model(model, shard), oid))
            cmds.append(("SADD", self._key(shard, "models"), model))
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
        self._writes_commands(cmds, writes)
        cmds.extend(("RPUSH", self.k_hist(db_id), *part) for part in _chunks(accepted))
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
        with map_redis_errors():
            for key in [self.k_index(model, field, s) for s in range(self.shards)]:
                self.client.delete(key)  # what a build cut short left
            for shard in range(self.shards):  # a shard at a time: each write in one slot
                members: Any = self.client.smembers(self.k_model(model, shard))
                self._build_index(model, field, sorted(o.decode() for o in members))
            self.client.sadd(self.k_indexes, f"{model}#{field}")
        self.indexes().add((model, field))

    def _build_index(self, model: str, field: str, oids: list[str]) -> None:
        indexed = {(model, field)}
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

    def index_range(self, model: str, field: str, low: bytes, high: bytes, *,
                    reverse: bool = False, offset: int = 0, count: int = -1) -> list[bytes]:
        """Members of an index between two ZRANGEBYLEX bounds, in order (or backwards)."""
        if self.shards == 1:
            key = self.k_index(model, field)
            limit = ("LIMIT", offset, count) if offset or count >= 0 else ()
            if reverse:
                return list(self._call("ZREVRANGEBYLEX", key, high, low, *limit))
            return list(self._call("ZRANGEBYLEX", key, low, high, *limit))
        # Each shard's first offset + count members, merged in order, then cut.
        limit = ("LIMIT", 0, offset + count) if count >= 0 else ()
        keys = [self.k_index(model, field, s) for s in range(self.shards)]
        cmds = [("ZREVRANGEBYLEX", k, high, low, *limit) if reverse else
                ("ZRANGEBYLEX", k, low, high, *limit) for k in keys]
        with map_redis_errors():
            replies = self._run(cmds)
        merged = list(heapq.merge(*(list(r) for r in replies), reverse=reverse))
        return merged[offset:offset + count] if count >= 0 else merged[offset:]

    def index_count(self, model: str, field: str, low: bytes, high: bytes) -> int:
        with map_redis_errors():
            return sum(int(n) for n in self._run(
                [("ZLEXCOUNT", self.k_index(model, field, s), low, high)
                 for s in range(self.shards)]))

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
            key = self.k_index(c.model, c.field, self.shard_of(c.db_id))
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

    def _candidate_shards(self, uid: bytes) -> Sequence[int]:
        """The shards that may hold update ``uid``: the one noted for it, else every
        shard. An update lives in its signer's shard only, so a noted shard is the
        answer: the update is there or nowhere."""
        if self.shards == 1:
            return (0,)
        home = self._homes.get(uid)
        return range(self.shards) if home is None else (home,)

    def _held_commands(self, uid: bytes) -> list[tuple[Any, ...]]:
        """HEXISTS of update ``uid`` in each shard that may hold it."""
        return [("HEXISTS", self._key(s, "u"), uid) for s in self._candidate_shards(uid)]

    def _by_candidate_shard(self, uids: Iterable[bytes]
                            ) -> tuple[dict[int, list[bytes]], list[bytes]]:
        """The distinct ``uids`` by the one shard that may hold each, and those to look
        for in every shard (see ``_candidate_shards``)."""
        by_home: dict[int, list[bytes]] = {}
        rest: list[bytes] = []
        for uid in dict.fromkeys(uids):
            shards = self._candidate_shards(uid)
            if len(shards) == 1:
                by_home.setdefault(shards[0], []).append(uid)
            else:
                rest.append(uid)
        return by_home, rest

    def raw_update(self, uid: bytes) -> bytes | None:
        return self.raw_updates([uid])[0]

    def raw_updates(self, uids: Iterable[bytes]) -> list[bytes | None]:
        uids = list(uids)
        if not uids:
            return []
        if self.shards == 1:
            return list(self._call("HMGET", self.k_updates, *uids))
        found = self._find_in_shards("HMGET", "u", uids)
        return [found.get(uid) for uid in uids]

    def _find_in_shards(self, command: str, name: str, uids: Iterable[bytes]
                        ) -> dict[bytes, Any]:
        """Look ``uids`` up with ``command`` (HMGET in ``u``, ZMSCORE in ``log``) in the
        shards that may hold them (``_candidate_shards``): the noted ones in one round
        trip, the others in every shard, 1,000 ids per round trip. Returns id -> the
        value found, noting the shard it was found in."""
        by_home, rest = self._by_candidate_shard(uids)
        rounds = [list(by_home.items())] + [
            [(s, part) for s in range(self.shards)] for part in _chunks(rest)]
        found: dict[bytes, Any] = {}
        for asks in rounds:
            if not asks:
                continue
            with map_redis_errors():
                replies = self._run([(command, self._key(s, name), *ids) for s, ids in asks])
            for (shard, ids), values in zip(asks, replies, strict=True):
                for uid, value in zip(ids, values, strict=True):
                    if value is not None and value is not False:  # False: a nil in Lua
                        found[uid] = value
                        self._note_home(uid, shard)
        return found

    def missing(self, uids: Sequence[bytes]) -> list[bytes]:
        """The ids among ``uids`` this store does not hold, in order."""
        if not uids:
            return []
        if self.shards == 1:
            held = self._run([("HEXISTS", self.k_updates, uid) for uid in uids])
            return [uid for uid, present in zip(uids, held, strict=True) if not present]
        # The log holds exactly the stored updates: ZMSCORE answers without the bodies.
        present = self._find_in_shards("ZMSCORE", "log", uids)
        return [uid for uid in uids if uid not in present]

    def has_update(self, uid: bytes) -> bool:
        if self.shards == 1:
            return bool(self._call("HEXISTS", self.k_updates, uid))
        return not self.missing([uid])

    def chain_head(self, caller: str, node: bytes) -> bytes:
        key = self._key(self.shard_of(caller), "head")
        with map_redis_errors():
            return (self.client.hget(key, f"{caller}|{node.hex()}") or b"")[:32]

    def _scan_hashes(self, name: str) -> Iterator[tuple[bytes, bytes]]:
        """Every field and value of the per-shard hash ``name``, shard by shard."""
        with map_redis_errors():
            for shard in range(self.shards):
                yield from self.client.hscan_iter(self._key(shard, name), count=1000)

    def chain_heads(self) -> dict[str, bytes]:
        """Every chain head as stored: "caller|node hex" -> update id + its timestamp
        (8 bytes, big-endian), unchecked (``verify`` checks them)."""
        return {(k.decode() if isinstance(k, bytes) else k): v
                for k, v in self._scan_hashes("head")}

    def chain_links(self) -> dict[bytes, bytes]:
        """Every chain link as stored: update id -> node id (16 bytes) + caller db_id."""
        return dict(self._scan_hashes("ch"))

    def log_length(self) -> int:
        """The next log position: how many updates this store ever stored."""
        return self._next_seq()

    def log_range(self, start: int = 0, stop: int = -1) -> list[bytes]:
        """Ids of the updates at log positions ``start``..``stop`` (inclusive; -1: to the
        end), in store order. Positions of pruned updates are gaps. A negative ``start``
        counts stored updates from the end (``log_range(-1)``: the last one; ``stop``
        is then -1)."""
        self._next_seq()  # migrates an old LIST log first
        if self.shards == 1:
            if start < 0:
                return list(self._call("ZRANGE", self.k_log, start, stop))
            return list(self._call("ZRANGEBYSCORE", self.k_log, start,
                                   "+inf" if stop < 0 else stop))
        cmds: list[tuple[Any, ...]]
        if start < 0:
            cmds = [("ZRANGE", self._key(s, "log"), start, -1, "WITHSCORES")
                    for s in range(self.shards)]
        else:
            cmds = [("ZRANGEBYSCORE", self._key(s, "log"), start, "+inf" if stop < 0 else stop,
                     "WITHSCORES") for s in range(self.shards)]
        with map_redis_errors():
            replies = self._run(cmds)
        entries = sorted(self._scored(replies))
        return [uid for _, uid in (entries[start:] if start < 0 else entries)]

    def _scored(self, replies: Sequence[Any]) -> Iterator[tuple[float, bytes]]:
        """(score, member) of each shard's WITHSCORES reply, in shard order (noting the
        members' shard); a reply is pairs or a flat list, as the connection gives it."""
        for shard, reply in enumerate(replies):
            yield from self._scored_one(shard, reply)

    def update_ids(self) -> Iterator[bytes]:
        """The ids of every stored update, in no order (one HKEYS per shard: ~32 bytes
        per id)."""
        with map_redis_errors():
            replies = self._run([("HKEYS", self._key(s, "u")) for s in range(self.shards)])
        return (uid for reply in replies for uid in reply)

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
        if self.shards == 1:
            out = self._call("ZRANGEBYSCORE", self.k_log, start, f"({end}", "WITHSCORES",
                             "LIMIT", 0, limit)
            entries = list(self._scored_one(0, out))
            if len(entries) < limit or not entries:
                return [uid for _, uid in entries], max(end, start)
            return [uid for _, uid in entries], int(entries[-1][0]) + 1
        return self._sharded_page(start, end, limit)

    def _sharded_page(self, start: int, end: int, limit: int) -> tuple[list[bytes], int]:
        """A log page merged from every shard's log. Each shard gives a few positions;
        the page holds every position below the lowest last one of the shards that had
        more (there nothing is left out), and a second read asks those shards for more
        when the first gave less than half a page."""
        few = max(8, limit // 16)
        asked = dict.fromkeys(range(self.shards), few)
        got: dict[int, list[tuple[float, bytes]]] = {}
        for _ in range(2):
            cmds = [("ZRANGEBYSCORE", self._key(s, "log"), start, f"({end}", "WITHSCORES",
                     "LIMIT", 0, n) for s, n in asked.items()]
            with map_redis_errors():
                replies = self._run(cmds)
            for shard, reply in zip(asked, replies, strict=True):
                got[shard] = list(self._scored_one(shard, reply))
            full = [s for s, n in asked.items() if len(got[s]) == n]
            bound = min([int(got[s][-1][0]) + 1 for s in full], default=end)
            page = sorted(e for entries in got.values() for e in entries if e[0] < bound)
            if not full or len(page) >= limit // 2 or all(asked[s] >= limit for s in full):
                break
            asked = dict.fromkeys(full, limit)
        if len(page) > limit:
            page = page[:limit]
            return [uid for _, uid in page], int(page[-1][0]) + 1
        return [uid for _, uid in page], bound if bound < end else max(end, start)

    def _scored_one(self, shard: int, reply: Any) -> Iterator[tuple[float, bytes]]:
        """(score, member) of one shard's WITHSCORES reply (see ``_scored``)."""
        flat = [x for pair in reply for x in pair] if reply and isinstance(
            reply[0], list | tuple) else reply
        for uid, score in zip(flat[0::2], flat[1::2], strict=True):
            self._note_home(uid, shard)
            yield float(score), uid

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
    def _union(self, keys: list[str]) -> set[bytes]:
        """The members of several sets (one per shard), read in one pipeline."""
        with map_redis_errors():
            return {m for reply in self._run([("SMEMBERS", k) for k in keys]) for m in reply}

    def models(self) -> list[str]:
        return sorted(m.decode() for m in self._union(
            [self._key(s, "models") for s in range(self.shards)]))

    def object_ids(self, model: str | None = None) -> list[str]:
        """db_ids of known objects (removed ones included; see object_meta)."""
        models = [model] if model else self.models()
        out: list[str] = []
        for m in models:
            oids = self._union([self.k_model(m, s) for s in range(self.shards)])
            out.extend(f"{m}:{oid.decode()}" for oid in oids)
        return sorted(out)

    def last_hlc(self) -> int:
        """The greatest timestamp this store has seen (each shard keeps its own)."""
        with map_redis_errors():
            found = self._run([("HGET", k, "hlc") for k in
                               dict.fromkeys([self.k_meta, *self._shard_metas()])])
        return max(int(v or 0) for v in found)

    def _shard_metas(self) -> list[str]:
        return [self._key(s, "meta") for s in range(self.shards)]

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
