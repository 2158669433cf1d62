"""What the ``dmodel`` command and ``dmodel peer`` print as data: JSON values and times.

One encoding for both: bytes as hex, sets and tuples as lists, a value no key here
opens as ``{"encrypted": true}``, times as ISO 8601 UTC (``2024-05-01T12:00:00.123Z``).
"""

from __future__ import annotations

import datetime
import json
from typing import Any

from ..crypto import EncryptedValue

ENCRYPTED_JSON: dict[str, bool] = {"encrypted": True}
"""What stands for a value no key of this home opens, in JSON output."""


class Sealed:
    """A value this home cannot open: ``<encrypted>`` as text, ``{"encrypted": true}`` in
    JSON (so a stored string ``"<encrypted>"`` is never mistaken for one)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "<encrypted>"


SEALED = Sealed()


def jsonable(value: Any) -> Any:
    """``json.dumps(default=...)`` for the values dmodel stores and reports."""
    if isinstance(value, bytes | bytearray):
        return bytes(value).hex()
    if isinstance(value, Sealed | EncryptedValue):
        return ENCRYPTED_JSON
    if isinstance(value, set | frozenset):
        return sorted(value, key=repr)
    if isinstance(value, tuple):
        return list(value)
    if isinstance(value, datetime.datetime):
        return utc_iso(value)
    return repr(value)


def dumps(data: Any, *, indent: int | None = None) -> str:
    """``data`` as JSON (one line unless ``indent``)."""
    separators = None if indent else (",", ":")
    return json.dumps(data, indent=indent, separators=separators, default=jsonable,
                      ensure_ascii=False)


def utc_iso(moment: datetime.datetime) -> str:
    """ISO 8601 in UTC to the millisecond, with a ``Z``: ``2024-05-01T12:00:00.123Z``."""
    text = moment.astimezone(datetime.UTC).isoformat(timespec="milliseconds")
    return text.replace("+00:00", "Z")


__all__ = ["ENCRYPTED_JSON", "SEALED", "Sealed", "dumps", "jsonable", "utc_iso"]
