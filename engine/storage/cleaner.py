"""The log cleaner: Kafka's log compaction (cleanup.policy=compact) of a
partition log's sealed segments.

What a clean does. A plan names an end offset E (a segment boundary below
the high watermark, never inside the active segment) and a tombstone end
T <= E. Of the batches wholly in [log start, E), the cleaner keeps the
latest record of each key; a record without key stays; a tombstone (null
value) that is the latest of its key stays if it lies at or past T, goes
below it. T is the end of the newest clean that ran delete.retention.ms ago
or more (0 if none): a tombstone goes only once a clean kept it for
delete.retention.ms, as Kafka's, so a consumer that read a key's older
value from the start of the log has that long to see its delete. Batches keep their base offset and lastOffsetDelta
(offsets never move: a read at a removed offset returns the next record,
consumers' committed offsets stay valid); a batch left without records goes,
except its producer's last batch in the range (kept empty: idempotent
producer state is rebuilt from the log), the last batch of each segment (so
a segment still ends where the next begins, and recovery's contiguity check
between segments holds) and the batch holding offset E - 1 (the range keeps
its end, so a follower catching up by offset reaches it).
A compressed batch is decompressed, mapped and filtered like the others and
recompressed with its codec (kept as it was when nothing goes, uncompressed
when emptied); control batches are copied whole. The per-record work is
native (records.c, rk_compact_*), with the GIL released, so the event loop
keeps running while a thread cleans; only decompression and recompression
run in Python (their libraries release the GIL for large buffers).

Determinism. The output is a function of the range's committed bytes, its
segment boundaries (the same on replicas that appended the same entries)
and (E, T) alone, not of the time a replica runs it, nor of what an earlier
clean already removed (cleaning is idempotent and a later plan subsumes an
earlier one), so every replica writes the same bytes (recompression too:
every replica runs the same pinned codec libraries). A replicated log's
leader decides the plan (`plan`: E bounded by min.compaction.lag.ms by its
clock, T from the cleans it decided and saw installed, with their times)
and replicates it as a Raft entry (engine/replication/partition.py); every
replica cleans when it commits. An embedded log plans and cleans alone.

Neighbours: PartitionLog (partition_log.py) runs a plan in the cleaner
thread (`start_clean`) and swaps the rewritten segment files in on its
caller's thread (`finish_clean`).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Sequence

from raftka.config import Config
from raftka.errors import CorruptRecordError, InvalidRecordError, StorageError
from raftka.native import crc32c, ffi, lib
from raftka.records import layout
from raftka.records.batch import iter_batches, read_header
from raftka.records.compression import Compression, compress, decompress

if TYPE_CHECKING:
    from raftka.storage.partition_log import PartitionLog

KEY_SLOT_BYTES = 24                 # rk_key_slot: two 64-bit hashes and an offset


@dataclass(frozen=True)
class CleanPlan:
    """A clean of the batches wholly below `end_offset`; the tombstones below
    `tombstone_end_offset` (<= end_offset) go."""

    end_offset: int
    tombstone_end_offset: int


@dataclass
class CleanStats:
    bytes_in: int = 0
    bytes_out: int = 0
    records_in: int = 0
    records_out: int = 0
    batches_kept_whole: int = 0
    seconds: float = 0.0


def is_compacted(config: Config) -> bool:
    return "compact" in config.cleanup_policy.split(",")


def is_deleting(config: Config) -> bool:
    """Retention (time and size) deletes segments: `delete` is in the policy."""
    return "delete" in config.cleanup_policy.split(",")


def plan(partition_log: "PartitionLog", now_ms: int, cleaned_to: int, tombstone_end: int) -> CleanPlan | None:
    """The clean the log is due, at `now_ms`, or None: the cleanable range
    is the sealed segments wholly below the high watermark whose newest
    batch is older than min.compaction.lag.ms; it is cleaned once the bytes
    past `cleaned_to` (the end of the last clean) are at least
    min.cleanable.dirty.ratio of it. Tombstones below `tombstone_end` (the
    end of a clean delete.retention.ms ago) go."""
    config = partition_log.config
    if not is_compacted(config):
        return None
    segments = partition_log.segments
    high_watermark = partition_log.high_watermark
    lag_horizon_ms = now_ms - config.min_compaction_lag_ms
    end = segments[0].base_offset
    total = dirty = 0
    for segment, following in zip(segments, segments[1:]):
        if following.base_offset > high_watermark or segment.max_timestamp() > lag_horizon_ms:
            break
        end = following.base_offset
        total += segment.size_bytes
        if following.base_offset > cleaned_to:
            dirty += segment.size_bytes
    if end <= max(cleaned_to, partition_log.log_start_offset) or total == 0:
        return None
    if dirty < config.min_cleanable_dirty_ratio * total:
        return None
    return CleanPlan(end, min(tombstone_end, end))


def clean(views: Sequence[memoryview], from_offset: int, clean_plan: CleanPlan, dedupe_buffer_bytes: int,
          bytes_per_second: int = 0, sleep: Callable[[float], Any] = time.sleep,
          emit: Callable[[int, memoryview], Any] | None = None,
          cancelled: Callable[[], bool] = lambda: False) -> tuple[list[Any], CleanStats]:
    """The segments `views` (the range's, oldest first) cleaned by
    `clean_plan`, batches below `from_offset` (the log start) left as they
    are: for each, what `emit(k, cleaned bytes)` returns (the view is only
    valid during the call; None, without a call, for a segment the clean
    leaves as it was), by default a copy of the bytes. Runs anywhere
    (the cleaner thread), reading at most `bytes_per_second` (0:
    unthrottled). StorageError when the range has more distinct keys than
    `dedupe_buffer_bytes` of map holds; CorruptRecordError for a record that
    does not parse; CleanCancelled once `cancelled()` (checked before each
    segment is read, and when the throttle wakes)."""
    started = time.monotonic()
    throttle = _Throttle(bytes_per_second, sleep, cancelled)
    state = ffi.new("rk_compact_state *")
    state.from_offset, state.end_offset = from_offset, clean_plan.end_offset
    state.tombstone_end_offset = clean_plan.tombstone_end_offset
    records, producer_batches = _count(views, state)
    # distinct keys <= records: a table sized for the records never fills, one capped by the buffer may
    key_capacity = _table_capacity(min(records, dedupe_buffer_bytes // (2 * KEY_SLOT_BYTES)))
    keys = _table(key_capacity)
    producers = _table(_table_capacity(producer_batches))
    state.keys, state.key_capacity = keys, key_capacity
    state.producers, state.producer_capacity = producers, len(producers)
    compressed = [_compressed_positions(view, state) for view in views]
    for view, positions in zip(views, compressed):
        throttle.read(len(view))
        _check(lib.rk_compact_map(ffi.from_buffer(view), len(view), state), state, "key map")
        for position in positions:   # the map keeps the latest offset whatever the order
            batch, _codec = _decompressed(view, position)
            _check(lib.rk_compact_map(ffi.from_buffer(batch), len(batch), state), state, "key map")
    outputs, stats = [], CleanStats()
    # one buffer for every segment: a rewrite is no larger, but for recompressed batches that grew
    out = bytearray(max(len(view) for view in views))
    for k, (view, positions) in enumerate(zip(views, compressed)):
        throttle.read(len(view))
        removed_before = state.records_in - state.records_out
        keep = _cleaned_compressed(view, positions, state)
        if len(out) < len(view) + keep.growth:
            out = bytearray(len(view) + keep.growth)
        written = lib.rk_compact_filter(ffi.from_buffer(view), len(view), state, ffi.from_buffer(out), len(out))
        state.replacement_count = 0   # their buffers go with `keep`
        del keep
        _check(written, state, "rewrite")
        changed = written != len(view) or state.records_in - state.records_out != removed_before
        with memoryview(out)[:written] as cleaned:
            outputs.append(bytes(cleaned) if emit is None else emit(k, cleaned) if changed else None)
        stats.bytes_in += len(view)
        stats.bytes_out += written
    stats.records_in, stats.records_out = state.records_in, state.records_out
    stats.batches_kept_whole = state.batches_kept_whole
    stats.seconds = time.monotonic() - started
    return outputs, stats


def check_keys(batches: bytes | bytearray | memoryview, name: str) -> None:
    """A compacted topic takes only records with a key (Kafka refuses the
    rest with INVALID_RECORD): InvalidRecordError for the first without,
    CorruptRecordError for a record that does not parse. A compressed
    batch is decompressed to be checked, as Kafka's LogValidator does."""
    view = memoryview(batches)
    _check_key_batches(view, name, 0)
    for header, batch in iter_batches(view):
        if header.attributes & layout.COMPRESSION_MASK and not header.attributes & layout.CONTROL_MASK:
            payload = decompress(Compression(header.attributes & layout.COMPRESSION_MASK),
                                 bytes(batch[layout.HEADER_SIZE:]))
            head = bytearray(batch[:layout.HEADER_SIZE])
            head[layout.ATTRIBUTES_OFF:layout.ATTRIBUTES_OFF + 2] = \
                (header.attributes & ~layout.COMPRESSION_MASK).to_bytes(2, "big", signed=True)
            head[8:12] = (layout.HEADER_SIZE - layout.LOG_OVERHEAD + len(payload)).to_bytes(4, "big")
            _check_key_batches(memoryview(bytes(head) + payload), name, header.base_offset)


def _check_key_batches(view: memoryview, name: str, where: int) -> None:
    error_position = ffi.new("int64_t *")
    found = lib.rk_null_key_batch(ffi.from_buffer(view), len(view), error_position)
    if found < 0:
        raise CorruptRecordError(f"{name}: malformed record (error {found})", error_position[0])
    if found < len(view):
        raise InvalidRecordError(f"{name} is compacted (cleanup.policy=compact): a record without key "
                                 f"(batch at byte {where + found}) is refused")


def _compressed_positions(view: memoryview, state: "ffi.CData") -> list[int]:
    """Positions of the compressed data batches of the clean range in one segment."""
    positions, found, next_position = [], ffi.new("int64_t[]", 1024), ffi.new("int64_t *")
    position = 0
    while True:
        count = lib.rk_compact_compressed(ffi.from_buffer(view), len(view), state, position, found, len(found),
                                          next_position)
        positions += ffi.unpack(found, count)
        if count < len(found):
            return positions
        position = next_position[0]


def _decompressed(view: memoryview, position: int) -> tuple[bytearray, Compression]:
    """The compressed batch at `position` as an uncompressed one (header kept, compression bits cleared)."""
    header = read_header(view, position)
    codec = Compression(header.attributes & layout.COMPRESSION_MASK)
    payload = decompress(codec, bytes(view[position + layout.HEADER_SIZE:position + header.size_bytes]), position)
    batch = bytearray(view[position:position + layout.HEADER_SIZE]) + payload
    batch[layout.ATTRIBUTES_OFF:layout.ATTRIBUTES_OFF + 2] = \
        (header.attributes & ~layout.COMPRESSION_MASK).to_bytes(2, "big", signed=True)
    batch[layout.BATCH_LENGTH_OFF:layout.BATCH_LENGTH_OFF + 4] = \
        (len(batch) - layout.LOG_OVERHEAD).to_bytes(4, "big")
    return batch, codec


@dataclass
class _Kept:
    """What the replacements of one segment hold alive, and how much larger than the originals they are."""

    buffers: list[Any]
    growth: int = 0


def _cleaned_compressed(view: memoryview, positions: list[int], state: "ffi.CData") -> _Kept:
    """The compressed batches of one segment cleaned: decompressed, filtered
    as uncompressed ones are, recompressed with their codec (an emptied one
    stays uncompressed, a whole one as it was); installed in `state` as the
    rk_compact_filter replacements."""
    kept = _Kept([])
    replacements = ffi.new("rk_replacement[]", max(1, len(positions)))
    for i, position in enumerate(positions):
        original = read_header(view, position)
        batch, codec = _decompressed(view, position)
        out = bytearray(len(batch))
        last = position + original.size_bytes == len(view)
        written = lib.rk_compact_filter_one(ffi.from_buffer(batch), len(batch), int(last), state,
                                            ffi.from_buffer(out), len(out))
        _check(written, state, "rewrite of a compressed batch")
        if written == len(batch):
            data = bytes(view[position:position + original.size_bytes])   # nothing removed: as it was
        elif written == 0 or read_header(out).record_count == 0:
            data = bytes(out[:written])
        else:
            data = _recompressed(out[:written], codec, original.attributes)
        kept.buffers.append(data)
        kept.growth += max(0, len(data) - original.size_bytes)
        replacements[i].position, replacements[i].data, replacements[i].len = position, ffi.from_buffer(data), len(data)
    state.replacements, state.replacement_count = replacements, len(positions)
    kept.buffers.append(replacements)
    return kept


def _recompressed(batch: bytearray, codec: Compression, attributes: int) -> bytes:
    """An uncompressed batch compressed with `codec` again: header kept, attributes, length and CRC32C anew."""
    payload = compress(codec, bytes(batch[layout.HEADER_SIZE:]))
    head = bytearray(batch[:layout.HEADER_SIZE])
    head[layout.ATTRIBUTES_OFF:layout.ATTRIBUTES_OFF + 2] = attributes.to_bytes(2, "big", signed=True)
    head[layout.BATCH_LENGTH_OFF:layout.BATCH_LENGTH_OFF + 4] = \
        (layout.HEADER_SIZE - layout.LOG_OVERHEAD + len(payload)).to_bytes(4, "big")
    head[layout.CRC_OFF:layout.CRC_OFF + 4] = crc32c(bytes(head[layout.ATTRIBUTES_OFF:]) + payload).to_bytes(4, "big")
    return bytes(head) + payload


def _count(views: Sequence[memoryview], state: "ffi.CData") -> tuple[int, int]:
    """(records of the cleanable batches, batches carrying a producer id) in the range."""
    records, producer_batches = 0, ffi.new("int64_t *")
    for view in views:
        records += lib.rk_compact_count(ffi.from_buffer(view), len(view), state, producer_batches)
    return records, producer_batches[0]


def _table_capacity(entries: int) -> int:
    """A power of two at least twice `entries` (the table stays under 3/4 full)."""
    capacity = 16
    while capacity < 2 * entries:
        capacity *= 2
    return capacity


def _table(capacity: int) -> "ffi.CData":
    return ffi.new("rk_key_slot[]", capacity)   # zeroed: every slot empty


def _check(result: int, state: "ffi.CData", what: str) -> None:
    if result == lib.RK_REC_ERR_SPACE:
        raise StorageError(f"log cleaner: the {what} needs more than log.cleaner.dedupe.buffer.size of key map "
                           f"(at byte {state.error_position} of a segment)")
    if result < 0:
        raise CorruptRecordError(f"log cleaner: malformed record in the {what} (error {result})",
                                 state.error_position)


class CleanCancelled(Exception):
    """The log closed while its clean ran: nothing of it is installed."""


class _Throttle:
    """Sleeps so that reads average at most `bytes_per_second`; raises
    CleanCancelled before a read once `cancelled()`."""

    def __init__(self, bytes_per_second: int, sleep: Callable[[float], Any], cancelled: Callable[[], bool]) -> None:
        self._rate = bytes_per_second
        self._sleep = sleep
        self._cancelled = cancelled
        self._started = time.monotonic()
        self._bytes = 0

    def read(self, size_bytes: int) -> None:
        if self._cancelled():
            raise CleanCancelled()
        if self._rate <= 0:
            return
        self._bytes += size_bytes
        ahead_s = self._bytes / self._rate - (time.monotonic() - self._started)
        if ahead_s > 0:
            self._sleep(ahead_s)
            if self._cancelled():
                raise CleanCancelled()
