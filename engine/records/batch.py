"""Building and parsing Kafka v2 record batches: the one module that does both.

Used by the embedded producer/consumer (engine/client) and by tests; the
broker's produce and fetch paths never decode records, they move raw batches.

A record inside a batch (varints are zigzag-encoded, as in protobuf):
  length varint | attributes int8 | timestampDelta varlong | offsetDelta varint
  | keyLength varint | key | valueLength varint | value
  | headerCount varint | (headerKeyLength varint | headerKey utf-8
  | headerValueLength varint | headerValue)*
A null key, value or header value has length -1.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Iterable, Iterator, NamedTuple, Sequence

from raftka.errors import CorruptRecordError
from raftka.records import layout
from raftka.records.compression import Compression, compress, decompress
from raftka.native import crc32c
from raftka.native.varint import get_varint, put_varint

Headers = tuple[tuple[str, bytes | None], ...]


@dataclass(frozen=True, slots=True)
class Record:
    """A record to produce. timestamp_ms None means "now" (CreateTime)."""

    value: bytes | None
    key: bytes | None = None
    headers: Headers = ()
    timestamp_ms: int | None = None


class ConsumerRecord(NamedTuple):
    """A record read back from a partition."""

    topic: str
    partition: int
    offset: int
    timestamp_ms: int
    key: bytes | None
    value: bytes | None
    headers: Headers


class BatchHeader(NamedTuple):
    """The fixed 61-byte header of a stored or received batch."""

    base_offset: int
    batch_length: int
    partition_leader_epoch: int
    magic: int
    crc: int
    attributes: int
    last_offset_delta: int
    first_timestamp: int
    max_timestamp: int
    producer_id: int
    producer_epoch: int
    base_sequence: int
    record_count: int

    @property
    def size_bytes(self) -> int:
        return self.batch_length + layout.LOG_OVERHEAD

    @property
    def last_offset(self) -> int:
        return self.base_offset + self.last_offset_delta

    @property
    def compression(self) -> Compression:
        return Compression.parse(self.attributes & layout.COMPRESSION_MASK)

    @property
    def is_control(self) -> bool:
        return bool(self.attributes & layout.CONTROL_MASK)

    @property
    def is_log_append_time(self) -> bool:
        return bool(self.attributes & layout.TIMESTAMP_TYPE_MASK)


# ---- encoding -------------------------------------------------------------

def _put_bytes(out: bytearray, data: bytes | None) -> None:
    if data is None:
        out.append(1)  # zigzag(-1)
        return
    put_varint(out, len(data))
    out += data


def _encode_record(out: bytearray, offset_delta: int, timestamp_delta: int,
                   record: Record) -> None:
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


def build_batch(
    records: Sequence[Record],
    *,
    compression: Compression | str = Compression.NONE,
    base_offset: int = 0,
    partition_leader_epoch: int = -1,
    producer_id: int = -1,
    producer_epoch: int = -1,
    base_sequence: int = -1,
    transactional: bool = False,
    now_ms: int | None = None,
) -> bytes:
    """Encode `records` as one v2 record batch with CreateTime timestamps."""
    if not records:
        raise ValueError("a record batch needs at least one record")
    codec = Compression.parse(compression)
    now_ms = int(time.time() * 1000) if now_ms is None else now_ms
    timestamps = [now_ms if r.timestamp_ms is None else r.timestamp_ms for r in records]
    first_timestamp = timestamps[0]
    body = bytearray()
    for offset_delta, (record, timestamp) in enumerate(zip(records, timestamps)):
        _encode_record(body, offset_delta, timestamp - first_timestamp, record)
    payload = compress(codec, bytes(body))
    attributes = int(codec) | (layout.TRANSACTIONAL_MASK if transactional else 0)
    out = bytearray(layout.HEADER_SIZE)
    out += payload
    layout.HEADER.pack_into(
        out, 0, base_offset, len(out) - layout.LOG_OVERHEAD, partition_leader_epoch,
        layout.MAGIC, 0, attributes, len(records) - 1, first_timestamp,
        max(timestamps), producer_id, producer_epoch, base_sequence, len(records))
    crc = crc32c(memoryview(out)[layout.ATTRIBUTES_OFF:])
    out[layout.CRC_OFF:layout.CRC_OFF + 4] = crc.to_bytes(4, "big")
    return bytes(out)


# ---- decoding -------------------------------------------------------------

def _get_bytes(buf: bytes, pos: int) -> tuple[bytes | None, int]:
    length, pos = get_varint(buf, pos)
    if length < 0:
        return None, pos
    if pos + length > len(buf):
        raise IndexError("field runs past the end of the records")
    return buf[pos:pos + length], pos + length


def read_header(buffer: bytes | memoryview, position: int = 0) -> BatchHeader:
    """Parse the header of the batch at `position` (no validation)."""
    return BatchHeader(*layout.HEADER.unpack_from(buffer, position))


def iter_batches(buffer: bytes | bytearray | memoryview) -> Iterator[tuple[BatchHeader, memoryview]]:
    """Yield (header, whole batch bytes) for each complete batch in `buffer`."""
    view = memoryview(buffer)
    position = 0
    while position + layout.HEADER_SIZE <= len(view):
        header = read_header(view, position)
        end = position + header.size_bytes
        if header.batch_length < layout.HEADER_SIZE - layout.LOG_OVERHEAD or end > len(view):
            return
        yield header, view[position:end]
        position = end


def decode_batch(header: BatchHeader, batch: memoryview, topic: str, partition: int,
                 position: int = 0) -> list[ConsumerRecord]:
    """Decode the records of one batch; CorruptRecordError if it does not parse."""
    if header.magic != layout.MAGIC:
        raise CorruptRecordError(f"magic {header.magic}, expected {layout.MAGIC}", position)
    if crc32c(batch[layout.ATTRIBUTES_OFF:]) != header.crc:
        raise CorruptRecordError("CRC32C mismatch", position)
    if header.is_control:
        return []
    payload = decompress(header.compression, bytes(batch[layout.HEADER_SIZE:]), position)
    try:
        return _decode_records(payload, header, topic, partition)
    except (IndexError, ValueError, UnicodeDecodeError) as exc:
        raise CorruptRecordError(f"records do not parse: {exc}", position) from exc


def _decode_records(payload: bytes, header: BatchHeader, topic: str,
                    partition: int) -> list[ConsumerRecord]:
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
        timestamp = (header.max_timestamp if header.is_log_append_time
                     else header.first_timestamp + timestamp_delta)
        records.append(ConsumerRecord(topic, partition, header.base_offset + offset_delta,
                                      timestamp, key, value, tuple(headers)))
    return records


def parse_records(buffer: bytes | bytearray | memoryview, topic: str = "", partition: int = 0,
                  min_offset: int = 0) -> Iterable[ConsumerRecord]:
    """Decode every record of the whole batches in `buffer` at or after min_offset."""
    for header, batch in iter_batches(buffer):
        if header.last_offset < min_offset:
            continue
        for record in decode_batch(header, batch, topic, partition):
            if record.offset >= min_offset:
                yield record
