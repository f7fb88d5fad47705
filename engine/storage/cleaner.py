"""The log cleaner: Kafka's log compaction (cleanup.policy=compact) of a
partition log's sealed segments.

What a clean does. A plan names an end offset E (a segment boundary below
the high watermark, never inside the active segment) and a tombstone
horizon H (ms). Of the batches wholly in [log start, E), the cleaner keeps
the latest record of each key; a record without key stays; a tombstone
(null value) that is the latest of its key stays until its timestamp is
below H, then goes. Batches keep their base offset and lastOffsetDelta
(offsets never move: a read at a removed offset returns the next record,
consumers' committed offsets stay valid); a batch left without records goes,
except its producer's last batch in the range (kept empty: idempotent
producer state is rebuilt from the log), the last batch of each segment (so
a segment still ends where the next begins, and recovery's contiguity check
between segments holds) and the batch holding offset E - 1 (the range keeps
its end, so a follower catching up by offset reaches it).
Compressed and control batches are copied whole (their records are not
compacted). The per-record work is native (records.c, rk_compact_*), with
the GIL released, so the event loop keeps running while a thread cleans.

Determinism. The output is a function of the range's committed bytes and
(E, H) alone, not of segment boundaries, the time a replica runs it, or
what an earlier clean already removed (cleaning is idempotent and a later
plan subsumes an earlier one), so every replica writes the same bytes. A
replicated log's leader decides the plan (`plan`, from its clock: H = now -
delete.retention.ms, E bounded by min.compaction.lag.ms) and replicates it
as a Raft entry (engine/replication/partition.py); every replica cleans when
it commits. An embedded log plans and cleans alone.

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
from raftka.native import ffi, lib
from raftka.records import layout
from raftka.records.batch import iter_batches
from raftka.records.compression import Compression, decompress

if TYPE_CHECKING:
    from raftka.storage.partition_log import PartitionLog

KEY_SLOT_BYTES = 24                 # rk_key_slot: two 64-bit hashes and an offset


@dataclass(frozen=True)
class CleanPlan:
    """A clean of the batches wholly below `end_offset`; tombstones whose
    timestamp is below `horizon_ms` go."""

    end_offset: int
    horizon_ms: int


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


def plan(partition_log: "PartitionLog", now_ms: int, cleaned_to: int) -> CleanPlan | None:
    """The clean the log is due, at `now_ms`, or None: the cleanable range
    is the sealed segments wholly below the high watermark whose newest
    batch is older than min.compaction.lag.ms; it is cleaned once the bytes
    past `cleaned_to` (the end of the last clean) are at least
    min.cleanable.dirty.ratio of it."""
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
    return CleanPlan(end, now_ms - config.delete_retention_ms)


def clean(views: Sequence[memoryview], from_offset: int, clean_plan: CleanPlan, dedupe_buffer_bytes: int,
          bytes_per_second: int = 0, sleep: Callable[[float], None] = time.sleep,
          emit: Callable[[int, memoryview], Any] | None = None) -> tuple[list[Any], CleanStats]:
    """The segments `views` (the range's, oldest first) cleaned by
    `clean_plan`, batches below `from_offset` (the log start) left as they
    are: for each, what `emit(k, cleaned bytes)` returns (the view is only
    valid during the call), by default a copy of the bytes. Runs anywhere
    (the cleaner thread), reading at most `bytes_per_second` (0:
    unthrottled). StorageError when the range has more distinct keys than
    `dedupe_buffer_bytes` of map holds; CorruptRecordError for a record that
    does not parse."""
    started = time.monotonic()
    throttle = _Throttle(bytes_per_second, sleep)
    state = ffi.new("rk_compact_state *")
    state.from_offset, state.end_offset, state.horizon_ms = from_offset, clean_plan.end_offset, clean_plan.horizon_ms
    records, producer_batches = _count(views, state)
    # distinct keys <= records: a table sized for the records never fills, one capped by the buffer may
    key_capacity = _table_capacity(min(records, dedupe_buffer_bytes // (2 * KEY_SLOT_BYTES)))
    keys = _table(key_capacity)
    producers = _table(_table_capacity(producer_batches))
    state.keys, state.key_capacity = keys, key_capacity
    state.producers, state.producer_capacity = producers, len(producers)
    for view in views:
        throttle.read(len(view))
        result = lib.rk_compact_map(ffi.from_buffer(view), len(view), state)
        _check(result, state, "key map")
    outputs, stats = [], CleanStats()
    out = bytearray(max(len(view) for view in views))   # one buffer for every segment: a rewrite never grows
    for k, view in enumerate(views):
        throttle.read(len(view))
        written = lib.rk_compact_filter(ffi.from_buffer(view), len(view), state, ffi.from_buffer(out), len(out))
        _check(written, state, "rewrite")
        with memoryview(out)[:written] as cleaned:
            outputs.append(bytes(cleaned) if emit is None else emit(k, cleaned))
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


class _Throttle:
    """Sleeps so that reads average at most `bytes_per_second`."""

    def __init__(self, bytes_per_second: int, sleep: Callable[[float], None]) -> None:
        self._rate = bytes_per_second
        self._sleep = sleep
        self._started = time.monotonic()
        self._bytes = 0

    def read(self, size_bytes: int) -> None:
        if self._rate <= 0:
            return
        self._bytes += size_bytes
        ahead_s = self._bytes / self._rate - (time.monotonic() - self._started)
        if ahead_s > 0:
            self._sleep(ahead_s)
