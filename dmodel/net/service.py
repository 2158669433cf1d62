"""Where :class:`NetworkService` used to live; it is in :mod:`dmodel.net.replication`."""

from __future__ import annotations

from dmodel.net.replication import LogSource, NetworkService, ProgressCallback

__all__ = ["LogSource", "NetworkService", "ProgressCallback"]
