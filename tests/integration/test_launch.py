"""launch()'s opt-outs, and peers that cannot be reached are named (loopback only)."""

from __future__ import annotations

import logging
import socket

from helpers import wait_until

import dmodel


def test_dmodel_discovery_0_keeps_launch_off_the_network(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("DMODEL_DISCOVERY", "0")
    node = dmodel.launch(tmp_path / "home")
    assert node.network is None and not node.discovery


def test_network_false_keeps_launch_off_the_network(tmp_path, monkeypatch) -> None:
    monkeypatch.delenv("DMODEL_DISCOVERY")  # even without the session's opt-out
    monkeypatch.setenv("DMODEL_PEERS", "tcp://127.0.0.1:9")
    node = dmodel.launch(tmp_path / "home", network=False)
    assert node.network is None and node.peers == [] and not node.discovery


def test_explicit_network_arguments_are_taken_as_given(tmp_path) -> None:
    node = dmodel.launch(tmp_path / "home", listen="tcp://127.0.0.1:*")
    assert node.network.endpoint.startswith("tcp://127.0.0.1:") and not node.discovery


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_a_peer_not_reached_is_a_warning_naming_it(make_node, caplog) -> None:
    endpoint = f"tcp://127.0.0.1:{_closed_port()}"
    caplog.set_level(logging.WARNING, logger="dmodel")
    node = make_node("n", listen="tcp://127.0.0.1:*", peers=[endpoint])
    assert node.unreached_peers() == []  # not yet: it has a few seconds
    assert node.unreached_peers(after=0) == [endpoint]
    record = wait_until(lambda: next((r for r in caplog.records
                                      if endpoint in r.getMessage()), None), timeout=15)
    assert record.levelno == logging.WARNING and "not reached" in record.getMessage()
