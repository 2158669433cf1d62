"""A beacon that cannot be sent is a WARNING with a hint once per run of failures, not
one per beacon (a real UDP socket and a real socket error, no mocks)."""

from __future__ import annotations

import logging
import os
import socket

from dmodel.net.discovery import Beacon, BeaconSender, DiscoveryConfig


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.levelno == logging.WARNING and r.name == "dmodel.net.discovery"]


def test_an_unsendable_beacon_is_one_warning_with_a_hint(caplog) -> None:
    caplog.set_level(logging.DEBUG, logger="dmodel.net.discovery")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        # An IPv6 address from an IPv4 socket: the kernel's resolver refuses it, every time.
        sender = BeaconSender(sock, DiscoveryConfig(port=port, address="::1"),
                              Beacon(os.urandom(16), 7600))
        assert [sender.send() for _ in range(5)] == [False] * 5
        assert sender.failed == 5
        [warning] = _warnings(caplog)
        assert "::1" in warning and "peers=[...]" in warning and "once" in warning
        # It works again (here: pointed at our own socket), then fails again: told again.
        sender.config = DiscoveryConfig(port=port, address="127.0.0.1")
        assert sender.send()
        assert sock.recv(64) == sender.data
        sender.config = DiscoveryConfig(port=port, address="::1")
        assert not sender.send() and not sender.send()
        assert len(_warnings(caplog)) == 2
