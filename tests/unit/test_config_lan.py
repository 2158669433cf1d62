"""launch()'s network default as NodeConfig resolves it (no sockets: pure resolution)."""

from __future__ import annotations

import pytest

from dmodel.config import NodeConfig
from dmodel.errors import ConfigurationError


def test_launch_with_no_network_argument_joins_the_lan(tmp_path) -> None:
    config = NodeConfig.resolve(tmp_path, lan=True, environ={})
    assert config.lan and config.discovery
    assert config.listen == "tcp://0.0.0.0:7600"


@pytest.mark.parametrize("value", ["0", "no", "off"])
def test_dmodel_discovery_0_opts_out(tmp_path, value) -> None:
    config = NodeConfig.resolve(tmp_path, lan=True, environ={"DMODEL_DISCOVERY": value})
    assert not config.lan and not config.discovery and config.listen is None


def test_a_listen_variable_is_kept(tmp_path) -> None:
    config = NodeConfig.resolve(tmp_path, lan=True,
                                environ={"DMODEL_LISTEN": "tcp://10.1.2.3:7000"})
    assert config.discovery and not config.lan and config.listen == "tcp://10.1.2.3:7000"


def test_node_stays_explicit(tmp_path) -> None:
    config = NodeConfig.resolve(tmp_path, environ={})
    assert not config.lan and not config.discovery and config.listen is None


def test_a_peer_list_given_as_one_string_is_refused(tmp_path) -> None:
    with pytest.raises(ConfigurationError, match=r"not one string: peers=\['tcp://a:1'\]"):
        NodeConfig.resolve(tmp_path, peers="tcp://a:1", environ={})


def test_an_endpoint_without_transport_gets_the_fix(tmp_path) -> None:
    with pytest.raises(ConfigurationError, match="did you mean 'tcp://10.0.0.1:7600'"):
        NodeConfig.resolve(tmp_path, peers=["10.0.0.1:7600"], environ={})
    with pytest.raises(ConfigurationError, match="did you mean 'tcp://10.0.0.1:7600'"):
        NodeConfig.resolve(tmp_path, environ={"DMODEL_PEERS": "10.0.0.1:7600"})
