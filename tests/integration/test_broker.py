"""The XSUB/XPUB broker relays publishes between buses that are not connected."""

from __future__ import annotations

import os
import threading

import pytest
import zmq
from helpers import wait_until

from dmodel.errors import NetworkError
from dmodel.net.broker import Broker
from dmodel.net.bus import Bus
from dmodel.net.curve import CurveConfig

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def closing():
    """Register buses/brokers to close after the test (reverse order)."""
    things: list = []
    yield things.append
    for thing in reversed(things):
        thing.close()


def _bus(closing, inbox: list, **options) -> Bus:
    bus = Bus(
        node_id=os.urandom(16),
        on_publish=lambda payload, sender: inbox.append((payload, sender)),
        on_request=lambda payload, sender: b"ok",
        **options,
    )
    closing(bus)
    return bus


def test_broker_relays_between_unconnected_buses(closing):
    broker = Broker()
    closing(broker)
    got_a: list = []
    got_b: list = []
    a = _bus(closing, got_a, broker=broker.endpoints)
    b = _bus(closing, got_b, broker=broker.endpoints)
    assert a.wait_for_broker(10) and b.wait_for_broker(10)
    assert a.peers() == {} and b.peers() == {}

    a.publish(b"through the hub")
    b.publish(b"and back")
    wait_until(lambda: got_b == [(b"through the hub", a.node_id)])
    wait_until(lambda: got_a == [(b"and back", b.node_id)])
    assert a.stats["dropped"].get("echo") == 1  # our own message came back, dropped
    # requests never go through the broker
    assert a.request(b.node_id, b"q", timeout=0.2) is None


def test_client_only_buses_through_broker(closing):
    broker = Broker()
    closing(broker)
    got: list = []
    a = _bus(closing, [], listen=None, broker=broker.endpoints)
    b = _bus(closing, got, listen=None, broker=broker.endpoints)
    assert a.wait_for_broker(10) and b.wait_for_broker(10)
    a.publish(b"nat to nat")
    wait_until(lambda: got == [(b"nat to nat", a.node_id)])


def test_broker_with_curve(closing):
    keys = CurveConfig.generate()
    broker = Broker(curve=keys)
    closing(broker)
    got: list = []
    a = _bus(closing, [], curve=keys, broker=broker.endpoints)
    b = _bus(closing, got, curve=keys, broker=broker.endpoints)
    outsider_got: list = []
    outsider = _bus(closing, outsider_got, broker=broker.endpoints)
    assert a.wait_for_broker(10) and b.wait_for_broker(10)
    assert not outsider.wait_for_broker(0.2)
    a.publish(b"sealed")
    wait_until(lambda: got == [(b"sealed", a.node_id)])
    assert outsider_got == []


def test_close_is_idempotent_and_stops_the_thread():
    broker = Broker()
    assert any(t.name == "dmodel-broker" for t in threading.enumerate())
    broker.close()
    broker.close()
    assert not any(t.name == "dmodel-broker" for t in threading.enumerate())


def test_run_forever_returns_after_close():
    broker = Broker()
    closer = threading.Thread(target=broker.close)
    closer.start()
    broker.run_forever()
    closer.join()
    assert not any(t.name == "dmodel-broker" for t in threading.enumerate())


def test_bind_failure_raises_network_error(closing):
    broker = Broker()
    closing(broker)
    with pytest.raises(NetworkError) as info:
        Broker(frontend=broker.frontend_endpoint)
    assert isinstance(info.value.__cause__, zmq.ZMQError)
