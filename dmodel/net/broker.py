"""A publish relay for hub-and-spoke sites: XSUB in, XPUB out, ``zmq.proxy_steerable``.

Buses created with ``broker=(broker.frontend_endpoint, broker.backend_endpoint)``
publish into the frontend and subscribe from the backend, so peers that cannot
reach each other directly still receive each other's publishes. Only publishes go
through the broker; requests (RPC) always go directly from DEALER to ROUTER.
The broker never reads the messages; with CURVE it needs the cluster key pair
just as the buses do.
"""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING

import zmq

from dmodel.errors import ConfigurationError, NetworkError
from dmodel.net.curve import CurveConfig, make_server, start_authenticator
from dmodel.net.frames import DEFAULT_MAX_MESSAGE_SIZE, check_endpoint, hard_limit

if TYPE_CHECKING:
    from zmq.auth.thread import ThreadAuthenticator

logger = logging.getLogger(__name__)

_CONTROL_ENDPOINT = "inproc://dmodel-broker-control"


class Broker:
    """XSUB/XPUB relay running in its own thread; ``close()`` stops it."""

    def __init__(
        self,
        frontend: str = "tcp://127.0.0.1:*",
        backend: str = "tcp://127.0.0.1:*",
        *,
        curve: CurveConfig | None = None,
        max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
        hwm: int = 10000,
    ) -> None:
        for endpoint in (frontend, backend):
            check_endpoint(endpoint)
        if curve is not None and not isinstance(curve, CurveConfig):
            raise ConfigurationError("curve must be a CurveConfig")
        self._frontend_bind = frontend
        self._backend_bind = backend
        self._curve = curve
        self._max_message_size = max_message_size
        self._hwm = hwm
        self._ctx = zmq.Context()
        self._lock = threading.Lock()
        self._closed = False
        self._started = threading.Event()
        self._error: BaseException | None = None
        self.frontend_endpoint = ""
        self.backend_endpoint = ""
        self._control = self._ctx.socket(zmq.PAIR)
        self._control.linger = 0
        self._control.bind(_CONTROL_ENDPOINT)
        self._thread = threading.Thread(target=self._run, name="dmodel-broker", daemon=True)
        self._thread.start()
        self._started.wait()
        if self._error is not None:
            self._thread.join()
            self._control.close(linger=0)
            self._ctx.term()
            self._closed = True
            if isinstance(self._error, NetworkError):
                raise self._error
            raise NetworkError(f"broker failed to start: {self._error}") from self._error

    def __repr__(self) -> str:
        return f"<Broker {self.frontend_endpoint} -> {self.backend_endpoint}>"

    def __enter__(self) -> Broker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def endpoints(self) -> tuple[str, str]:
        """(frontend, backend): the value to pass as ``Bus(broker=...)``."""
        return (self.frontend_endpoint, self.backend_endpoint)

    def _run(self) -> None:
        sockets: list[zmq.SyncSocket] = []
        auth: ThreadAuthenticator | None = None
        try:
            if self._curve is not None:
                auth = start_authenticator(self._ctx, self._curve, logger.getChild("zap"))
            xsub = self._ctx.socket(zmq.XSUB)
            xpub = self._ctx.socket(zmq.XPUB)
            control = self._ctx.socket(zmq.PAIR)
            sockets += [xsub, xpub, control]
            for sock in sockets:
                sock.linger = 0
            for sock in (xsub, xpub):
                sock.rcvhwm = self._hwm
                sock.sndhwm = self._hwm
                make_server(sock, self._curve)
            xsub.maxmsgsize = hard_limit(self._max_message_size)
            # Pass every subscription upstream, so each bus sees its own probe
            # subscription even when another bus already subscribed the same topic.
            xpub.setsockopt(zmq.XPUB_VERBOSE, 1)
            control.connect(_CONTROL_ENDPOINT)
            try:
                xsub.bind(self._frontend_bind)
                xpub.bind(self._backend_bind)
            except zmq.ZMQError as exc:
                raise NetworkError(
                    f"cannot bind broker {self._frontend_bind} / {self._backend_bind}: {exc}"
                ) from exc
            self.frontend_endpoint = xsub.get_string(zmq.LAST_ENDPOINT)
            self.backend_endpoint = xpub.get_string(zmq.LAST_ENDPOINT)
        except BaseException as exc:
            self._error = exc
            self._cleanup(sockets, auth)
            self._started.set()
            return
        self._started.set()
        logger.info("broker relaying %s -> %s", self.frontend_endpoint, self.backend_endpoint)
        try:
            zmq.proxy_steerable(xsub, xpub, None, control)
        except zmq.ContextTerminated:
            pass
        except Exception:
            logger.exception("broker proxy stopped with an error")
        finally:
            self._cleanup(sockets, auth)

    @staticmethod
    def _cleanup(sockets: list[zmq.SyncSocket], auth: ThreadAuthenticator | None) -> None:
        for sock in sockets:
            sock.close(linger=0)
        if auth is not None:
            try:
                auth.stop()
            except Exception:
                logger.debug("ZAP authenticator did not stop cleanly", exc_info=True)

    def run_forever(self) -> None:
        """Block until the broker is closed (from another thread or by Ctrl-C)."""
        try:
            while self._thread.is_alive():
                self._thread.join(timeout=0.5)
        except KeyboardInterrupt:
            pass
        finally:
            self.close()

    def close(self) -> None:
        """Stop the relay thread, join it and release the sockets. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            try:
                self._control.send(b"TERMINATE")
            except zmq.ZMQError:
                pass
        self._thread.join(timeout=30)
        self._control.close(linger=0)
        if self._thread.is_alive():
            logger.error("broker thread did not stop; leaking its context")
            return
        self._ctx.term()


__all__ = ["Broker"]
