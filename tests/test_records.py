"""engine/records: our batch builder and parser against kafka-python's, byte for byte."""
from __future__ import annotations

import pytest
from hypothesis import given, strategies as st
from kafka.record.default_records import DefaultRecordBatch, DefaultRecordBatchBuilder

from raftka.errors import CorruptRecordError
from raftka.records.batch import Record, build_batch, iter_batches, parse_records
from raftka.records.compression import Compression

KAFKA_PYTHON_CODEC = {
    Compression.NONE: DefaultRecordBatchBuilder.CODEC_NONE,
    Compression.GZIP: DefaultRecordBatchBuilder.CODEC_GZIP,
    Compression.SNAPPY: DefaultRecordBatchBuilder.CODEC_SNAPPY,
    Compression.LZ4: DefaultRecordBatchBuilder.CODEC_LZ4,
    Compression.ZSTD: DefaultRecordBatchBuilder.CODEC_ZSTD,
}

header_keys = st.text(max_size=8)
optional_bytes = st.none() | st.binary(max_size=64)
records_strategy = st.lists(
    st.builds(Record, value=optional_bytes, key=optional_bytes,
              headers=st.lists(st.tuples(header_keys, optional_bytes), max_size=3).map(tuple),
              timestamp_ms=st.integers(min_value=0, max_value=2**41)),
    min_size=1, max_size=20)


def kafka_python_batch(records: list[Record], codec: Compression = Compression.NONE) -> bytes:
    builder = DefaultRecordBatchBuilder(magic=2, compression_type=KAFKA_PYTHON_CODEC[codec],
                                        is_transactional=False, producer_id=-1, producer_epoch=-1,
                                        base_sequence=-1, batch_size=1 << 30)
    for offset, record in enumerate(records):
        builder.append(offset, timestamp=record.timestamp_ms, key=record.key, value=record.value,
                       headers=list(record.headers))
    return bytes(builder.build())


def as_tuples(records):
    return [(r.offset, r.timestamp_ms, r.key, r.value, tuple(r.headers)) for r in records]


def expected_tuples(records: list[Record]):
    return [(i, r.timestamp_ms, r.key, r.value, tuple(r.headers)) for i, r in enumerate(records)]


@given(records_strategy)
def test_uncompressed_batch_is_byte_identical_to_kafka_python(records):
    # kafka-python writes partitionLeaderEpoch 0; everything else must match as is
    ours = build_batch(records, partition_leader_epoch=0)
    assert ours == kafka_python_batch(records)


@pytest.mark.parametrize("codec", list(Compression))
@given(records=records_strategy)
def test_kafka_python_batches_parse_identically_with_every_codec(codec, records):
    parsed = list(parse_records(kafka_python_batch(records, codec)))
    assert as_tuples(parsed) == expected_tuples(records)


@pytest.mark.parametrize("codec", list(Compression))
@given(records=records_strategy)
def test_our_batches_parse_identically_in_kafka_python_with_every_codec(codec, records):
    batch = DefaultRecordBatch(build_batch(records, compression=codec))
    assert batch.validate_crc()
    theirs = [(r.offset, r.timestamp, r.key, r.value, tuple(r.headers)) for r in batch]
    assert theirs == expected_tuples(records)


def test_timestamps_keep_their_milliseconds():
    records = [Record(b"v", timestamp_ms=1_700_000_000_123), Record(b"w", timestamp_ms=1_700_000_000_999)]
    assert [r.timestamp_ms for r in parse_records(build_batch(records))] == [1_700_000_000_123, 1_700_000_000_999]


def test_null_keys_values_and_header_values_round_trip():
    records = [Record(None, None, (("a", None), ("b", b"")), 5)]
    (parsed,) = parse_records(build_batch(records))
    assert (parsed.key, parsed.value, parsed.headers) == (None, None, (("a", None), ("b", b"")))


def test_parse_rejects_a_batch_with_a_flipped_bit():
    batch = bytearray(build_batch([Record(b"value")]))
    batch[-2] ^= 0x01
    with pytest.raises(CorruptRecordError, match="CRC32C"):
        list(parse_records(bytes(batch)))


def test_iter_batches_stops_at_a_partial_trailing_batch():
    one = build_batch([Record(b"a")])
    assert len(list(iter_batches(one + one[:20]))) == 1


def test_unknown_compression_name_is_refused():
    from raftka.errors import UnsupportedCompressionError
    with pytest.raises(UnsupportedCompressionError):
        build_batch([Record(b"a")], compression="brotli")
