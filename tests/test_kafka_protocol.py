"""The request parser under random and mutated input: it returns a Request or
raises MalformedRequest / UnsupportedRequest, never anything else, and valid
frames of every advertised API decode to what was written."""
from __future__ import annotations

import datetime

import pytest
from hypothesis import given, settings, strategies as st
from kio.index import load_request_schema
from kio.static.primitive import i16, i32

from raftka.protocol import kafka
from tests.conftest import make_batch


def frame(api_key: int, version: int, body) -> bytes:
    """A request frame without its size prefix."""
    return kafka.encode_request(api_key, version, 77, body, client_id="fuzz")[4:]


def valid_frames() -> list[bytes]:
    metadata = load_request_schema(3, 4)
    produce = load_request_schema(0, 3)
    fetch = load_request_schema(1, 4)
    partition = kafka.nested(produce, "PartitionProduceData")(index=i32(0), records=make_batch(2))
    fetch_partition = kafka.nested(fetch, "FetchPartition")(partition=i32(0), fetch_offset=0, partition_max_bytes=i32(1 << 20))
    return [
        frame(18, 3, load_request_schema(18, 3)(client_software_name="fuzz", client_software_version="1")),
        frame(3, 4, metadata(topics=(kafka.nested(metadata, "MetadataRequestTopic")(name="t"),),
                             allow_auto_topic_creation=True)),
        frame(0, 3, produce(transactional_id=None, acks=i16(-1), timeout=datetime.timedelta(seconds=1),
                            topic_data=(kafka.nested(produce, "TopicProduceData")(name="t", partition_data=(partition,)),))),
        frame(1, 4, fetch(replica_id=i32(-1), max_wait=datetime.timedelta(milliseconds=100), min_bytes=i32(1),
                          max_bytes=i32(1 << 20), isolation_level=0,
                          topics=(kafka.nested(fetch, "FetchTopic")(topic="t", partitions=(fetch_partition,)),))),
    ]


VALID = valid_frames()


def parse(data: bytes):
    try:
        return kafka.read_request(data)
    except (kafka.MalformedRequest, kafka.UnsupportedRequest):
        return None


def test_valid_frames_decode():
    requests = [kafka.read_request(f) for f in VALID]
    assert [(r.api_key, r.api_version, r.correlation_id) for r in requests] == [(18, 3, 77), (3, 4, 77), (0, 3, 77), (1, 4, 77)]
    assert requests[2].body.topic_data[0].partition_data[0].records == make_batch(2)


@settings(max_examples=500)
@given(st.binary(max_size=200))
def test_random_bytes_never_escape_the_parser(data):
    parse(data)


@settings(max_examples=1000)
@given(st.sampled_from(VALID), st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=8),
       st.integers(0, 10_000))
def test_mutated_valid_requests_never_escape_the_parser(original, flips, cut):
    data = bytearray(original)
    for position, value in flips:
        data[position % len(data)] = value
    parse(bytes(data[:max(cut, 1)] if cut < len(data) else data))


# ---- flexible versions and the hand-built Fetch response ----------------------

def test_flexible_requests_decode_with_their_tagged_header():
    produce = load_request_schema(0, 9)
    partition = kafka.nested(produce, "PartitionProduceData")(index=i32(0), records=make_batch(2))
    body = produce(transactional_id=None, acks=i16(-1), timeout=datetime.timedelta(seconds=1),
                   topic_data=(kafka.nested(produce, "TopicProduceData")(name="t", partition_data=(partition,)),))
    request = kafka.read_request(frame(0, 9, body))
    assert (request.api_version, request.client_id) == (9, "fuzz")
    assert request.body.topic_data[0].partition_data[0].records == make_batch(2)


@pytest.mark.parametrize("version", range(4, 13))
def test_the_fetch_response_of_every_served_version_decodes_with_kafkas_schema(version):
    records = make_batch(3)
    topics = [("t", [kafka.FetchPartition(0, 0, 10, 2, records), kafka.FetchPartition(1, 1, 7, 0, b"")]),
              ("other", [])]
    frame_ = b"".join(bytes(part) for part in kafka.fetch_response(99, version, topics))
    assert int.from_bytes(frame_[:4], "big") == len(frame_) - 4
    body = kafka.decode_response(1, version, frame_[4:])
    assert [t.topic for t in body.responses] == ["t", "other"]
    first, second = body.responses[0].partitions
    assert (first.partition_index, first.error_code.value, first.high_watermark, first.records) == (0, 0, 10, records)
    assert (second.partition_index, second.error_code.value, second.records) == (1, 1, b"")
    if version >= 5:
        assert (first.log_start_offset, first.last_stable_offset) == (2, 10)
    if version >= 7:
        assert (body.error_code.value, body.session_id) == (0, 0)
    if version >= 11:
        assert first.preferred_read_replica == -1


def test_bytes_past_the_body_are_ignored_as_kafka_does_for_librdkafkas_all_topics_metadata():
    # librdkafka 2.x, Metadata v12 for all topics: a 4-byte placeholder whose first byte is the null array
    request = kafka.read_request(bytes.fromhex("0003000c00000003000772646b61666b610000000000010000"))
    assert (request.api_key, request.api_version, request.body.topics) == (3, 12, None)
