"""UDP beacon discovery between buses on loopback (broadcast to 127.255.255.255)."""

from __future__ import annotations

import os
import socket

import pytest
from helpers import wait_until

from dmodel.errors import NetworkError
from dmodel.net.bus import Bus
from dmodel.net.discovery import Beacon, DiscoveryConfig, encode_beacon

pytestmark = pytest.mark.timeout(60)


def _free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("0.0.0.0", 0))
        return s.getsockname()[1]


@pytest.fixture
def make_bus():
    buses: list[Bus] = []
    received: dict[bytes, list[bytes]] = {}

    def _make(**options) -> Bus:
        node_id = os.urandom(16)
        received[node_id] = []
        bus = Bus(
            node_id=node_id,
            on_publish=lambda payload, sender: received[node_id].append(payload),
            on_request=lambda payload, sender: payload,
            **options,
        )
        buses.append(bus)
        return bus

    _make.received = received  # type: ignore[attr-defined]
    yield _make
    for bus in reversed(buses):
        bus.close()


def _loopback(port: int, **kw) -> DiscoveryConfig:
    return DiscoveryConfig(port=port, interval=0.05, address="127.255.255.255", **kw)


def test_two_buses_find_each_other(make_bus):
    port = _free_udp_port()
    a = make_bus(discovery=_loopback(port))
    b = make_bus(discovery=_loopback(port))
    assert a.wait_for_peers(1, timeout=10) and b.wait_for_peers(1, timeout=10)
    assert set(a.peers()) == {b.node_id} and set(b.peers()) == {a.node_id}
    a.publish(b"found you")
    wait_until(lambda: make_bus.received[b.node_id] == [b"found you"])


def test_other_cluster_is_ignored(make_bus):
    port = _free_udp_port()
    a = make_bus(discovery=_loopback(port, cluster="red"))
    b = make_bus(discovery=_loopback(port, cluster="red"))
    blue = make_bus(discovery=_loopback(port, cluster="blue"))
    assert a.wait_for_peers(1, timeout=10)
    wait_until(lambda: blue.stats["dropped"].get("beacon_cluster", 0) >= 4)
    assert blue.peers() == {}
    assert set(a.peers()) == {b.node_id}


def test_garbage_datagrams_are_counted(make_bus):
    port = _free_udp_port()
    a = make_bus(discovery=_loopback(port))
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
        s.sendto(b"not a beacon", ("127.255.255.255", port))
        # our own beacon, sent back to us, is ignored
        s.sendto(encode_beacon(Beacon(a.node_id, 1)), ("127.255.255.255", port))
    wait_until(lambda: a.stats["dropped"].get("beacon", 0) == 1)
    assert a.peers() == {}


def test_client_only_bus_listens_for_beacons(make_bus):
    port = _free_udp_port()
    a = make_bus(discovery=_loopback(port))
    c = make_bus(listen=None, discovery=_loopback(port))
    assert c.wait_for_peers(1, timeout=10)
    assert set(c.peers()) == {a.node_id}


def test_discovery_disabled_opens_no_socket(make_bus):
    port = _free_udp_port()
    make_bus(discovery=DiscoveryConfig(port=port, enabled=False))
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("0.0.0.0", port))  # free: nobody bound it


def test_unbindable_beacon_port_raises_network_error(make_bus):
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("0.0.0.0", 0))  # no SO_REUSEADDR: the bus cannot share it
        port = s.getsockname()[1]
        with pytest.raises(NetworkError):
            make_bus(discovery=_loopback(port))
