"""A hostile peer made of raw sockets, run as its own process (``python attacker.py MODE``).

Every mode is bounded in time and count, prints one JSON line (what it did) and exits.
The test suite and ``benchmarks/bench_hostile.py`` start it with ``subprocess`` and
stop it by its handle. Modes:

    forge-ban  ENDPOINT HONEST_ID_HEX N       junk from a DEALER named like the honest peer
    rotate     ENDPOINT N EVERY                junk, a new DEALER every EVERY frames
    amplify    ENDPOINT SECONDS IDS_HEX,...   proven; `get` requests, replies never read
    garbage    ENDPOINT N                      proven; N pushes of invalid updates
    flood      ENDPOINT N SIZE                 proven; N valid creates of SIZE bytes, each
                                               from a fresh identity
    trap       SECONDS [sums]                  a fake peer whose log pages lie (prints its
                                               endpoint first); the victim dials it. With
                                               ``sums``: a short log, and state sums that
                                               all differ, buckets of made-up objects, and
                                               objects that hold ever more ids
    dial       ENDPOINT SECONDS                proven; HELLOs and gossip naming ipc:// and a
                                               TCP target this process counts accepts on
    beacon     PORT SECONDS                    UDP beacons from 127.0.0.3 to 127.0.0.1:PORT
                                               that try to point at a TCP target on
                                               127.0.0.2, at ipc:// and at inproc://

:func:`proven_dealer` (the handshake from a raw DEALER) is imported by the tests too.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from typing import Any

import msgpack
import zmq

from dmodel.buckets import BUCKETS_PER_GROUP, GROUPS, bucket_of
from dmodel.crypto import Identity
from dmodel.net import frames as fr
from dmodel.net.discovery import Beacon, encode_beacon
from dmodel.net.identity import NodeKey, proof_message
from dmodel.update import Op, Update


def hello(node_id: bytes, key: NodeKey, nonce: bytes, proof: bytes = b"", ep: str = "",
          peers: tuple[tuple[bytes, str], ...] = ()) -> list[bytes]:
    return fr.hello_frames(fr.encode_hello(fr.Hello(node_id, ep, "", peers, key.public,
                                                    nonce, proof)))


def proven_dealer(ctx: zmq.Context, endpoint: str, node_id: bytes | None = None,
                  key: NodeKey | None = None, timeout: float = 5.0,
                  ep: str = "", rcvhwm: int = 100_000) -> zmq.Socket:
    """A DEALER that did the handshake with the ROUTER at ``endpoint`` (so it may send
    requests and pushes). Raises TimeoutError if no WELCOME comes."""
    node_id = node_id or os.urandom(16)
    key = key or NodeKey.generate()
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    sock.rcvhwm, sock.sndhwm = rcvhwm, 100_000
    sock.connect(endpoint)
    nonce = os.urandom(16)
    deadline = time.monotonic() + timeout
    while True:
        sock.send_multipart(hello(node_id, key, nonce, ep=ep))
        if sock.poll(200):
            frames = sock.recv_multipart()
            if frames[0] == fr.WELCOME:
                welcome = fr.decode_hello(frames[1])
                break
        if time.monotonic() > deadline:
            raise TimeoutError(f"no WELCOME from {endpoint}")
    proof = key.sign(proof_message(fr.HELLO, node_id, key.public, welcome.nonce))
    sock.send_multipart(hello(node_id, key, nonce, proof, ep=ep))
    return sock


def _junk(sock: zmq.Socket, n: int) -> None:
    for i in range(n):
        sock.send_multipart([b"\xee", i.to_bytes(4, "big")])


def forge_ban(ctx: zmq.Context, endpoint: str, honest: str, n: int) -> dict[str, Any]:
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    sock.sndhwm = 100_000
    sock.routing_id = bytes.fromhex(honest) + b"\0\0\0\1"
    sock.connect(endpoint)
    _junk(sock, n)
    time.sleep(0.5)  # let the frames leave before the socket closes
    return {"sent": n}


def rotate(ctx: zmq.Context, endpoint: str, n: int, every: int) -> dict[str, Any]:
    sent = sockets = 0
    while sent < n:
        sock = ctx.socket(zmq.DEALER)
        sock.linger = 100
        sock.routing_id = os.urandom(20)
        sock.connect(endpoint)
        _junk(sock, min(every, n - sent))
        sent += min(every, n - sent)
        sockets += 1
        sock.close()
    return {"sent": sent, "sockets": sockets}


def amplify(ctx: zmq.Context, endpoint: str, seconds: float, ids: list[bytes]) -> dict[str, Any]:
    sock = proven_dealer(ctx, endpoint)
    sock.rcvhwm = 1  # never read: replies pile up on the victim's side, if it lets them
    payload = msgpack.packb({"q": "get", "ids": ids}, use_bin_type=True)
    sent, end, req = 0, time.monotonic() + seconds, 0
    while time.monotonic() < end:
        for _ in range(100):
            req += 1
            try:
                sock.send_multipart(fr.request_frames(req.to_bytes(8, "big"), payload),
                                    zmq.NOBLOCK)
                sent += 1
            except zmq.Again:
                break
        time.sleep(0.001)
    return {"sent": sent, "request_bytes": len(payload)}


def garbage(ctx: zmq.Context, endpoint: str, n: int) -> dict[str, Any]:
    sock = proven_dealer(ctx, endpoint)
    for i in range(n):
        sock.send_multipart(fr.push_frames(b"\x00" * 80 + i.to_bytes(4, "big")))
    time.sleep(0.5)
    return {"sent": n}


def _create(size: int) -> bytes:
    identity = Identity.generate()
    db_id = f"Person:{identity.oid}"
    ops = [Op(db_id, "create", "", {"sign": identity.public.verify_key,
                                   "box": identity.public.box_key, "read": [], "update": []}),
           *(Op(db_id, "set", f"f{i}", "x" * 120_000) for i in range(max(1, size // 120_000)))]
    ts = (time.time_ns() // 1_000_000) << 16
    return Update.create(identity, node=os.urandom(16), caller=db_id, timestamp=ts,
                         prev=b"", ops=ops).raw


def flood(ctx: zmq.Context, endpoint: str, n: int, size: int) -> dict[str, Any]:
    raws = [_create(size) for _ in range(n)]
    sock = proven_dealer(ctx, endpoint)
    for raw in raws:
        sock.send_multipart(fr.push_frames(raw))
    time.sleep(0.5)
    return {"sent": n, "bytes": sum(len(r) for r in raws)}


def trap(ctx: zmq.Context, seconds: float, sums: bool = False) -> dict[str, Any]:
    """Answer HELLOs properly, then lie in every log page and serve nothing (``sums``:
    lie in the state sums instead, see the module docstring)."""
    node_id, key, nonce = os.urandom(16), NodeKey.generate(), os.urandom(16)
    router, xpub = ctx.socket(zmq.ROUTER), ctx.socket(zmq.XPUB)
    for sock in (router, xpub):
        sock.linger = 0
    xpub.setsockopt(zmq.XPUB_VERBOSE, 1)
    router.bind("tcp://127.0.0.1:*")
    xpub.bind("tcp://127.0.0.1:*")
    ep, pub = router.LAST_ENDPOINT.decode(), xpub.LAST_ENDPOINT.decode()
    print(json.dumps({"endpoint": ep, "node_id": node_id.hex()}), flush=True)
    counts = {"pages": 0, "gets": 0, "sums": 0}
    made_up = _objects_by_bucket(100_000) if sums else {}
    poller = zmq.Poller()
    poller.register(router, zmq.POLLIN)
    poller.register(xpub, zmq.POLLIN)
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        for sock, _ in poller.poll(100):
            if sock is xpub:
                sub = xpub.recv()
                if sub[:2] == b"\x01A":
                    xpub.send_multipart([sub[1:], node_id])
                continue
            frames = router.recv_multipart()
            ident, kind = frames[0], frames[1]
            if kind == fr.HELLO:
                h = fr.decode_hello(frames[2])
                proof = key.sign(proof_message(fr.WELCOME, node_id, key.public, h.nonce))
                body = fr.encode_hello(fr.Hello(node_id, ep, pub, (), key.public, nonce, proof))
                router.send_multipart([ident, fr.WELCOME, body])
            elif kind == fr.REQUEST:
                req = msgpack.unpackb(frames[3])
                reply = _lie(req, sums, made_up)
                if reply is None:
                    counts["gets"] += 1  # never served: the asker waits for nothing
                    continue
                counts["pages" if req.get("q") == "log" else "sums"] += 1
                router.send_multipart([ident, fr.REPLY, frames[2],
                                       msgpack.packb(reply, use_bin_type=True)])
    return counts


_EPOCH = b"trap" * 4
_LOG = 40  # the log the sums trap claims: short enough that a victim compares sums


def _lie(req: dict[str, Any], sums: bool, made_up: dict[int, list[str]]) -> Any:
    q = req.get("q")
    if q == "log":
        start = req["from"]
        if not sums:
            return {"e": _EPOCH, "from": start, "end": 10**12,
                    "ids": [os.urandom(32) for _ in range(100)]}
        ids = [os.urandom(32) for _ in range(max(0, min(20, _LOG - start)))]
        return {"e": _EPOCH, "from": start, "end": _LOG, "ids": ids}
    if not sums:
        return None
    if q == "sum":
        return {"e": _EPOCH, "end": _LOG, "g": [os.urandom(16) for _ in range(GROUPS)]}
    if q == "sumg":
        return {"b": [[g, [os.urandom(16) for _ in range(BUCKETS_PER_GROUP)]]
                      for g in req["ids"]]}
    if q == "sumb":
        return {"o": [[b, [[db_id, os.urandom(16)] for db_id in made_up.get(b, [])]]
                      for b in req["ids"]]}
    if q == "stored":  # every object holds 2,000 more ids than the last answer said
        return {"s": [[db_id, start, [os.urandom(32) for _ in range(2000)], True]
                      for db_id, start in req["ids"][:4]]}
    return None


def _objects_by_bucket(n: int) -> dict[int, list[str]]:
    """Made-up db_ids, by the bucket they hash to (so they pass that check)."""
    out: dict[int, list[str]] = {}
    for _ in range(n):
        db_id = f"Person:{os.urandom(16).hex()}"
        out.setdefault(bucket_of(db_id), []).append(db_id)
    return out


def _target() -> tuple[socket.socket, int]:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(512)
    listener.setblocking(False)
    return listener, listener.getsockname()[1]


def _count_accepts(listener: socket.socket, until: float) -> int:
    accepted = 0
    while time.monotonic() < until:
        try:
            conn, _ = listener.accept()
            conn.close()
            accepted += 1
        except BlockingIOError:
            time.sleep(0.01)
    return accepted


def dial(ctx: zmq.Context, endpoint: str, seconds: float) -> dict[str, Any]:
    listener, port = _target()
    target = f"tcp://127.0.0.1:{port}"
    node_id, key = os.urandom(16), NodeKey.generate()
    sock = proven_dealer(ctx, endpoint, node_id, key, ep="ipc:///tmp/dmodel-attack")
    end = time.monotonic() + seconds
    hellos = 0
    while time.monotonic() < end:
        gossip = tuple((os.urandom(16), target) for _ in range(32)) + tuple(
            (os.urandom(16), f"ipc:///tmp/dmodel-attack-{i}") for i in range(16))
        sock.send_multipart(hello(node_id, key, os.urandom(16), ep=target, peers=gossip))
        hellos += 1
        _count_accepts(listener, min(end, time.monotonic() + 0.1))
    accepted = _count_accepts(listener, time.monotonic() + 0.5)
    return {"hellos": hellos, "target": target, "accepted": accepted}


def beacon(port: int, seconds: float) -> dict[str, Any]:
    """Beacons that try to send the victim to a third address: a TCP target listens on
    127.0.0.2 (counting accepts) while every datagram comes from 127.0.0.3. Each round:
    a valid beacon naming the target's port, valid beacons naming other ports (each
    from a new node id), and datagrams that spell an endpoint out (``tcp://`` to the
    target, ``ipc://``, ``inproc://``, a beacon "version 2" with an address field)."""
    listener = socket.socket()
    listener.bind(("127.0.0.2", 0))
    listener.listen(512)
    listener.setblocking(False)
    target_port = listener.getsockname()[1]
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.3", 0))
    spelled = [f"tcp://127.0.0.2:{target_port}", "ipc:///tmp/dmodel-beacon",
               "inproc://dmodel-beacon"]
    end, valid, forged, accepted = time.monotonic() + seconds, 0, 0, 0
    while time.monotonic() < end:
        datagrams = [encode_beacon(Beacon(os.urandom(16), target_port))]
        datagrams += [encode_beacon(Beacon(os.urandom(16), 20000 + valid % 20000 + i))
                      for i in range(3)]
        valid += len(datagrams)
        for text in spelled:
            head = encode_beacon(Beacon(os.urandom(16), target_port))
            datagrams.append(head + text.encode())  # the endpoint after a beacon
            datagrams.append(head[:4] + text.encode())  # in place of id and port
            datagrams.append(b"DMD\x02" + os.urandom(16) + text.encode())  # "version 2"
            forged += 3
        for data in datagrams:
            udp.sendto(data, ("127.0.0.1", port))
        accepted += _count_accepts(listener, time.monotonic() + 0.1)
    accepted += _count_accepts(listener, time.monotonic() + 0.5)
    return {"valid": valid, "forged": forged, "accepted": accepted,
            "target": f"tcp://127.0.0.2:{target_port}", "source": "127.0.0.3"}


def main(argv: list[str]) -> int:
    mode, args = argv[0], argv[1:]
    ctx = zmq.Context()
    try:
        if mode == "forge-ban":
            out = forge_ban(ctx, args[0], args[1], int(args[2]))
        elif mode == "rotate":
            out = rotate(ctx, args[0], int(args[1]), int(args[2]))
        elif mode == "amplify":
            out = amplify(ctx, args[0], float(args[1]),
                          [bytes.fromhex(i) for i in args[2].split(",") if i])
        elif mode == "garbage":
            out = garbage(ctx, args[0], int(args[1]))
        elif mode == "flood":
            out = flood(ctx, args[0], int(args[1]), int(args[2]))
        elif mode == "trap":
            out = trap(ctx, float(args[0]), sums=args[1:2] == ["sums"])
        elif mode == "dial":
            out = dial(ctx, args[0], float(args[1]))
        elif mode == "beacon":
            out = beacon(int(args[0]), float(args[1]))
        else:
            raise SystemExit(f"unknown mode {mode}")
    finally:
        ctx.destroy(linger=0)
    print(json.dumps({"mode": mode, **out}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
