"""Turning arbitrary field values into JSON for logs, streams and environments."""

from __future__ import annotations

import json
import math
from typing import Any

_MAX_DEPTH = 32
REDACTED = "<encrypted>"


def redact(value: Any, context: Any) -> Any:
    """``value``, or a placeholder when it belongs to an encrypted field."""
    if value is None or context is None or not getattr(context, "encrypted", False):
        return value
    return REDACTED


def plain(value: Any, _depth: int = 0) -> Any:
    """``value`` as JSON-ready data: bytes become hex, anything else unknown its repr."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, int):
        # json and repr refuse ints over 4300 digits (CPython's int_max_str_digits).
        return value if value.bit_length() <= 14_000 else f"<int of {value.bit_length()} bits>"
    if isinstance(value, float):
        return value if math.isfinite(value) else repr(value)
    if _depth >= _MAX_DEPTH:
        return _repr(value)
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value).hex()
    if isinstance(value, list | tuple):
        return [plain(v, _depth + 1) for v in value]
    if isinstance(value, dict):
        return {
            (k if isinstance(k, str) else _repr(k)): plain(v, _depth + 1)
            for k, v in value.items()
        }
    if isinstance(value, set | frozenset):
        items = [plain(v, _depth + 1) for v in value]
        return sorted(items, key=repr)
    return _repr(value)


def to_json(value: Any) -> str:
    """Compact JSON for ``value``, never raising."""
    try:
        return json.dumps(plain(value), ensure_ascii=False, separators=(",", ":"))
    except (TypeError, ValueError, RecursionError):
        return json.dumps(_repr(value))


def short(value: Any, limit: int = 200) -> str:
    """A one-line repr of ``value`` cut to ``limit`` characters."""
    text = _repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _repr(value: Any) -> str:
    try:
        return repr(value)
    except Exception:
        return f"<unrepresentable {type(value).__name__}>"
