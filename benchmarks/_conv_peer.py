"""The convergence benchmark's peer commands, loaded into ``dmodel peer``.

Private to ``bench_convergence.py`` (not a benchmark, not a tool). Every peer is a
``dmodel peer --stdin-commands --commands benchmarks/_conv_peer.py:ConvCommands``
process (one node with its own embedded Redis), driven by
``dmodel.tools.driver.PeerProcess``; :class:`ConvCommands` adds the benchmark's
requests to the peer's own, as ``_children.py`` describes.

``conv_digest`` is ``Node.state_digest()`` (the hash the peer's own ``digest`` op
answers: every known object's metadata, registers, DList orders, authorization events
and key wraps), taken while the node's apply lock is held, plus, separately, a BLAKE2b
of the set of stored update ids, the time it waited for the lock and the node's
stats. Nothing that depends on arrival order (the log order, per-object history
lists) is included.

"""

from __future__ import annotations

import hashlib
import random
import sys
import time
from pathlib import Path
from typing import Any

if str(Path(__file__).resolve().parent) not in sys.path:  # loaded by dmodel peer --commands
    sys.path.insert(0, str(Path(__file__).resolve().parent))

import _children  # noqa: E402 - the benchmarks folder, just put on sys.path

WIDE_FIELDS = 100  # fields of the model written 100 at a time in one transaction


class ConvCommands(_children.BenchCommandsBase):
    """The bench_convergence requests (``op_<name>``), built by ``dmodel peer`` as
    ``ConvCommands(peer)`` once its node runs."""

    def __init__(self, peer: Any) -> None:
        import dmodel

        class ConvWriter(dmodel.DModel):
            """The identity a peer writes as on objects it does not own."""

            label = dmodel.DField("label", False)

        class ConvItem(dmodel.DModel):
            n = dmodel.DField("n", False)
            m = dmodel.DField("m", False)
            items = dmodel.DList("items")

        wide = {f"f{k}": dmodel.DField(f"f{k}", False) for k in range(WIDE_FIELDS)}
        self.wide_model = type("ConvWide", (dmodel.DModel,), wide)
        self.writer_model = ConvWriter
        self.item_model = ConvItem
        super().__init__(peer)
        self.writer: Any = None
        self.wide: Any = None

    # ------------------------------------------------------------- commands
    def op_create_writer(self, req: dict[str, Any]) -> dict[str, Any]:
        self.writer = self.writer_model([], node=self.node)
        return {"db_id": self.writer.db_id}

    def op_create_items(self, req: dict[str, Any]) -> dict[str, Any]:
        """``count`` items owned here, ``update`` ids in their update-authorized set."""
        update = list(req.get("update", ()))
        ids = [self.item_model.create(update=update, node=self.node, n=0).db_id
               for _ in range(int(req["count"]))]
        return {"ids": ids, "log_length": self.node.log_length()}

    def op_create_wide(self, req: dict[str, Any]) -> dict[str, Any]:
        self.wide = self.wide_model([], node=self.node)
        return {"db_id": self.wide.db_id, "log_length": self.node.log_length()}

    def op_wait_objects(self, req: dict[str, Any]) -> dict[str, Any]:
        """Wait until every object in ``ids`` is known here (or ``timeout`` s pass)."""
        ids, timeout = list(req["ids"]), float(req.get("timeout", 30))
        deadline = time.monotonic() + timeout
        missing = [i for i in ids if not self.node.exists(i)]
        while missing and time.monotonic() < deadline:
            time.sleep(0.02)
            missing = [i for i in missing if not self.node.exists(i)]
        return {"reached": not missing, "missing": len(missing)}

    def op_write_for(self, req: dict[str, Any]) -> dict[str, Any]:
        """From wall time ``start_ns`` for ``seconds``: random writes to the items ``ids``.

        Items this node owns are written as themselves, the others as this node's writer
        object (which their update-authorized set names). The mix, per write: set ``n``
        (60%), set ``m`` (20%), delete ``m`` (5%), DList append (10%), DList insert at a
        random index (5%). Each write is one signed update.
        """
        ids, seconds = list(req["ids"]), float(req["seconds"])
        rng = random.Random(int(req.get("seed", 0)))
        tag = str(req.get("tag", "p"))
        objs = []
        for db_id in ids:
            caller = db_id if self.node.is_owned(db_id) else self.writer.db_id
            objs.append(self.item_model(db_id, caller, node=self.node))
        counts = {"set": 0, "delete": 0, "append": 0, "insert": 0}
        errors: dict[str, int] = {}
        start_ns = int(req.get("start_ns", time.time_ns()))
        wait = (start_ns - time.time_ns()) / 1e9
        if wait > 0:
            time.sleep(min(wait, 10.0))
        cpu0 = self.cpu()
        remote0 = self.node.stats.remote
        latencies: list[int] = []
        first_ns = time.time_ns()
        end_ns = first_ns + int(seconds * 1e9)
        i = 0
        now = first_ns
        while now < end_ns:
            obj = objs[rng.randrange(len(objs))]
            r = rng.random()
            value = f"{tag}{i}"
            try:
                if r < 0.60:
                    obj.n.set(value)
                    counts["set"] += 1
                elif r < 0.80:
                    obj.m.set(value)
                    counts["set"] += 1
                elif r < 0.85:
                    obj.m.delete()
                    counts["delete"] += 1
                elif r < 0.95:
                    obj.items.append(value)
                    counts["append"] += 1
                else:
                    lst = obj.items
                    lst.insert(rng.randint(0, lst.length()), value)
                    counts["insert"] += 1
            except Exception as exc:  # counted and reported; the loop is bounded by time
                name = type(exc).__name__
                errors[name] = errors.get(name, 0) + 1
            i += 1
            last, now = now, time.time_ns()
            latencies.append(now - last)
        cpu1 = self.cpu()
        written = sum(counts.values())
        latencies.sort()
        pct = {f"p{q}_ms": round(latencies[min(len(latencies) - 1, len(latencies) * q // 100)]
                                 / 1e6, 2) for q in (50, 90, 99)} if latencies else {}
        return {"written": written, "counts": counts, "errors": errors, "first_ns": first_ns,
                "last_ns": now, "elapsed": (now - first_ns) / 1e9,
                "write_ms": {"mean_ms": round(sum(latencies) / len(latencies) / 1e6, 2)
                             if latencies else 0.0, **pct,
                             "max_ms": round(latencies[-1] / 1e6, 1) if latencies else 0.0},
                "remote_applied": self.node.stats.remote - remote0,
                "cpu": {k: cpu1[k] - cpu0[k] for k in cpu0},
                "log_length": self.node.log_length()}

    def op_tx_write(self, req: dict[str, Any]) -> dict[str, Any]:
        """``n`` transactions, each setting all 100 fields of the wide object (one update)."""
        n, start = int(req["n"]), int(req.get("start", 0))  # start: transactions before
        obj = self.wide
        names = [f"f{k}" for k in range(WIDE_FIELDS)]
        cpu0 = self.cpu()
        first_ns = time.time_ns()
        start = time.perf_counter()
        for t in range(n):
            base = (start + t + 1) * WIDE_FIELDS
            with obj.transaction():
                for k, name in enumerate(names):
                    setattr(obj, name, base + k)
        elapsed = time.perf_counter() - start
        cpu1 = self.cpu()
        return {"n": n, "elapsed": elapsed, "first_ns": first_ns, "last_ns": time.time_ns(),
                "cpu": {k: cpu1[k] - cpu0[k] for k in cpu0},
                "log_length": self.node.log_length()}

    def op_mark(self, req: dict[str, Any]) -> dict[str, Any]:
        self.recorder.mark()
        return {"log_length": self.node.log_length(), "cpu": self.cpu()}

    def op_wait_log(self, req: dict[str, Any]) -> dict[str, Any]:
        """Wait until the log holds ``target`` updates (or ``timeout`` s pass)."""
        target = int(req["target"])
        length, _ = self.wait_log(target, float(req.get("timeout", 60)), poll=0.005)
        return {"reached": length >= target, "log_length": length,
                "applied": self.recorder.as_dict(), "cpu": self.cpu()}

    def op_read_wide(self, req: dict[str, Any]) -> dict[str, Any]:
        """The wide object's fields as this node sees them (a spot check of B's copy)."""
        db_id = req["db_id"]
        return {"values": [self.node.read(db_id, f"f{k}") for k in range(WIDE_FIELDS)]}

    def op_conv_digest(self, req: dict[str, Any]) -> dict[str, Any]:
        started = time.perf_counter()
        with self.node._lock:  # the apply lock (an RLock): one consistent view
            locked = time.perf_counter()
            taken_ns = time.time_ns()
            state = self.node.state_digest()
            uids = sorted(self.node.store.log_range())
            stats = self._stats()
        return {"state": state,
                "updates": hashlib.blake2b(b"".join(uids), digest_size=16).hexdigest(),
                "update_count": len(uids), "objects": len(self.node.store.object_ids()),
                "taken_ns": taken_ns, "lock_wait_seconds": round(locked - started, 4),
                "seconds": round(time.perf_counter() - locked, 4), "stats": stats}
