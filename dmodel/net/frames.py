"""The bus wire format: frame kinds, the HELLO body and endpoint rules (pure codecs).

No sockets and no threads: bytes and lists of frames in, typed messages or bytes out.
Only the bus I/O thread (:mod:`dmodel.net.actor`) calls these, but any thread may.

Frames (all bytes; ``id`` is a 16-byte node id, ``dmodel.update.NODE_ID_SIZE``)::

    DEALER -> ROUTER   (the ROUTER sees the DEALER's routing id first: 20 random
                        bytes, one per connection; it names the connection, never
                        the node)
      HELLO     [b"H", body]              body: msgpack map, see below
      REQUEST   [b"Q", req_id(8), payload]
      PUSH      [b"U", payload]           publish from a client-only node
    ROUTER -> DEALER
      WELCOME   [b"W", body]
      REPLY     [b"R", req_id(8), payload]
      NO_REPLY  [b"N", req_id(8)]         the handler returned None or failed
    XPUB -> SUB
      MESSAGE   [b"M", sender id, payload]
      ACK       [b"A" + subscriber id, sender id]

    body = {"v": 2, "id": node id, "ep": ROUTER endpoint or "",
            "pub": PUB endpoint or "", "peers": [[node id, endpoint], ...],
            "key": Ed25519 node key (32), "n": a fresh nonce (16),
            "sig": b"" or the signature of identity.proof_message(role, id, key,
                   the other side's nonce) (64)}

Handshake (proof of the node key, :mod:`dmodel.net.identity`). The DEALER's first
HELLO carries its link nonce and no signature; the WELCOME signs that nonce and carries
the ROUTER's session nonce; the DEALER checks it (the peer is now *proven* on our link)
and at once sends a HELLO signing the session nonce (we are now proven on the peer's
ROUTER). Until then the ROUTER takes nothing but HELLO from that connection. WELCOMEs
to a connection not proven yet carry no gossip.

Endpoints learned from a peer (its HELLO, WELCOME and gossip) are dialled only if
:func:`gossip_endpoint_ok`: ``tcp://host:port`` of sane length, never ``ipc://`` or
``inproc://``. Gossip entries that fail it are skipped (counted by the caller).

Size limit. A payload carries one update (at most ``MAX_UPDATE_SIZE``) or a
catch-up reply holding several; :data:`FRAME_OVERHEAD` is the room left around them
(the reply's msgpack envelope and per-update headers), so the default payload limit
is ``MAX_UPDATE_SIZE + FRAME_OVERHEAD`` and a reply packs updates up to
:func:`reply_budget`. ZMQ_MAXMSGSIZE is set ``FRAME_OVERHEAD`` above the payload
limit, as a hard memory bound that the frame kinds and ids fit under.

Decoding never raises anything but :class:`MalformedFrame`, whose ``reason`` is the
drop counter the bus increments: ``"malformed"`` (a known kind in the wrong shape)
or ``"unknown"`` (a kind the protocol does not have).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import msgpack

from dmodel.errors import ConfigurationError, DModelError
from dmodel.net.identity import HANDSHAKE_NONCE_SIZE, KEY_SIZE, PROOF_SIZE
from dmodel.update import MAX_UPDATE_SIZE, NODE_ID_SIZE

HELLO_VERSION = 2

HELLO = b"H"
WELCOME = b"W"
REQUEST = b"Q"
REPLY = b"R"
NO_REPLY = b"N"
PUSH = b"U"
MESSAGE = b"M"
ACK = b"A"

REQ_ID_SIZE = 8
ROUTING_ID_SIZE = 20
MAX_ENDPOINT_LEN = 256
MAX_GOSSIP = 64
FRAME_OVERHEAD = 64 * 1024
DEFAULT_MAX_MESSAGE_SIZE = MAX_UPDATE_SIZE + FRAME_OVERHEAD

_WILDCARD_HOSTS = frozenset({"", "*", "0.0.0.0", "::", "[::]"})
_SUBSCRIBE_ACK = b"\x01" + ACK


class MalformedFrame(DModelError, ValueError):
    """Frames that do not follow the bus wire format; ``reason`` names the drop counter."""

    def __init__(self, reason: str = "malformed", detail: str = "") -> None:
        super().__init__(detail or reason)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Hello:
    """A HELLO or WELCOME body: who the sender is, where it listens, whom it knows."""

    node_id: bytes
    endpoint: str
    pub_endpoint: str
    peers: tuple[tuple[bytes, str], ...] = ()
    key: bytes = bytes(KEY_SIZE)
    nonce: bytes = bytes(HANDSHAKE_NONCE_SIZE)
    proof: bytes = b""
    skipped: int = 0
    """Gossip entries left out because their endpoint may not be dialled."""


@dataclass(frozen=True, slots=True)
class Request:
    req_id: bytes
    payload: bytes


@dataclass(frozen=True, slots=True)
class Push:
    payload: bytes


@dataclass(frozen=True, slots=True)
class Reply:
    """A REPLY, or a NO_REPLY when ``payload`` is None."""

    req_id: bytes
    payload: bytes | None


@dataclass(frozen=True, slots=True)
class Message:
    sender: bytes
    payload: bytes


@dataclass(frozen=True, slots=True)
class Ack:
    sender: bytes


# ------------------------------------------------------------------- limits


def reply_budget(max_message_size: int) -> int:
    """Bytes of updates one reply may carry under a payload limit (room for framing)."""
    return max(max_message_size - FRAME_OVERHEAD, max_message_size // 2)


def hard_limit(max_message_size: int) -> int:
    """The ZMQ_MAXMSGSIZE for a payload limit."""
    return max_message_size + FRAME_OVERHEAD


# ------------------------------------------------------------------- HELLO


def encode_hello(hello: Hello) -> bytes:
    peers = [[nid, ep] for nid, ep in hello.peers]
    return msgpack.packb(
        {"v": HELLO_VERSION, "id": hello.node_id, "ep": hello.endpoint,
         "pub": hello.pub_endpoint, "peers": peers, "key": hello.key, "n": hello.nonce,
         "sig": hello.proof},
        use_bin_type=True,
    )


def decode_hello(data: bytes) -> Hello:
    """A HELLO/WELCOME body; raises MalformedFrame for anything else."""
    try:
        obj = msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=True,
            max_str_len=MAX_ENDPOINT_LEN,
            max_bin_len=PROOF_SIZE,
            max_array_len=MAX_GOSSIP * 2,
            max_map_len=16,
        )
    except Exception as exc:  # msgpack raises a zoo of types on hostile input
        raise MalformedFrame("malformed", "hello is not msgpack") from exc
    if not isinstance(obj, dict) or obj.get("v") != HELLO_VERSION:
        raise MalformedFrame("malformed", "not a hello")
    node_id, ep, pub, peers = obj.get("id"), obj.get("ep"), obj.get("pub"), obj.get("peers")
    if not isinstance(node_id, bytes) or len(node_id) != NODE_ID_SIZE:
        raise MalformedFrame("malformed", "bad node id")
    if not isinstance(ep, str) or not isinstance(pub, str) or not isinstance(peers, list):
        raise MalformedFrame("malformed", "bad hello fields")
    key, nonce, proof = obj.get("key"), obj.get("n"), obj.get("sig")
    if not isinstance(key, bytes) or len(key) != KEY_SIZE:
        raise MalformedFrame("malformed", "bad node key")
    if not isinstance(nonce, bytes) or len(nonce) != HANDSHAKE_NONCE_SIZE:
        raise MalformedFrame("malformed", "bad nonce")
    if not isinstance(proof, bytes) or len(proof) not in (0, PROOF_SIZE):
        raise MalformedFrame("malformed", "bad proof")
    if len(peers) > MAX_GOSSIP:
        raise MalformedFrame("malformed", "too many peers")
    gossip: list[tuple[bytes, str]] = []
    skipped = 0
    for item in peers:
        if (
            not isinstance(item, list)
            or len(item) != 2
            or not isinstance(item[0], bytes)
            or len(item[0]) != NODE_ID_SIZE
            or not isinstance(item[1], str)
        ):
            raise MalformedFrame("malformed", "bad gossip entry")
        if gossip_endpoint_ok(item[1]):
            gossip.append((item[0], item[1]))
        else:
            skipped += 1
    return Hello(node_id, ep, pub, tuple(gossip), key, nonce, proof, skipped)


# ------------------------------------------------------------ frame decoding


def _kind_error(kind: bytes, known: tuple[bytes, ...]) -> MalformedFrame:
    return MalformedFrame("malformed" if kind in known else "unknown", f"bad {kind[:8]!r} frame")


def decode_router(frames: Sequence[bytes]) -> Hello | Request | Push:
    """What a DEALER sent to our ROUTER (the frames after the routing id)."""
    if not frames:
        raise MalformedFrame("malformed", "empty")
    kind, n = frames[0], len(frames)
    if kind == HELLO and n == 2:
        return decode_hello(frames[1])
    if kind == REQUEST and n == 3 and len(frames[1]) == REQ_ID_SIZE:
        return Request(frames[1], frames[2])
    if kind == PUSH and n == 2:
        return Push(frames[1])
    raise _kind_error(kind, (HELLO, REQUEST, PUSH))


def decode_dealer(frames: Sequence[bytes]) -> Hello | Reply:
    """What a ROUTER sent back to our DEALER: a WELCOME body or a (NO_)REPLY."""
    if not frames:
        raise MalformedFrame("malformed", "empty")
    kind, n = frames[0], len(frames)
    if kind == WELCOME and n == 2:
        return decode_hello(frames[1])
    if kind == REPLY and n == 3:
        return Reply(frames[1], frames[2])
    if kind == NO_REPLY and n == 2:
        return Reply(frames[1], None)
    raise _kind_error(kind, (WELCOME, REPLY, NO_REPLY))


def decode_sub(frames: Sequence[bytes], own_id: bytes) -> Message | Ack:
    """What a PUB sent to our SUB (subscribed to MESSAGE and to ACK + own_id)."""
    if not frames:
        raise MalformedFrame("malformed", "empty")
    topic, n = frames[0], len(frames)
    if topic == MESSAGE and n == 3 and len(frames[1]) == NODE_ID_SIZE:
        return Message(frames[1], frames[2])
    if n == 2 and topic == ACK + own_id and len(frames[1]) == NODE_ID_SIZE:
        return Ack(frames[1])
    if topic == MESSAGE or topic.startswith(ACK):
        raise MalformedFrame("malformed", "bad message")
    raise MalformedFrame("unknown", "unknown topic")


def ack_subscriber(subscription: bytes) -> bytes | None:
    """The node id in an XPUB subscription to its ACK topic, else None."""
    if len(subscription) == 2 + NODE_ID_SIZE and subscription[:2] == _SUBSCRIBE_ACK:
        return subscription[2:]
    return None


# ------------------------------------------------------------ frame encoding


def hello_frames(body: bytes) -> list[bytes]:
    return [HELLO, body]


def welcome_frames(ident: bytes, body: bytes) -> list[bytes]:
    return [ident, WELCOME, body]


def request_frames(req_id: bytes, payload: bytes) -> list[bytes]:
    return [REQUEST, req_id, payload]


def reply_frames(ident: bytes, req_id: bytes, payload: bytes | None) -> list[bytes]:
    if payload is None:
        return [ident, NO_REPLY, req_id]
    return [ident, REPLY, req_id, payload]


def push_frames(payload: bytes) -> list[bytes]:
    return [PUSH, payload]


def message_frames(sender: bytes, payload: bytes) -> list[bytes]:
    return [MESSAGE, sender, payload]


def ack_frames(subscriber: bytes, sender: bytes) -> list[bytes]:
    return [ACK + subscriber, sender]


# ------------------------------------------------------------------ endpoints


def check_node_id(node_id: object, what: str = "node_id") -> bytes:
    if not isinstance(node_id, bytes) or len(node_id) != NODE_ID_SIZE:
        raise ConfigurationError(f"{what} must be {NODE_ID_SIZE} bytes")
    return node_id


def check_endpoint(endpoint: object) -> str:
    if not isinstance(endpoint, str) or "://" not in endpoint:
        raise ConfigurationError(f"not a ZeroMQ endpoint: {endpoint!r}")
    if len(endpoint) > MAX_ENDPOINT_LEN:
        raise ConfigurationError("endpoint too long")
    return endpoint


def split_host(endpoint: str) -> tuple[str, str] | None:
    """(host, port) of a tcp:// endpoint, or None."""
    if not endpoint.startswith("tcp://"):
        return None
    host, sep, port = endpoint[6:].rpartition(":")
    if not sep:
        return None
    return host, port


def with_host(endpoint: str, host: str) -> str:
    """A tcp:// endpoint with its host replaced (IPv6 hosts bracketed)."""
    parts = split_host(endpoint)
    if parts is None:
        return endpoint
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"tcp://{host}:{parts[1]}"


def is_wildcard(endpoint: str) -> bool:
    parts = split_host(endpoint)
    return parts is not None and parts[0] in _WILDCARD_HOSTS


def pub_bind_endpoint(listen: str) -> str:
    """Where the PUB binds, given where the ROUTER listens."""
    scheme, _, rest = listen.partition("://")
    if scheme == "tcp":
        host, sep, _port = rest.rpartition(":")
        if not sep:
            raise ConfigurationError(f"tcp endpoint needs a port: {listen!r}")
        return f"tcp://{host}:*"
    if scheme == "ipc":
        return "ipc://*" if rest == "*" else f"{listen}.pub"
    return f"{listen}.pub"


def gossip_endpoint_ok(endpoint: Any) -> bool:
    """The one rule for endpoints learned from a peer (HELLO, WELCOME, gossip, beacons):
    ``tcp://host:port`` of sane length, a port in 1..65535 and no wildcard host. Never
    ``ipc://`` or ``inproc://``: a peer must not make us open local sockets."""
    if not isinstance(endpoint, str) or not 0 < len(endpoint) <= MAX_ENDPOINT_LEN:
        return False
    parts = split_host(endpoint)
    if parts is None:
        return False
    host, port = parts
    if not host or "/" in host or not port.isdigit() or not 0 < int(port) < 65536:
        return False
    return host not in _WILDCARD_HOSTS
