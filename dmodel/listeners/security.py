"""Listeners that keep changes out: RejectUnauthorized and ReadOnlyFields."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from dmodel.actions import Context, DAction
from dmodel.errors import ConfigurationError, RejectedError, UnauthorizedError

from ._context import need

__all__ = ["ReadOnlyFields", "RejectUnauthorized"]


class RejectUnauthorized(DAction):
    """Veto every unauthorized update, delete and remove of the objects it watches.

    The node rejects unauthorized updates by default; this listener restores that
    for models or nodes whose policy hands the decision to listeners. Apply it to
    ``Model:*`` (or ``*``), since updates are matched on field keys and removes on
    object keys. Its veto raises :class:`~dmodel.errors.UnauthorizedError`, which the
    node wraps in VetoedError.
    """

    def on_unauthorized_update(
        self, object_id: str, field: str, old_value: Any, new_value: Any,
        context: Context | None = None,
    ) -> None:
        raise UnauthorizedError(
            f"{need(context).caller_id} may not change {field!r} of {object_id}", db_id=object_id
        )

    def on_unauthorized_delete(
        self, object_id: str, field: str, value: Any, context: Context | None = None
    ) -> None:
        raise UnauthorizedError(
            f"{need(context).caller_id} may not delete {field!r} of {object_id}", db_id=object_id
        )

    def on_unauthorized_remove(self, object_id: str, context: Context | None = None) -> None:
        raise UnauthorizedError(
            f"{need(context).caller_id} may not remove {object_id}", db_id=object_id
        )


class ReadOnlyFields(DAction):
    """Veto any change to the named fields once they hold a value, whoever makes it.

    A field may get its first value (normally when the object is created); after
    that, updates and deletes of it are vetoed, even from the object itself. A field
    counts as empty when the change's ``old_value`` is None. Naming a DDict field
    (``"tags"``) applies this rule to each of its entries; ``"tags:color"`` to one
    entry. Apply it to field keys, e.g. ``Person:[id]:*``.
    """

    def __init__(self, fields: str | Iterable[str]) -> None:
        names = [fields] if isinstance(fields, str) else list(fields)
        if not names or not all(isinstance(n, str) and n for n in names):
            raise ConfigurationError(
                f"ReadOnlyFields needs one or more non-empty field names, got {fields!r}"
            )
        self.fields = frozenset(names)

    def _protected(self, field: str) -> bool:
        return field in self.fields or field.partition(":")[0] in self.fields

    def on_update(self, object_id: str, field: str, old_value: Any, new_value: Any) -> None:
        if old_value is not None and self._protected(field):
            raise RejectedError(f"{field!r} of {object_id} is read-only", db_id=object_id)

    def on_delete(self, object_id: str, field: str, value: Any) -> None:
        if value is not None and self._protected(field):
            raise RejectedError(f"{field!r} of {object_id} is read-only", db_id=object_id)
