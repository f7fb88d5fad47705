"""The pure-Python record codec that engine/records used before the native one:
kept as the executable reference the native codec is tested against
(tests/test_records.py), never imported by engine/.

It builds and parses one v2 batch record by record, exactly as the format
in native/records.h says, with no attempt at speed.
"""
from __future__ import annotations

from raftka.errors import CorruptRecordError
from raftka.native import crc32c
from raftka.native.varint import get_varint, put_varint
from raftka.records import layout
from raftka.records.batch import BatchHeader, ConsumerRecord, Record, read_header
from raftka.records.compression import Compression, compress, decompress


def _put_bytes(out: bytearray, data: bytes | None) -> None:
    if data is None:
        out.append(1)  # zigzag(-1)
        return
    put_varint(out, len(data))
    out += data


def _encode_record(out: bytearray, offset_delta: int, timestamp_delta: int, record: Record) -> None:
    body = bytearray(b"\x00")  # record attributes: unused, always 0
    put_varint(body, timestamp_delta)
    put_varint(body, offset_delta)
    _put_bytes(body, record.key)
    _put_bytes(body, record.value)
    put_varint(body, len(record.headers))
    for header_key, header_value in record.headers:
        _put_bytes(body, header_key.encode("utf-8"))
        _put_bytes(body, header_value)
    put_varint(out, len(body))
    out += body


def build_batch(records: list[Record], *, compression: Compression = Compression.NONE,
                partition_leader_epoch: int = -1, now_ms: int = 0) -> bytes:
    """One v2 batch of `records` (CreateTime; None timestamps are now_ms)."""
    timestamps = [now_ms if r.timestamp_ms is None else r.timestamp_ms for r in records]
    first_timestamp = timestamps[0]
    body = bytearray()
    for offset_delta, (record, timestamp) in enumerate(zip(records, timestamps)):
        _encode_record(body, offset_delta, timestamp - first_timestamp, record)
    out = bytearray(layout.HEADER_SIZE)
    out += compress(compression, bytes(body))
    layout.HEADER.pack_into(
        out, 0, 0, len(out) - layout.LOG_OVERHEAD, partition_leader_epoch, layout.MAGIC, 0, int(compression),
        len(records) - 1, first_timestamp, max(timestamps), -1, -1, -1, len(records))
    out[layout.CRC_OFF:layout.CRC_OFF + 4] = crc32c(memoryview(out)[layout.ATTRIBUTES_OFF:]).to_bytes(4, "big")
    return bytes(out)


def _get_bytes(buf: bytes, pos: int) -> tuple[bytes | None, int]:
    length, pos = get_varint(buf, pos)
    if length < 0:
        return None, pos
    if pos + length > len(buf):
        raise IndexError("field runs past the end of the records")
    return buf[pos:pos + length], pos + length


def parse_batch(batch: bytes) -> list[ConsumerRecord]:
    """Every record of one whole batch; CorruptRecordError if it does not parse."""
    header = read_header(batch)
    if crc32c(memoryview(batch)[layout.ATTRIBUTES_OFF:]) != header.crc:
        raise CorruptRecordError("CRC32C mismatch", 0)
    payload = decompress(header.compression, bytes(batch[layout.HEADER_SIZE:]))
    try:
        return _decode_records(payload, header)
    except (IndexError, ValueError, UnicodeDecodeError) as exc:
        raise CorruptRecordError(f"records do not parse: {exc}", 0) from exc


def _decode_records(payload: bytes, header: BatchHeader) -> list[ConsumerRecord]:
    records = []
    pos = 0
    for _ in range(header.record_count):
        length, pos = get_varint(payload, pos)
        end = pos + length
        pos += 1  # record attributes
        timestamp_delta, pos = get_varint(payload, pos)
        offset_delta, pos = get_varint(payload, pos)
        key, pos = _get_bytes(payload, pos)
        value, pos = _get_bytes(payload, pos)
        header_count, pos = get_varint(payload, pos)
        headers = []
        for _ in range(header_count):
            header_key, pos = _get_bytes(payload, pos)
            header_value, pos = _get_bytes(payload, pos)
            headers.append(((header_key or b"").decode("utf-8"), header_value))
        if pos != end:
            raise ValueError(f"record length {length} disagrees with its fields")
        timestamp = header.max_timestamp if header.is_log_append_time else header.first_timestamp + timestamp_delta
        records.append(ConsumerRecord("", 0, header.base_offset + offset_delta, timestamp, key, value,
                                      tuple(headers)))
    return records


def parse_payload(batch: bytes) -> bytes:
    """The records section of one whole batch, decompressed."""
    header = read_header(batch)
    return decompress(header.compression, bytes(batch[layout.HEADER_SIZE:]))
