"""Columns in, batches out, and back: the Python side of native/records.c.

The record format is in native/records.h. Python crosses into C once per
batch and never loops over records itself: columns are built and taken apart
with C-level builtins (zip, map, bytes.join, list.count, itertools), so the
cost per record is what those builtins charge, not the interpreter's.

  encode_batches  columns of keys, values, headers and timestamps -> back-to-
                  back v2 batches (split under a size limit, compressed, CRC'd)
  decode_records  one batch's records section -> DecodedRecords: absolute
                  offsets and timestamps, and byte ranges of every field
  partition_keys  a column of keys -> partitions (Kafka's murmur2), grouped
  validate_records  a whole batch -> its record count, or CorruptRecordError:
                  magic, CRC32C, decompression, every record well-formed, the
                  record count and offset deltas as the header says; allocates
                  no Python object per record (the broker's produce path can
                  call it)

engine/records/batch.py turns these into Record/ConsumerRecord objects; the
embedded client (engine/client/embedded.py) uses both.
"""
from __future__ import annotations

import io
import operator
from array import array
from functools import partial
from itertools import chain, islice, repeat
from typing import Any, Iterable, NamedTuple, Sequence

from raftka.errors import CorruptRecordError
from raftka.native import crc32c, ffi, lib
from raftka.records import layout
from raftka.records.compression import Compression, compress, decompress

_NOT_NONE = partial(operator.is_not, None)
_FIRST, _SECOND = operator.itemgetter(0), operator.itemgetter(1)
_INT64_BYTES = 8
# per-record arrays rk_records_decode fills, in rk_record_views order
_RECORD_ARRAYS = ("offsets", "timestamps", "key_index", "key_starts", "key_ends", "value_index",
                  "value_starts", "value_ends", "header_counts")
_HEADER_ARRAYS = ("header_key_starts", "header_key_ends", "header_value_index", "header_value_starts",
                  "header_value_ends")

_ERRORS = {
    lib.RK_REC_ERR_TRUNCATED: "a field runs past the end of the records",
    lib.RK_REC_ERR_VARINT: "a varint is longer than its type allows or out of range",
    lib.RK_REC_ERR_LENGTH: "a record's length disagrees with its fields",
    lib.RK_REC_ERR_FIELD_LENGTH: "a length below -1, a null header key or too many headers",
    lib.RK_REC_ERR_COUNT: "the records do not match the header's record count and offset deltas",
    lib.RK_REC_ERR_UTF8: "a header key is not UTF-8",
}


def corrupt(code: int, position: int) -> CorruptRecordError:
    return CorruptRecordError(f"records do not parse: {_ERRORS.get(code, f'error {code}')}", position)


# ---- encoding -----------------------------------------------------------------

def _fill_bytes(target: Any, items: Sequence[Any], keep: list[object]) -> None:
    """Point an rk_bytes_column at `items` (bytes-like or None), joined in C."""
    present: Sequence[Any] = items
    try:
        data = b"".join(items)  # the common case, no None: one pass over the items, not two
    except TypeError:
        data = None
    if data is None:
        present = list(filter(_NOT_NONE, items))
        flags = bytes(map(operator.is_, items, repeat(None)))
        target.nulls = ffi.from_buffer("uint8_t[]", flags)
        keep.append(flags)
        try:
            data = b"".join(present)
        except TypeError as exc:
            raise TypeError(f"record keys, values and header values must be bytes or None: {exc}") from None
    target.data = ffi.from_buffer("uint8_t[]", data)
    target.data_len = len(data)
    target.lengths_count = len(present)
    try:  # keys and small values: one byte per length
        short_lengths = bytes(map(len, present))
        target.short_lengths = ffi.from_buffer("uint8_t[]", short_lengths)
        keep.extend((data, short_lengths))
    except ValueError:
        lengths = array("q", map(len, present))
        target.lengths = ffi.from_buffer("int64_t[]", lengths)
        keep.extend((data, lengths))


def _fill_timestamps(columns: Any, timestamps: Sequence[int | None], now_ms: int, keep: list[object]) -> None:
    """Point the columns at the timestamps (None = now_ms)."""
    columns.timestamp = now_ms
    nulls = timestamps.count(None)
    if nulls == len(timestamps):
        columns.timestamps = ffi.NULL
        return
    present = timestamps if nulls == 0 else list(filter(_NOT_NONE, timestamps))
    try:
        stamps = array("q", present)
    except (OverflowError, TypeError) as exc:
        raise ValueError(f"record timestamps must be int64 milliseconds or None: {exc}") from None
    columns.timestamps = ffi.from_buffer("int64_t[]", stamps)
    columns.timestamps_count = len(stamps)
    keep.append(stamps)
    if nulls:
        flags = bytes(map(operator.is_, timestamps, repeat(None)))
        columns.timestamp_nulls = ffi.from_buffer("uint8_t[]", flags)
        keep.append(flags)


def _fill_headers(columns: Any, headers: Sequence[Sequence[tuple[str, bytes | None]]], keep: list[object]) -> int:
    """Point the columns at the headers; returns how many there are in all."""
    if headers.count(()) == len(headers):
        columns.header_counts = ffi.NULL
        return 0
    counts = array("q", map(len, headers))
    pairs = list(chain.from_iterable(headers))
    columns.header_counts = ffi.from_buffer("int64_t[]", counts)
    keep.append(counts)
    try:
        header_keys = list(map(str.encode, map(_FIRST, pairs)))
    except TypeError as exc:
        raise TypeError(f"header keys must be str: {exc}") from None
    _fill_bytes(columns.header_keys, header_keys, keep)
    _fill_bytes(columns.header_values, list(map(_SECOND, pairs)), keep)
    return len(pairs)


class Columns:
    """Records as columns, ready for rk_records_encode (which reads them in place)."""

    def __init__(self, keys: Sequence[bytes | None], values: Sequence[bytes | None],
                 headers: Sequence[Sequence[tuple[str, bytes | None]]], timestamps: Sequence[int | None],
                 now_ms: int) -> None:
        count = len(values)
        if not (len(keys) == len(headers) == len(timestamps) == count):
            raise ValueError("every column needs one entry per record")
        self.count = count
        self._keep: list[object] = []
        self.native = ffi.new("rk_record_columns *")
        self.native.count = count
        _fill_bytes(self.native.keys, keys, self._keep)
        _fill_bytes(self.native.values, values, self._keep)
        _fill_timestamps(self.native, timestamps, now_ms, self._keep)
        header_count = _fill_headers(self.native, headers, self._keep)
        self.size_bound_bytes = (self.native.keys.data_len + self.native.values.data_len
                                 + self.native.header_keys.data_len + self.native.header_values.data_len
                                 + count * lib.RK_MAX_RECORD_FRAMING_BYTES
                                 + header_count * lib.RK_MAX_HEADER_FRAMING_BYTES)

    @property
    def encoded_count(self) -> int:
        """Records encoded so far (the cursor)."""
        return int(self.native.next_record)


def encode_batches(columns: Columns, *, compression: Compression | str = Compression.NONE,
                   max_records_bytes: int = 1 << 62, attributes: int = 0, base_offset: int = 0,
                   partition_leader_epoch: int = -1, producer_id: int = -1, producer_epoch: int = -1,
                   base_sequence: int = -1) -> tuple[bytearray, list[int]]:
    """Encode all of `columns` as back-to-back batches, each records section at
    most max_records_bytes uncompressed (a lone larger record gets a batch of
    its own); returns the batches and each one's record count."""
    codec = Compression.parse(compression)
    fields = ffi.new("rk_batch_fields *", {
        "base_offset": base_offset, "partition_leader_epoch": partition_leader_epoch,
        "attributes": int(codec) | attributes, "producer_id": producer_id,
        "producer_epoch": producer_epoch, "base_sequence": base_sequence})
    # every batch but the last, with the record after it, is over max_records_bytes
    batch_count_bound = min(columns.count, 1 + 2 * columns.size_bound_bytes // max(1, max_records_bytes))
    out = bytearray(columns.size_bound_bytes + layout.HEADER_SIZE * batch_count_bound)
    scratch = bytearray(columns.size_bound_bytes if codec != Compression.NONE else 0)
    counts: list[int] = []
    position = 0
    while columns.encoded_count < columns.count:
        first = columns.encoded_count
        if codec == Compression.NONE:
            end = _encode_plain(columns, out, position, max_records_bytes)
        else:
            end = _encode_compressed(columns, codec, scratch, out, position, max_records_bytes)
        counts.append(columns.encoded_count - first)
        _seal(columns, out, position, end, counts[-1], fields)
        position = end
    del out[position:]
    return out, counts


def _encode_plain(columns: Columns, out: bytearray, position: int, max_bytes: int) -> int:
    """Encode the next batch's records in place after its header at out[position:]; returns its end."""
    start = position + layout.HEADER_SIZE
    target = ffi.from_buffer("uint8_t[]", out, require_writable=True)
    return start + _encode_records(columns, target + start, len(out) - start, max_bytes)


def _encode_compressed(columns: Columns, codec: Compression, scratch: bytearray, out: bytearray,
                       position: int, max_bytes: int) -> int:
    """Encode the next batch's records into scratch and put them compressed after its header."""
    written = _encode_records(columns, ffi.from_buffer("uint8_t[]", scratch, require_writable=True),
                              len(scratch), max_bytes)
    payload = compress(codec, bytes(memoryview(scratch)[:written]))
    end = position + layout.HEADER_SIZE + len(payload)
    if end > len(out):
        out.extend(bytes(end - len(out)))
    out[position + layout.HEADER_SIZE:end] = payload
    return end


def _encode_records(columns: Columns, target: Any, capacity: int, max_bytes: int) -> int:
    written = lib.rk_records_encode(columns.native, target, capacity, max_bytes)
    if written < 0:  # the bound in Columns or the columns themselves are wrong: our bug
        raise AssertionError(f"rk_records_encode refused its input: error {written}")
    return written


def _seal(columns: Columns, out: bytearray, position: int, end: int, count: int, fields: Any) -> None:
    """Write the header and CRC32C of the batch at out[position:end]."""
    fields.first_timestamp = columns.native.first_timestamp
    fields.max_timestamp = columns.native.max_timestamp
    fields.record_count = count
    target = ffi.from_buffer("uint8_t[]", out, require_writable=True)
    if lib.rk_batch_seal(target + position, end - position, fields) < 0:
        raise AssertionError(f"rk_batch_seal refused the batch at {position}..{end}")


# ---- decoding -----------------------------------------------------------------

class DecodedRecords:
    """One batch's records as native columns over `data` (no per-record Python objects yet)."""

    __slots__ = ("data", "count", "null_keys", "null_values", "header_total", "null_header_values",
                 "key_bytes", "value_bytes", "header_value_bytes", "offsets_sequential", "timestamps_uniform",
                 "_arrays", "_header_arrays", "_header_capacity")

    def __init__(self, data: bytes, count: int) -> None:
        self.data = data
        self.count = count
        self._arrays = ffi.new("int64_t[]", len(_RECORD_ARRAYS) * max(count, 1))
        self._header_arrays: Any = None
        self._header_capacity = 0   # entries per header array (>= header_total once decoded)

    def ints(self, name: str, count: int | None = None) -> list[int]:
        """A per-record (or per-header) int64 column as a list of ints."""
        return ffi.unpack(self.pointer(name), self.count if count is None else count)

    def offsets(self) -> Iterable[int]:
        """The records' offsets: a range when they are dense, as they almost always are."""
        if self.offsets_sequential and self.count:
            first = self.pointer("offsets")[0]
            return range(first, first + self.count)
        return self.ints("offsets")

    def timestamps(self) -> Iterable[int]:
        """The records' timestamps: one repeated int when a batch has one timestamp."""
        if self.timestamps_uniform and self.count:
            return repeat(self.pointer("timestamps")[0], self.count)
        return self.ints("timestamps")

    def view(self, name: str) -> memoryview:
        """A per-record int64 column as a zero-copy memoryview of format 'q'."""
        return memoryview(ffi.buffer(self.pointer(name), self.count * _INT64_BYTES)).cast("q")

    def pointer(self, name: str) -> Any:
        if name in _HEADER_ARRAYS:
            return self._header_arrays + _HEADER_ARRAYS.index(name) * self._header_capacity
        return self._arrays + _RECORD_ARRAYS.index(name) * max(self.count, 1)

    def bytes_column(self, field: str, nulls: int, count: int, views: bool = False) -> list[Any]:
        """Column `field` ("key", "value", "header_value"): bytes, or zero-copy
        memoryviews of the batch when `views`, and None for nulls."""
        if nulls == count:
            return [None] * count
        present = count - nulls
        starts, ends = self.pointer(f"{field}_starts"), self.pointer(f"{field}_ends")
        if views:
            items = list(map(memoryview(self.data).__getitem__,
                             map(slice, ffi.unpack(starts, present), ffi.unpack(ends, present))))
        else:  # one copy of the column, cut sequentially: no slice object per item
            blob = bytearray(getattr(self, f"{field}_bytes"))
            lengths = ffi.new("int64_t[]", present)
            copied = lib.rk_gather(ffi.from_buffer("uint8_t[]", self.data), len(self.data), starts, ends, present,
                                   ffi.from_buffer("uint8_t[]", blob, require_writable=True), len(blob), lengths)
            if copied != len(blob):
                raise AssertionError(f"rk_gather copied {copied} of {len(blob)} bytes of {field}s")
            items = list(map(io.BytesIO(blob).read, ffi.unpack(lengths, present)))
        if nulls == 0:
            return items
        pool = [None, *items]
        return list(map(pool.__getitem__, self.ints(f"{field}_index", count)))

    def headers(self) -> Iterable[tuple[tuple[str, bytes | None], ...]]:
        """Each record's headers as a tuple of (key, value) pairs."""
        if self.header_total == 0:
            return repeat((), self.count)
        total = self.header_total
        slices = map(slice, self.ints("header_key_starts", total), self.ints("header_key_ends", total))
        keys = list(map(bytes.decode, map(self.data.__getitem__, slices)))  # UTF-8: checked by the decoder
        values = self.bytes_column("header_value", self.null_header_values, total)
        pairs = iter(zip(keys, values))
        return list(map(tuple, map(islice, repeat(pairs), self.ints("header_counts"))))


def decode_records(data: bytes, start: int, end: int, count: int, base_offset: int, first_timestamp: int,
                   max_timestamp: int, log_append_time: bool, position: int = 0) -> DecodedRecords:
    """Decode the records section data[start:end] of a batch; CorruptRecordError if it is malformed."""
    if count < 0 or count > (end - start) // lib.RK_MIN_RECORD_BYTES:
        raise CorruptRecordError(f"record count {count} cannot fit in {end - start} bytes", position)
    decoded = DecodedRecords(data, count)
    views = ffi.new("rk_record_views *", {
        "count": count, "base_offset": base_offset, "first_timestamp": first_timestamp,
        "max_timestamp": max_timestamp, "log_append_time": int(log_append_time)})
    for i, name in enumerate(_RECORD_ARRAYS):
        setattr(views, name, decoded._arrays + i * max(count, 1))
    _point_headers(decoded, views, count)   # room for one header per record: one pass unless a batch has more
    source = ffi.from_buffer("uint8_t[]", data)
    result = lib.rk_records_decode(source, start, end, views)
    if result >= 0 and views.header_total > views.header_capacity:
        _point_headers(decoded, views, views.header_total)
        result = lib.rk_records_decode(source, start, end, views)
    if result < 0:
        raise corrupt(result, position + views.error_position - start)
    decoded.null_keys, decoded.null_values = views.null_keys, views.null_values
    decoded.header_total, decoded.null_header_values = views.header_total, views.null_header_values
    decoded.key_bytes, decoded.value_bytes = views.key_bytes, views.value_bytes
    decoded.header_value_bytes = views.header_value_bytes
    decoded.offsets_sequential = bool(views.offsets_sequential)
    decoded.timestamps_uniform = bool(views.timestamps_uniform)
    return decoded


# Header arrays are not zeroed: most batches have no headers and would pay for
# it, and nothing reads an entry the decoder did not write (reads stop at header_total).
_new_uncleared = ffi.new_allocator(should_clear_after_alloc=False)


def _point_headers(decoded: DecodedRecords, views: Any, capacity: int) -> None:
    capacity = max(capacity, 1)
    decoded._header_arrays = _new_uncleared("int64_t[]", len(_HEADER_ARRAYS) * capacity)
    decoded._header_capacity = views.header_capacity = capacity
    for i, name in enumerate(_HEADER_ARRAYS):
        setattr(views, name, decoded._header_arrays + i * capacity)


def validate_records(batch: bytes | bytearray | memoryview, position: int = 0) -> int:
    """Check one whole v2 batch down to its records; returns its record count.

    CorruptRecordError (CORRUPT_MESSAGE) unless: the sizes agree, magic is 2,
    the CRC32C matches, the payload decompresses, and it holds exactly
    recordCount well-formed records (every varint and length in bounds, each
    record's length matching its fields) with offset deltas 0..count-1, as
    lastOffsetDelta says. Control batches are checked the same way.
    """
    view = memoryview(batch)
    if len(view) < layout.HEADER_SIZE:
        raise CorruptRecordError(f"{len(view)} bytes cannot hold a batch header", position)
    header = layout.HEADER.unpack_from(view, 0)
    batch_length, magic, crc, attributes, last_offset_delta, count = (
        header[1], header[3], header[4], header[5], header[6], header[12])
    if batch_length + layout.LOG_OVERHEAD != len(view):
        raise CorruptRecordError(f"batchLength {batch_length} disagrees with {len(view)} bytes", position)
    if magic != layout.MAGIC:
        raise CorruptRecordError(f"magic {magic}, expected {layout.MAGIC}", position)
    if crc32c(view[layout.ATTRIBUTES_OFF:]) != crc:
        raise CorruptRecordError("CRC32C mismatch", position)
    if count < 1 or last_offset_delta != count - 1:
        raise CorruptRecordError(f"recordCount {count} with lastOffsetDelta {last_offset_delta}", position)
    codec = Compression.parse(attributes & layout.COMPRESSION_MASK)
    payload = view[layout.HEADER_SIZE:]
    if codec != Compression.NONE:
        payload = memoryview(decompress(codec, bytes(payload), position))
    error_position = ffi.new("int64_t *")
    result = lib.rk_records_validate(ffi.from_buffer("uint8_t[]", payload), len(payload), count, error_position)
    if result < 0:
        raise corrupt(result, position + layout.HEADER_SIZE + error_position[0])
    return result


# ---- partitioning -------------------------------------------------------------

class KeyPartitions(NamedTuple):
    """Where Kafka's default partitioner sends each record of a column of keys."""

    targets: list[int]        # per record: its partition
    ranks: list[int]          # per record: earlier records going to the same partition
    order: list[int]          # record indexes grouped by partition, in input order within one
    per_partition: list[int]  # per partition: how many records go there


def partition_keys(keys: Sequence[bytes | None], partitions: int, sticky: int) -> KeyPartitions:
    """murmur2(key) mod partitions per keyed record, `sticky` for null keys, in one C call."""
    keep: list[object] = []
    column = ffi.new("rk_bytes_column *")
    _fill_bytes(column, keys, keep)
    count = len(keys)
    targets = ffi.new("int32_t[]", max(count, 1))
    ranks, order = ffi.new("int64_t[]", max(count, 1)), ffi.new("int64_t[]", max(count, 1))
    per_partition = ffi.new("int64_t[]", partitions)
    if lib.rk_partition_keys(column, count, partitions, sticky, targets, ranks, order, per_partition) < 0:
        raise ValueError(f"cannot partition {count} keys over {partitions} partitions (sticky {sticky})")
    return KeyPartitions(ffi.unpack(targets, count), ffi.unpack(ranks, count), ffi.unpack(order, count),
                         ffi.unpack(per_partition, partitions))
