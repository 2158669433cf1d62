"""What cannot be reached is named: a peer endpoint nobody listens on (a free port on
127.0.0.1) and beacons that cannot be sent, in the log once and in the stats."""

from __future__ import annotations

import logging
import socket
import time

import pytest
from helpers import wait_until

from dmodel.net.discovery import DiscoveryConfig
from dmodel.tools.peer import Peer

pytestmark = pytest.mark.timeout(60)


def _free_port(kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _named(caplog, text: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.levelno == logging.WARNING and text in r.getMessage()]


def test_an_endpoint_nobody_listens_on_is_one_warning_and_listed(make_node, caplog) -> None:
    caplog.set_level(logging.WARNING, logger="dmodel")
    endpoint = f"tcp://127.0.0.1:{_free_port()}"
    node = make_node("n", listen="tcp://127.0.0.1:*", peers=[endpoint],
                     network_options={"unreached_after": 0.3, "peer_timeout": 0.6,
                                      "ping_interval": 0.3})
    wait_until(lambda: _named(caplog, endpoint), timeout=15)
    assert node.network.stats["guard"]["unreached"] == [endpoint]
    assert node.unreached_peers(after=0) == [endpoint]
    assert f"unreached={endpoint}" in Peer(node).status_line()
    # Its link starts over with new sockets (every peer_timeout): still one warning.
    relinks = node.network.bus.stats["relinks"]
    wait_until(lambda: node.network.bus.stats["relinks"] >= relinks + 2, timeout=15)
    [record] = _named(caplog, endpoint)
    assert "not reached" in record.getMessage() and "firewall" in record.getMessage()


def test_a_reached_endpoint_is_not_listed(make_node, caplog) -> None:
    caplog.set_level(logging.WARNING, logger="dmodel")
    a = make_node("a", listen="tcp://127.0.0.1:*")
    b = make_node("b", listen="tcp://127.0.0.1:*", peers=[a.network.endpoint],
                  network_options={"unreached_after": 0.3})
    assert b.network.wait_for_peers(1, timeout=10)
    time.sleep(0.5)  # past unreached_after
    assert b.network.stats["guard"]["unreached"] == []
    assert not _named(caplog, a.network.endpoint)


def test_a_peer_that_was_reached_and_went_away_is_no_warning(make_node, caplog) -> None:
    """A joiner that caught up and shut down: the node it joined keeps trying its
    endpoint (learned from it, dialled back), but it was there, so it is not reported
    as never reached."""
    caplog.set_level(logging.WARNING, logger="dmodel")
    options = {"unreached_after": 0.3, "peer_timeout": 0.6, "ping_interval": 0.3}
    a = make_node("a", listen="tcp://127.0.0.1:*", network_options=options)
    b = make_node("b", listen="tcp://127.0.0.1:*", peers=[a.network.endpoint],
                  network_options=options)
    gone = b.network.endpoint
    assert b.network.wait_for_peers(1, timeout=10) and a.network.wait_for_peers(1, timeout=10)
    b.shutdown()
    relinks = a.network.bus.stats["relinks"]
    wait_until(lambda: a.network.bus.stats["relinks"] >= relinks + 2, timeout=15)
    assert a.network.stats["guard"]["unreached"] == []
    assert not _named(caplog, gone)


def test_beacons_that_cannot_be_sent_are_one_warning_and_counted(make_node, caplog) -> None:
    caplog.set_level(logging.WARNING, logger="dmodel")
    config = DiscoveryConfig(port=_free_port(socket.SOCK_DGRAM), interval=0.05, address="::1")
    node = make_node("n", listen="tcp://127.0.0.1:*", discovery=True,
                     network_options={"discovery_config": config})
    wait_until(lambda: node.network.stats["guard"]["beacons_failed"] >= 5, timeout=15)
    [record] = _named(caplog, "cannot send beacons")
    assert "::1" in record.getMessage()
