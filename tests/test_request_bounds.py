"""The bounds walk in front of kio: it refuses any frame whose lengths or
array counts claim more bytes than follow, and never refuses a frame kio
decodes (every advertised API and version has a walk)."""
from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings, strategies as st

from raftka.protocol import kafka
from raftka.security.request_bounds import check_request
from tests.test_kafka_protocol import VALID

HUGE = 2**31 - 1


def test_every_advertised_api_version_has_a_walk() -> None:
    from raftka.security.request_bounds import _plan
    for api_key, (low, high) in kafka.ADVERTISED.items():
        for version in range(low, high + 1):
            if version not in kafka.REFUSED.get(api_key, ()):
                _plan(api_key, version)


def test_valid_frames_pass() -> None:
    for frame in VALID:
        check_request(frame)


def test_metadata_topic_count_of_two_billion_is_refused_before_kio() -> None:
    frame = struct.pack(">hhih", kafka.METADATA, 1, 1, -1) + struct.pack(">i", HUGE)
    with pytest.raises(kafka.MalformedRequest, match="2147483647 elements"):
        check_request(frame)


def test_nested_partition_count_past_the_bytes_left_is_refused() -> None:
    # Produce v3: transactional id (null), acks, timeout, 1 topic "t", then 2^31-1 partitions
    frame = (struct.pack(">hhih", kafka.PRODUCE, 3, 1, -1) + struct.pack(">hhi", -1, -1, 1000)
             + struct.pack(">ih", 1, 1) + b"t" + struct.pack(">i", HUGE))
    with pytest.raises(kafka.MalformedRequest, match="elements"):
        check_request(frame)


def test_string_longer_than_the_frame_is_refused() -> None:
    frame = struct.pack(">hhih", kafka.METADATA, 1, 1, -1) + struct.pack(">ih", 1, 30000) + b"x"
    with pytest.raises(kafka.MalformedRequest):
        check_request(frame)


def test_unserved_versions_are_left_to_the_unsupported_answer() -> None:
    check_request(struct.pack(">hhih", kafka.METADATA, 99, 1, -1) + struct.pack(">i", HUGE))


def _decodes(frame: bytes) -> bool:
    try:
        kafka.read_request(frame)
    except (kafka.MalformedRequest, kafka.UnsupportedRequest):
        return False
    return True


@settings(max_examples=1000)
@given(st.sampled_from(VALID), st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=8),
       st.integers(0, 10_000))
def test_walk_refuses_no_frame_kio_decodes(original: bytes, flips: list, cut: int) -> None:
    data = bytearray(original)
    for position, value in flips:
        data[position % len(data)] = value
    frame = bytes(data[:max(cut, 1)] if cut < len(data) else data)
    try:
        check_request(frame)
    except kafka.MalformedRequest:
        assert not _decodes(frame), "the walk refused a frame kio decodes"
