"""engine/records: the native batch builder and parser against the pure-Python
reference (tests/records_reference.py) and kafka-python, byte for byte, and
against malformed and fuzzed batches."""
from __future__ import annotations

import pytest
from hypothesis import given, strategies as st
from kafka.record.default_records import DefaultRecordBatch, DefaultRecordBatchBuilder

from raftka.errors import CorruptRecordError
from raftka.native import crc32c
from raftka.native.varint import put_varint
from raftka.records import layout
from raftka.records.batch import Record, build_batch, columns_of, iter_batches, iter_columns, parse_records, read_header
from raftka.records import codec
from raftka.records.codec import decode_records, encode_batches, validate_records
from raftka.records.compression import Compression
from tests import records_reference as reference

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
# also "now" timestamps (None) and timestamps before the first record's
loose_records = st.lists(
    st.builds(Record, value=optional_bytes, key=optional_bytes,
              headers=st.lists(st.tuples(header_keys, optional_bytes), max_size=3).map(tuple),
              timestamp_ms=st.none() | st.integers(min_value=-2**40, max_value=2**45)),
    min_size=1, max_size=30)
NOW_MS = 1_700_000_000_000


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


# ---- native codec against the Python reference -------------------------------

@pytest.mark.parametrize("codec", list(Compression))
@given(records=loose_records)
def test_native_batches_are_byte_identical_to_the_python_reference_with_every_codec(codec, records):
    assert build_batch(records, compression=codec, now_ms=NOW_MS) == \
        reference.build_batch(records, compression=codec, now_ms=NOW_MS)


@pytest.mark.parametrize("codec", list(Compression))
@given(records=records_strategy)
def test_native_parse_matches_the_python_reference_on_kafka_python_batches(codec, records):
    batch = kafka_python_batch(records, codec)
    assert list(parse_records(batch)) == reference.parse_batch(batch)


@given(records=loose_records)
def test_columns_agree_with_the_records_they_come_from(records):
    (columns,) = iter_columns(build_batch(records, now_ms=NOW_MS))
    expected = reference.parse_batch(build_batch(records, now_ms=NOW_MS))
    assert list(columns.offsets) == [r.offset for r in expected]
    assert list(columns.timestamps) == [r.timestamp_ms for r in expected]
    assert columns.keys() == [r.key for r in expected]
    assert columns.values() == [r.value for r in expected]
    assert [None if v is None else bytes(v) for v in columns.value_views()] == [r.value for r in expected]
    assert [None if k is None else bytes(k) for k in columns.key_views()] == [r.key for r in expected]
    assert columns.headers() == [r.headers for r in expected]


@given(records=st.lists(st.builds(Record, value=st.binary(max_size=300), key=optional_bytes,
                                  headers=st.just(()), timestamp_ms=st.none()),
                        min_size=1, max_size=60),
       limit=st.integers(min_value=1, max_value=2000))
def test_a_split_encode_keeps_every_record_in_order_and_each_batch_under_the_limit(records, limit):
    out, counts = encode_batches(columns_of(records, NOW_MS), max_records_bytes=limit)
    batches = [bytes(b) for _, b in iter_batches(out)]
    assert [read_header(b).record_count for b in batches] == counts and sum(counts) == len(records)
    for batch, count in zip(batches, counts):
        assert count == 1 or len(batch) - layout.HEADER_SIZE <= limit
    assert [(r.key, r.value) for r in parse_records(out)] == [(r.key, r.value) for r in records]


def test_parse_from_an_offset_inside_a_batch_skips_the_records_before_it():
    batch = bytearray(build_batch([Record(b"%d" % i) for i in range(10)]))
    layout.HEADER.pack_into(batch, 0, 100, *read_header(batch)[1:])  # base offset 100 (outside the CRC)
    assert [r.offset for r in parse_records(bytes(batch), min_offset=104)] == list(range(104, 110))
    (columns,) = iter_columns(bytes(batch), min_offset=104)
    assert len(columns) == 6 and list(columns.offsets) == list(range(104, 110))
    assert columns.values() == [b"%d" % i for i in range(4, 10)]


def test_non_bytes_values_are_refused_with_a_type_error():
    with pytest.raises(TypeError, match="bytes or None"):
        build_batch([Record("text")])


# ---- malformed records ----------------------------------------------------------

def sealed(records_section: bytes, count: int, last_offset_delta: int | None = None,
           compression: Compression = Compression.NONE) -> bytes:
    """A batch around `records_section` with a correct CRC, so only the records can be wrong."""
    out = bytearray(layout.HEADER_SIZE) + records_section
    delta = count - 1 if last_offset_delta is None else last_offset_delta
    layout.HEADER.pack_into(out, 0, 0, len(out) - layout.LOG_OVERHEAD, -1, layout.MAGIC, 0, int(compression),
                            delta, NOW_MS, NOW_MS, -1, -1, -1, count)
    out[layout.CRC_OFF:layout.CRC_OFF + 4] = crc32c(memoryview(out)[layout.ATTRIBUTES_OFF:]).to_bytes(4, "big")
    return bytes(out)


def record_bytes(*fields: bytes) -> bytes:
    body = b"".join(fields)
    out = bytearray()
    put_varint(out, len(body))
    return bytes(out) + body


def varint(value: int) -> bytes:
    out = bytearray()
    put_varint(out, value)
    return bytes(out)


GOOD_RECORD = record_bytes(b"\x00", varint(0), varint(0), varint(1), b"k", varint(1), b"v", varint(0))
MALFORMED = {
    "record runs past the end": GOOD_RECORD[:-1],
    "key length below -1": record_bytes(b"\x00", varint(0), varint(0), varint(-2), varint(1), b"v", varint(0)),
    "key longer than the record": record_bytes(b"\x00", varint(0), varint(0), varint(50), b"k", varint(0)),
    "record length longer than its fields": record_bytes(b"\x00", varint(0), varint(0), varint(-1), varint(-1),
                                                         varint(0), b"\x00"),
    "six-byte varint for an int32": record_bytes(b"\x00", varint(0), b"\x80\x80\x80\x80\x80\x00", varint(-1),
                                                 varint(-1), varint(0)),
    "offset delta beyond int32": record_bytes(b"\x00", varint(0), varint(2**33), varint(-1), varint(-1), varint(0)),
    "negative header count": record_bytes(b"\x00", varint(0), varint(0), varint(-1), varint(-1), varint(-1)),
    "huge header count": record_bytes(b"\x00", varint(0), varint(0), varint(-1), varint(-1), varint(2**30)),
    "null header key": record_bytes(b"\x00", varint(0), varint(0), varint(-1), varint(-1), varint(1),
                                    varint(-1), varint(-1)),
    "varint running past the record": record_bytes(b"\x00", varint(0), varint(0), varint(-1), varint(-1), b"\x80"),
    "bytes after the last record": GOOD_RECORD + b"\x00",
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_records_are_rejected_by_parse_and_validate(case):
    batch = sealed(MALFORMED[case], 1)
    with pytest.raises(CorruptRecordError, match="records do not parse"):
        list(parse_records(batch))
    with pytest.raises(CorruptRecordError):
        validate_records(batch)


def test_a_record_count_the_bytes_cannot_hold_is_rejected_before_anything_is_allocated():
    batch = sealed(GOOD_RECORD, 2**31 - 1)
    with pytest.raises(CorruptRecordError, match="cannot fit"):
        list(parse_records(batch))
    with pytest.raises(CorruptRecordError):
        validate_records(batch)


def test_fewer_records_than_the_header_says_are_rejected():
    with pytest.raises(CorruptRecordError):
        list(parse_records(sealed(GOOD_RECORD * 2, 3)))


def test_decoding_never_reads_past_the_end_it_is_given():
    # the bytes the truncated record lacks sit right after `end`: reading them would succeed
    data = GOOD_RECORD * 2
    for end in range(len(GOOD_RECORD) + 1, len(data)):
        with pytest.raises(CorruptRecordError):
            decode_records(data, len(GOOD_RECORD), end, 1, 0, 0, 0, False)


def test_validate_returns_the_record_count_of_a_good_batch_with_every_codec():
    records = [Record(b"v%d" % i, b"k", (("h", b"x"),)) for i in range(7)]
    for codec in Compression:
        assert validate_records(build_batch(records, compression=codec)) == 7


def test_validate_rejects_out_of_sequence_offset_deltas_and_a_wrong_last_offset_delta():
    second = record_bytes(b"\x00", varint(0), varint(5), varint(-1), varint(-1), varint(0))
    with pytest.raises(CorruptRecordError, match="record count"):
        validate_records(sealed(GOOD_RECORD + second, 2))
    with pytest.raises(CorruptRecordError, match="lastOffsetDelta"):
        validate_records(sealed(GOOD_RECORD, 1, last_offset_delta=3))


def test_validate_rejects_a_flipped_bit_and_a_truncated_batch():
    batch = bytearray(build_batch([Record(b"value")]))
    with pytest.raises(CorruptRecordError, match="batchLength"):
        validate_records(batch[:-1])
    batch[-2] ^= 0x01
    with pytest.raises(CorruptRecordError, match="CRC32C"):
        validate_records(batch)


@pytest.mark.parametrize("codec", list(Compression))
@given(records=records_strategy, data=st.data())
def test_fuzzed_records_are_either_parsed_as_the_reference_does_or_rejected(codec, records, data):
    section = bytearray(reference.parse_payload(build_batch(records)))
    for _ in range(data.draw(st.integers(1, 4))):
        position = data.draw(st.integers(0, len(section) - 1))
        section[position] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(section)))
    from raftka.records.compression import compress
    batch = sealed(compress(codec, bytes(section[:cut])), len(records), compression=codec)
    try:
        ours = list(parse_records(batch))
    except CorruptRecordError:
        with pytest.raises(CorruptRecordError):
            validate_records(batch)
        return
    assert ours == reference.parse_batch(batch)


@given(st.binary(max_size=12) | st.text(max_size=6).map(str.encode))
def test_a_header_key_parses_exactly_when_it_is_valid_utf8(key):
    record = record_bytes(b"\x00", varint(0), varint(0), varint(-1), varint(-1), varint(1),
                          varint(len(key)), key, varint(-1))
    try:
        expected = key.decode("utf-8")
    except UnicodeDecodeError:
        with pytest.raises(CorruptRecordError, match="UTF-8"):
            list(parse_records(sealed(record, 1)))
        return
    assert next(iter(parse_records(sealed(record, 1)))).headers == ((expected, None),)


def test_a_header_key_that_is_not_str_is_refused_with_a_type_error():
    with pytest.raises(TypeError, match="header keys must be str"):
        build_batch([Record(b"v", None, ((b"bytes-key", b"x"),))])


class CountingLib:
    """raftka.native's lib, counting the calls of the native records decoder."""

    def __init__(self, lib) -> None:
        self._lib, self.decode_calls = lib, 0

    def __getattr__(self, name: str):
        return getattr(self._lib, name)

    def rk_records_decode(self, *args):
        self.decode_calls += 1
        return self._lib.rk_records_decode(*args)


@pytest.mark.parametrize("header_counts, passes", [([0] * 50, 1), ([1] * 50, 1), ([0, 2] * 25, 1), ([3] * 50, 2)])
def test_a_batch_is_decoded_in_one_native_pass_unless_it_has_more_headers_than_records(monkeypatch, header_counts,
                                                                                       passes):
    records = [Record(b"v%d" % i, b"k", tuple((f"h{j}", b"x%d" % j) for j in range(n)))
               for i, n in enumerate(header_counts)]
    batch = build_batch(records)
    counting = CountingLib(codec.lib)
    monkeypatch.setattr(codec, "lib", counting)
    assert [r.headers for r in parse_records(batch)] == [r.headers for r in records]
    assert counting.decode_calls == passes
