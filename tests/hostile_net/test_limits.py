"""The limits that keep an attacker's work off the victim: the ROUTER's reject budget
and the catch-up back-off, each through real sockets with the attacker in its own
process (``attacker.py``), and the back-off's arithmetic on its own.

- A peer that floods requests (``amplify``) gets its frames read only as fast as the
  reject budget allows: the victim's ROUTER pauses, and what it dropped stays within
  ``5 x max_requests_per_s`` a second (plus one burst). Meanwhile an honest client-only
  peer, whose pushes and requests share that ROUTER, loses nothing.
- A stranger (proven, but not a peer we link to) gets a quarter of the request rate and
  of the update budget,
  and strangers together a bounded share of the requests in service; a connection that
  does not read its replies gets its requests dropped before they reach the handler.
- A lying peer (``trap``) gets a catch-up turn after waits that double, and no relays
  of the honest peer's updates once it lied.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import threading
import time

import pytest
import zmq
from attacker import proven_dealer
from helpers import wait_until
from test_attacks import ATTACKER, Writer, check_outcome, lying_peer, rss, spawn

from dmodel.net import frames as fr
from dmodel.net.bus import Bus, DeferredReply
from dmodel.net.catchup import TurnBackoff
from dmodel.net.router import REJECTS_PER_REQUEST_RATE, STRANGER_SHARE
from dmodel.tools.driver import child_env

pytestmark = pytest.mark.timeout(90)

_REJECT_KEYS = ("banned", "unproven_limited", "unproven", "requests_limited",
                "requests_busy", "duplicate_request", "updates_limited", "oversize")


def _rejected(stats: dict) -> int:
    return sum(stats["dropped"].get(key, 0) for key in _REJECT_KEYS)


def test_a_request_flood_pauses_the_router_and_an_honest_client_loses_nothing() -> None:
    received: list[bytes] = []
    victim = Bus(node_id=os.urandom(16), listen="tcp://127.0.0.1:*", max_requests_per_s=400,
                 on_publish=lambda payload, sender: received.append(payload),
                 on_request=lambda payload, sender: b"ok:" + payload[:8])
    # A client-only honest peer: its updates and its requests both reach the victim's
    # ROUTER, the socket the attacker floods.
    honest = Bus(node_id=os.urandom(16), listen=None, peers=[victim.endpoint],
                 on_publish=lambda payload, sender: None,
                 on_request=lambda payload, sender: None)
    attacker = None
    try:
        wait_until(lambda: getattr(honest.peers().get(victim.node_id), "connected", False),
                   timeout=15)
        attacker = subprocess.Popen([sys.executable, str(ATTACKER), "amplify",
                                     victim.endpoint, "3", ""], stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True, env=child_env())
        wait_until(lambda: victim.stats["dropped"].get("router_paused", 0) > 0, timeout=15)
        t0, before = time.monotonic(), _rejected(victim.stats)
        sent, answers = [], []
        for i in range(40):
            payload = b"honest-%d" % i
            honest.publish(payload)
            sent.append(payload)
            answers.append(honest.request(victim.node_id, payload, timeout=5.0))
        stats = victim.stats
        elapsed, rejected = time.monotonic() - t0, _rejected(stats) - before
        wait_until(lambda: set(sent) <= set(received), timeout=15)
        assert answers == [b"ok:" + p[:8] for p in sent]
        budget = REJECTS_PER_REQUEST_RATE * 400
        pauses = stats["dropped"]["router_paused"]
        # What the ROUTER read and dropped: the budget's rate, one burst, and the one
        # frame over it that started each pause.
        assert rejected <= budget * elapsed + max(16, budget / 10) + pauses, \
            (rejected, elapsed, stats["dropped"])
        out, err = attacker.communicate(timeout=30)
        assert attacker.returncode == 0, err[-2000:]
        # Most of what it sent was never read: it waited in the sockets' queues.
        sent_by_attacker = json.loads(out.strip().splitlines()[-1])["sent"]
        assert _rejected(victim.stats) < sent_by_attacker
    finally:
        if attacker is not None and attacker.poll() is None:
            attacker.kill()
            attacker.wait(10)
        honest.close()
        victim.close()


@pytest.fixture
def zctx():
    ctx = zmq.Context()
    yield ctx
    ctx.destroy(linger=0)


def _replies(sock: zmq.Socket, n: int, timeout: float = 10.0) -> list[bytes | None]:
    """The next ``n`` REPLY / NO_REPLY payloads on a raw DEALER (None for NO_REPLY)."""
    out: list[bytes | None] = []
    while len(out) < n:
        assert sock.poll(int(timeout * 1000)), f"{len(out)} of {n} replies"
        frames = sock.recv_multipart()
        if frames[0] in (fr.REPLY, fr.NO_REPLY):
            out.append(frames[2] if frames[0] == fr.REPLY else None)
    return out


def test_a_stranger_gets_a_quarter_of_the_request_rate(zctx) -> None:
    victim = Bus(node_id=os.urandom(16), max_requests_per_s=40,
                 on_publish=lambda payload, sender: None,
                 on_request=lambda payload, sender: b"ok")
    peer = Bus(node_id=os.urandom(16), peers=[victim.endpoint],
               on_publish=lambda payload, sender: None, on_request=lambda p, s: None)
    try:
        assert victim.wait_for_peers(1, timeout=15) and peer.wait_for_peers(1, timeout=15)
        stranger = proven_dealer(zctx, victim.endpoint)  # no endpoint: never dialled back
        t0, got = time.monotonic(), []
        for group in range(25):  # 200 requests, 8 at a time, each group's replies read
            for i in range(8):
                stranger.send_multipart(fr.request_frames((8 * group + i).to_bytes(8, "big"),
                                                          b"q"))
            got += _replies(stranger, 8)
            # Paced to 160 a second, under the ROUTER's reject budget (5 x 40): past it,
            # rejected frames go unanswered (the ROUTER pauses), which is another test's.
            time.sleep(0.05)
        elapsed = time.monotonic() - t0
        served = sum(r == b"ok" for r in got)
        rate = 40 / STRANGER_SHARE  # its bucket: 10 a second, bursts of 20
        assert 0 < served <= 2 * rate + rate * elapsed + 1, (served, elapsed)
        assert victim.stats["dropped"]["requests_limited"] == 200 - served
        # A peer we link to has the whole rate: a burst of 60 is all served.
        answers = [peer.request(victim.node_id, b"q", timeout=5) for _ in range(60)]
        assert answers == [b"ok"] * 60
    finally:
        peer.close()
        victim.close()


def test_a_strangers_pushes_get_a_quarter_of_the_update_bytes(zctx) -> None:
    received: list[bytes] = []
    mib, size = 1024 * 1024, 100_000
    victim = Bus(node_id=os.urandom(16), max_update_bytes_per_s=4 * mib,
                 max_message_size=size + 1000,
                 on_publish=lambda payload, sender: received.append(payload),
                 on_request=lambda payload, sender: None)
    try:
        stranger = proven_dealer(zctx, victim.endpoint)
        t0 = time.monotonic()
        for i in range(100):  # 10 MB at once
            stranger.send_multipart(fr.push_frames(i.to_bytes(4, "big") * (size // 4)))
        wait_until(lambda: len(received) + victim.stats["dropped"].get("updates_limited", 0)
                   >= 100, timeout=30)
        elapsed = time.monotonic() - t0
        # Its bucket: 1 MiB a second, bursts of 2 MiB (a peer we link to: 4 and 8).
        rate = 4 * mib / STRANGER_SHARE
        assert 0 < len(received) * size <= 2 * rate + rate * elapsed + size, \
            (len(received), elapsed)
    finally:
        victim.close()


def test_strangers_share_a_bounded_number_of_requests_in_service(zctx) -> None:
    held: list[tuple[bytes, DeferredReply]] = []
    lock = threading.Lock()

    def on_request(payload: bytes, sender: bytes) -> DeferredReply:
        deferred = DeferredReply()
        with lock:
            held.append((sender, deferred))
        return deferred

    victim = Bus(node_id=os.urandom(16), max_requests_per_s=1000,
                 on_publish=lambda payload, sender: None, on_request=on_request)
    peer_id = os.urandom(16)
    peer = Bus(node_id=peer_id, peers=[victim.endpoint],
               on_publish=lambda payload, sender: None, on_request=lambda p, s: None)
    try:
        assert victim.wait_for_peers(1, timeout=15) and peer.wait_for_peers(1, timeout=15)
        per_conn = 8  # max_requests_in_service
        strangers = [proven_dealer(zctx, victim.endpoint) for _ in range(STRANGER_SHARE + 2)]
        for sock in strangers:
            for i in range(per_conn):
                sock.send_multipart(fr.request_frames(i.to_bytes(8, "big"), b"q"))
        cap = STRANGER_SHARE * per_conn
        wait_until(lambda: victim.stats["dropped"].get("requests_busy", 0)
                   >= len(strangers) * per_conn - cap, timeout=15)
        # The peer we link to still gets its requests into service.
        answers: list[bytes | None] = []
        asking = threading.Thread(target=lambda: answers.extend(
            peer.request(victim.node_id, b"p", timeout=15) for _ in range(1)))
        asking.start()
        wait_until(lambda: any(s == peer_id for s, _ in held), timeout=15)
        with lock:
            from_strangers = [d for s, d in held if s != peer_id]
        assert len(from_strangers) == cap
        for _, deferred in list(held):
            deferred.resolve(b"done")
        asking.join(15)
        assert answers == [b"done"]
        # Answered, the strangers' slots are free again.
        strangers[0].send_multipart(fr.request_frames(b"\xff" * 8, b"q"))
        wait_until(lambda: len(held) == cap + 2, timeout=15)
    finally:
        peer.close()
        victim.close()


def test_a_connection_that_does_not_read_its_replies_is_served_nothing(zctx) -> None:
    served = [0]

    def on_request(payload: bytes, sender: bytes) -> bytes:
        served[0] += 1
        return b"x" * 65536

    victim = Bus(node_id=os.urandom(16), max_requests_per_s=100_000, reply_hwm=4,
                 on_publish=lambda payload, sender: None, on_request=on_request)
    try:
        sock = proven_dealer(zctx, victim.endpoint, rcvhwm=1)
        sent = 0
        # Requests it never reads the answers of, until the victim's queue to it is full.
        while not victim.stats["dropped"].get("reply_hwm"):
            for _ in range(50):
                sock.send_multipart(fr.request_frames(sent.to_bytes(8, "big"), b"q"))
                sent += 1
            time.sleep(0.01)
        before = served[0]
        for _ in range(200):
            sock.send_multipart(fr.request_frames(sent.to_bytes(8, "big"), b"q"))
            sent += 1
        wait_until(lambda: victim.stats["dropped"].get("requests_unread", 0) > 0, timeout=15)
        # Its requests stopped reaching the handler (a few may come as the hold ends).
        assert served[0] - before < 200, (served[0], before, victim.stats["dropped"])
        # Once it reads again, it is served again.
        while sock.poll(200):
            sock.recv_multipart()
        deadline = time.monotonic() + 15
        while True:
            sock.send_multipart(fr.request_frames(b"\xfe" * 8, b"q"))
            if sock.poll(500):
                frames = sock.recv_multipart()
                if frames[0] == fr.REPLY and frames[1] == b"\xfe" * 8:
                    break
            assert time.monotonic() < deadline, victim.stats["dropped"]
    finally:
        victim.close()


def test_a_lying_peer_waits_longer_for_each_turn_and_gets_no_relays(tmp_path) -> None:
    with lying_peer(30) as (trap_ep, procs):
        honest = spawn(tmp_path / "honest", "honest")
        procs.append(honest)
        options = {"sync_interval": 0.1, "sync_turn_seconds": 0.5}
        victim = spawn(tmp_path / "victim", "victim", peers=[trap_ep, honest.endpoint],
                       options=options)
        procs.append(victim)
        assert victim.ok("wait_peers", n=2, timeout=15)["ready"]
        t0 = time.monotonic()
        wait_until(lambda: victim.stats()["network"]["sync_bad_replies"] >= 1, timeout=15)
        baseline = rss(victim.pid)
        published = victim.stats()["published"]
        with Writer(honest, period=0.02) as writer:
            time.sleep(3)
        check_outcome(victim, honest, writer, baseline, rss(victim.pid))
        # Once it lied it gets no relays: the honest peer's updates are not sent on.
        assert victim.stats()["published"] - published <= 2, len(writer.ids)
        elapsed = time.monotonic() - t0
        bad = victim.stats()["network"]["sync_bad_replies"]
        # Waits of 0.1, 0.2, 0.4 ... s: about log2(elapsed / 0.1) turns, where a pass
        # every 0.1 s would have given it one each pass.
        assert bad <= 2 + math.log2(elapsed / 0.1 + 1), (bad, elapsed)


def test_turn_backoff_doubles_by_node_id_and_by_endpoint() -> None:
    backoff = TurnBackoff(1.0, cap=8.0)
    liar, other = b"L" * 16, b"O" * 16
    backoff.seen(liar, "tcp://10.0.0.1:5000")
    waits = [backoff.failed(liar, 0.0) for _ in range(5)]
    assert waits == [1.0, 2.0, 4.0, 8.0, 8.0]
    assert backoff.waiting(liar, 7.9) and not backoff.waiting(liar, 8.0)
    assert backoff.struck(liar) and not backoff.struck(other)
    # The same endpoint under a new node id waits as long, and its next wait is longer.
    backoff.seen(other, "tcp://10.0.0.1:5000")
    assert backoff.waiting(other, 7.0)
    assert backoff.failed(other, 8.0) == 8.0
    backoff.passed(other)  # a good turn clears it, endpoint included
    assert not backoff.waiting(other, 9.0) and not backoff.struck(other)
    assert not backoff.waiting(b"N" * 16, 0.0)
