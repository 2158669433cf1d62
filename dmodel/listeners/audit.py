"""AuditLog: one JSON line per change, to a file or a Redis stream."""

from __future__ import annotations

import json
import logging
import os
import weakref
from datetime import UTC, datetime
from typing import Any

from dmodel.actions import Context, DAction
from dmodel.errors import ConfigurationError

from ._context import need
from ._values import plain, redact, to_json

__all__ = ["AuditLog"]

logger = logging.getLogger(__name__)


class AuditLog(DAction):
    """Record changes as JSON lines in an append-only file and/or a Redis stream.

    Each record has ``time`` (UTC, ISO 8601, when recorded), ``verdict``, ``kind``
    (create/update/delete/remove), ``object_id``, ``field`` (None for objects),
    ``caller_id``, ``update_id``, ``authorized``, ``owned``, ``local``, ``node_id``,
    ``timestamp`` (the update's HLC time) and, unless ``values=False``,
    ``old_value``/``new_value`` (bytes as hex, other non-JSON values as their repr).
    Values of encrypted fields are written as ``<encrypted>``.

    Verdicts recorded:

    * ``accepted``: from the after-callbacks, one per committed create/update/delete.
    * ``unauthorized``: a change the node's policy rejected as unauthorized (shown to
      ``on_unauthorized_*`` with ``context.verdict == "unauthorized"``).
    * ``attempted`` (with ``attempts=True``, the default): from the before-callbacks,
      one per change about to be decided. A vetoed change is an ``attempted`` record
      with no ``accepted`` record of the same ``update_id`` and field. Removes have no
      after-callback, so they are recorded as ``attempted`` only. To see attempts that
      other listeners veto, apply the AuditLog before them (dispatch follows
      registration order). Before-callbacks may run again when the node retries, so
      an attempt can be recorded twice. An AuditLog never vetoes: failures to write
      an attempt are logged, failures in after-callbacks go to the node's counters.

    ``path``: the log file, opened for appending (created with mode 0600), one
    ``write`` per line, unbuffered. ``redis``: a redis-py client; each record is
    added with ``XADD`` to ``stream`` (trimmed to about ``maxlen`` entries if given); entry fields
    hold strings as-is, ``field`` None as ``""``, and booleans, numbers and the
    old/new values as JSON text. Give one or both.
    """

    def __init__(
        self,
        path: str | os.PathLike[str] | None = None,
        redis: Any = None,
        stream: str = "dmodel:audit",
        *,
        attempts: bool = True,
        values: bool = True,
        maxlen: int | None = None,
    ) -> None:
        if path is None and redis is None:
            raise ConfigurationError("AuditLog needs path= or redis= (or both)")
        if not stream:
            raise ConfigurationError("AuditLog stream name must not be empty")
        self.path = os.fspath(path) if path is not None else None
        self.redis = redis
        self.stream = stream
        self.attempts = attempts
        self.values = values
        self.maxlen = maxlen
        self._fd: int | None = None
        if self.path is not None:
            flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_CLOEXEC", 0)
            self._fd = os.open(self.path, flags, 0o600)
            self._closer = weakref.finalize(self, os.close, self._fd)

    def close(self) -> None:
        """Close the log file (the Redis client belongs to the caller)."""
        if self._fd is not None:
            self._closer()
            self._fd = None

    def __enter__(self) -> AuditLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # Accepted changes.
    def on_created(self, object_id: str, key: str, context: Context | None = None) -> None:
        self._record("accepted", "create", object_id, None, None, None, need(context))

    def on_updated(
        self, object_id: str, field: str, old_value: Any, new_value: Any,
        context: Context | None = None,
    ) -> None:
        self._record("accepted", "update", object_id, field, old_value, new_value, need(context))

    def on_deleted(
        self, object_id: str, field: str, value: Any, context: Context | None = None
    ) -> None:
        self._record("accepted", "delete", object_id, field, value, None, need(context))

    # Attempts (before the decision).
    def on_create(self, object_id: str, key: str, context: Context | None = None) -> None:
        self._attempt("create", object_id, None, None, None, need(context))

    def on_update(
        self, object_id: str, field: str, old_value: Any, new_value: Any,
        context: Context | None = None,
    ) -> None:
        self._attempt("update", object_id, field, old_value, new_value, need(context))

    def on_delete(
        self, object_id: str, field: str, value: Any, context: Context | None = None
    ) -> None:
        self._attempt("delete", object_id, field, value, None, need(context))

    def on_remove(self, object_id: str, context: Context | None = None) -> None:
        self._attempt("remove", object_id, None, None, None, need(context))

    # Changes the policy rejected (observation only).
    def on_unauthorized_update(
        self, object_id: str, field: str, old_value: Any, new_value: Any,
        context: Context | None = None,
    ) -> None:
        if need(context).verdict == "unauthorized":
            self._observe("update", object_id, field, old_value, new_value, context)

    def on_unauthorized_delete(
        self, object_id: str, field: str, value: Any, context: Context | None = None
    ) -> None:
        if need(context).verdict == "unauthorized":
            self._observe("delete", object_id, field, value, None, context)

    def on_unauthorized_remove(self, object_id: str, context: Context | None = None) -> None:
        if need(context).verdict == "unauthorized":
            self._observe("remove", object_id, None, None, None, context)

    def _attempt(self, *args: Any) -> None:
        if self.attempts:
            self._observe(*args, verdict="attempted")

    def _observe(self, *args: Any, verdict: str = "unauthorized") -> None:
        try:
            self._record(verdict, *args)
        except Exception as exc:
            logger.warning("AuditLog could not record a change: %s", exc, exc_info=exc)

    def _record(
        self,
        verdict: str,
        kind: str,
        object_id: str,
        field: str | None,
        old_value: Any,
        new_value: Any,
        context: Context,
    ) -> None:
        record: dict[str, Any] = {
            "time": datetime.now(UTC).isoformat(timespec="milliseconds"),
            "verdict": verdict,
            "kind": kind,
            "object_id": object_id,
            "field": field,
            "caller_id": context.caller_id,
            "update_id": context.update_id,
            "authorized": context.authorized,
            "owned": context.owned,
            "local": context.local,
            "node_id": context.node_id,
            "timestamp": context.timestamp,
        }
        if self.values:
            record["old_value"] = plain(redact(old_value, context))
            record["new_value"] = plain(redact(new_value, context))
        if self.path is not None:
            self._write_line(record)
        if self.redis is not None:
            self.redis.xadd(self.stream, _stream_fields(record), maxlen=self.maxlen)

    def _write_line(self, record: dict[str, Any]) -> None:
        fd = self._fd
        if fd is None:
            raise ValueError(f"AuditLog({self.path!r}) is closed")
        # ASCII only: no U+2028, NEL or the like for line-splitting readers to trip on.
        line = json.dumps(record, separators=(",", ":"))
        data = (line + "\n").encode("ascii")
        while data:
            data = data[os.write(fd, data) :]


def _stream_fields(record: dict[str, Any]) -> dict[str, str]:
    fields = {}
    for key, value in record.items():
        if key.endswith("_value"):
            fields[key] = to_json(value)
        elif isinstance(value, str):
            fields[key] = value
        elif value is None and key == "field":
            fields[key] = ""
        else:
            fields[key] = to_json(value)
    return fields
