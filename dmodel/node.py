"""Node: one peer. Wires the store, keyring, clock, listeners and bus; runs the pipeline.

Local writes and remote updates go through one function, ``Node._process_batch``, under
the node's apply lock: snapshot -> ``pipeline.decide`` -> before-listeners -> atomic
commit -> after-listeners -> publish/relay. A local write that is not accepted raises
in the caller and nothing is stored or sent; a remote update that is not accepted is
dropped, counted in ``node.stats`` and logged at debug level.
"""

from __future__ import annotations

import atexit
import collections
import concurrent.futures
import hashlib
import logging
import os
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack
import redis

from . import merge, pipeline
from .actions import Change, Context, ListenerRegistry
from .clock import HybridClock, physical_ms
from .crypto import (
    EncryptedValue,
    Identity,
    PublicIdentity,
    open_sealed,
    open_value_key,
    place,
    seal,
    wrap_key,
)
from .errors import (
    ConfigurationError,
    DecryptionError,
    DModelError,
    IntegrityError,
    InvalidUpdate,
    KeyringError,
    NodeNotRunningError,
    ObjectNotFoundError,
    RejectedError,
    ReplayedUpdate,
    VetoedError,
)
from .keyring import Keyring, secure_home, write_private
from .store.embedded import EmbeddedRedis
from .store.redis import RedisStore, map_redis_errors
from .update import (
    FIELD_OPS,
    LIST_OPS,
    MAX_FRONTIER,
    Op,
    Update,
    decode,
    op_register,
    pack_value,
    unpack_value,
)

logger = logging.getLogger(__name__)

MAX_PENDING = 10_000
MAX_FUTURE = 10_000            # future-dated updates held until their time comes
MAX_FUTURE_BYTES = 64 << 20
_FUTURE_TICK_S = 0.1
_PARALLEL_VERIFY_MIN = 16
_pool: concurrent.futures.ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def _verify_pool() -> tuple[concurrent.futures.ThreadPoolExecutor, int]:
    """A process-wide pool for signature checks, and its size (cores - 1, at least 1)."""
    global _pool
    workers = max(1, min(7, (os.cpu_count() or 2) - 1))
    with _pool_lock:
        if _pool is None:
            _pool = concurrent.futures.ThreadPoolExecutor(max_workers=workers,
                                                          thread_name_prefix="dmodel-verify")
        return _pool, workers


def _event_field(op: Op, update: Update, index: int) -> str | None:
    """The field name listeners see for an op (None for object-level ops)."""
    if op.op in FIELD_OPS:
        return op_register(op, update.id, index)
    return None


class _Bounded(dict):  # type: ignore[type-arg]
    """An insertion-ordered map that forgets its oldest entries past ``capacity``."""

    def __init__(self, capacity: int) -> None:
        super().__init__()
        self.capacity = capacity

    def add(self, key: Any, value: Any = None) -> None:
        self[key] = value
        if len(self) > self.capacity:
            del self[next(iter(self))]


class _Overlay:
    """What earlier updates of a batch wrote, laid over each later update's snapshot."""

    def __init__(self) -> None:
        self.state = merge.State()
        self.seen: set[bytes] = set()
        self.chain: dict[bytes, tuple[str, bytes]] = {}
        self.next: dict[bytes, bytes] = {}

    def add(self, update: Update, writes: list[merge.Write] | None) -> None:
        self.seen.add(update.id)
        self.chain[update.id] = (update.caller, update.node)
        if update.prev:
            self.next.setdefault(update.prev, update.id)
        ms = physical_ms(update.timestamp)
        for op in update.ops:
            if op.obj != update.caller:
                key = (op.obj, update.caller)
                self.state.last_write[key] = max(self.state.last_write.get(key, -1), ms)
        if writes:
            self.state.apply(writes)

    def patch(self, snap: pipeline.Snapshot, update: Update) -> pipeline.Snapshot:
        if not self.seen:
            return snap
        if update.id in self.seen:
            snap.seen = True
        if update.prev in self.chain:
            snap.prev_chain = self.chain[update.prev]
        if update.prev in self.next and self.next[update.prev] != update.id:
            snap.equivocation = True
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
        for key in auth:
            if key in over.auth:
                mine.auth[key] = over.auth[key]
            if key[1] == "u":  # a grant/revoke: did the member write earlier in the batch?
                ms = over.last_write.get((key[0], key[2]), -1)
                if ms > mine.last_write.get((key[0], key[2]), -1):
                    mine.last_write[(key[0], key[2])] = ms
        return snap


def _pending_key(update: Update) -> bytes:
    """Identity of a waiting update: its id and signature, so that a copy with a bad
    signature cannot take the place of the genuine update while both wait."""
    return update.id + update.signature


def default_home() -> Path:
    """``$DMODEL_HOME``, else ``$XDG_DATA_HOME/dmodel`` or ``~/.local/share/dmodel``."""
    env = os.environ.get("DMODEL_HOME")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(base) / "dmodel"


@dataclass
class Stats:
    """Counters of what the node did. ``dropped``/``rejected`` are keyed by error class name."""

    applied: int = 0
    local: int = 0
    remote: int = 0
    duplicates: int = 0
    published: int = 0
    dropped: collections.Counter[str] = field(default_factory=collections.Counter)
    rejected: collections.Counter[str] = field(default_factory=collections.Counter)
    listener_errors: int = 0
    equivocations: int = 0
    recomputed: int = 0
    held_future: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {"applied": self.applied, "local": self.local, "remote": self.remote,
                "duplicates": self.duplicates, "published": self.published,
                "dropped": dict(self.dropped), "rejected": dict(self.rejected),
                "listener_errors": self.listener_errors, "equivocations": self.equivocations,
                "recomputed": self.recomputed, "held_future": self.held_future}


@dataclass(frozen=True, slots=True)
class HistoryEntry:
    """One stored update of an object, as ``history()`` reports it."""

    update_id: str
    caller_id: str
    timestamp: int
    verdict: str  # "accepted" or "unauthorized"
    ops: tuple[Op, ...]


def _shutdown_at_exit(ref: weakref.ref[Node]) -> None:
    node = ref()
    if node is not None and not node.closed:
        try:
            node.shutdown()
        except Exception:  # at exit: nothing left to report to
            logger.debug("shutdown at exit failed", exc_info=True)


def _lock_home(home: Path) -> Any:
    """Hold an exclusive lock on ``home`` for this node's life (released if it dies)."""
    import fcntl

    handle = open(home / "node.lock", "a+")  # noqa: SIM115 - held until shutdown
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.close()
        raise ConfigurationError(f"the home {home} is in use by another running node "
                                 "(one node per home)") from None
    return handle


def _env_bool(name: str) -> bool | None:
    value = os.environ.get(name)
    if value is None or value == "":
        return None
    if value.lower() in ("1", "true", "yes", "on"):
        return True
    if value.lower() in ("0", "false", "no", "off"):
        return False
    raise ConfigurationError(f"{name} must be 0 or 1, not {value!r}")


class Node:
    """One dmodel peer: a store, a keyring, a clock, listeners and (optionally) a bus.

    All arguments default to the ``DMODEL_*`` environment variables of the README:
    ``home`` (DMODEL_HOME), ``listen`` (DMODEL_LISTEN), ``peers`` (DMODEL_PEERS,
    comma-separated), ``discovery`` (DMODEL_DISCOVERY), ``redis_url`` (DMODEL_REDIS_URL),
    ``passphrase`` (DMODEL_PASSPHRASE), ``unauthorized_policy``
    (DMODEL_UNAUTHORIZED_POLICY: ``"reject"`` or ``"listeners"``).
    """

    def __init__(self, home: str | os.PathLike[str] | None = None, *,
                 listen: str | None = None, peers: Iterable[str] | None = None,
                 discovery: bool | None = None, redis_url: str | None = None,
                 unauthorized_policy: str | None = None, passphrase: str | None = None,
                 skew: float | None = None, redis_prefix: str = "dm:",
                 now: Callable[[], int] = time.time_ns, curve: Any = None,
                 broker: Any = None, network_options: dict[str, Any] | None = None,
                 start_network: bool = True) -> None:
        self.home = (Path(home).expanduser() if home is not None else default_home()).absolute()
        self.listen = (listen if listen is not None else os.environ.get("DMODEL_LISTEN")) or None
        if peers is None:
            peers = [p for p in os.environ.get("DMODEL_PEERS", "").split(",") if p.strip()]
        self.peers = [p.strip() for p in peers]
        env_discovery = _env_bool("DMODEL_DISCOVERY")
        self.discovery = discovery if discovery is not None else bool(env_discovery)
        policy = unauthorized_policy or os.environ.get("DMODEL_UNAUTHORIZED_POLICY") or "reject"
        if policy not in merge.POLICIES:
            raise ConfigurationError(
                f"unauthorized_policy must be 'reject' or 'listeners', not {policy!r}")
        self.unauthorized_policy: merge.Policy = policy  # type: ignore[assignment]
        if skew is None:
            try:
                skew = float(os.environ.get("DMODEL_SKEW") or
                             pipeline.DEFAULT_SKEW_MS / 1000)
            except ValueError as exc:
                raise ConfigurationError(f"DMODEL_SKEW must be seconds: {exc}") from None
        if not 0 < skew <= 3600:
            raise ConfigurationError(f"skew must be between 0 and 3600 s, not {skew}")
        self.skew_ms = int(skew * 1000)
        self._now = now
        try:
            secure_home(self.home)
        except KeyringError as exc:
            raise ConfigurationError(str(exc)) from None
        redis_url = redis_url if redis_url is not None else os.environ.get("DMODEL_REDIS_URL")
        # The embedded Redis of a home belongs to one node at a time; a Redis given by URL
        # is the operator's to share out (one node per database or prefix).
        self._home_lock = _lock_home(self.home) if not redis_url else None
        try:
            self.node_id = self._load_node_id()
            self.keyring = Keyring(self.home / "keys",
                                   passphrase or os.environ.get("DMODEL_PASSPHRASE") or None)
        except BaseException:
            self._unlock_home()
            raise
        self._embedded: EmbeddedRedis | None = None
        if redis_url:
            try:
                client = redis.Redis.from_url(redis_url)
            except ValueError as exc:
                raise ConfigurationError(f"bad redis_url {redis_url!r}: {exc}") from exc
        else:
            try:
                self._embedded = EmbeddedRedis(self.home)
            except BaseException:
                self._unlock_home()
                raise
            client = self._embedded.client()
            # A program that ends without shutdown() still stops its Redis server.
            atexit.register(_shutdown_at_exit, weakref.ref(self))
        self.store = RedisStore(client, prefix=redis_prefix, unix_socket=(
            str(self._embedded.socket) if self._embedded is not None else None))
        try:
            with map_redis_errors():
                client.ping()
            self.clock = HybridClock(now, last=self.store.last_hlc(),
                                     max_ahead_ms=self.skew_ms)
            if self.clock.ahead_ms() > self.skew_ms:
                logger.warning(
                    "this host's clock is %.0f s behind the timestamps this node issued "
                    "before; peers hold its new updates until their clocks catch up: fix "
                    "the clock (NTP)", self.clock.ahead_ms() / 1000)
        except BaseException:
            self._stop_store()
            raise
        self._lock = threading.RLock()
        # The registry shares the apply lock, so apply()/revoke() from other threads
        # never race a dispatch (an RLock: callbacks may apply listeners themselves).
        self.listeners = ListenerRegistry(lock=self._lock)
        self.stats = Stats()
        self._heads: dict[str, bytes] = {}
        self._recent = _Bounded(100_000)  # ids of updates stored lately
        self._vetoed = _Bounded(MAX_PENDING)  # ids of updates vetoed here -> their chain
        self._pending: dict[bytes | str, list[Update]] = {}
        self._pending_order: collections.deque[tuple[bytes | str, bytes]] = collections.deque()
        self._pending_ids: set[bytes] = set()  # _pending_key of every waiting update
        self._releasing: list[Update] | None = None  # released updates not yet re-processed
        self._future: dict[bytes, tuple[int, Update]] = {}  # held: id -> (release ms, update)
        self._future_bytes = 0
        self._future_thread: threading.Thread | None = None
        self._model_policies: dict[str, merge.Policy] = {}
        self._on_accepted: list[Callable[[Update, bool], None]] = []
        self._closed = False
        self.network: Any = None
        self._network_options = dict(network_options or {}, curve=curve, broker=broker)
        self._load_future()
        if start_network and (self.listen or self.peers or self.discovery or broker):
            try:
                self.start_network()
            except BaseException:
                self.shutdown()  # a node half set up keeps no Redis server running
                raise

    # ----------------------------------------------------------------- set-up
    def _load_node_id(self) -> bytes:
        path = self.home / "node.id"
        try:
            data = path.read_bytes()
            if len(data) == 16:
                return data
        except FileNotFoundError:
            pass
        data = os.urandom(16)
        write_private(path, data)
        return data

    def start_network(self, *, listen: str | None = None, peers: Iterable[str] | None = None,
                      discovery: bool | None = None, **options: Any) -> Any:
        """Start the bus, publishing and catch-up; returns ``node.network``.

        ``Node(..., start_network=False)`` then this: listeners applied in between see
        every update from the network. Arguments override the constructor's.
        """
        from .net.service import NetworkService  # late: the core works without networking

        self._check_open()
        if self.network is not None:
            raise ConfigurationError("the network of this node is already started")
        if listen is not None:
            self.listen = listen
        if peers is not None:
            self.peers = list(peers)
        if discovery is not None:
            self.discovery = discovery
        merged = {k: v for k, v in {**self._network_options, **options}.items()
                  if v is not None}
        self.network = NetworkService(self, listen=self.listen, peers=self.peers,
                                      discovery=self.discovery, **merged)
        return self.network

    def set_model_policy(self, model: str, policy: merge.Policy) -> None:
        """Override the unauthorized-update policy for one model (from ``Meta``)."""
        if policy not in merge.POLICIES:
            raise ConfigurationError(f"unknown policy {policy!r}")
        self._model_policies[model] = policy

    def policy_for(self, model: str) -> merge.Policy:
        """The policy for unauthorized updates to ``model`` (node default or Meta override)."""
        policy = self._model_policies.get(model)
        if policy is None:
            from .model import model_policy  # late: model imports node lazily too

            policy = model_policy(model) or self.unauthorized_policy
        return policy

    def on_accepted(self, callback: Callable[[Update, bool], None]) -> None:
        """Call ``callback(update, local)`` after every stored update (the bus publishes)."""
        self._on_accepted.append(callback)

    # -------------------------------------------------------------- pipeline
    def ingest(self, raw: bytes) -> pipeline.Decision | None:
        """Take an update from elsewhere. Never raises for bad input: it is counted and logged.

        Returns the decision, or None when the bytes are not an update at all.
        """
        return self.ingest_many([raw])[0]

    def ingest_many(self, raws: Iterable[bytes]) -> list[pipeline.Decision | None]:
        """Take several updates from elsewhere, in order, as one batch.

        The batch is read from the store in one round trip, signatures are checked on
        a small thread pool, and everything accepted is committed in one atomic step;
        the result is the same as ingesting them one by one.
        """
        self._check_open()
        results: list[pipeline.Decision | None] = []
        updates: list[Update] = []
        where: list[int] = []
        for raw in raws:
            try:
                updates.append(decode(raw))
                where.append(len(results))
            except InvalidUpdate as exc:
                self._count_drop(exc, None)
            results.append(None)
        if updates:
            with self._lock:
                fresh = [(i, u) for i, u in zip(where, updates, strict=True)
                         if u.id not in self._recent]
                for i, update in zip(where, updates, strict=True):
                    if update.id in self._recent:  # a relayed copy: no store round trip
                        error = ReplayedUpdate("update already seen", update.id)
                        self._count_drop(error, update)
                        results[i] = pipeline.Decision(update, pipeline.DROPPED, error=error)
                if fresh:
                    decisions = self._process_batch([u for _, u in fresh], local=False)
                    for (i, _), decision in zip(fresh, decisions, strict=True):
                        results[i] = decision
        return results

    def _process(self, update: Update, *, local: bool) -> pipeline.Decision:
        return self._process_batch([update], local=local)[0]

    def _process_batch(self, updates: list[Update], *, local: bool) -> list[pipeline.Decision]:
        """The pipeline for a batch of updates, under the apply lock.

        Each update is decided against the store plus what earlier updates of the batch
        wrote (the overlay); the batch is committed in one atomic step before any
        after-listener or publisher sees it.
        """
        listening = bool(self.listeners) and any(
            self.listeners.wants(op.obj.partition(":")[0], _event_field(op, update, i))
            for update in updates for i, op in enumerate(update.ops))
        if listening and len(updates) > 1:
            # Listeners see each update's before- and after-callbacks before the next
            # update's: one commit per update.
            return [d for update in updates for d in self._process_batch([update], local=local)]
        snaps = self.store.snapshots(updates, local=local, registers=listening or not local)
        verified = [local] * len(updates) if local else self._verify_batch(updates, snaps)
        overlay = _Overlay()
        staged: list[tuple[Update, list[merge.Write] | None]] = []
        done: list[tuple[pipeline.Decision, pipeline.Snapshot, list[Change]]] = []
        decisions: list[pipeline.Decision] = []
        rest: list[Update] = []
        held: list[Update] = []  # not applied, but later updates may chain to them
        now = self.clock.now()
        if local:  # our own timestamps are never "from the future", even if the wall clock
            now = max(now, self.clock.last)  # went back since they were issued
        for index, update in enumerate(updates):
            snap = overlay.patch(snaps[index], update)
            if update.prev and snap.prev_chain is None and update.prev in self._vetoed:
                snap.prev_chain = self._vetoed[update.prev]  # chained to a vetoed update
            decision = pipeline.decide(update, snap, now=now, skew_ms=self.skew_ms,
                                       policy=self.policy_for, verified=verified[index])
            decisions.append(decision)
            verdict = decision.verdict
            if verdict == pipeline.DROPPED:
                self._count_drop(decision.error, update)
                continue
            if verdict == pipeline.MISSING:
                if not local:
                    self._park(update, decision.missing)
                continue
            if verdict == pipeline.HELD:
                self._hold_future(update, decision.release_at)
                continue
            outcome = decision.outcome
            assert outcome is not None
            if verdict == pipeline.UNAUTHORIZED:
                if self.listeners:
                    changes = self._changes(update, outcome, snap, local, "unauthorized")
                    self.listeners.observe_rejected(changes)
                self.stats.rejected["UnauthorizedError"] += 1
                logger.debug("rejected %s: %s", update.hex_id[:12], decision.error)
                if not local:  # a local caller gets the error: nothing is stored or sent
                    staged.append((update, None))
                    overlay.add(update, None)
                    held.append(update)
                continue
            changes: list[Change] = []
            if listening and outcome.events:
                changes = self._changes(update, outcome, snap, local, "accepted")
                try:
                    self.listeners.before(changes)
                except VetoedError as exc:
                    self.stats.rejected["VetoedError"] += 1
                    logger.info("vetoed %s: %s", update.hex_id[:12], exc)
                    decision.verdict = pipeline.VETOED
                    decision.error = exc
                    if not local:
                        # Not stored, but its signed link stands: the caller's later
                        # updates are judged on their own instead of waiting for it.
                        self._vetoed.add(update.id, (update.caller, update.node))
                        held.append(update)
                    continue
            staged.append((update, outcome.writes))
            overlay.add(update, outcome.writes)
            done.append((decision, snap, changes))
            if outcome.retroactive:
                rest = updates[index + 1:]  # re-decided against the store once this is in
                break
        if staged:
            for update, writes in staged:
                if writes is not None:  # held unauthorized updates move no clock
                    self.clock.observe(update.timestamp)
            self.store.commit_many(staged, hlc=self.clock.last)
            for update, _ in staged:
                self._recent.add(update.id)
        for decision, snap, changes in done:
            self._after_commit(decision, snap, changes, local)
        for update in held:
            self._release_pending(update)
        if rest:
            decisions.extend(self._process_batch(rest, local=local))
        return decisions

    def _after_commit(self, decision: pipeline.Decision, snap: pipeline.Snapshot,
                      changes: list[Change], local: bool) -> None:
        update, outcome = decision.update, decision.outcome
        assert outcome is not None
        if snap.equivocation:
            self.stats.equivocations += 1
            logger.warning("equivocation: %s signed two updates after %s on node %s",
                           update.caller, update.prev.hex()[:12], update.node.hex()[:8])
        if outcome.retroactive:
            self._recompute(outcome.retroactive)
        self.stats.applied += 1
        if local:
            self.stats.local += 1
        else:
            self.stats.remote += 1
        if changes:
            self.stats.listener_errors += len(self.listeners.after(changes))
        for callback in self._on_accepted:
            try:
                callback(update, local)
            except Exception:
                logger.exception("on_accepted callback failed")
        self._release_pending(update)

    def _verify_batch(self, updates: list[Update], snaps: list[pipeline.Snapshot]) -> list[bool]:
        """Check the signatures whose keys are at hand, on a thread pool (the Ed25519
        verify releases the GIL). An update left unchecked here is checked by decide."""
        if len(updates) < _PARALLEL_VERIFY_MIN:
            return [False] * len(updates)
        keys: list[PublicIdentity | None] = []
        created: dict[str, PublicIdentity] = {}
        for update, snap in zip(updates, snaps, strict=True):
            if snap.seen:
                keys.append(None)  # a duplicate: dropped without a signature check
                continue
            own = update.creates()
            if own is not None:
                created.setdefault(update.caller, own)
                keys.append(own)
                continue
            meta = snap.state.objects.get(update.caller)
            keys.append(meta.keys if meta is not None else created.get(update.caller))

        def check(items: list[tuple[Update, PublicIdentity | None]]) -> list[bool]:
            out = []
            for update, key in items:
                try:
                    if key is not None:
                        update.verify(key)
                        out.append(True)
                        continue
                except InvalidUpdate:
                    pass
                out.append(False)
            return out

        # One chunk per pool worker plus one for this thread: a few hand-offs per batch,
        # not one per update.
        items = list(zip(updates, keys, strict=True))
        pool, workers = _verify_pool()
        size = -(-len(items) // (workers + 1))
        chunks = [items[i:i + size] for i in range(0, len(items), size)]
        futures = [pool.submit(check, chunk) for chunk in chunks[1:]]
        results = check(chunks[0])
        for future in futures:
            results.extend(future.result())
        return results

    def _recompute(self, seeds: set[str]) -> None:
        """Re-decide the stored updates of objects whose update-authorization changed in the
        past of updates already decided (a grant or revoke that arrived late).

        Verdicts are evaluated as of each update's version against the complete
        authorization state, and every object whose set of accepted updates changes is
        rebuilt from its updates in version order: the state ``merge.fold`` gives, whatever
        the arrival order. Listeners are not called for these corrections.
        """
        updates: dict[bytes, Update] = {}
        verdicts: dict[bytes, bool] = {}
        uids_of: dict[str, list[bytes]] = {}
        auth_cache: dict[str, dict[str, merge.AuthEvents]] = {}
        scope, todo = set(seeds), list(seeds)
        while todo:
            db_id = todo.pop()
            accepted = self.store.history(db_id)
            uids = list(dict.fromkeys(accepted + self.store.history(db_id, held=True)))
            uids_of[db_id] = uids
            was_accepted = set(accepted)
            for uid, raw in zip(uids, self.store.raw_updates(uids), strict=True):
                if raw is None or uid in verdicts:
                    continue
                update = updates[uid] = decode(raw)
                state = merge.State()
                for op in update.ops:
                    if op.obj != update.caller:
                        if op.obj not in auth_cache:
                            auth_cache[op.obj] = self.store.auth_events(op.obj, "u")
                        state.auth[(op.obj, "u", update.caller)] = auth_cache[op.obj].get(
                            update.caller, ())
                ok = pipeline.is_applied(update, merge.is_authorized(update, state),
                                         self.policy_for)
                verdicts[uid] = ok
                if ok != (uid in was_accepted):
                    for other in {op.obj for op in update.ops} - scope:
                        scope.add(other)
                        todo.append(other)
        for db_id in scope:
            uids = uids_of[db_id]
            ordered = sorted((updates[u] for u in uids if verdicts.get(u)),
                             key=merge.order_key)
            state = merge.State()
            for update in ordered:
                state.apply(merge.apply(update, state, authorized=True).writes)
            registers = {name: reg for (obj, name), reg in state.registers.items()
                         if obj == db_id}
            wraps = {ref + oid.encode(): w for (obj, ref, oid), w in state.wraps.items()
                     if obj == db_id}
            lists = {name: keys for (obj, name), keys in state.lists.items() if obj == db_id}
            self.store.replace_object(db_id, state.objects.get(db_id), registers, wraps, lists,
                                      [u for u in uids if verdicts.get(u)],
                                      [u for u in uids if u in verdicts and not verdicts[u]])
            self.stats.recomputed += 1
            logger.info("re-decided %d updates of %s after a late authorization change",
                        len(uids), db_id)

    def _count_drop(self, error: Exception | None, update: Update | None) -> None:
        name = type(error).__name__ if error else "Unknown"
        if name == "ReplayedUpdate":
            self.stats.duplicates += 1
        elif name == "ConflictingCreate":
            self.stats.equivocations += 1
            logger.warning("equivocation: %s", error)
        self.stats.dropped[name] += 1
        logger.debug("dropped %s: %s", update.hex_id[:12] if update else "bytes", error)

    # ------------------------------------------------------ future-dated updates
    def _hold_future(self, update: Update, release_at: int) -> None:
        """Keep an update timestamped beyond the skew bound until its time comes.

        Held in memory and in the store (so a restart keeps it), bounded by count and
        bytes: past the bound the update furthest in the future is let go (counted as
        StaleUpdate; catch-up brings it again).
        """
        if update.id in self._future:
            return
        self._future[update.id] = (release_at, update)
        self._future_bytes += len(update.raw)
        self.store.hold_future(update.id, update.raw)
        self.stats.held_future += 1
        logger.info("holding %s until its timestamp is within %g s of this clock",
                    update.hex_id[:12], self.skew_ms / 1000)
        while len(self._future) > MAX_FUTURE or self._future_bytes > MAX_FUTURE_BYTES:
            uid = max(self._future, key=lambda u: self._future[u][0])
            self._drop_future([uid])
            self.stats.dropped["StaleUpdate"] += 1
        if self._future_thread is None or not self._future_thread.is_alive():
            self._future_thread = threading.Thread(target=self._release_future_loop,
                                                   name="dmodel-future", daemon=True)
            self._future_thread.start()

    def _drop_future(self, uids: Iterable[bytes]) -> list[Update]:
        out = []
        for uid in uids:
            _, update = self._future.pop(uid)
            self._future_bytes -= len(update.raw)
            out.append(update)
        self.store.release_future([u.id for u in out])
        return out

    def _release_future_loop(self) -> None:
        """The node's timer thread: decides held updates again once their time comes."""
        while not self._closed:
            time.sleep(_FUTURE_TICK_S)
            with self._lock:
                if self._closed or not self._future:
                    self._future_thread = None
                    return
                now = physical_ms(self.clock.now())
                due = sorted((u for u, (at, _) in self._future.items() if at <= now),
                             key=lambda u: self._future[u][0])
                if due:
                    try:
                        self._process_batch(self._drop_future(due), local=False)
                    except DModelError:
                        logger.exception("deciding held updates failed")

    def _load_future(self) -> None:
        """Held updates kept by an earlier run are decided again."""
        raws = self.store.future_updates()
        if raws:
            self.store.release_future([decode(r).id for r in raws])
            self.ingest_many(raws)

    @property
    def future_count(self) -> int:
        """Updates held because their timestamps are beyond the skew bound."""
        return len(self._future)

    # ------------------------------------------------------------ pending set
    def _park(self, update: Update, missing: Sequence[bytes | str]) -> None:
        token = _pending_key(update)
        if token in self._pending_ids:
            return
        key = missing[0]
        self._pending.setdefault(key, []).append(update)
        self._pending_ids.add(token)
        self._pending_order.append((key, token))
        if len(self._pending_order) > 2 * MAX_PENDING:  # forget updates released meanwhile
            self._pending_order = collections.deque(
                e for e in self._pending_order if e[1] in self._pending_ids)
        while len(self._pending_ids) > MAX_PENDING:
            old_key, old_id = self._pending_order.popleft()
            waiting = self._pending.get(old_key, [])
            self._pending[old_key] = [u for u in waiting if _pending_key(u) != old_id]
            if not self._pending[old_key]:
                del self._pending[old_key]
            if old_id in self._pending_ids:
                self._pending_ids.discard(old_id)
                self.stats.dropped["PendingOverflow"] += 1

    def _release_pending(self, update: Update) -> None:
        if not self._pending:
            return
        keys: list[bytes | str] = [update.id]
        created = update.creates()
        if created is not None:
            keys.append(update.caller)
        ready = []
        for key in keys:
            for parked in self._pending.pop(key, None) or ():
                token = _pending_key(parked)
                if token in self._pending_ids:
                    self._pending_ids.discard(token)
                    ready.append(parked)
        if not ready:
            return
        if self._releasing is not None:  # inside a release: the outer loop takes them
            self._releasing.extend(ready)
            return
        # A loop, not recursion: a long chain delivered backwards is released in one go.
        self._releasing = ready
        try:
            while self._releasing:
                batch, self._releasing = self._releasing, []
                self._process_batch(batch, local=False)
        finally:
            self._releasing = None

    @property
    def pending_count(self) -> int:
        """Updates waiting for a missing dependency."""
        return len(self._pending_ids)

    def pending_needs(self) -> list[bytes | str]:
        """What the pending updates wait for: update ids (bytes) and db_ids (str)."""
        with self._lock:
            return list(self._pending)

    # ----------------------------------------------------------- local writes
    def identity(self, db_id: str) -> Identity:
        """The private keys of an owned object; KeyringError if not owned."""
        identity = self.keyring.get(db_id.partition(":")[2])
        if identity is None:
            raise KeyringError(f"{db_id} is not owned by this node (no private key): "
                               "pass a caller_id this node owns")
        return identity

    def is_owned(self, db_id: str) -> bool:
        return db_id.partition(":")[2] in self.keyring

    def write(self, caller: str, ops: Sequence[Op] | Callable[[], Sequence[Op]]) -> Update:
        """Sign ``ops`` as ``caller`` and apply them here; raise if not accepted.

        ``ops`` may be a function, called under the apply lock (so what it reads is what
        the update is decided against).
        """
        self._check_open()
        signer = self.identity(caller)
        with self._lock:
            op_list = tuple(ops() if callable(ops) else ops)
            grants = self._grants_for(caller, op_list)
            head = self._heads.get(caller)
            if head is None:
                head = self.store.chain_head(caller, self.node_id)
            update = Update.create(signer, node=self.node_id, caller=caller,
                                   timestamp=self.clock.tick(), prev=head, ops=op_list,
                                   grants=grants)
            decision = self._process(update, local=True)
            if decision.verdict == pipeline.ACCEPTED:
                self._heads[caller] = update.id
                return update
        if decision.verdict == pipeline.MISSING:
            missing = ", ".join(m if isinstance(m, str) else m.hex() for m in decision.missing)
            raise ObjectNotFoundError(f"not known to this node: {missing}")
        assert decision.error is not None
        raise decision.error

    def _grants_for(self, caller: str, ops: Sequence[Op]) -> dict[str, bytes]:
        """The update-grant ``caller`` writes under, for each other object ``ops`` change.

        Raises ObjectNotFoundError for an object removed here: nobody would apply it.
        """
        grants = {}
        for db_id in dict.fromkeys(op.obj for op in ops if op.op != "create"):
            meta = self.store.object_meta(db_id)
            if meta is not None and meta.removed is not None:
                raise ObjectNotFoundError(f"{db_id} was removed; it cannot be changed")
            if db_id == caller:
                continue
            ref = merge.open_grant(self.store.member_events(db_id, "u", caller))
            if ref is not None:
                grants[db_id] = ref
        return grants

    def revoke_update_op(self, db_id: str, member: str) -> Op:
        """A revoke_update op naming its frontier: ``member``'s updates of ``db_id``
        accepted here (they stay valid everywhere; any other update of the member is
        refused, whatever its timestamp)."""
        uids = self.store.history(db_id)
        frontier = sorted(uid for uid, raw in zip(uids, self.store.raw_updates(uids),
                                                  strict=True)
                          if raw is not None and decode(raw).caller == member)
        if len(frontier) > MAX_FRONTIER:
            raise ConfigurationError(
                f"{member} has {len(frontier)} accepted updates of {db_id}; one revoke can "
                f"name at most {MAX_FRONTIER}")
        return Op(db_id, "revoke_update", "", {"id": member, "f": frontier})

    def create(self, model: str, *, read: Iterable[str] = (), update: Iterable[str] = (),
               fields: Callable[[str, dict[str, bytes]], Sequence[Op]] | None = None,
               identity: Identity | None = None) -> str:
        """Create an owned object; returns its db_id.

        ``fields(db_id, readers)`` gives initial set ops, in the same update; ``readers``
        (oid -> public encryption key) is who its encrypted values are sealed for.
        """
        identity = identity or Identity.generate()
        db_id = f"{model}:{identity.oid}"
        read, update = list(dict.fromkeys(read)), list(dict.fromkeys(update))
        readers = {identity.oid: identity.public.box_key}
        for member in read:  # must be known, to encrypt for it
            readers[member.partition(":")[2]] = self._member_keys(member).box_key
        self.keyring.add(identity, db_id)
        create = Op(db_id, "create", "", {"sign": identity.public.verify_key,
                                          "box": identity.public.box_key,
                                          "read": read, "update": update})
        extra: Callable[[], Sequence[Op]] = (
            (lambda: fields(db_id, readers)) if fields else (lambda: ()))
        try:
            self.write(db_id, lambda: (create, *extra()))
        except RejectedError:  # refused before anything was stored: keep no key for it
            self.keyring.discard(identity.oid)
            raise
        return db_id

    def _member_keys(self, member: str) -> PublicIdentity:
        meta = self.store.object_meta(member)
        if meta is None:
            raise ObjectNotFoundError(
                f"{member} is not known to this node; its create update must arrive first "
                "(its public key is needed to encrypt for it)")
        return meta.keys

    def readers(self, db_id: str) -> dict[str, bytes]:
        """oid -> public encryption key of everyone who may read ``db_id``'s encrypted fields."""
        meta = self.object_meta(db_id)
        out = {db_id.partition(":")[2]: meta.keys.box_key}
        for member in merge.current_members(self.store.auth_events(db_id, "r")):
            member_meta = self.store.object_meta(member)
            if member_meta is not None:
                out[member.partition(":")[2]] = member_meta.keys.box_key
            else:
                logger.warning("read-authorized %s of %s is unknown here; it cannot be given "
                               "the key of the new value", member, db_id)
        return out

    def seal_value(self, db_id: str, register: str, value: Any,
                   readers: dict[str, bytes] | None = None) -> dict[str, object]:
        """Encrypt a plain value (checked by the caller) for ``db_id`` and its current
        readers (or ``readers``), bound to register ``register`` of ``db_id``."""
        return seal(pack_value(value), self.readers(db_id) if readers is None else readers,
                    place(db_id, register))

    def grant_read_op(self, db_id: str, member: str, reader: str) -> Op:
        """A grant_read op that also gives ``member`` the keys of the current encrypted values.

        ``reader`` is an owned object able to open them (the object itself, usually).
        """
        box_key = self._member_keys(member).box_key
        reader_oid = reader.partition(":")[2]
        wraps: dict[bytes, bytes] = {}
        for name, reg in self.store.registers(db_id).items():
            if reg.encrypted and not reg.deleted:
                try:
                    value_key = self._value_key(db_id, name, reg, reader_oid)
                    # Only a value that opens in its own place: a sealed value someone
                    # copied here from elsewhere is never handed to a new reader.
                    open_sealed(merge.element_value(name, reg), value_key,
                                place(db_id, name))
                except DecryptionError:
                    continue
                wraps[merge.version_ref(reg.version)] = wrap_key(value_key, box_key)
        return Op(db_id, "grant_read", "", {"id": member, "w": wraps})

    # ----------------------------------------------------------------- reads
    def object_meta(self, db_id: str) -> merge.ObjectMeta:
        """Public keys and creation of a known object; ObjectNotFoundError otherwise."""
        meta = self.store.object_meta(db_id)
        if meta is None or meta.removed is not None:
            raise ObjectNotFoundError(f"{db_id} is {'removed' if meta else 'not known'} here")
        return meta

    def exists(self, db_id: str) -> bool:
        self._check_open()
        meta = self.store.object_meta(db_id)
        return meta is not None and meta.removed is None

    def read(self, db_id: str, name: str, *, reader: str | None = None,
             verified: bool = False, default: Any = None) -> Any:
        """The current value of register ``name``; decrypted as ``reader`` if encrypted."""
        self._check_open()
        reg = self.store.register(db_id, name)
        if reg is None or reg.deleted:
            if reg is None and not self.exists(db_id):
                raise ObjectNotFoundError(f"{db_id} is not known here")
            return default
        if verified:
            self.verify_register(db_id, name, reg)
        if not reg.encrypted:
            return merge.element_value(name, reg)
        if not reader:
            raise DecryptionError("no decryption key found (reading anonymously)")
        return self._open(db_id, name, reg, reader.partition(":")[2])

    def read_all(self, db_id: str) -> dict[str, merge.Register]:
        """Every live register of an object (raw; encrypted values stay sealed)."""
        self._check_open()
        return {k: r for k, r in self.store.registers(db_id).items() if not r.deleted}

    def _value_key(self, db_id: str, name: str, reg: merge.Register, reader_oid: str) -> bytes:
        identity = self.keyring.get(reader_oid)
        if identity is None:
            raise DecryptionError(f"no decryption key found ({reader_oid} is not owned here)")
        envelope = merge.element_value(name, reg)
        extra = None
        if identity.oid not in (envelope.get("k") or {}):
            wrapped = self.store.wrapped_key(db_id, merge.version_ref(reg.version), identity.oid)
            extra = {identity.oid: wrapped} if wrapped else None
        return open_value_key(envelope, identity, extra)

    def _open(self, db_id: str, name: str, reg: merge.Register, reader_oid: str) -> Any:
        value_key = self._value_key(db_id, name, reg, reader_oid)
        return unpack_value(open_sealed(merge.element_value(name, reg), value_key,
                                        place(db_id, name)))

    def display_value(self, db_id: str, name: str | None, reg: merge.Register | None) -> Any:
        """A register's value for listeners: decrypted if any owned key opens it."""
        if reg is None or reg.deleted:
            return None
        value = merge.element_value(name or "", reg)
        if not reg.encrypted:
            return value
        candidates = [db_id.partition(":")[2]]
        candidates += [oid for oid in (value.get("k") or {}) if oid in self.keyring]
        for reader_oid in candidates:
            try:
                return self._open(db_id, name or "", reg, reader_oid)
            except DecryptionError:
                continue
        return EncryptedValue(db_id, name)

    def _signed_op(self, db_id: str, name: str, ref: bytes) -> tuple[Update, int]:
        """The verified update and op index that ``ref`` (update id + index) names."""
        uid, index = ref[:32], int.from_bytes(ref[32:], "big")
        raw = self.store.raw_update(uid)
        if raw is None:
            raise IntegrityError(f"{db_id}:{name}: its update {uid.hex()[:12]} is not stored")
        try:
            update = decode(raw)
            caller = self.store.object_meta(update.caller)
            keys = update.creates() or (caller.keys if caller else None)
            if keys is None:
                raise IntegrityError(f"{db_id}:{name}: signer {update.caller} unknown")
            update.verify(keys)
        except InvalidUpdate as exc:
            raise IntegrityError(f"{db_id}:{name}: stored update does not verify: {exc}") from exc
        if update.id != uid or index >= len(update.ops):
            raise IntegrityError(f"{db_id}:{name}: value points outside its update")
        return update, index

    def verify_register(self, db_id: str, name: str, reg: merge.Register) -> None:
        """Raise IntegrityError unless ``reg`` is exactly what its signed update wrote.

        For a DList element the position is checked against its insert as well; that an
        element is deleted is not (a delete leaves no value to check).
        """
        if reg.version == b"" and reg.deleted:
            return  # a list element known only from its delete
        update, index = self._signed_op(db_id, name, merge.version_ref(reg.version))
        op = update.ops[index]
        if merge.version(update.timestamp, update.caller_oid, update.id, index) != reg.version:
            raise IntegrityError(f"{db_id}:{name}: version does not match its update")
        if op.obj != db_id or op_register(op, update.id, index) != name:
            raise IntegrityError(f"{db_id}:{name}: signed update wrote another field")
        if op.op in ("del", "ddel"):
            expected = merge.Register(reg.version, None, False, True)
        elif op.op in LIST_OPS:
            element = bytes.fromhex(name.partition("#")[2])
            insert, at = self._signed_op(db_id, name, element)
            position = insert.ops[at].value[0] if insert.ops[at].op.startswith("lins") else None
            expected = merge.Register(reg.version, [position, op.value[1]],
                                      op.op.endswith("_enc"), reg.deleted)
        else:
            value = op.value[1] if op.op in ("dset", "dset_enc") else op.value
            expected = merge.Register(reg.version, value, op.op.endswith("_enc"))
        if expected != reg:
            raise IntegrityError(f"{db_id}:{name}: stored value differs from the signed one")

    def state_digest(self) -> str:
        """A hash of the whole merged state (objects, registers, DList order, authorization
        events, key wraps): two nodes that hold the same state give the same digest."""
        digest = hashlib.blake2b(digest_size=32)
        with self._lock:
            for db_id in self.store.object_ids():
                meta = self.store.object_meta(db_id)
                digest.update(msgpack.packb([db_id, meta.pack() if meta else None]))
                registers = self.store.registers(db_id)
                for name in sorted(registers):
                    digest.update(msgpack.packb([name, registers[name].pack()]))
                for name in sorted({n.partition("#")[0] for n in registers if "#" in n}):
                    digest.update(msgpack.packb([name, self.store.list_range(db_id, name)]))
                for kind in ("r", "u"):
                    events = self.store.auth_events(db_id, kind)
                    digest.update(msgpack.packb(sorted(
                        [m, merge.pack_auth(e)] for m, e in events.items())))
                digest.update(msgpack.packb(sorted(self.store.wraps(db_id).items())))
        return digest.hexdigest()

    def verify_store(self) -> list[str]:
        """Re-check every stored value and log entry; return a list of problems (empty = ok)."""
        problems: list[str] = []
        for db_id in self.store.object_ids():
            for name, reg in self.store.registers(db_id).items():
                try:
                    self.verify_register(db_id, name, reg)
                except IntegrityError as exc:
                    problems.append(str(exc))
            for uid in self.store.history(db_id):
                if not self.store.has_update(uid):
                    problems.append(f"{db_id}: history names missing update {uid.hex()[:12]}")
        for uid in self.store.log_range():
            raw = self.store.raw_update(uid)
            if raw is None:
                problems.append(f"log names missing update {uid.hex()[:12]}")
                continue
            try:
                update = decode(raw)
            except InvalidUpdate as exc:
                problems.append(f"update {uid.hex()[:12]} is damaged: {exc}")
                continue
            if update.id != uid:
                problems.append(f"update {uid.hex()[:12]} is stored under the wrong id")
                continue
            keys = update.creates()
            if keys is None:
                meta = self.store.object_meta(update.caller)
                keys = meta.keys if meta else None
            if keys is None:
                problems.append(f"update {uid.hex()[:12]}: signer {update.caller} unknown")
                continue
            try:
                update.verify(keys)
            except InvalidUpdate:
                problems.append(f"update {uid.hex()[:12]}: signature does not verify")
        return problems

    def object_ids(self, model: str | None = None, *, owned: bool = False) -> list[str]:
        """db_ids of live objects (of ``model``), optionally only owned ones."""
        ids = [i for i in self.store.object_ids(model) if self.exists(i)]
        if owned:
            ids = [i for i in ids if self.is_owned(i)]
        return ids

    def history(self, db_id: str, field: str | None = None, *,
                include_rejected: bool = False) -> list[HistoryEntry]:
        """Stored updates of an object in merge order (timestamp, caller, id)."""
        entries = []
        sources = [("accepted", self.store.history(db_id))]
        if include_rejected:
            sources.append(("unauthorized", self.store.history(db_id, held=True)))
        for verdict, uids in sources:
            for raw in self.store.raw_updates(uids):
                if raw is None:
                    continue
                update = decode(raw)
                ops = tuple(o for o in update.ops if o.obj == db_id and (
                    field is None or o.field == field))
                if ops:
                    entries.append((update, HistoryEntry(update.hex_id, update.caller,
                                                         update.timestamp, verdict, ops)))
        entries.sort(key=lambda e: merge.order_key(e[0]))
        return [e for _, e in entries]

    # --------------------------------------------------------------- shipping
    def log_length(self) -> int:
        return self.store.log_length()

    def updates_since(self, seq: int = 0, limit: int | None = None) -> list[bytes]:
        """Raw signed updates from log position ``seq`` on, in store order."""
        stop = -1 if limit is None else seq + limit - 1
        uids = self.store.log_range(seq, stop)
        return [raw for raw in self.store.raw_updates(uids) if raw is not None]

    # ------------------------------------------------------------- listeners
    def _changes(self, update: Update, outcome: merge.Outcome, snap: pipeline.Snapshot,
                 local: bool, verdict: str) -> list[Change]:
        changes = []
        for event in outcome.events:
            model = event.db_id.partition(":")[0]
            if not self.listeners.wants(model, event.name):
                continue
            owned = self.is_owned(event.db_id)  # a dict lookup in the keyring
            encrypted = any(r is not None and r.encrypted for r in (event.old, event.new))
            ctx = Context(caller_id=update.caller, verified=True, authorized=outcome.authorized,
                          owned=owned, timestamp=update.timestamp, update_id=update.hex_id,
                          local=local, node_id=update.node.hex(), verdict=verdict,
                          equivocation=snap.equivocation, encrypted=encrypted)
            if event.kind in ("create", "remove"):
                changes.append(Change(event.kind, event.db_id, event.db_id, None, context=ctx))
                continue
            old = self.display_value(event.db_id, event.name, event.old)
            key = f"{event.db_id}:{event.name}"
            if event.kind == "delete":
                changes.append(Change("delete", event.db_id, key, event.name, old, None,
                                      context=ctx))
            else:
                new = self.display_value(event.db_id, event.name, event.new)
                changes.append(Change("update", event.db_id, key, event.name, old, new,
                                      context=ctx))
        return changes

    # -------------------------------------------------------------- lifecycle
    def _check_open(self) -> None:
        if self._closed:
            raise NodeNotRunningError("this node was shut down")

    @property
    def closed(self) -> bool:
        return self._closed

    def shutdown(self) -> None:
        """Stop the network, close the store and stop the embedded Redis. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self.network is not None:
            try:
                self.network.close()
            except DModelError:
                logger.exception("closing the network failed")
        with self._lock:
            self._stop_store()

    def _stop_store(self) -> None:
        self.store.close()
        if self._embedded is not None:
            self._embedded.stop()
        self._unlock_home()

    def _unlock_home(self) -> None:
        if self._home_lock is not None:
            self._home_lock.close()
            self._home_lock = None

    close = shutdown

    def __enter__(self) -> Node:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    def __repr__(self) -> str:
        return f"<Node {self.node_id.hex()[:8]} home={str(self.home)!r}>"


# ------------------------------------------------------------- default node

_default: Node | None = None
_default_lock = threading.Lock()


def default_node() -> Node:
    """The node started by ``dmodel.launch()``; NodeNotRunningError if there is none."""
    node = _default
    if node is None or node.closed:
        raise NodeNotRunningError("no dmodel node is running: call dmodel.launch() first "
                                  "(or pass node=...)")
    return node


def launch(home: str | os.PathLike[str] | None = None, **options: Any) -> Node:
    """Start the default node (PyDinemic's ``launch()``); see ``Node`` for the options."""
    global _default
    with _default_lock:
        if _default is not None and not _default.closed:
            raise ConfigurationError("a default node is already running; call shutdown() first")
        _default = Node(home, **options)
        return _default


def shutdown() -> None:
    """Stop the default node, if any."""
    global _default
    with _default_lock:
        node, _default = _default, None
    if node is not None:
        node.shutdown()


__all__ = ["HistoryEntry", "Node", "Stats", "default_home", "default_node", "launch",
           "shutdown"]
