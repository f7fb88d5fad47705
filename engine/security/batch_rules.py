"""What a client's produced batches must satisfy beyond framing and CRC
(Kafka's LogValidator rules that need only the 61-byte headers), checked by
the leader before a batch enters the Raft log:

- the compression id (attribute bits 0-2) names a codec: 0-4, else CORRUPT_MESSAGE;
- no control batch and no transactional batch (transactions are not served):
  those bits are the broker's to set, INVALID_RECORD;
- recordCount >= 1 and lastOffsetDelta == recordCount - 1, and the count is
  plausible for the bytes: an uncompressed record takes at least
  MIN_RECORD_BYTES, a compressed one at least that of the capped decompressed
  size; else CORRUPT_MESSAGE (a 61-byte batch claiming 2^31-1 records);
- CreateTime timestamps (first and max) within message.timestamp.before/
  after.max.ms of the broker's clock, else INVALID_TIMESTAMP (a far-future
  timestamp would pin its segment against time retention forever).

The framing itself (length, magic, CRC32C) is checked by the native scan
(PartitionLog.validate) first; this walks one header per batch, never records.
"""
from __future__ import annotations

from raftka.config import Config
from raftka.errors import CorruptRecordError, InvalidRecordError, InvalidTimestampError
from raftka.records import layout
from raftka.records.compression import DECOMPRESSED_MAX_BYTES, Compression

# length, attributes, timestamp delta, offset delta, key length, value length,
# header count: one byte each at the least
MIN_RECORD_BYTES = 7
NO_TIMESTAMP = -1
_CODECS = frozenset(int(c) for c in Compression)


def check_client_batches(batches: bytes | memoryview, config: Config, now_ms: int) -> None:
    """Raise the RaftkaError Kafka answers for the first batch of `batches`
    (already framed and CRC-checked) that a client may not write."""
    view = memoryview(batches)
    position = 0
    while position < len(view):
        (_base, batch_length, _epoch, _magic, _crc, attributes, last_offset_delta, first_timestamp,
         max_timestamp, _pid, _pepoch, _seq, record_count) = layout.HEADER.unpack_from(view, position)
        _check_attributes(attributes, position)
        payload_bytes = batch_length + layout.LOG_OVERHEAD - layout.HEADER_SIZE
        _check_count(record_count, last_offset_delta, attributes, payload_bytes, position)
        if not attributes & layout.TIMESTAMP_TYPE_MASK:
            _check_timestamp(first_timestamp, config, now_ms, position)
            _check_timestamp(max_timestamp, config, now_ms, position)
        position += batch_length + layout.LOG_OVERHEAD


def _check_attributes(attributes: int, position: int) -> None:
    codec = attributes & layout.COMPRESSION_MASK
    if codec not in _CODECS:
        raise CorruptRecordError(f"compression id {codec} is not a codec", position)
    if attributes & layout.CONTROL_MASK:
        raise InvalidRecordError(f"control batch at byte {position}: control batches are written by the broker only")
    if attributes & layout.TRANSACTIONAL_MASK:
        raise InvalidRecordError(f"transactional batch at byte {position}: transactions are not supported")


def _check_count(record_count: int, last_offset_delta: int, attributes: int, payload_bytes: int,
                 position: int) -> None:
    if record_count < 1 or last_offset_delta != record_count - 1:
        raise CorruptRecordError(f"record count {record_count} with last offset delta {last_offset_delta}", position)
    compressed = attributes & layout.COMPRESSION_MASK != Compression.NONE
    room = DECOMPRESSED_MAX_BYTES if compressed else payload_bytes
    if record_count > room // MIN_RECORD_BYTES:
        raise CorruptRecordError(f"{record_count} records cannot fit in {room} bytes of records", position)


def _check_timestamp(timestamp_ms: int, config: Config, now_ms: int, position: int) -> None:
    if timestamp_ms == NO_TIMESTAMP:
        return
    if now_ms - timestamp_ms > config.message_timestamp_before_max_ms:
        raise InvalidTimestampError(f"timestamp {timestamp_ms} of the batch at byte {position} is more than "
                                    f"message.timestamp.before.max.ms={config.message_timestamp_before_max_ms} "
                                    f"before the broker's clock ({now_ms})")
    if timestamp_ms - now_ms > config.message_timestamp_after_max_ms:
        raise InvalidTimestampError(f"timestamp {timestamp_ms} of the batch at byte {position} is more than "
                                    f"message.timestamp.after.max.ms={config.message_timestamp_after_max_ms} "
                                    f"after the broker's clock ({now_ms})")
