"""Node: one peer. Wires the store, keyring, clock, listeners and bus around an Applier.

The node is the facade: reads, local writes and the lifecycle are here; applying
updates is ``node.applier`` (applier.py), encrypted values ``node.sealer``
(sealing.py), verification and history audit.py, the pending set pending.py.

Threads: ``write``/``create`` run on the caller's thread and apply under the apply
lock; ``ingest``/``ingest_many`` are called by the network's apply thread (live
updates) and its sync thread (catch-up), under the same lock, so never two at once.
Reads take no lock and may come from any thread.
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from .. import host, merge, pipeline
from ..clock import HybridClock
from ..config import DEFAULT_PREFIX, NodeConfig
from ..crypto import Identity
from ..errors import (
    ConfigurationError,
    DecryptionError,
    DModelError,
    KeyringError,
    NodeNotRunningError,
    ObjectNotFoundError,
    RejectedError,
    WaitTimeout,
)
from ..net.identity import load_node_key
from ..update import Op, Update
from . import audit, rights
from .applier import Applier
from .audit import HistoryEntry
from .home import open_home
from .pending import PendingLimits
from .root import RootKeeper
from .sealing import Sealer, live_meta
from .statesum import StateSums
from .writes import QueuedWrite, WriteQueue

logger = logging.getLogger(__name__)

# Seconds after the network starts by which a configured peer should have answered;
# one that has not is in ``unreached_peers()`` (the bus names it in a WARNING, see
# ``unreached_after`` in the README's Limits table).
PEER_REACH_SECONDS = 5.0


def _shutdown_at_exit(ref: weakref.ref[Node]) -> None:
    node = ref()
    if node is not None and not node.closed:
        try:
            node.shutdown()
        except Exception:  # at exit: nothing left to report to
            logger.debug("shutdown at exit failed", exc_info=True)


class Node:
    """One dmodel peer: a store, a keyring, a clock, listeners and (optionally) a bus.

    All arguments default to the ``DMODEL_*`` environment variables of the README
    (read by ``dmodel.config.NodeConfig``): ``home`` (DMODEL_HOME), ``listen``
    (DMODEL_LISTEN), ``peers`` (DMODEL_PEERS, comma-separated), ``discovery``
    (DMODEL_DISCOVERY), ``redis_url`` (DMODEL_REDIS_URL), ``passphrase``
    (DMODEL_PASSPHRASE), ``unauthorized_policy`` (DMODEL_UNAUTHORIZED_POLICY:
    ``"reject"`` or ``"listeners"``). ``config=`` (a resolved ``NodeConfig``) takes the
    place of all of those.

    ``dial``: which endpoints learned from peers (gossip, beacons) the node may connect
    to: ``"learned"`` (default: any ``tcp://`` one), ``"static"`` (none: only ``peers``)
    or a list of networks such as ``["10.0.0.0/8", "192.168.1.0/24"]``. Configured
    ``peers`` are always dialled. ``network_options`` holds the limits of the README's
    Limits table (``pending_*`` among them).
    """

    def __init__(self, home: str | os.PathLike[str] | None = None, *,
                 listen: str | None = None, peers: Iterable[str] | None = None,
                 discovery: bool | None = None, redis_url: str | None = None,
                 unauthorized_policy: str | None = None, passphrase: str | None = None,
                 skew: float | None = None, redis_prefix: str = DEFAULT_PREFIX,
                 now: Callable[[], int] = time.time_ns, curve: Any = None,
                 broker: Any = None, network_options: dict[str, Any] | None = None,
                 start_network: bool = True, config: NodeConfig | None = None,
                 retention: object = None, dial: str | Sequence[str] | None = None,
                 keep_root: bool = True) -> None:
        if config is None:
            config = NodeConfig.resolve(
                home, listen=listen, peers=peers, discovery=discovery, redis_url=redis_url,
                unauthorized_policy=unauthorized_policy, passphrase=passphrase, skew=skew,
                redis_prefix=redis_prefix, retention=retention)
        self.config = config
        self.home = config.home
        self.listen = config.listen
        self.peers = list(config.peers)
        self.discovery = config.discovery
        self.unauthorized_policy: merge.Policy = config.unauthorized_policy
        self.skew_ms = config.skew_ms
        self._home = open_home(config)
        self.node_id, self.keyring, self.store = (
            self._home.node_id, self._home.keyring, self._home.store)
        self._embedded = self._home.embedded
        # A node dropped without shutdown() still closes its home (and stops its Redis)
        # when collected; shutdown() runs the same finalizer, once.
        self._close_home = weakref.finalize(self, self._home.close)
        try:
            self.clock = HybridClock(now, last=self.store.last_hlc(), max_ahead_ms=self.skew_ms)
        except BaseException:
            self._home.close()
            raise
        if self._embedded is not None:
            # A program that ends without shutdown() still stops its Redis server.
            atexit.register(_shutdown_at_exit, weakref.ref(self))
        self.sealer = Sealer(self.store, self.keyring)
        # The applier's lock is the apply lock; the listener registry shares it, so
        # apply()/revoke() from other threads never race a dispatch (an RLock:
        # callbacks may apply listeners themselves).
        network_options = dict(network_options or {}, curve=curve, broker=broker)
        if dial is not None:
            network_options["dial"] = dial
        self.applier = Applier(self.store, self.clock, policy=self.policy_for,
                               skew_ms=self.skew_ms, is_owned=self.is_owned,
                               display_value=self.sealer.display_value,
                               retention=config.retention,
                               pending_limits=PendingLimits.take(network_options))
        self._lock = self.applier.lock
        key = load_node_key(config.home)
        # keep_root=False: a tool sharing a running peer's store checks that peer's root.
        self.root = RootKeeper(config.home, key.sign, key.public, self.store, self._lock,
                               self.applier.live, write=keep_root)
        self.root.start()
        self.listeners = self.applier.listeners
        self.stats = self.applier.stats
        self.writes = WriteQueue(self.applier, self.store, self.clock, self.node_id)
        self._closed = False
        self._network_started = 0.0
        # Woken after every stored update (and at shutdown): what wait() sleeps on.
        self._arrivals = threading.Condition()
        self.on_accepted(self._wake_waiters)
        self.network: Any = None
        self._network_options = network_options
        if self.clock.ahead_ms() > self.skew_ms:
            logger.warning("this host's clock is %.0f s behind the timestamps this node issued "
                           "before; peers hold its new updates until their clocks catch up: "
                           "fix the clock (NTP)", self.clock.ahead_ms() / 1000)
        held = self.applier.future.stored()
        if held:
            self.ingest_many(held)  # held by an earlier run: decided again (or held again)
        if start_network and (self.listen or self.peers or self.discovery or broker):
            try:
                self.start_network()
            except BaseException:
                self.shutdown()  # a node half set up keeps no Redis server running
                raise

    # ----------------------------------------------------------------- set-up
    def start_network(self, *, listen: str | None = None, peers: Iterable[str] | None = None,
                      discovery: bool | None = None, **options: Any) -> Any:
        """Start the bus, publishing and catch-up; returns ``node.network``.

        ``Node(..., start_network=False)`` then this: listeners applied in between see
        every update from the network. Arguments override the constructor's.
        """
        from ..net.replication import NetworkService  # late: the core works without networking

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
        self.applier.pending.limits = PendingLimits.take(merged, self.applier.pending.limits)
        self.network = NetworkService(self, listen=self.listen, peers=self.peers,
                                      discovery=self.discovery, **merged)
        self._network_started = time.monotonic()
        return self.network

    def unreached_peers(self, after: float = PEER_REACH_SECONDS) -> list[str]:
        """Configured peer endpoints with no connection yet, once the network has run
        ``after`` seconds (before that, and without a network: none)."""
        network = self.network
        if network is None or self._closed or \
                time.monotonic() - self._network_started < after:
            return []
        reached = {p.endpoint for p in network.peers().values() if p.connected}
        return [e for e in self.peers if e not in reached]

    def policy_for(self, model: str) -> merge.Policy:
        """The policy for unauthorized updates to ``model`` (its Meta, else the node's)."""
        return host.model_policy(model) or self.unauthorized_policy

    def on_accepted(self, callback: Callable[[Update, bool], None]) -> None:
        """Call ``callback(update, local)`` after every stored update (the bus publishes)."""
        self.applier.on_accepted(callback)

    def _wake_waiters(self, update: Update, local: bool) -> None:
        with self._arrivals:
            self._arrivals.notify_all()

    def wait(self, predicate: Callable[[], Any], timeout: float = 10.0,
             what: str = "the condition") -> Any:
        """Block until ``predicate()`` is truthy and return its value; it is checked now
        and after every update this node stores. WaitTimeout after ``timeout`` seconds,
        NodeNotRunningError if the node is shut down meanwhile."""
        deadline = time.monotonic() + timeout
        with self._arrivals:
            while True:
                self._check_open()
                result = predicate()
                if result:
                    return result
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise WaitTimeout(f"{what}: not there after {timeout:g} s")
                self._arrivals.wait(remaining)

    # -------------------------------------------------------------- pipeline
    def ingest(self, raw: bytes) -> pipeline.Decision | None:
        """Take an update from elsewhere. Never raises for bad input: it is counted and logged.

        Returns the decision, or None when the bytes are not an update at all.
        """
        return self.ingest_many([raw])[0]

    def ingest_many(self, raws: Iterable[bytes | Update], sources: Sequence[Any] | None = None
                    ) -> list[pipeline.Decision | None]:
        """Take several updates from elsewhere, in order, as one batch (raw bytes, or
        what :meth:`prepare_many` made of them).

        The batch is read from the store in one round trip, signatures are checked on
        a small thread pool, and everything accepted is committed in one atomic step;
        the result is the same as ingesting them one by one. ``sources[i]``: the peer
        ``raws[i]`` came from (the pending set's budgets are per source).
        """
        self._check_open()
        return self.applier.ingest_raw(raws, sources)

    def prepare_many(self, raws: Iterable[bytes]) -> list[Update | bytes]:
        """Decode updates and check the signatures that need no store read, on the
        calling thread and without the apply lock; hand the result to ``ingest_many``."""
        return self.applier.preverify(raws)

    @property
    def state_sums(self) -> StateSums:
        """Per-object digests of the merged state, summed by bucket (catch-up compares
        them with a peer's: dmodel.node.statesum)."""
        return self.applier.sums

    @property
    def pending_count(self) -> int:
        """Updates waiting for a missing dependency."""
        return len(self.applier.pending)

    def pending_needs(self) -> list[bytes | str]:
        """What the pending updates wait for: update ids (bytes) and db_ids (str)."""
        with self._lock:
            return self.applier.pending.needs()

    def release_gaps(self, links: Iterable[bytes] | None = None) -> None:
        """Decide now the updates that wait only for their previous update (a link that
        retention may have pruned everywhere), or only those waiting for one of
        ``links``; the node does it by itself after ``applier.CHAIN_WAIT_S``. For
        catch-up (no peer has these links) and for tools that know nothing more will come."""
        self._check_open()
        self.applier.release_gaps(0, None if links is None else set(links))

    @property
    def future_count(self) -> int:
        """Updates held because their timestamps are beyond the skew bound."""
        return len(self.applier.future)

    @property
    def _pending_bookkeeping(self) -> int:  # the pending set's index entries, for tests
        return self.applier.pending.bookkeeping()

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
        the update is decided against). Writes from several threads at once share one
        commit (``node/writes.py``); each is still signed, decided and acknowledged alone.
        """
        self._check_open()
        return self.writes.write(QueuedWrite(caller, self.identity(caller), ops))

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
            readers[member.partition(":")[2]] = self.sealer.member_keys(member).box_key
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

    # ------------------------------------------------------ encrypted values
    def readers(self, db_id: str) -> dict[str, bytes]:
        """oid -> public encryption key of everyone who may read ``db_id``'s encrypted fields."""
        return self.sealer.readers(db_id)

    def seal_value(self, db_id: str, register: str, value: Any,
                   readers: dict[str, bytes] | None = None) -> dict[str, object]:
        """Encrypt a plain value for ``db_id`` and its current readers (or ``readers``),
        bound to its register."""
        return self.sealer.seal_value(db_id, register, value, readers)

    def revoke_update_op(self, db_id: str, member: str) -> Op:
        """A revoke_update op naming ``member``'s updates of ``db_id`` accepted here."""
        return rights.revoke_update_op(self.store, db_id, member)

    def grant_read_op(self, db_id: str, member: str, reader: str) -> Op:
        """A grant_read op that also gives ``member`` the keys of the current encrypted values."""
        return self.sealer.grant_read_op(db_id, member, reader)

    def display_value(self, db_id: str, name: str | None, reg: merge.Register | None) -> Any:
        """A register's value for listeners: decrypted if any owned key opens it."""
        return self.sealer.display_value(db_id, name, reg)

    # ----------------------------------------------------------------- reads
    def object_meta(self, db_id: str) -> merge.ObjectMeta:
        """Public keys and creation of a known object; ObjectNotFoundError otherwise."""
        return live_meta(self.store, db_id)

    def exists(self, db_id: str) -> bool:
        self._check_open()
        meta = self.store.object_meta(db_id)
        return meta is not None and meta.removed is None

    def object_state(self, db_id: str) -> str:
        """``"live"``, ``"removed"`` (removed here, final) or ``"unknown"`` (its create has
        not arrived here, or never will)."""
        self._check_open()
        meta = self.store.object_meta(db_id)
        if meta is None:
            return "unknown"
        return "live" if meta.removed is None else "removed"

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
        return self.sealer.open(db_id, name, reg, reader.partition(":")[2])

    def read_all(self, db_id: str) -> dict[str, merge.Register]:
        """Every live register of an object (raw; encrypted values stay sealed)."""
        self._check_open()
        return {k: r for k, r in self.store.registers(db_id).items() if not r.deleted}

    def raw_register(self, db_id: str, name: str) -> merge.Register | None:
        """The stored register ``name`` (deleted ones included), or None."""
        return self.store.register(db_id, name)

    def members(self, db_id: str, kind: str) -> set[str]:
        """Current read (``"r"``) or update (``"u"``) authorized members of ``db_id``."""
        return set(merge.current_members(self.store.auth_events(db_id, kind)))

    def list_length(self, db_id: str, name: str) -> int:
        return self.store.list_length(db_id, name)

    def list_range(self, db_id: str, name: str, start: int = 0, stop: int = -1) -> list[bytes]:
        """Element ids of a DList in list order, ``start``..``stop`` inclusive."""
        return self.store.list_range(db_id, name, start, stop)

    def list_keys_range(self, db_id: str, name: str, start: int, stop: int) -> list[bytes]:
        """Order keys (position + 0x00 + element id) of a DList, ``start``..``stop``."""
        return self.store.list_keys_range(db_id, name, start, stop)

    def list_key_below(self, db_id: str, name: str, position: bytes) -> bytes | None:
        """The order key of the last element whose position is below ``position``."""
        return self.store.list_key_below(db_id, name, position)

    def object_ids(self, model: str | None = None, *, owned: bool = False) -> list[str]:
        """db_ids of live objects (of ``model``), optionally only owned ones."""
        ids = [i for i in self.store.object_ids(model) if self.exists(i)]
        if owned:
            ids = [i for i in ids if self.is_owned(i)]
        return ids

    # --------------------------------------------------------------- queries
    def index_range(self, model: str, field: str, low: bytes, high: bytes, *,
                    reverse: bool = False, offset: int = 0, count: int = -1) -> list[bytes]:
        """Members of the value index of ``model.field`` between two ZRANGEBYLEX bounds
        (see dmodel/query.py); an index this store does not keep yet is built first."""
        self._ensure_index(model, field)
        return self.store.index_range(model, field, low, high, reverse=reverse,
                                      offset=offset, count=count)

    def index_count(self, model: str, field: str, low: bytes, high: bytes) -> int:
        """How many members ``index_range`` would give (without offset or count)."""
        self._ensure_index(model, field)
        return self.store.index_count(model, field, low, high)

    def _ensure_index(self, model: str, field: str) -> None:
        self._check_open()
        if not self.store.has_index(model, field):
            with self._lock:  # the build reads, then writes: no commit in between
                self.store.ensure_index(model, field)

    def field_registers(self, db_ids: Sequence[str], name: str) -> list[merge.Register | None]:
        """Register ``name`` of each object, raw (what a query scans)."""
        self._check_open()
        return self.store.field_registers(db_ids, name)

    # ----------------------------------------------------------------- audit
    def verify_register(self, db_id: str, name: str, reg: merge.Register) -> None:
        """Raise IntegrityError unless ``reg`` is exactly what its signed update wrote."""
        audit.verify_register(self.store, db_id, name, reg)

    def verify_store(self, progress: audit.Progress | None = None) -> list[str]:
        """Re-check every stored value and log entry, and the store against the node's
        signed root (node/root.py); return a list of problems (empty = ok)."""
        self.settle()
        return self.root.verify() + audit.verify_store(self.store, progress=progress)

    def state_digest(self) -> str:
        """A hash of the whole merged state: nodes that hold the same state agree on it."""
        with self._lock:
            self.applier.pruner.flush()
            return audit.state_digest(self.store)

    def history(self, db_id: str, field: str | None = None, *,
                include_rejected: bool = False) -> list[HistoryEntry]:
        """Stored updates of an object in merge order (timestamp, caller, id)."""
        self.settle()
        return audit.history(self.store, db_id, field, include_rejected=include_rejected)

    def settle(self) -> None:
        """Finish the pruning that retention has gathered (it runs in batches, see
        node/pruner.py), so that the store holds exactly what the policy keeps (and, on a
        Redis Cluster, its journal only the commits under way)."""
        with self._lock:
            self.applier.pruner.flush()
            self.store.settle()

    # --------------------------------------------------------------- shipping
    def log_length(self) -> int:
        return self.store.log_length()

    def missing_updates(self, uids: Sequence[bytes]) -> list[bytes]:
        """The ids among ``uids`` worth fetching: not stored here, and not stored here
        lately either (an update retention pruned since would only be dropped again
        as a replay)."""
        return self.applier.missing(uids)

    def updates_since(self, seq: int = 0, limit: int | None = None) -> list[bytes]:
        """Raw signed updates from log position ``seq`` on, in store order."""
        stop = -1 if limit is None else seq + limit - 1
        uids = self.store.log_range(seq, stop)
        return [raw for raw in self.store.raw_updates(uids) if raw is not None]

    # -------------------------------------------------------------- lifecycle
    def _check_open(self) -> None:
        if self._closed:
            raise NodeNotRunningError(f"this node was shut down; reopen its home with "
                                      f"dmodel.Node({str(self.home)!r}) or "
                                      f"dmodel.launch({str(self.home)!r})")

    @property
    def closed(self) -> bool:
        return self._closed

    def shutdown(self) -> None:
        """Stop the network, close the store and stop the embedded Redis. Idempotent."""
        if self._closed:
            return
        self._closed = True
        with self._arrivals:
            self._arrivals.notify_all()  # waiters see the node closed
        self.applier.future.stop()
        if self.network is not None:
            try:
                self.network.close()
            except DModelError:
                logger.exception("closing the network failed")
        self.applier.sums.close()
        with self._lock:
            self.applier.pruner.stop()
            try:
                self.applier.pruner.flush()
            except DModelError:
                logger.exception("pruning at shutdown failed")
        self.root.close()
        with self._lock:
            self._close_home()

    close = shutdown

    def __enter__(self) -> Node:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    def __repr__(self) -> str:
        return f"<Node {self.node_id.hex()[:8]} home={str(self.home)!r}>"


__all__ = ["Node"]
