"""The Context a ready-made listener's callback was called with."""

from __future__ import annotations

from dmodel.actions import Context


def need(context: Context | None) -> Context:
    """``context``, which the registry passes to every callback that declares it.

    The callbacks declare it ``context: Context | None = None`` so that they still
    override :class:`~dmodel.actions.DAction`'s callbacks, which take PyDinemic's
    arguments only; called without one (directly, not through a registry) they raise
    TypeError, as a missing argument would.
    """
    if context is None:
        raise TypeError("this listener callback needs its context= (a dmodel Context)")
    return context
