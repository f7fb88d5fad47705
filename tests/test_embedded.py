"""The embedded API end to end: topics, partitioning, produce, read, blocking reads, errors."""
from __future__ import annotations

import threading
import time

import pytest

import raftka
from raftka.errors import (DataDirLockedError, InvalidPartitionsError, InvalidTopicError, OffsetOutOfRangeError,
                           TopicAlreadyExistsError, UnknownTopicOrPartitionError)
from raftka.partitioner import partition_for_key
from raftka.records.batch import Record
from tests.test_native import MURMUR2_JAVA_VECTORS


@pytest.fixture
def rk(tmp_path):
    with raftka.open(tmp_path / "data") as handle:
        yield handle


def test_produce_and_read_back_keys_values_headers_and_millisecond_timestamps(rk):
    rk.create_topic("events", partitions=1)
    sent = [
        rk.produce("events", b"v1", key=b"k1", headers=[("trace", b"abc"), ("empty", None)], timestamp_ms=1_700_000_000_001),
        rk.produce("events", None, key=None, timestamp_ms=1_700_000_000_999),
        rk.produce("events", b"", key=b""),
    ]
    got = list(rk.read("events", 0))
    assert [r.offset for r in got] == [0, 1, 2] == [m.offset for m in sent]
    assert (got[0].key, got[0].value, got[0].headers, got[0].timestamp_ms) == (
        b"k1", b"v1", (("trace", b"abc"), ("empty", None)), 1_700_000_000_001)
    assert (got[1].key, got[1].value, got[1].timestamp_ms) == (None, None, 1_700_000_000_999)
    assert (got[2].key, got[2].value, got[2].timestamp_ms) == (b"", b"", sent[2].timestamp_ms)


def test_keyed_records_go_where_the_java_client_sends_them(rk):
    rk.create_topic("keys", partitions=7)
    for key, java_hash in MURMUR2_JAVA_VECTORS:
        expected = (java_hash & 0x7FFFFFFF) % 7  # Utils.toPositive(murmur2(key)) % numPartitions
        assert partition_for_key(key, 7) == expected
        assert rk.produce("keys", b"v", key=key).partition == expected


def test_one_keys_records_stay_in_order_on_one_partition(rk):
    rk.create_topic("orders", partitions=4)
    records = [Record(b"%d" % i, key=b"user-%d" % (i % 5)) for i in range(500)]
    metadata = rk.produce_batch("orders", records)
    for user in range(5):
        key = b"user-%d" % user
        partitions = {m.partition for m, r in zip(metadata, records) if r.key == key}
        assert len(partitions) == 1
        values = [r.value for r in rk.read("orders", partitions.pop()) if r.key == key]
        assert values == [b"%d" % i for i in range(user, 500, 5)]


def test_keyless_records_spread_over_all_partitions(rk):
    rk.create_topic("spread", partitions=3)
    counts = [0, 0, 0]
    for i in range(30):
        counts[rk.produce("spread", b"x").partition] += 1
    assert counts == [10, 10, 10]
    batch_partitions = {rk.produce_batch("spread", [Record(b"y")] * 5)[0].partition for _ in range(6)}
    assert batch_partitions == {0, 1, 2}


def test_produce_batch_splits_large_input_into_batches_under_the_size_cap(tmp_path):
    with raftka.open(tmp_path, max_batch_bytes=4096) as rk:
        rk.create_topic("big")
        metadata = rk.produce_batch("big", [Record(b"x" * 300) for _ in range(100)])
        assert [m.offset for m in metadata] == list(range(100))
        assert len(list(rk.read("big", 0))) == 100


@pytest.mark.parametrize("codec", ["none", "gzip", "snappy", "lz4", "zstd"])
def test_compressed_batches_round_trip(rk, codec):
    rk.create_topic("c")
    records = [Record(b"value-%d" % i * 20, key=b"%d" % i) for i in range(50)]
    rk.produce_batch("c", records, partition=0, compression=codec)
    assert [r.value for r in rk.read("c", 0)] == [r.value for r in records]


def test_blocking_read_wakes_when_a_record_arrives(rk):
    rk.create_topic("live")
    reader = rk.read("live", 0, timeout_s=10)
    threading.Timer(0.2, lambda: rk.produce("live", b"late")).start()
    started = time.monotonic()
    record = next(reader)
    assert record.value == b"late" and time.monotonic() - started < 5


def test_non_blocking_and_timed_reads_stop_when_caught_up(rk):
    rk.create_topic("quiet")
    rk.produce("quiet", b"only")
    assert [r.value for r in rk.read("quiet", 0, timeout_s=0)] == [b"only"]
    started = time.monotonic()
    assert [r.value for r in rk.read("quiet", 0, offset=1, timeout_s=0.3)] == []
    assert 0.25 <= time.monotonic() - started < 3


def test_read_outside_the_log_states_the_valid_range(rk):
    rk.create_topic("t")
    rk.produce_batch("t", [Record(b"a"), Record(b"b")])
    with pytest.raises(OffsetOutOfRangeError, match=r"offset 5 is out of range for t-0: valid offsets are \[0, 2\]"):
        rk.read("t", 0, offset=5)
    assert OffsetOutOfRangeError.error_code == 1


@pytest.mark.parametrize("name", ["", ".", "..", "has space", "slash/name", "x" * 250, "ünïcode"])
def test_illegal_topic_names_are_refused_with_a_reason(rk, name):
    with pytest.raises(InvalidTopicError):
        rk.create_topic(name)
    assert rk.topics() == {}


def test_topic_errors_carry_kafka_error_codes(rk):
    rk.create_topic("a.b_c-D", partitions=2)
    with pytest.raises(TopicAlreadyExistsError) as exists:
        rk.create_topic("a.b_c-D")
    assert exists.value.error_code == 36
    with pytest.raises(UnknownTopicOrPartitionError):
        rk.produce("missing", b"x")
    with pytest.raises(UnknownTopicOrPartitionError):
        rk.read("a.b_c-D", 2)
    with pytest.raises(InvalidPartitionsError):
        rk.create_topic("zero", partitions=0)
    assert rk.topics() == {"a.b_c-D": 2}


def test_a_data_directory_opens_in_one_handle_at_a_time(tmp_path):
    with raftka.open(tmp_path):
        with pytest.raises(DataDirLockedError):
            raftka.open(tmp_path)
    raftka.open(tmp_path).close()


def test_everything_survives_close_and_reopen(tmp_path):
    with raftka.open(tmp_path) as rk:
        rk.create_topic("keep", partitions=2)
        sent = rk.produce_batch("keep", [Record(b"%d" % i, key=b"%d" % i) for i in range(200)])
    with raftka.open(tmp_path) as rk:
        assert rk.topics() == {"keep": 2}
        got = {(r.partition, r.offset): r.value for p in range(2) for r in rk.read("keep", p)}
        assert got == {(m.partition, m.offset): b"%d" % i for i, m in enumerate(sent)}
        assert rk.produce("keep", b"next", partition=0).offset == rk.offsets("keep", 0).high_watermark - 1


def test_a_topic_past_max_partitions_per_topic_is_refused(tmp_path):
    with raftka.open(tmp_path / "data", max_partitions_per_topic=4, offsets_topic_partitions=1) as rk:
        with pytest.raises(InvalidPartitionsError, match="max_partitions_per_topic=4"):
            rk.create_topic("wide", partitions=5)
        rk.create_topic("fits", partitions=4)
        assert rk.topics() == {"fits": 4}


def test_deleted_topic_is_gone_and_can_be_recreated_empty(rk):
    rk.create_topic("gone", partitions=2)
    rk.produce("gone", b"x")
    rk.delete_topic("gone")
    assert rk.topics() == {}
    rk.create_topic("gone", partitions=1)
    assert list(rk.read("gone", 0)) == []


def test_raw_batches_from_another_client_are_stored_as_they_are(rk):
    from tests.test_records import kafka_python_batch
    rk.create_topic("raw")
    batch = kafka_python_batch([Record(b"a", b"k", (), 1_700_000_000_000), Record(b"b", None, (), 1_700_000_000_005)])
    result = rk.append_batches("raw", 0, batch)
    assert (result.base_offset, result.last_offset) == (0, 1)
    assert [(r.offset, r.value) for r in rk.read("raw", 0)] == [(0, b"a"), (1, b"b")]
    assert rk.offset_for_timestamp("raw", 0, 1_700_000_000_003) == 1


def test_produce_batch_metadata_points_at_each_record_across_partitions(rk):
    rk.create_topic("mixed", partitions=5)
    records = [Record(b"value-%d" % i, key=None if i % 3 == 0 else b"key-%d" % (i % 11),
                      headers=(("n", b"%d" % i),) if i % 4 == 0 else (), timestamp_ms=None if i % 2 else 1_000 + i)
               for i in range(300)]
    produced = rk.produce_batch("mixed", records, compression="lz4")
    assert len(produced) == 300 and produced[-1] == produced[299] and len(produced[10:20]) == 10
    stored = {(r.partition, r.offset): r for p in range(5) for r in rk.read("mixed", p)}
    assert len(stored) == 300
    for record, meta in zip(records, produced):
        found = stored[(meta.partition, meta.offset)]
        assert (found.key, found.value, found.headers, found.timestamp_ms) == (
            record.key, record.value, record.headers, meta.timestamp_ms)
        if record.key is not None:
            assert meta.partition == partition_for_key(record.key, 5)
    assert len({produced[i].partition for i in range(0, 300, 3)}) == 1  # keyless: one partition per call


def test_read_batches_gives_the_same_records_as_read_as_columns(rk):
    rk.create_topic("cols", partitions=1)
    for start in range(0, 90, 30):
        rk.produce_batch("cols", [Record(b"v%d" % i, key=None if i % 7 == 0 else b"k%d" % i,
                                         headers=(("h", None),) if i % 5 == 0 else ()) for i in range(start, start + 30)])
    expected = list(rk.read("cols", 0, offset=40))
    batches = list(rk.read_batches("cols", 0, offset=40))
    assert [len(b) for b in batches] == [20, 30]
    assert [o for b in batches for o in b.offsets] == [r.offset for r in expected]
    assert [t for b in batches for t in b.timestamps] == [r.timestamp_ms for r in expected]
    assert [k for b in batches for k in b.keys()] == [r.key for r in expected]
    assert [v for b in batches for v in b.values()] == [r.value for r in expected]
    assert [bytes(v) for b in batches for v in b.value_views()] == [r.value for r in expected]
    assert [h for b in batches for h in b.headers()] == [r.headers for r in expected]
    assert [r for b in batches for r in b.records()] == expected


def test_read_batches_waits_for_the_next_batch_like_read(rk):
    rk.create_topic("later", partitions=1)
    threading.Timer(0.2, rk.produce, ("later", b"late")).start()
    started = time.monotonic()
    batch = next(rk.read_batches("later", 0, timeout_s=5))
    assert batch.values() == [b"late"] and time.monotonic() - started < 5


def test_append_batches_refuses_a_batch_whose_records_do_not_parse_and_writes_nothing(rk):
    from tests.test_records import GOOD_RECORD, sealed
    from raftka.errors import CorruptRecordError
    rk.create_topic("raw", partitions=1)
    good = sealed(GOOD_RECORD, 1)
    assert rk.append_batches("raw", 0, good).record_count == 1
    with pytest.raises(CorruptRecordError, match="records do not parse"):
        rk.append_batches("raw", 0, good + sealed(GOOD_RECORD + b"\x00", 1))
    assert rk.offsets("raw", 0).log_end_offset == 1
