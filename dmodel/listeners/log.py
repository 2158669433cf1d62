"""LogChanges: one readable log line per change."""

from __future__ import annotations

import logging
from typing import Any

from dmodel.actions import Context, DAction

from ._context import need
from ._values import REDACTED, short

__all__ = ["LogChanges"]


class LogChanges(DAction):
    """Log one line per committed create, update and delete, and per remove.

    ``logger`` is a :class:`logging.Logger` or a logger name (default: this
    module's logger, ``dmodel.listeners.log``); lines go out at ``level``. Values
    are shown as short reprs unless ``values=False``; values of encrypted fields are
    shown as ``<encrypted>``.
    Removes have no after-callback, so they are logged from ``on_remove``, before the
    decision: apply LogChanges after any listener that may veto removes.
    """

    def __init__(
        self,
        logger: logging.Logger | str | None = None,
        level: int = logging.INFO,
        *,
        values: bool = True,
    ) -> None:
        if logger is None or isinstance(logger, str):
            logger = logging.getLogger(logger or __name__)
        self.logger = logger
        self.level = level
        self.values = values

    def on_created(self, object_id: str, key: str, context: Context | None = None) -> None:
        self._log("%s created%s", object_id, _by(need(context)))

    def on_updated(
        self, object_id: str, field: str, old_value: Any, new_value: Any,
        context: Context | None = None,
    ) -> None:
        context = need(context)
        if self.values:
            change = f" {_show(old_value, context)} -> {_show(new_value, context)}"
        else:
            change = ""
        self._log("%s.%s updated%s%s", object_id, field, change, _by(context))

    def on_deleted(
        self, object_id: str, field: str, value: Any, context: Context | None = None
    ) -> None:
        context = need(context)
        was = f" (was {_show(value, context)})" if self.values else ""
        self._log("%s.%s deleted%s%s", object_id, field, was, _by(context))

    def on_remove(self, object_id: str, context: Context | None = None) -> None:
        self._log("%s removing%s", object_id, _by(need(context)))

    def _log(self, msg: str, *args: Any) -> None:
        if self.logger.isEnabledFor(self.level):
            self.logger.log(self.level, msg, *args)


def _show(value: Any, context: Context) -> str:
    """A short repr of ``value``, or the bare placeholder for an encrypted field's value."""
    return REDACTED if context.encrypted else short(value)


def _by(context: Context) -> str:
    how = "authorized" if context.authorized else "UNAUTHORIZED"
    where = "local" if context.local else f"node {context.node_id[:12]}"
    return f" by {context.caller_id} ({how}, {where}, update {context.update_id[:16]})"
