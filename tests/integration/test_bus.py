"""The ZeroMQ bus on loopback: handshake, gossip, publish/request, limits, CURVE."""

from __future__ import annotations

import os
import queue
import socket
import stat
import threading
from dataclasses import dataclass, field

import msgpack
import pytest
import zmq
from helpers import wait_until

from dmodel.errors import ConfigurationError, NetworkError
from dmodel.net import frames as fr
from dmodel.net.bus import Bus, DeferredReply, PeerInfo
from dmodel.net.curve import CurveConfig, read_key_file
from dmodel.net.identity import NodeKey, proof_message

pytestmark = pytest.mark.timeout(60)


@dataclass
class Harness:
    """A bus plus what its callbacks saw."""

    bus: Bus = None  # type: ignore[assignment]  # set right after construction
    received: list[tuple[bytes, bytes]] = field(default_factory=list)
    requests: list[tuple[bytes, bytes]] = field(default_factory=list)

    def payloads(self) -> list[bytes]:
        return [payload for payload, _ in self.received]


@pytest.fixture
def make_bus():
    """``make_bus(**Bus options)``: a Harness whose bus is closed after the test."""
    buses: list[Bus] = []

    def _make(**options) -> Harness:
        harness = Harness()  # before the bus: callbacks may fire before Bus() returns

        def on_publish(payload: bytes, sender: bytes) -> None:
            harness.received.append((payload, sender))

        def on_request(payload: bytes, sender: bytes) -> bytes | None:
            harness.requests.append((payload, sender))
            return b"echo:" + payload

        options.setdefault("node_id", os.urandom(16))
        options.setdefault("on_publish", on_publish)
        options.setdefault("on_request", on_request)
        harness.bus = Bus(**options)
        buses.append(harness.bus)
        return harness

    yield _make
    for bus in reversed(buses):
        bus.close()


@pytest.fixture
def zctx():
    """A context for raw test sockets, destroyed with linger 0 at the end."""
    ctx = zmq.Context()
    yield ctx
    ctx.destroy(linger=0)


def _free_tcp_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _bus_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("dmodel-bus-")]


# ------------------------------------------------------------------ basic mesh


def test_two_buses_handshake_publish_and_request(make_bus):
    a = make_bus()
    b = make_bus(peers=[a.bus.endpoint])
    assert b.bus.wait_for_peers(1, timeout=10)
    assert a.bus.wait_for_peers(1, timeout=10)  # a connected back after b's HELLO

    a.bus.publish(b"from a")
    b.bus.publish(b"from b")
    wait_until(lambda: b.received == [(b"from a", a.bus.node_id)])
    wait_until(lambda: a.received == [(b"from b", b.bus.node_id)])

    assert b.bus.request(a.bus.node_id, b"ping") == b"echo:ping"
    assert a.requests == [(b"ping", b.bus.node_id)]
    assert a.bus.request(b.bus.node_id, b"pong") == b"echo:pong"

    info = b.bus.peers()[a.bus.node_id]
    assert isinstance(info, PeerInfo)
    assert info.endpoint == a.bus.endpoint
    assert info.pub_endpoint == a.bus.pub_endpoint
    assert info.connected and info.ready and info.last_seen is not None
    assert set(a.bus.peers()) == {b.bus.node_id}

    stats = a.bus.stats
    assert stats["messages_out"] == 1 and stats["messages_in"] == 1
    assert stats["requests_in"] == 1 and stats["requests_out"] == 1
    assert stats["peers"][b.bus.node_id]["messages_in"] == 1


def test_gossip_joins_the_mesh_through_one_peer(make_bus):
    a = make_bus()
    b = make_bus(peers=[a.bus.endpoint])
    c = make_bus(peers=[b.bus.endpoint])  # c only knows b
    assert c.bus.wait_for_peers(2, timeout=10)
    assert a.bus.wait_for_peers(2, timeout=10)
    assert set(c.bus.peers()) == {a.bus.node_id, b.bus.node_id}
    a.bus.publish(b"hi all")
    wait_until(lambda: c.payloads() == [b"hi all"] and b.payloads() == [b"hi all"])
    assert c.bus.request(a.bus.node_id, b"x") == b"echo:x"


def test_peer_down_at_start_is_connected_when_it_comes_up(make_bus):
    endpoint = f"tcp://127.0.0.1:{_free_tcp_port()}"
    a = make_bus(peers=[endpoint])
    assert not a.bus.wait_for_peers(1, timeout=0.1)
    b = make_bus(listen=endpoint)
    assert a.bus.wait_for_peers(1, timeout=10)
    assert b.bus.wait_for_peers(1, timeout=10)
    b.bus.publish(b"late")
    wait_until(lambda: a.payloads() == [b"late"])


def test_connect_at_runtime_is_idempotent(make_bus):
    a = make_bus()
    b = make_bus()
    b.bus.connect(a.bus.endpoint)
    b.bus.connect(a.bus.endpoint)
    assert b.bus.wait_for_peers(1, timeout=10)
    assert list(b.bus.peers()) == [a.bus.node_id]


def test_connecting_to_ourselves_is_ignored(make_bus):
    a = make_bus()
    a.bus.connect(a.bus.endpoint)
    wait_until(lambda: a.bus.endpoint in a.bus.stats["self_endpoints"])
    assert a.bus.stats["links"] == 0
    assert a.bus.peers() == {}
    a.bus.connect(a.bus.endpoint)  # remembered: no new link
    assert a.bus.stats["links"] == 0


def test_client_only_bus_pushes_and_receives(make_bus):
    a = make_bus()
    c = make_bus(listen=None, peers=[a.bus.endpoint])
    assert c.bus.endpoint is None and c.bus.pub_endpoint is None
    assert c.bus.wait_for_peers(1, timeout=10)
    c.bus.publish(b"from client")
    wait_until(lambda: a.received == [(b"from client", c.bus.node_id)])
    a.bus.publish(b"to client")
    wait_until(lambda: c.payloads() == [b"to client"])
    assert a.bus.peers() == {}  # nobody can connect to a client-only bus


# ------------------------------------------------------------- lifecycle, errors


def test_close_is_idempotent_and_joins_the_thread(make_bus):
    a = make_bus()
    name = f"dmodel-bus-{a.bus.node_id.hex()[:8]}"
    assert any(t.name == name for t in _bus_threads())
    a.bus.close()
    a.bus.close()
    assert not any(t.name == name for t in _bus_threads())
    assert a.bus.closed
    with pytest.raises(NetworkError):
        a.bus.publish(b"x")
    with pytest.raises(NetworkError):
        a.bus.request(os.urandom(16), b"x")
    with pytest.raises(NetworkError):
        a.bus.peers()


def test_bind_failure_raises_network_error(make_bus):
    a = make_bus()
    before = len(_bus_threads())
    with pytest.raises(NetworkError) as info:
        make_bus(listen=a.bus.endpoint)
    assert isinstance(info.value.__cause__, zmq.ZMQError)
    assert len(_bus_threads()) == before


def test_bad_arguments_raise_configuration_error(make_bus):
    with pytest.raises(ConfigurationError):
        make_bus(node_id=b"short")
    with pytest.raises(ConfigurationError):
        make_bus(listen="nonsense")
    with pytest.raises(ConfigurationError):
        make_bus(peers=["127.0.0.1:5"])
    with pytest.raises(ConfigurationError):
        make_bus(max_message_size=0)


def test_request_to_unknown_peer_returns_none(make_bus):
    a = make_bus()
    assert a.bus.request(os.urandom(16), b"anyone?", timeout=5) is None
    assert a.bus.stats["requests_unroutable"] == 1


def test_request_from_the_io_thread_raises(make_bus):
    errors: list[BaseException] = []
    holder: dict[str, Bus] = {}

    def on_publish(payload: bytes, sender: bytes) -> None:
        try:
            holder["a"].request(sender, b"nested")
        except NetworkError as exc:
            errors.append(exc)

    a = make_bus(on_publish=on_publish)
    holder["a"] = a.bus
    b = make_bus(peers=[a.bus.endpoint])
    assert b.bus.wait_for_peers(1, timeout=10) and a.bus.wait_for_peers(1, timeout=10)
    b.bus.publish(b"trigger")
    wait_until(lambda: errors)
    assert "I/O thread" in str(errors[0])


def test_callback_errors_are_counted_and_do_not_stop_the_bus(make_bus, caplog):
    seen: list[bytes] = []

    def on_publish(payload: bytes, sender: bytes) -> None:
        if payload == b"boom":
            raise RuntimeError("listener bug")
        seen.append(payload)

    def on_request(payload: bytes, sender: bytes) -> bytes | None:
        if payload == b"boom":
            raise RuntimeError("handler bug")
        return None if payload == b"nothing" else b"ok"

    a = make_bus(on_publish=on_publish, on_request=on_request)
    b = make_bus(peers=[a.bus.endpoint])
    assert a.bus.wait_for_peers(1, timeout=10) and b.bus.wait_for_peers(1, timeout=10)
    b.bus.publish(b"boom")
    b.bus.publish(b"fine")
    wait_until(lambda: seen == [b"fine"])
    # a failing or silent handler answers at once with no reply
    assert b.bus.request(a.bus.node_id, b"boom", timeout=30) is None
    assert b.bus.request(a.bus.node_id, b"nothing", timeout=30) is None
    assert b.bus.request(a.bus.node_id, b"x") == b"ok"
    assert a.bus.stats["callback_errors"] == 2
    assert any(r.name == "dmodel.net.bus" for r in caplog.records)


def test_dead_io_thread_makes_calls_raise(make_bus, monkeypatch):
    a = make_bus()

    def broken(payload: bytes) -> None:
        raise RuntimeError("simulated bug in the loop")

    monkeypatch.setattr(a.bus._actor, "_publish", broken)
    a.bus.publish(b"x")
    wait_until(lambda: a.bus.closed)
    with pytest.raises(NetworkError) as info:
        a.bus.publish(b"y")
    assert isinstance(info.value.__cause__, RuntimeError)
    with pytest.raises(NetworkError):
        a.bus.stats  # noqa: B018
    with pytest.raises(NetworkError):
        a.bus.wait_for_peers(1, timeout=10)
    a.bus.close()


# ---------------------------------------------------------- hostile input, limits


def test_oversize_messages_are_dropped_and_counted(make_bus):
    a = make_bus(max_message_size=1000, ping_interval=0.1, peer_timeout=1.0)
    b = make_bus(peers=[a.bus.endpoint])
    assert a.bus.wait_for_peers(1, timeout=10) and b.bus.wait_for_peers(1, timeout=10)
    b.bus.publish(b"x" * 2000)
    b.bus.publish(b"small")
    wait_until(lambda: a.payloads() == [b"small"])
    assert a.bus.stats["dropped"]["oversize"] == 1
    assert b.bus.request(a.bus.node_id, b"y" * 2000) is None
    assert a.bus.stats["dropped"]["oversize"] == 2
    assert a.requests == []

    # Far above the limit ZeroMQ itself drops the connection and does not
    # reconnect; the bus notices the silent SUB and subscribes again.
    b.bus.publish(b"z" * 200_000)

    def republished() -> bool:
        b.bus.publish(b"after")
        return b"after" in a.payloads()

    wait_until(republished, interval=0.05)
    assert all(len(p) <= 1000 for p in a.payloads())
    assert a.bus.stats["resubscribes"] >= 1


def _raw_dealer(ctx: zmq.Context, endpoint: str, node_id: bytes) -> zmq.Socket:
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    sock.routing_id = node_id + b"\0\0\0\1"
    sock.connect(endpoint)
    return sock


def test_garbage_from_a_raw_dealer_does_not_stop_valid_traffic(make_bus, zctx):
    a = make_bus()
    b = make_bus(peers=[a.bus.endpoint])
    assert a.bus.wait_for_peers(1, timeout=10) and b.bus.wait_for_peers(1, timeout=10)

    raw = zctx.socket(zmq.DEALER)  # no routing id: ZeroMQ makes a short one up
    raw.linger = 0
    raw.connect(a.bus.endpoint)
    forged = _raw_dealer(zctx, a.bus.endpoint, os.urandom(16))
    for frames in ([b"\xff"], [b"H"], [b"H", b"not msgpack"], [b"Q", b"short", b"x"]):
        raw.send_multipart(frames)
        forged.send_multipart(frames)
    forged.send_multipart([b"H", msgpack.packb({"v": 1, "id": os.urandom(16)})])
    forged.send_multipart([b"Zzz", b"unknown kind"])

    wait_until(lambda: sum(a.bus.stats["dropped"].values()) >= 10)
    b.bus.publish(b"still here")
    wait_until(lambda: a.payloads() == [b"still here"])
    assert b.bus.request(a.bus.node_id, b"q") == b"echo:q"
    dropped = a.bus.stats["dropped"]
    # An unproven connection may send HELLO only: everything else is "unproven".
    assert dropped["malformed"] >= 3 and dropped["unproven"] >= 7
    assert a.bus.stats["bans"] == 0


class FakePeer:
    """A peer made of raw sockets, to send what a real bus never would."""

    def __init__(self, ctx: zmq.Context) -> None:
        self.node_id = os.urandom(16)
        self.key = NodeKey.generate()
        self.nonce = os.urandom(16)
        self.router = ctx.socket(zmq.ROUTER)
        self.xpub = ctx.socket(zmq.XPUB)
        for sock in (self.router, self.xpub):
            sock.linger = 0
        self.xpub.setsockopt(zmq.XPUB_VERBOSE, 1)
        self.router.bind("tcp://127.0.0.1:*")
        self.xpub.bind("tcp://127.0.0.1:*")
        self.endpoint = self.router.LAST_ENDPOINT.decode()
        self.pub_endpoint = self.xpub.LAST_ENDPOINT.decode()
        self.requests: list[list[bytes]] = []

    def body(self, their_nonce: bytes) -> bytes:
        proof = self.key.sign(proof_message(b"W", self.node_id, self.key.public, their_nonce))
        return fr.encode_hello(fr.Hello(self.node_id, self.endpoint, self.pub_endpoint, (),
                                        self.key.public, self.nonce, proof))

    def serve_once(self) -> None:
        """Answer HELLOs (never requests) and ack subscriptions, without blocking."""
        while self.router.poll(0):
            frames = self.router.recv_multipart()
            if frames[1] == b"H":
                hello = fr.decode_hello(frames[2])
                self.router.send_multipart([frames[0], b"W", self.body(hello.nonce)])
            elif frames[1] == b"Q":
                self.requests.append(frames)
        while self.xpub.poll(0):
            sub = self.xpub.recv()
            if sub[:2] == b"\x01A":
                self.xpub.send_multipart([sub[1:], self.node_id])

    def ready_on(self, bus: Bus) -> bool:
        self.serve_once()
        info = bus.peers().get(self.node_id)
        return bool(info and info.ready)


def test_garbage_from_a_raw_pub_does_not_stop_valid_traffic(make_bus, zctx):
    a = make_bus()
    fake = FakePeer(zctx)
    a.bus.connect(fake.endpoint)
    wait_until(lambda: fake.ready_on(a.bus))

    for frames in (
        [b"M"],
        [b"M", b"short id", b"x"],
        [b"M", os.urandom(16), b"someone else's id"],
        [b"A" + a.bus.node_id, b"short"],
    ):
        fake.xpub.send_multipart(frames)
    fake.xpub.send_multipart([b"M", fake.node_id, b"valid"])
    wait_until(lambda: a.received == [(b"valid", fake.node_id)])
    dropped = a.bus.stats["dropped"]
    assert dropped["malformed"] == 3 and dropped["spoofed"] == 1

    # a peer that never answers requests: the request times out
    assert a.bus.request(fake.node_id, b"hello?", timeout=0.2) is None
    assert a.bus.stats["request_timeouts"] == 1
    wait_until(lambda: (fake.serve_once(), fake.requests)[1])


def test_flooding_dealer_is_banned_while_others_continue(make_bus, zctx):
    a = make_bus(flood_threshold=20, flood_window=60.0)
    b = make_bus(peers=[a.bus.endpoint])
    assert a.bus.wait_for_peers(1, timeout=10) and b.bus.wait_for_peers(1, timeout=10)

    flooder_id = os.urandom(16)
    flooder = _raw_dealer(zctx, a.bus.endpoint, flooder_id)
    for _ in range(50):
        flooder.send_multipart([b"\xee", b"garbage"])
    flooder.send_multipart([b"Q", b"\0" * 8, b"a valid request, too late"])

    wait_until(lambda: a.bus.stats["dropped"].get("banned", 0) >= 30)
    stats = a.bus.stats
    # Banned is the connection (its routing id), not the node id it put in there.
    connection = "conn:" + (flooder_id + b"\0\0\0\1").hex()
    assert stats["banned"] == [connection] and stats["bans"] == 1
    assert stats["dropped"]["unproven"] == 21  # the frame over the threshold bans
    assert a.requests == []
    assert not flooder.poll(50)  # the banned request got no reply

    b.bus.publish(b"unaffected")
    wait_until(lambda: a.payloads() == [b"unaffected"])
    assert b.bus.request(a.bus.node_id, b"q") == b"echo:q"


def test_flooding_publisher_is_disconnected(make_bus, zctx):
    a = make_bus(flood_threshold=10)
    b = make_bus(peers=[a.bus.endpoint])
    fake = FakePeer(zctx)
    a.bus.connect(fake.endpoint)
    wait_until(lambda: fake.ready_on(a.bus))
    assert a.bus.wait_for_peers(2, timeout=10)

    for _ in range(30):
        fake.xpub.send_multipart([b"M", b"bad"])
    wait_until(lambda: fake.node_id in a.bus.stats["banned"])
    assert fake.node_id not in a.bus.peers()
    fake.serve_once()  # its HELLO answers are ignored while banned
    assert fake.node_id not in a.bus.peers()
    b.bus.publish(b"still flowing")
    wait_until(lambda: a.payloads() == [b"still flowing"])


# ---------------------------------------------------------------------- CURVE


def test_curve_cluster_key_buses_talk(make_bus):
    keys = CurveConfig.generate()
    a = make_bus(curve=keys)
    b = make_bus(curve=keys, peers=[a.bus.endpoint])
    assert b.bus.wait_for_peers(1, timeout=10) and a.bus.wait_for_peers(1, timeout=10)
    a.bus.publish(b"secret")
    wait_until(lambda: b.payloads() == [b"secret"])
    assert b.bus.request(a.bus.node_id, b"q") == b"echo:q"


def test_curve_outsiders_get_nothing(make_bus, zctx):
    keys = CurveConfig.generate()
    a = make_bus(curve=keys)
    insider = make_bus(curve=keys, peers=[a.bus.endpoint])
    plain = make_bus(peers=[a.bus.endpoint])
    wrong = make_bus(curve=CurveConfig.generate(), peers=[a.bus.endpoint])

    # knows the public key but not the secret: ZAP refuses its own key pair
    public_only = zctx.socket(zmq.SUB)
    public_only.linger = 0
    public_only.curve_serverkey = keys.server_public
    public_only.curve_publickey, public_only.curve_secretkey = zmq.curve_keypair()
    public_only.subscribe(b"")
    public_only.connect(a.bus.pub_endpoint)
    sniffer = zctx.socket(zmq.SUB)  # no CURVE at all
    sniffer.linger = 0
    sniffer.subscribe(b"")
    sniffer.connect(a.bus.pub_endpoint)

    assert insider.bus.wait_for_peers(1, timeout=10)

    def published_until_insider_sees() -> bool:
        a.bus.publish(b"for insiders")
        return b"for insiders" in insider.payloads()

    wait_until(published_until_insider_sees, interval=0.05)
    for outsider in (plain, wrong):
        assert outsider.bus.request(a.bus.node_id, b"q", timeout=0.2) is None
        assert outsider.bus.peers() == {}
        assert outsider.received == []
    assert not public_only.poll(100) and not sniffer.poll(0)
    assert a.requests == []


def test_curve_allow_list_with_per_node_client_keys(make_bus):
    server_public, server_secret = zmq.curve_keypair()
    a_client = zmq.curve_keypair()
    b_client = zmq.curve_keypair()
    allowed = [a_client[0], b_client[0]]
    a = make_bus(
        curve=CurveConfig(
            server_public, server_secret, *a_client, allowed_clients=frozenset(allowed)
        )
    )
    b = make_bus(
        curve=CurveConfig(server_public, server_secret, *b_client).with_allowed(allowed),
        peers=[a.bus.endpoint],
    )
    stranger = make_bus(
        curve=CurveConfig(server_public, server_secret, *zmq.curve_keypair()),
        peers=[a.bus.endpoint],
    )
    assert b.bus.wait_for_peers(1, timeout=10) and a.bus.wait_for_peers(1, timeout=10)
    assert stranger.bus.request(a.bus.node_id, b"q", timeout=0.2) is None
    assert set(a.bus.peers()) == {b.bus.node_id}


def test_curve_keys_save_and_load(tmp_path):
    keys = CurveConfig.generate()
    path = tmp_path / "cluster.key_secret"
    keys.save(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert CurveConfig.load(path) == keys
    assert read_key_file(path) == (keys.server_public, keys.server_secret)
    path.chmod(0o644)
    with pytest.raises(ConfigurationError):
        CurveConfig.load(path)


def test_curve_config_validates_keys():
    public, secret = zmq.curve_keypair()
    other_public, _ = zmq.curve_keypair()
    with pytest.raises(ConfigurationError):
        CurveConfig.cluster(other_public, secret)
    with pytest.raises(ConfigurationError):
        CurveConfig.cluster(b"too short", secret)
    with pytest.raises(ConfigurationError):
        CurveConfig(public, secret, client_public=public)
    assert CurveConfig.cluster(public.decode(), secret.decode()).server_public == public


def test_deferred_replies_are_sent_from_another_thread(make_bus):
    jobs: queue.Queue = queue.Queue()

    def on_request(payload: bytes, sender: bytes) -> DeferredReply:
        deferred = DeferredReply()
        if payload == b"now":
            deferred.resolve(b"at once")  # resolved before the bus routes it
        else:
            jobs.put((payload, deferred))
        return deferred

    def worker() -> None:
        for _ in range(2):
            payload, deferred = jobs.get(timeout=10)
            deferred.resolve(None if payload == b"none" else b"later:" + payload)
            deferred.resolve(b"ignored")  # only the first answer counts

    a = make_bus(on_request=on_request)
    b = make_bus(peers=[a.bus.endpoint])
    assert a.bus.wait_for_peers(1, timeout=10) and b.bus.wait_for_peers(1, timeout=10)
    thread = threading.Thread(target=worker)
    thread.start()
    try:
        assert b.bus.request(a.bus.node_id, b"x", timeout=10) == b"later:x"
        assert b.bus.request(a.bus.node_id, b"none", timeout=10) is None
        assert b.bus.request(a.bus.node_id, b"now", timeout=10) == b"at once"
    finally:
        thread.join(10)
    stats = a.bus.stats
    assert stats["replies_out"] == 2 and stats["requests_in"] == 3
    assert stats["callback_errors"] == 0


def test_request_worker_drops_when_its_queue_is_full():
    from dmodel.net.replication import RequestWorker

    started, release = threading.Event(), threading.Event()
    answers: list[bytes | None] = []

    def serve(payload: bytes, sender: bytes, allowance: int) -> bytes:
        started.set()
        assert release.wait(10)
        return b"re:" + payload

    worker = RequestWorker(serve, size=1, name="dmodel-serve-test")
    try:
        first = worker.submit(b"1", b"s")
        assert started.wait(10)  # the worker holds the first one
        second = worker.submit(b"2", b"s")  # fills the queue
        assert worker.submit(b"3", b"s") is None and worker.dropped == 1
        for deferred in (first, second):
            deferred._attach(answers.append)
        release.set()
        wait_until(lambda: len(answers) == 2)
        assert answers == [b"re:1", b"re:2"]
    finally:
        release.set()
        worker.close()
    assert not any(t.name == "dmodel-serve-test" for t in threading.enumerate())
