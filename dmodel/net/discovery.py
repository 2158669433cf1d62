"""LAN discovery: a UDP beacon codec (pure) and the beacon socket the bus I/O thread polls.

Wire format of a beacon (network byte order), after pyre's ``'ZRE' + version +
uuid + port``::

    magic    3 bytes   b"DMD"
    version  1 byte    1
    node_id 16 bytes   the sender's node id
    port     2 bytes   TCP port of the sender's ROUTER socket (1..65535)
    cluster  0 or 8    optional cluster tag: blake2b-64 of the cluster name

A beacon is therefore exactly 22 or 30 bytes. The receiver connects to
``tcp://<sender ip>:<port>``; beacons with another cluster tag (or none, when one
is configured) are ignored, so several clusters can share a LAN and a UDP port.

On one machine, several buses can share the beacon port (SO_REUSEADDR and
SO_REUSEPORT), but only broadcast datagrams reach all of them: use
``address="127.255.255.255"`` for loopback tests, not ``"127.0.0.1"`` (a unicast
datagram is delivered to one socket only).
"""

from __future__ import annotations

import hashlib
import logging
import socket
import struct
from dataclasses import dataclass

from dmodel.errors import ConfigurationError, DModelError
from dmodel.update import NODE_ID_SIZE

logger = logging.getLogger(__name__)

MAGIC = b"DMD"
VERSION = 1
CLUSTER_TAG_SIZE = 8
DEFAULT_PORT = 7699

_HEADER = struct.Struct(f"!3sB{NODE_ID_SIZE}sH")
BEACON_SIZE = _HEADER.size
BEACON_SIZE_WITH_CLUSTER = _HEADER.size + CLUSTER_TAG_SIZE


class MalformedBeacon(DModelError, ValueError):
    """A datagram that is not a valid dmodel beacon."""


@dataclass(frozen=True, slots=True)
class Beacon:
    """What a node announces on the LAN: who it is and where its ROUTER listens."""

    node_id: bytes
    port: int
    cluster: bytes | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.node_id, bytes) or len(self.node_id) != NODE_ID_SIZE:
            raise MalformedBeacon(f"node_id must be {NODE_ID_SIZE} bytes")
        if isinstance(self.port, bool) or not isinstance(self.port, int):
            raise MalformedBeacon("port must be an int")
        if not 0 < self.port < 65536:
            raise MalformedBeacon(f"port out of range: {self.port}")
        if self.cluster is not None and (
            not isinstance(self.cluster, bytes) or len(self.cluster) != CLUSTER_TAG_SIZE
        ):
            raise MalformedBeacon(f"cluster tag must be {CLUSTER_TAG_SIZE} bytes")


def cluster_tag(name: str) -> bytes:
    """The 8-byte tag a beacon carries for the cluster called ``name``."""
    return hashlib.blake2b(
        name.encode("utf-8"), digest_size=CLUSTER_TAG_SIZE, person=b"dmodel-beacon"
    ).digest()


def encode_beacon(beacon: Beacon) -> bytes:
    """Serialize a beacon to its 22- or 30-byte wire form."""
    data = _HEADER.pack(MAGIC, VERSION, beacon.node_id, beacon.port)
    if beacon.cluster is not None:
        data += beacon.cluster
    return data


def decode_beacon(data: bytes) -> Beacon:
    """Parse a datagram; raise MalformedBeacon (a ValueError) on anything else."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise MalformedBeacon("beacon must be bytes")
    data = bytes(data)
    if len(data) not in (BEACON_SIZE, BEACON_SIZE_WITH_CLUSTER):
        raise MalformedBeacon(f"bad beacon length {len(data)}")
    magic, version, node_id, port = _HEADER.unpack_from(data)
    if magic != MAGIC:
        raise MalformedBeacon("bad magic")
    if version != VERSION:
        raise MalformedBeacon(f"unsupported beacon version {version}")
    cluster = data[BEACON_SIZE:] or None
    return Beacon(node_id=node_id, port=port, cluster=cluster)


@dataclass(frozen=True, slots=True)
class DiscoveryConfig:
    """UDP beacon settings. ``address`` is where beacons are sent (broadcast by default)."""

    port: int = DEFAULT_PORT
    interval: float = 1.0
    address: str = "255.255.255.255"
    enabled: bool = True
    cluster: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.port, bool) or not isinstance(self.port, int):
            raise ConfigurationError("discovery port must be an int")
        if not 0 < self.port < 65536:
            raise ConfigurationError(f"discovery port out of range: {self.port}")
        if not self.interval > 0:
            raise ConfigurationError("discovery interval must be > 0")
        if not isinstance(self.address, str) or not self.address:
            raise ConfigurationError("discovery address must be a host string")

    @property
    def cluster_tag(self) -> bytes | None:
        """The tag put into (and required from) beacons, or None."""
        return None if self.cluster is None else cluster_tag(self.cluster)


def open_beacon_socket(config: DiscoveryConfig) -> socket.socket:
    """A non-blocking UDP socket bound on 0.0.0.0:port, able to broadcast.

    Raises OSError when it cannot be bound; the bus turns that into NetworkError.
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if hasattr(socket, "SO_REUSEPORT"):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
        sock.bind(("0.0.0.0", config.port))
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


class BeaconSender:
    """Sends one node's beacons. The first failure of a run of failures is a WARNING with
    a hint (a host without a route to the beacon address fails at every beacon), the
    others are DEBUG; ``failed`` counts them all."""

    def __init__(self, sock: socket.socket, config: DiscoveryConfig, beacon: Beacon) -> None:
        self.sock, self.config = sock, config
        self.data = encode_beacon(beacon)
        self.failed = 0
        self._failing = False

    def send(self) -> bool:
        """Send a beacon now; False if the network refused it."""
        where = f"{self.config.address}:{self.config.port}"
        try:
            self.sock.sendto(self.data, (self.config.address, self.config.port))
        except OSError as exc:
            self.failed += 1
            if self._failing:
                logger.debug("beacon not sent to %s: %s", where, exc)
            else:
                self._failing = True
                logger.warning(
                    "discovery: cannot send beacons to %s (%s): this host has no route "
                    "there (is a network up? is %s an address of this LAN?), so nodes on "
                    "other hosts do not find this one; give peers=[...] instead, or "
                    "DiscoveryConfig(address=...) (told once; beacons keep being tried)",
                    where, exc.strerror or exc, self.config.address)
            return False
        if self._failing:
            self._failing = False
            logger.info("discovery: beacons to %s are sent again", where)
        return True


def recv_beacons(sock: socket.socket, limit: int = 64) -> list[tuple[bytes, str]]:
    """Read up to ``limit`` pending datagrams as (data, sender ip), never blocking."""
    out: list[tuple[bytes, str]] = []
    for _ in range(limit):
        try:
            data, addr = sock.recvfrom(64)
        except (BlockingIOError, InterruptedError):
            break
        except OSError as exc:
            logger.debug("beacon socket error: %s", exc)
            break
        out.append((data, addr[0]))
    return out
