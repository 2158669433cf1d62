"""Node ids and what a node dials: a new home's id derives from its node key, an older
home keeps its own, and ``Node(dial=...)`` narrows the learned endpoints it connects to
(real nodes, real ZeroMQ on 127.0.0.1)."""

from __future__ import annotations

import os

import pytest
from helpers import wait_until

import dmodel
from dmodel.errors import ConfigurationError
from dmodel.keyring import write_private
from dmodel.net.identity import derived_node_id, load_node_key

pytestmark = pytest.mark.timeout(60)

LOOPBACK = "tcp://127.0.0.1:*"


def test_a_new_home_derives_its_node_id_from_its_node_key(make_node, tmp_path) -> None:
    node = make_node("fresh")
    assert node.node_id == derived_node_id(load_node_key(tmp_path / "fresh").public)
    assert (tmp_path / "fresh" / "node.id").read_bytes() == node.node_id
    other = make_node("other")
    assert other.node_id != node.node_id


def test_a_home_with_an_older_random_id_keeps_it_and_still_proves_it(make_node,
                                                                     tmp_path) -> None:
    home = tmp_path / "old"
    home.mkdir(mode=0o700)
    old_id = os.urandom(16)
    write_private(home / "node.id", old_id)  # a home from before ids were derived
    old = make_node("old", listen=LOOPBACK)
    assert old.node_id == old_id != derived_node_id(load_node_key(home).public)
    new = make_node("new", listen=LOOPBACK, peers=[old.network.endpoint])
    assert new.network.wait_for_peers(1, timeout=10)
    assert old.network.wait_for_peers(1, timeout=10)
    assert old_id.hex() in new.network.peers()  # bound to its key on first use
    assert new.network.stats["guard"].get("identity_conflict", 0) == 0
    old.shutdown()
    assert make_node("old").node_id == old_id  # and it stays


@pytest.mark.parametrize(("start", "dial"), [("node", "static"), ("node", ["10.0.0.0/8"]),
                                             ("launch", "static")])
def test_dial_keeps_a_node_off_the_endpoints_gossip_names(make_node, tmp_path, start,
                                                          dial) -> None:
    hub = make_node("hub", listen=LOOPBACK)
    other = make_node("other", listen=LOOPBACK, peers=[hub.network.endpoint])
    assert hub.network.wait_for_peers(1, timeout=10)
    options = {"listen": LOOPBACK, "peers": [hub.network.endpoint], "dial": dial}
    narrow = make_node("narrow", **options) if start == "node" else \
        dmodel.launch(tmp_path / "narrow", **options)
    # The hub tells it about `other` (a 127.0.0.1 endpoint): not dialled, counted.
    wait_until(lambda: narrow.network.stats["guard"]["dials_refused_by"].get("policy", 0) > 0,
               timeout=15)
    assert narrow.network.bus.stats["links"] == 1  # the configured peer only
    assert other.network.endpoint not in {p.endpoint for p in narrow.network.peers().values()
                                          if p.endpoint}


def test_a_bad_dial_is_a_configuration_error(tmp_path) -> None:
    with pytest.raises(ConfigurationError, match="dial"):
        dmodel.Node(tmp_path / "b", listen=LOOPBACK, dial="anything")
