"""A long-lived peer (``dmodel peer``) and the JSON-lines protocol that drives it.

``dmodel peer`` starts a node with networking, prints ``endpoint <its ROUTER endpoint>``
as the first line on stdout, logs one line per event to stderr, and runs until
SIGINT/SIGTERM (or ``quit``/end of input with ``--stdin-commands``).

With ``--stdin-commands`` the peer reads one JSON object per line on stdin and
answers each with one JSON object per line on stdout, in order. A request has an
``op`` and may have an ``id``, which the answer echoes. An answer is
``{"ok": true, ...}`` or ``{"ok": false, "error": "<ExceptionClass>", "message": "..."}``
(``error`` is ``Timeout`` when a ``wait`` runs out of time, ``ProtocolError`` for a
request that cannot be understood). Values are JSON; bytes come back as hex.

    op          arguments (defaults)                          answer fields
    ping                                                      node_id, endpoint, name, pid
    create      model, fields ({}), authorized ([]),          db_id
                read ([]), update ([])
    set         db_id, field, value, caller (the object)      -
    fill        db_id, field, count, caller                   count   (count updates: 1..count)
    get         db_id, field, caller ("" = anonymous)         value
    wait        db_id, field, value, caller, timeout (10)     waited  (seconds)
    grant       db_id, member, access ("read"|"update"),      -
                caller
    ls          filter ("*")                                  ids
    stats                                                     stats   (see Peer.stats)
    sync                                                      pulled
    wait_peers  n (1), timeout (10)                           ready (bool), peers (ready now)
    digest                                                    state (Node.state_digest()),
                                                              log_length
    quit                                                      -       (then the peer stops)

``dmodel peer --commands FILE.py:CLASS`` (or ``module:CLASS``) adds commands:
``CLASS(peer)`` is built once the node runs, and each of its ``op_<name>(request) ->
dict`` methods answers the op ``<name>`` (an op of the table above cannot be replaced).
The benchmarks' peers are such classes. An exception a command does not expect is
logged and answered with its class name as ``error``; the peer keeps serving.

``wait`` returns once ``db_id`` is known here, ``field`` (if given) holds a value and
that value equals ``value`` (if given), read as ``caller``.
"""

from __future__ import annotations

import contextlib
import datetime
import importlib
import importlib.util
import json
import logging
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import IO, Any, Literal, overload

from ..actions import DAction
from ..errors import CommandError, ConfigurationError, DecryptionError, DModelError
from ..filters import compile as compile_filter
from ..model import BoundDict, BoundField, DDict, DField, DModel, model_class, transaction
from ..node import Node
from ..runtime import tune_gc
from .output import jsonable, utc_iso

logger = logging.getLogger(__name__)


# ------------------------------------------------------------ loading code


def _load_file(path: Path) -> Any:
    if not path.is_file():
        raise ConfigurationError(f"no such file: {path}")
    name = f"dmodel_user_{path.stem}_{abs(hash(str(path.resolve()))):x}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ConfigurationError(f"cannot load {path} as Python code")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        del sys.modules[name]
        raise ConfigurationError(f"loading {path} failed: {type(exc).__name__}: {exc}") from exc
    return module


def _import(module: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ConfigurationError(f"cannot import {module}: {exc}") from exc
    except Exception as exc:
        raise ConfigurationError(
            f"importing {module} failed: {type(exc).__name__}: {exc}") from exc


def load_models(spec: str) -> list[type[DModel]]:
    """Import model definitions: ``module``, ``module:Class``, ``file.py`` or ``file.py:Class``.

    Returns the DModel subclasses loaded (all of the module's when no class is named).
    """
    where, _, cls_name = spec.partition(":") if not spec.endswith(".py") else (spec, "", "")
    try:
        module = _load_file(Path(where)) if where.endswith(".py") else _import(where)
    except ConfigurationError as exc:
        raise ConfigurationError(f"bad model spec {spec!r}: {exc}") from exc
    if cls_name:
        cls = getattr(module, cls_name, None)
        if not (isinstance(cls, type) and issubclass(cls, DModel)):
            raise ConfigurationError(f"bad model spec {spec!r}: {cls_name} is not a DModel "
                                     f"class of {where}")
        return [cls]
    found = [v for v in vars(module).values()
             if isinstance(v, type) and issubclass(v, DModel) and v is not DModel]
    if not found:
        raise ConfigurationError(f"bad model spec {spec!r}: it defines no DModel class")
    return found


def load_commands(spec: str) -> type:
    """``'module:Class'`` or ``'file.py:Class'`` -> the class (see ``--commands``)."""
    where, _, cls_name = spec.rpartition(":")
    try:
        if not where or not cls_name:
            raise ConfigurationError("expected 'module:Class' or 'file.py:Class'")
        module = _load_file(Path(where)) if where.endswith(".py") else _import(where)
        cls = getattr(module, cls_name, None)
        if not isinstance(cls, type):
            raise ConfigurationError(f"{cls_name!r} is not a class of {where}")
    except ConfigurationError as exc:
        raise ConfigurationError(f"bad commands spec {spec!r}: {exc}") from exc
    return cls


def parse_listener(spec: str) -> tuple[DAction, str]:
    """``'pkg.module.Class:FILTER'`` or ``'file.py:Class:FILTER'`` -> (listener, filter).

    The class is instantiated without arguments; the filter is checked.
    """
    try:
        return _parse_listener(spec)
    except ConfigurationError as exc:
        raise ConfigurationError(f"bad listener spec {spec!r}: {exc}") from exc


def _parse_listener(spec: str) -> tuple[DAction, str]:
    if ".py:" in spec:
        path, _, rest = spec.partition(".py:")
        cls_name, sep, pattern = rest.partition(":")
        where = path + ".py"
        module = _load_file(Path(where))
    else:
        cls_path, sep, pattern = spec.partition(":")
        where, _, cls_name = cls_path.rpartition(".")
        if not where or not cls_name:
            raise ConfigurationError("expected 'package.module.Class:FILTER' or "
                                     "'file.py:Class:FILTER'")
        module = _import(where)
    if not sep or not pattern:
        raise ConfigurationError("a filter must follow the class, "
                                 "e.g. 'dmodel.listeners.LogChanges:Person:*'")
    cls = getattr(module, cls_name, None)
    if not (isinstance(cls, type) and issubclass(cls, DAction)):
        raise ConfigurationError(f"{cls_name!r} is not a DAction class of {where}")
    compile_filter(pattern)
    try:
        listener = cls()
    except TypeError as exc:
        raise ConfigurationError(f"{cls_name}() cannot be built without arguments "
                                 f"({exc})") from exc
    return listener, pattern


# ------------------------------------------------------------ the protocol


def encode(message: dict[str, Any]) -> str:
    """One protocol line (no newline)."""
    return json.dumps(message, default=jsonable, separators=(",", ":"))


CONNECTED_META = "peer:connected"
"""The store meta key where a running ``dmodel peer`` keeps the hex node ids of its
connected peers (a JSON list), for ``dmodel status`` on its home."""


def connected_peers(network: Any) -> list[str]:
    """The hex node ids of the peers ``network`` (a node's, or None) is connected to."""
    if network is None:
        return []
    return sorted(nid for nid, info in network.peers().items() if info.connected)


class Peer:
    """A running node plus what ``dmodel peer`` adds: commands, status, progress."""

    def __init__(self, node: Node, *, name: str = "peer",
                 stopping: threading.Event | None = None) -> None:
        self.node = node
        self.name = name
        self.stopping = stopping if stopping is not None else threading.Event()
        self.progress: dict[str, tuple[int, int]] = {}
        self._out_lock = threading.Lock()
        self._quit_requested = False
        self._recorded: list[str] | None = None  # what CONNECTED_META says
        self.failure: BaseException | None = None
        """What stopped the peer abnormally (the process then exits non-zero), or None."""
        if node.network is not None:
            node.network.on_progress(self._on_progress)
        self._ops: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
            "ping": self._ping, "create": self._create, "set": self._set, "fill": self._fill,
            "get": self._get, "wait": self._wait, "grant": self._grant, "ls": self._ls,
            "stats": lambda req: {"stats": self.stats()}, "sync": self._sync,
            "wait_peers": self._wait_peers, "digest": self._digest, "quit": self._quit,
        }

    def add_commands(self, commands: object) -> None:
        """Answer the ops of ``commands``' ``op_<name>(request) -> dict`` methods too."""
        for attr in dir(commands):
            if not attr.startswith("op_"):
                continue
            op = attr[3:]
            if op in self._ops:
                raise ConfigurationError(f"{type(commands).__name__}.{attr}: the op {op!r} "
                                         "is already answered by the peer")
            self._ops[op] = getattr(commands, attr)

    def _on_progress(self, peer: str, done: int, total: int) -> None:
        self.progress[peer] = (done, total)

    @property
    def endpoint(self) -> str | None:
        return self.node.network.endpoint if self.node.network is not None else None

    # ------------------------------------------------------------- serving
    def handle(self, request: Any) -> dict[str, Any]:
        """Answer one decoded request."""
        if not isinstance(request, dict):
            return {"ok": False, "error": "ProtocolError", "message": "a request is an object"}
        answer: dict[str, Any] = {}
        if "id" in request:
            answer["id"] = request["id"]
        op = request.get("op")
        handler = self._ops.get(op) if isinstance(op, str) else None
        try:
            if handler is None:
                raise CommandError("ProtocolError", f"unknown op {op!r}; known: "
                                                    f"{', '.join(sorted(self._ops))}")
            answer.update(ok=True, **handler(request))
        except CommandError as exc:
            answer.update(ok=False, error=exc.code, message=str(exc))
        except DModelError as exc:
            answer.update(ok=False, error=type(exc).__name__, message=str(exc))
        except (KeyError, TypeError, ValueError) as exc:
            answer.update(ok=False, error="ProtocolError",
                          message=f"bad request for {op!r}: {type(exc).__name__}: {exc}")
        except Exception as exc:  # answer, never die: the parent decides what it means
            logger.exception("%s failed", op)
            answer.update(ok=False, error=type(exc).__name__, message=str(exc))
        return answer

    def handle_line(self, line: str) -> dict[str, Any]:
        """Answer one protocol line."""
        try:
            request = json.loads(line)
        except ValueError as exc:
            return {"ok": False, "error": "ProtocolError", "message": f"not JSON: {exc}"}
        return self.handle(request)

    def serve(self, stdin: IO[str], stdout: IO[str]) -> None:
        """Answer requests from ``stdin`` until ``quit`` or end of input; then stop.

        No request ends it: whatever one raises is answered as an error line. If the
        channel itself breaks, ``failure`` is set and the peer stops (non-zero exit).
        """
        try:
            for line in stdin:
                if not line.strip():
                    continue
                try:
                    text = encode(self.handle_line(line))
                except Exception as exc:  # an answer that cannot be encoded, say
                    logger.exception("answering %r failed", line[:200])
                    text = encode({"ok": False, "error": type(exc).__name__,
                                   "message": str(exc)})
                with self._out_lock:
                    stdout.write(text + "\n")
                    stdout.flush()
                if self._quit_requested or self.stopping.is_set():
                    break
        except (OSError, ValueError) as exc:  # stdout or stdin closed under us
            logger.info("command channel closed: %s", exc)
        except BaseException as exc:
            logger.exception("the command channel failed")
            self.failure = exc
        finally:
            self.stopping.set()

    def run(self, *, stdin_commands: bool = False, status_interval: float = 0.0,
            stdin: IO[str] | None = None, stdout: IO[str] | None = None) -> None:
        """Run until ``stopping`` is set (see :func:`stop_on_signals`), ``quit`` or end of
        input; then shut the node down.
        """
        tune_gc()  # started: freeze the long-lived objects, fewer full GCs (dmodel.runtime)
        try:
            if stdin_commands:
                threading.Thread(target=self.serve, args=(stdin or sys.stdin,
                                                          stdout or sys.stdout),
                                 name="dmodel-peer-commands", daemon=True).start()
            next_status = time.monotonic() + status_interval
            next_record = time.monotonic()
            while not self.stopping.is_set():
                if time.monotonic() >= next_record:
                    with contextlib.suppress(DModelError):  # bookkeeping for `dmodel status`
                        self.record_connected()
                    next_record = time.monotonic() + 1.0
                # Short waits keep the main thread responsive to signals.
                self.stopping.wait(0.2)
                if status_interval > 0 and time.monotonic() >= next_status:
                    self.log_status()
                    next_status = time.monotonic() + status_interval
        finally:
            logger.info("shutting down")
            with contextlib.suppress(DModelError):
                self.record_connected(stopping=True)
            self.node.shutdown()

    def record_connected(self, *, stopping: bool = False) -> None:
        """Keep the connected peers' hex ids under CONNECTED_META (written when they
        change; none once ``stopping``)."""
        connected = [] if stopping else connected_peers(self.node.network)
        if connected != self._recorded:
            self.node.store.set_meta(CONNECTED_META, json.dumps(connected))
            self._recorded = connected

    # --------------------------------------------------------------- state
    def stats(self) -> dict[str, Any]:
        """The node's counters plus log length, pending count, peers and catch-up progress."""
        node = self.node
        out = node.stats.as_dict()
        out["rejected_total"] = sum(node.stats.rejected.values())
        out["dropped_total"] = sum(node.stats.dropped.values())
        out["log_length"] = node.log_length()
        out["pending"] = node.pending_count
        out["node_id"] = node.node_id.hex()
        out["endpoint"] = self.endpoint
        if node.network is not None:
            peers = node.network.peers()
            out["peers"] = sum(1 for p in peers.values() if p.ready)
            out["network"] = dict(node.network.stats)
        else:
            out["peers"] = 0
        out["connected"] = connected_peers(node.network)
        out["catchup"] = {peer: list(pos) for peer, pos in self.progress.items()}
        return out

    def status(self) -> dict[str, Any]:
        """What a status line tells: ready peers, the connected ones (hex node ids),
        updates in/local/out/rejected/dropped, pending, log length."""
        s = self.stats()
        unreached = s.get("network", {}).get("guard", {}).get("unreached")
        out = {"peers": s["peers"], "connected": s["connected"], "in": s["remote"],
               "local": s["local"], "out": s["published"], "rejected": s["rejected_total"],
               "dropped": s["dropped_total"], "pending": s["pending"], "log": s["log_length"]}
        if unreached:
            out["unreached"] = list(unreached)
        return out

    def status_line(self, status: dict[str, Any] | None = None) -> str:
        """The status as one line of text (connected peers by their first 8 hex digits)."""
        s = self.status() if status is None else status
        connected = ",".join(nid[:8] for nid in s["connected"]) or "-"
        fields = [f"{k}={v}" for k, v in s.items() if k not in ("connected", "unreached")]
        unreached = [f"unreached={','.join(s['unreached'])}"] if s.get("unreached") else []
        return " ".join(["status", *fields, f"connected={connected}", *unreached])

    def log_status(self) -> None:
        """Log the status line (with ``--json``, the status object: see JsonLines)."""
        status = self.status()
        logger.info("%s", self.status_line(status), extra={"data": {"status": status}})

    # ---------------------------------------------------------- operations
    def _model(self, name: str) -> type[DModel]:
        cls = model_class(name)
        if cls is None:
            raise CommandError("UnknownModel", f"model {name!r} is not loaded in this peer "
                                               "(start it with --models)")
        return cls

    def _bound(self, db_id: str, field: str, caller: str | None) -> BoundField | BoundDict:
        cls = self._model(db_id.partition(":")[0])
        obj = cls(db_id, caller, node=self.node)
        name, _, key = field.partition(":")
        for f in cls._meta.fields.values():
            if f.name == name and isinstance(f, DField) and not key:
                return BoundField(obj, f)
            if f.name == name and isinstance(f, DDict) and key:
                return BoundDict(obj, f)
        raise CommandError("UnknownField", f"{cls.__name__} has no field {field!r}")

    def _write(self, bound: BoundField | BoundDict, field: str, value: Any) -> None:
        if isinstance(bound, BoundDict):
            bound.set(field.partition(":")[2], value)
        else:
            bound.set(value)

    def _ping(self, req: dict[str, Any]) -> dict[str, Any]:
        return {"node_id": self.node.node_id.hex(), "endpoint": self.endpoint,
                "name": self.name, "pid": os.getpid()}

    def _create(self, req: dict[str, Any]) -> dict[str, Any]:
        cls = self._model(req["model"])
        authorized = _ids(req.get("authorized", []))
        db_id = self.node.create(cls._meta.name, read=[*authorized, *_ids(req.get("read", []))],
                                 update=[*authorized, *_ids(req.get("update", []))])
        fields = req.get("fields") or {}
        if not isinstance(fields, dict):
            raise CommandError("ProtocolError", "fields must be an object")
        if fields:
            bound = {f: self._bound(db_id, f, db_id) for f in fields}
            with transaction(db_id, node=self.node):
                for f, value in fields.items():
                    self._write(bound[f], f, value)
        return {"db_id": db_id}

    def _set(self, req: dict[str, Any]) -> dict[str, Any]:
        field = req["field"]
        self._write(self._bound(req["db_id"], field, req.get("caller")), field, req["value"])
        return {}

    def _fill(self, req: dict[str, Any]) -> dict[str, Any]:
        field, count = req["field"], _number(req, "count", None, 0, 10_000_000, whole=True)
        bound = self._bound(req["db_id"], field, req.get("caller"))
        for i in range(1, count + 1):
            self._write(bound, field, i)
        return {"count": count}

    def _get(self, req: dict[str, Any]) -> dict[str, Any]:
        db_id = req["db_id"]
        caller = req.get("caller", db_id)
        return {"value": self.node.read(db_id, req["field"], reader=caller or None)}

    def _wait(self, req: dict[str, Any]) -> dict[str, Any]:
        db_id, field = req["db_id"], req.get("field")
        caller = req.get("caller", db_id)
        timeout = _number(req, "timeout", 10.0, 0, MAX_TIMEOUT)
        start = time.monotonic()
        deadline = start + timeout
        last = "unknown here"
        while True:
            if self.node.exists(db_id):
                if field is None:
                    break
                if field in self.node.read_all(db_id):
                    if "value" not in req:
                        break
                    try:
                        value = self.node.read(db_id, field, reader=caller or None)
                    except DecryptionError as exc:
                        last = str(exc)
                    else:
                        if value == req["value"]:
                            break
                        last = f"{field} = {value!r}"
                else:
                    last = f"{field} has no value"
            if time.monotonic() >= deadline:
                raise CommandError("Timeout", f"{db_id}: not there after {timeout:g} s "
                                              f"({last})")
            time.sleep(0.02)
        return {"waited": round(time.monotonic() - start, 3)}

    def _grant(self, req: dict[str, Any]) -> dict[str, Any]:
        db_id, member, access = req["db_id"], req["member"], req.get("access", "read")
        obj = self._model(db_id.partition(":")[0])(db_id, req.get("caller"), node=self.node)
        if access == "read":
            obj.append_read_authorized(member)
        elif access == "update":
            obj.append_update_authorized(member)
        else:
            raise CommandError("ProtocolError", "access is 'read' or 'update'")
        return {}

    def _ls(self, req: dict[str, Any]) -> dict[str, Any]:
        matcher = compile_filter(req.get("filter", "*"))
        return {"ids": [i for i in self.node.object_ids(matcher.model) if matcher.match(i)]}

    def _sync(self, req: dict[str, Any]) -> dict[str, Any]:
        if self.node.network is None:
            raise CommandError("NoNetwork", "this peer has no network")
        return {"pulled": self.node.network.sync_now()}

    def _wait_peers(self, req: dict[str, Any]) -> dict[str, Any]:
        if self.node.network is None:
            raise CommandError("NoNetwork", "this peer has no network")
        n = _number(req, "n", 1, 0, 100_000, whole=True)
        timeout = _number(req, "timeout", 10.0, 0, MAX_TIMEOUT)
        ready = self.node.network.wait_for_peers(n, timeout)
        return {"ready": ready,
                "peers": sum(1 for p in self.node.network.peers().values() if p.ready)}

    def _digest(self, req: dict[str, Any]) -> dict[str, Any]:
        return {"state": self.node.state_digest(), "log_length": self.node.log_length()}

    def _quit(self, req: dict[str, Any]) -> dict[str, Any]:
        self._quit_requested = True  # serve() stops once the answer is written
        return {}


MAX_TIMEOUT = 86_400.0  # seconds a request may ask to wait


@overload
def _number(req: dict[str, Any], key: str, default: int | None, low: float, high: float,
            *, whole: Literal[True]) -> int: ...
@overload
def _number(req: dict[str, Any], key: str, default: float | None, low: float, high: float,
            *, whole: Literal[False] = False) -> float: ...
def _number(req: dict[str, Any], key: str, default: float | None, low: float, high: float,
            *, whole: bool = False) -> float:
    """``req[key]`` checked to be a finite number in ``low..high`` (an int if ``whole``);
    CommandError ProtocolError otherwise (never an OverflowError)."""
    if key not in req and default is not None:
        return default
    value = req.get(key)
    if not isinstance(value, int | float) or isinstance(value, bool) \
            or not (math.isfinite(value) and low <= value <= high) \
            or (whole and value != int(value)):
        kind = "a whole number" if whole else "a number"
        raise CommandError("ProtocolError", f"{key} must be {kind} from {low:g} to {high:g}, "
                                            f"not {value!r}")
    return int(value) if whole else float(value)


def _ids(value: Any) -> list[str]:
    if isinstance(value, str) or not isinstance(value, Iterable):
        raise CommandError("ProtocolError", "a list of db_ids is expected")
    ids = list(value)
    if not all(isinstance(i, str) for i in ids):
        raise CommandError("ProtocolError", "a list of db_ids is expected")
    return ids


@contextlib.contextmanager
def stop_on_signals(event: threading.Event) -> Iterator[threading.Event]:
    """While inside, SIGINT and SIGTERM only set ``event`` (the main thread polls it).

    Entered before anything is started, so a signal during start-up cannot leave an
    embedded Redis or a socket behind: start-up completes, then everything stops.
    """
    previous = {sig: signal.signal(sig, lambda *_: event.set())
                for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield event
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


class JsonLines(logging.Formatter):
    """One JSON object per record: ``time`` (ISO 8601 UTC), ``name`` (the peer's),
    ``level``, ``logger``, ``message``, plus the record's ``data`` (a status line's
    ``status`` object) and ``traceback`` when there is one."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.peer_name = name

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": utc_iso(datetime.datetime.fromtimestamp(record.created, datetime.UTC)),
            "name": self.peer_name, "level": record.levelname.lower(), "logger": record.name,
            "message": record.getMessage()}
        out.update(getattr(record, "data", None) or {})
        if record.exc_info:
            out["traceback"] = self.formatException(record.exc_info)
        return json.dumps(out, default=jsonable, separators=(",", ":"))


def configure_logging(name: str, level: str = "info", *, as_json: bool = False) -> None:
    """One line per record on stderr: ``time name LEVEL logger: message``, or with
    ``as_json`` one JSON object (see :class:`JsonLines`)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonLines(name) if as_json else logging.Formatter(
        f"%(asctime)s {name} %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    numeric = logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        raise ConfigurationError(f"unknown log level {level!r}")
    logging.getLogger("dmodel").setLevel(numeric)


__all__ = ["CONNECTED_META", "CommandError", "JsonLines", "Peer", "configure_logging",
           "connected_peers", "encode", "load_commands", "load_models", "parse_listener",
           "stop_on_signals"]
