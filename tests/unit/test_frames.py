"""The bus wire format: frame and HELLO codecs, endpoint rules (pure, no sockets)."""

from __future__ import annotations

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from dmodel.errors import ConfigurationError, DModelError
from dmodel.net import frames as fr
from dmodel.update import MAX_UPDATE_SIZE, NODE_ID_SIZE

ME = bytes(range(16))
OTHER = bytes(range(16, 32))

node_ids = st.binary(min_size=NODE_ID_SIZE, max_size=NODE_ID_SIZE)
endpoints = st.builds(lambda host, port: f"tcp://{host}:{port}",
                      st.sampled_from(["127.0.0.1", "10.0.0.7", "[::1]", "node.lan"]),
                      st.integers(1, 65535))
hellos = st.builds(fr.Hello, node_ids, endpoints | st.just(""), endpoints | st.just(""),
                   st.lists(st.tuples(node_ids, endpoints), max_size=fr.MAX_GOSSIP)
                   .map(tuple))
frame_lists = st.lists(st.binary(max_size=64) | st.sampled_from(
    [fr.HELLO, fr.WELCOME, fr.REQUEST, fr.REPLY, fr.NO_REPLY, fr.PUSH, fr.MESSAGE,
     fr.ACK + ME, bytes(8), ME]), max_size=5)


# ------------------------------------------------------------------- HELLO

@given(hellos)
def test_hello_round_trips(hello: fr.Hello) -> None:
    assert fr.decode_hello(fr.encode_hello(hello)) == hello


@given(st.binary(max_size=512))
def test_random_bytes_never_raise_anything_but_malformed(data: bytes) -> None:
    try:
        fr.decode_hello(data)
    except fr.MalformedFrame as exc:
        assert exc.reason == "malformed"


@pytest.mark.parametrize("body", [
    {"v": 2, "id": ME, "ep": "", "pub": "", "peers": []},
    {"v": 1, "id": ME[:15], "ep": "", "pub": "", "peers": []},
    {"v": 1, "id": ME, "ep": 5, "pub": "", "peers": []},
    {"v": 1, "id": ME, "ep": "", "pub": "", "peers": [[OTHER, "inproc://x"]]},
    {"v": 1, "id": ME, "ep": "", "pub": "", "peers": [[OTHER]]},
    {"v": 1, "id": ME, "ep": "", "pub": "", "peers": [[OTHER, "tcp://a:1"]] * 65},
    [1, 2, 3],
])
def test_bad_hellos_are_malformed(body: object) -> None:
    with pytest.raises(fr.MalformedFrame):
        fr.decode_hello(msgpack.packb(body, use_bin_type=True))


def test_malformed_frame_is_a_dmodel_value_error() -> None:
    assert issubclass(fr.MalformedFrame, DModelError)
    assert issubclass(fr.MalformedFrame, ValueError)


# ------------------------------------------------------------ frame kinds

@given(frame_lists)
def test_decoders_raise_only_malformed_frame(frames: list[bytes]) -> None:
    for decode in (fr.decode_router, fr.decode_dealer, lambda f: fr.decode_sub(f, ME)):
        try:
            decode(frames)
        except fr.MalformedFrame as exc:
            assert exc.reason in ("malformed", "unknown")


def test_router_frames() -> None:
    hello = fr.Hello(ME, "tcp://127.0.0.1:5000", "tcp://127.0.0.1:5001")
    assert fr.decode_router(fr.hello_frames(fr.encode_hello(hello))) == hello
    assert fr.decode_router(fr.request_frames(bytes(8), b"q")) == fr.Request(bytes(8), b"q")
    assert fr.decode_router(fr.push_frames(b"u")) == fr.Push(b"u")


@pytest.mark.parametrize("frames, reason", [
    ([], "malformed"),
    ([fr.REQUEST, bytes(7), b"q"], "malformed"),
    ([fr.HELLO], "malformed"),
    ([fr.PUSH, b"a", b"b"], "malformed"),
    ([b"Z", b"x"], "unknown"),
])
def test_router_rejects(frames: list[bytes], reason: str) -> None:
    with pytest.raises(fr.MalformedFrame) as info:
        fr.decode_router(frames)
    assert info.value.reason == reason


def test_dealer_frames() -> None:
    ident = ME + b"abcd"
    assert fr.decode_dealer(fr.reply_frames(ident, bytes(8), b"r")[1:]) == fr.Reply(bytes(8), b"r")
    assert fr.decode_dealer(fr.reply_frames(ident, bytes(8), None)[1:]) == fr.Reply(bytes(8), None)
    hello = fr.Hello(OTHER, "", "", ((ME, "tcp://h:1"),))
    assert fr.decode_dealer(fr.welcome_frames(ident, fr.encode_hello(hello))[1:]) == hello
    with pytest.raises(fr.MalformedFrame) as info:
        fr.decode_dealer([fr.NO_REPLY, bytes(8), b"extra"])
    assert info.value.reason == "malformed"


def test_sub_frames() -> None:
    assert fr.decode_sub(fr.message_frames(OTHER, b"p"), ME) == fr.Message(OTHER, b"p")
    assert fr.decode_sub(fr.ack_frames(ME, OTHER), ME) == fr.Ack(OTHER)
    with pytest.raises(fr.MalformedFrame) as info:
        fr.decode_sub(fr.ack_frames(OTHER, OTHER), ME)  # someone else's ACK topic
    assert info.value.reason == "malformed"
    with pytest.raises(fr.MalformedFrame) as info:
        fr.decode_sub([b"X", b"y"], ME)
    assert info.value.reason == "unknown"
    with pytest.raises(fr.MalformedFrame):
        fr.decode_sub([fr.MESSAGE, b"short", b"p"], ME)


def test_ack_subscription() -> None:
    assert fr.ack_subscriber(b"\x01" + fr.ACK + ME) == ME
    assert fr.ack_subscriber(b"\x00" + fr.ACK + ME) is None
    assert fr.ack_subscriber(b"\x01" + fr.MESSAGE) is None


# ------------------------------------------------------------------ limits

def test_default_limit_fits_one_update_and_its_reply_envelope() -> None:
    assert fr.DEFAULT_MAX_MESSAGE_SIZE == MAX_UPDATE_SIZE + fr.FRAME_OVERHEAD
    assert fr.reply_budget(fr.DEFAULT_MAX_MESSAGE_SIZE) == MAX_UPDATE_SIZE
    assert fr.reply_budget(1000) == 500
    assert fr.hard_limit(1000) == 1000 + fr.FRAME_OVERHEAD


# --------------------------------------------------------------- endpoints

def test_endpoint_helpers() -> None:
    assert fr.split_host("tcp://10.0.0.1:5000") == ("10.0.0.1", "5000")
    assert fr.split_host("ipc:///tmp/x") is None
    assert fr.with_host("tcp://0.0.0.0:5000", "10.0.0.2") == "tcp://10.0.0.2:5000"
    assert fr.with_host("tcp://*:5000", "::1") == "tcp://[::1]:5000"
    assert fr.is_wildcard("tcp://*:1") and fr.is_wildcard("tcp://0.0.0.0:1")
    assert not fr.is_wildcard("tcp://127.0.0.1:1")
    assert fr.pub_bind_endpoint("tcp://127.0.0.1:*") == "tcp://127.0.0.1:*"
    assert fr.pub_bind_endpoint("ipc:///tmp/bus") == "ipc:///tmp/bus.pub"
    assert fr.pub_bind_endpoint("ipc://*") == "ipc://*"
    assert fr.gossip_endpoint_ok("tcp://h:1") and not fr.gossip_endpoint_ok("inproc://x")
    assert not fr.gossip_endpoint_ok("tcp://" + "h" * 300)


@pytest.mark.parametrize("bad", ["nohost", 5, "tcp://" + "x" * 300])
def test_check_endpoint_refuses(bad: object) -> None:
    with pytest.raises(ConfigurationError):
        fr.check_endpoint(bad)


def test_check_node_id_and_tcp_without_port() -> None:
    assert fr.check_node_id(ME) == ME
    with pytest.raises(ConfigurationError):
        fr.check_node_id(ME[:8])
    with pytest.raises(ConfigurationError):
        fr.pub_bind_endpoint("tcp://nohostport")


def test_learned_endpoints_are_tcp_only() -> None:
    ok = fr.gossip_endpoint_ok
    assert ok("tcp://10.0.0.1:5000") and ok("tcp://[::1]:5000") and ok("tcp://host:1")
    for bad in ("ipc:///tmp/x", "inproc://x", "tcp://0.0.0.0:1", "tcp://*:1", "tcp://h:0",
                "tcp://h:70000", "tcp://h:x", "tcp://h", "tcp://:1", 5, ""):
        assert not ok(bad), bad


def test_hello_skips_gossip_it_may_not_dial_and_checks_its_proof_fields() -> None:
    hello = fr.Hello(ME, "", "", ((OTHER, "tcp://h:1"),), bytes(32), bytes(16), bytes(64))
    body = msgpack.unpackb(fr.encode_hello(hello))
    body["peers"].append([OTHER, "ipc:///tmp/x"])
    got = fr.decode_hello(msgpack.packb(body, use_bin_type=True))
    assert got.peers == ((OTHER, "tcp://h:1"),) and got.skipped == 1
    for field, value in (("key", b"short"), ("n", b""), ("sig", b"x" * 10)):
        with pytest.raises(fr.MalformedFrame):
            fr.decode_hello(msgpack.packb({**body, field: value}, use_bin_type=True))


def test_node_key_proofs_and_pins(tmp_path) -> None:
    from dmodel.net.identity import (
        KeyPins,
        NodeKey,
        derived_node_id,
        load_node_key,
        proof_message,
        verify,
    )

    key = load_node_key(tmp_path)
    assert (tmp_path / "node.key").stat().st_mode & 0o777 == 0o600
    assert load_node_key(tmp_path).public == key.public  # kept across restarts
    nonce = bytes(16)
    sig = key.sign(proof_message(b"H", ME, key.public, nonce))
    assert verify(key.public, proof_message(b"H", ME, key.public, nonce), sig)
    assert not verify(key.public, proof_message(b"H", ME, key.public, b"\1" * 16), sig)
    assert not verify(key.public, proof_message(b"W", ME, key.public, nonce), sig)
    pins, other = KeyPins(), NodeKey.generate()
    assert pins.accept(ME, key.public) and pins.accept(ME, key.public)
    assert not pins.accept(ME, other.public)  # the id is bound to the first key
    assert pins.accept(derived_node_id(other.public), other.public)
