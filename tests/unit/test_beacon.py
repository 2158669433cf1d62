"""The beacon codec: round trips, and garbage in gives MalformedBeacon only."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dmodel.errors import ConfigurationError, DModelError
from dmodel.net.discovery import (
    BEACON_SIZE,
    BEACON_SIZE_WITH_CLUSTER,
    Beacon,
    DiscoveryConfig,
    MalformedBeacon,
    cluster_tag,
    decode_beacon,
    encode_beacon,
)

NODE = bytes(range(16))

beacons = st.builds(
    Beacon,
    node_id=st.binary(min_size=16, max_size=16),
    port=st.integers(min_value=1, max_value=65535),
    cluster=st.none() | st.binary(min_size=8, max_size=8),
)


def test_known_encoding():
    data = encode_beacon(Beacon(NODE, 7600))
    assert data == b"DMD\x01" + NODE + struct.pack("!H", 7600)
    assert len(data) == BEACON_SIZE == 22


def test_cluster_tag_is_appended():
    tag = cluster_tag("site-a")
    data = encode_beacon(Beacon(NODE, 7600, tag))
    assert len(data) == BEACON_SIZE_WITH_CLUSTER and data.endswith(tag)
    assert decode_beacon(data).cluster == tag
    assert cluster_tag("site-a") == tag != cluster_tag("site-b")
    assert DiscoveryConfig(cluster="site-a").cluster_tag == tag
    assert DiscoveryConfig().cluster_tag is None


@given(beacons)
def test_round_trip(beacon):
    assert decode_beacon(encode_beacon(beacon)) == beacon


@given(st.binary(max_size=64))
def test_random_bytes_give_a_beacon_or_malformed(data):
    try:
        beacon = decode_beacon(data)
    except MalformedBeacon as exc:
        assert isinstance(exc, ValueError) and isinstance(exc, DModelError)
    else:
        assert encode_beacon(beacon) == data


@given(beacons, st.integers(min_value=0, max_value=29), st.integers(0, 255))
def test_flipped_bytes_never_raise_anything_else(beacon, index, value):
    data = bytearray(encode_beacon(beacon))
    data[index % len(data)] = value
    try:
        decode_beacon(bytes(data))
    except MalformedBeacon:
        pass


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"DMD",
        b"XYZ\x01" + NODE + b"\x1d\xb0",  # bad magic
        b"DMD\x02" + NODE + b"\x1d\xb0",  # unknown version
        b"DMD\x01" + NODE + b"\x00\x00",  # port 0
        b"DMD\x01" + NODE + b"\x1d\xb0" + b"\x00",  # odd length
        b"DMD\x01" + NODE + b"\x1d\xb0" + b"\x00" * 9,
    ],
)
def test_garbage_is_rejected(data):
    with pytest.raises(MalformedBeacon):
        decode_beacon(data)


def test_decode_rejects_non_bytes():
    with pytest.raises(MalformedBeacon):
        decode_beacon("DMD")  # type: ignore[arg-type]


def test_beacon_validates_fields():
    with pytest.raises(MalformedBeacon):
        Beacon(b"short", 7600)
    with pytest.raises(MalformedBeacon):
        Beacon(NODE, 70000)
    with pytest.raises(MalformedBeacon):
        Beacon(NODE, 7600, b"tag")


def test_discovery_config_validates():
    assert DiscoveryConfig().port == 7699
    with pytest.raises(ConfigurationError):
        DiscoveryConfig(port=0)
    with pytest.raises(ConfigurationError):
        DiscoveryConfig(interval=0)
    with pytest.raises(ConfigurationError):
        DiscoveryConfig(address="")
