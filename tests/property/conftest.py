"""Fixtures of the property tests that run real nodes."""

from __future__ import annotations

import pytest

from dmodel.store.embedded import EmbeddedRedis


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """One embedded Redis per test module: (redis url, a directory for node homes)."""
    root = tmp_path_factory.mktemp("nodes")
    redis_server = EmbeddedRedis(root / "redis-home")
    yield f"unix://{redis_server.socket}", root
    redis_server.stop()
