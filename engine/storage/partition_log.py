"""PartitionLog: the append-only log of one partition, as segments plus a sparse index.

Invariants (asserted where cheap):
  first segment's base offset <= log_start_offset <= high_watermark <= log_end_offset
  segments are contiguous: segment i+1 starts at the offset after segment i's last batch
  offsets are dense: every appended batch starts at the previous log_end_offset
  readers only see batches wholly below the high watermark

The log start offset is logical (Kafka's): retention moves it to a segment
boundary, DeleteRecords to any offset up to the high watermark, and whole
segments below it are deleted. The rest of the segment holding it stays
on disk but is not readable: reads below it are out of range, though the
batch holding it is served whole, as Kafka serves it. It is recorded with
the partition state (before any segment below it goes), so it survives a
restart.

Durability and recovery. Segment bytes are the truth. The LMDB offset/time
index is a sparse hint (one entry per `index_interval_bytes`) committed in
groups, so after a crash it may lag the segment (uncommitted entries) or lead
it (the segment tail was lost). The partition state records a recovery
point: the offset below which segment bytes were fsynced (a sync under
`interval`/`always`, a roll that synced the sealed file and the directory,
a clean close). On open every segment past the recovery point is rescanned
with native CRC checks, sealed ones included (a power loss can tear a
sealed file that was never synced); the log is cut at the first invalid
byte, later segments go, and what is valid is re-indexed. State is never
recorded ahead of the data it describes: when recovery cut data below the
recorded high watermark, the Raft index it was applied at is no longer
known, and is recorded as UNKNOWN_APPLIED_INDEX for the replica to repair.

Neighbours: Segment (segment.py) does the file I/O through native code;
IndexStore (index.py) holds the index and partition state; LogManager
(log_manager.py) owns all partition logs of a data directory and schedules
index commits, fsyncs and retention.
"""
from __future__ import annotations

import bisect
import logging
import os
import time
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, NamedTuple

from raftka.config import Config
from raftka.errors import CorruptRecordError, OffsetOutOfRangeError, RecordTooLargeError, StorageError
from raftka.records import layout
from raftka.records.batch import decode_batch, read_header
from raftka.storage import cleaner
from raftka.storage.cleaner import CleanPlan, CleanStats
from raftka.storage.index import UNKNOWN_APPLIED_INDEX, IndexStore, PartitionState
from raftka.storage.segment import Segment, list_segment_offsets
from raftka.native import ffi, lib
from raftka.native.files import fsync_directory

log = logging.getLogger(__name__)

_SCAN_ERRORS = {
    lib.RK_ERR_TRUNCATED: "truncated batch",
    lib.RK_ERR_LENGTH: "batch length out of bounds",
    lib.RK_ERR_MAGIC: "magic byte is not 2",
    lib.RK_ERR_CRC: "CRC32C mismatch",
    lib.RK_ERR_COUNT: "record count disagrees with lastOffsetDelta",
    lib.RK_ERR_OFFSET: "base offset not contiguous",
}
# batches per native scan call during recovery (bounds the entries buffer)
_RECOVERY_ENTRIES_MAX = 4096
# index entries recovery tries, newest first, before rescanning the whole segment
_RECOVERY_CANDIDATES_MAX = 64
# the log cleaner's thread (Kafka's log.cleaner.threads = 1), shared by every log of the process
_CLEANER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="log-cleaner")
CLEANED_SUFFIX = ".cleaned"   # a rewritten segment before its rename over the original
# installed cleans remembered for tombstone ends; forgetting older ones can only keep tombstones longer
CLEAN_HISTORY_MAX = 64


class AppendResult(NamedTuple):
    """Where an append landed: offsets [base_offset, last_offset]."""

    base_offset: int
    last_offset: int
    batch_count: int
    record_count: int
    size_bytes: int


@dataclass
class CleanJob:
    """A clean running in the cleaner thread over `segments` (the log's
    sealed segments wholly below the plan's end, as they were at its start)."""

    plan: CleanPlan
    segments: tuple[Segment, ...]
    sizes: tuple[int, ...]
    stop: threading.Event   # set when the log closes: the thread gives up at its next segment
    # per segment: None (nothing removed), or its rewrite, written and synced: (file, offset-index entries)
    result: "Future[tuple[list[tuple[Path, list[tuple[int, int]]] | None], CleanStats]]"


@dataclass(frozen=True, slots=True)
class LogSlice:
    """Whole batches served by a read, without copying them.

    `buffer` is a read-only view of the segment's mapping; `segment_path` and
    `file_position` locate the same bytes for sendfile.
    """

    buffer: memoryview
    segment_path: Path | None
    file_position: int
    next_offset: int  # where the next read continues

    @property
    def size_bytes(self) -> int:
        return len(self.buffer)


class PartitionLog:
    """One partition's log: append, read, truncate, roll, retention, recovery."""

    def __init__(self, name: str, directory: Path, storage_id: int, index: IndexStore, config: Config) -> None:
        self.name = name
        self.directory = directory
        self.storage_id = storage_id
        self._index = index
        self._config = config
        self._segments: list[Segment] = []
        self._segment_bases: list[int] = []
        self._log_start_offset = 0
        self._log_end_offset = 0
        self._high_watermark = 0
        self._applied_index = 0
        self._recovery_point = 0     # segment bytes below it are known to be on disk (persisted, lags)
        self._on_disk_offset = 0     # the same, in memory: includes what was found on disk at open
        # True when a Raft journal makes appends durable (a replica's log): append then never syncs
        self.journaled = False
        self.recovered_short = False   # recovery cut data below the recorded high watermark
        self.on_sync: Callable[[], None] | None = None   # a Raft journal syncing its own file alongside
        self.on_retention: Callable[[int], None] | None = None   # a replica replicating retention decisions
        # a replica replicating clean plans: True if it did (its leader), False if it is not the one to decide
        self.on_compaction: Callable[[CleanPlan], bool] | None = None
        # a replica's condition for swapping cleaned segments in (its Raft log no longer sends that range)
        self.may_install_clean: Callable[[int], bool] | None = None
        self.last_clean: CleanStats | None = None
        self._cleaned_to = 0          # end offset of the last clean installed here (in memory: 0 after a restart)
        # the cleans this log decided and installed: (decision time ms, end offset), oldest first, in memory
        self._clean_history: list[tuple[int, int]] = []
        self._decided_ms: dict[int, int] = {}    # end offset -> when this log decided that clean
        self._clean_job: CleanJob | None = None
        self._clean_next: CleanPlan | None = None   # a plan that arrived while a clean was running
        self._bytes_since_index = 0
        self._max_timestamp = -1     # running max of batch maxTimestamp
        self._last_time_entry = -1   # largest timestamp in the time index
        self._pending_offsets: list[int] = []    # [offset] sorted, not yet in LMDB
        self._pending_positions: list[int] = []  # file position per pending offset
        self._pending_times: list[tuple[int, int]] = []  # (timestamp, offset)
        self._state_dirty = False
        self._dirty_since_sync = False
        self._scan_state = ffi.new("rk_scan_state *")
        self._scan_state.check_offsets = 0
        self._scan_state.max_batch_bytes = config.max_batch_bytes
        self._scan_state.index_interval_bytes = config.index_interval_bytes
        self._entries = ffi.new("rk_index_entry[]", 1)
        self._next_offset_out = ffi.new("int64_t *")
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StorageError(f"cannot create partition directory {directory}: {exc.strerror}") from exc
        self._open()

    # ---- offsets -----------------------------------------------------

    @property
    def log_start_offset(self) -> int:
        return self._log_start_offset

    @property
    def log_end_offset(self) -> int:
        return self._log_end_offset

    @property
    def high_watermark(self) -> int:
        return self._high_watermark

    @property
    def applied_index(self) -> int:
        """Last Raft index applied to this log (0 when not replicated)."""
        return self._applied_index

    @property
    def size_bytes(self) -> int:
        return sum(segment.size_bytes for segment in self._segments)

    @property
    def segments(self) -> tuple[Segment, ...]:
        return tuple(self._segments)

    def set_high_watermark(self, offset: int, applied_index: int | None = None) -> None:
        """Move the readers' bound; it must fall on a batch boundary within the log."""
        if not self.log_start_offset <= offset <= self._log_end_offset:
            raise OffsetOutOfRangeError(self.name, offset, self.log_start_offset, self._log_end_offset)
        self._high_watermark = offset
        if applied_index is not None:
            self._applied_index = applied_index
        self._state_dirty = True

    # ---- append ------------------------------------------------------

    def append(self, batches: bytes | bytearray | memoryview, leader_epoch: int = -1,
               keep_offsets: bool = False) -> AppendResult:
        """Validate and append whole record batches; returns the offsets they got.

        Nothing is written unless every batch is valid (CorruptRecordError,
        RecordTooLargeError); a failed write (StorageError) leaves the log as
        it was. A writable buffer (the broker's receive buffer, a bytearray)
        gets baseOffset and partitionLeaderEpoch rewritten in place and goes
        to disk in one write; a read-only one is left untouched and written
        as a patched header plus the rest of each batch.

        `keep_offsets`: the batches are a copy of another replica's log, a
        compacted one's included (offsets with gaps, fewer records than
        offsets): they keep their stored base offsets, which must not go
        below the log end offset.
        """
        size = len(batches)
        if size == 0:
            raise CorruptRecordError("no record batches", 0)
        data = ffi.from_buffer(batches)
        state = self._scan(data, size, check_crc=True, keep_offsets=keep_offsets)
        if self._roll_due(size, _max_timestamp_of_first(batches)):
            self.roll()
            state = self._scan(data, size, check_crc=False, keep_offsets=keep_offsets)  # index entries, new segment
        base_offset = self._log_end_offset
        active = self._segments[-1]
        position = active.size_bytes
        active.append(data, size, -1 if keep_offsets else base_offset, leader_epoch,
                      in_place=not memoryview(batches).readonly)
        self._remember_entries(self._entries, state.entry_count, position)
        self._log_end_offset = state.next_offset
        self._bytes_since_index = state.bytes_since_index
        self._max_timestamp = state.max_timestamp
        if self._config.fsync == "always" and not self.journaled:
            active.sync()
            self._advance_recovery_point()
        else:
            self._dirty_since_sync = True
        return AppendResult(base_offset, state.next_offset - 1, state.batch_count,
                            state.record_count, size)

    @property
    def config(self) -> Config:
        return self._config

    def reconfigure(self, config: Config) -> None:
        """Apply a topic's own settings (retention, segment size and age, max
        batch size); they take effect from the next append, roll or retention run."""
        self._config = config
        self._scan_state.max_batch_bytes = config.max_batch_bytes

    def validate(self, batches: bytes | bytearray | memoryview) -> None:
        """Raise what append() would for these batches (CorruptRecordError,
        RecordTooLargeError), writing nothing: a leader checks a produce
        before it enters the Raft log."""
        if len(batches) == 0:
            raise CorruptRecordError("no record batches", 0)
        self._scan(ffi.from_buffer(batches), len(batches), check_crc=True)
        if cleaner.is_compacted(self._config):
            cleaner.check_keys(batches, self.name)

    def _scan(self, data: object, size: int, check_crc: bool, keep_offsets: bool = False) -> "ffi.CData":
        """Validate `data` and work out its offsets and index entries, writing nothing."""
        state = self._scan_state
        state.check_crc = check_crc
        state.check_offsets = lib.RK_CHECK_COMPACTED if keep_offsets else 0
        state.next_offset = self._log_end_offset
        state.bytes_since_index = self._bytes_since_index
        state.max_timestamp = self._max_timestamp
        state.batch_count = state.record_count = 0
        capacity = size // self._config.index_interval_bytes + 2
        if len(self._entries) < capacity:
            self._entries = ffi.new("rk_index_entry[]", capacity)
        lib.rk_scan(data, size, state, self._entries, len(self._entries))
        if state.error != lib.RK_OK or state.valid_bytes != size:
            self._raise_scan_error(state.error, data, state.valid_bytes)
        return state

    def _raise_scan_error(self, error: int, data: object, position: int) -> None:
        if error == lib.RK_ERR_LENGTH:
            batch_length = int.from_bytes(ffi.buffer(data)[position + 8:position + 12], "big", signed=True)
            if batch_length + layout.LOG_OVERHEAD > self._config.max_batch_bytes:
                raise RecordTooLargeError(
                    f"batch at byte {position} is {batch_length + layout.LOG_OVERHEAD} bytes, "
                    f"over the {self._config.max_batch_bytes}-byte limit of {self.name}")
        raise CorruptRecordError(_SCAN_ERRORS.get(error, f"error {error}"), position)

    def _remember_entries(self, entries: "ffi.CData", count: int, file_position: int) -> None:
        """Queue the first `count` native index entries (positions relative to
        file_position) for the next index commit."""
        if not count:
            return
        # rk_index_entry is three int64s: position, base_offset, max_timestamp
        flat = ffi.unpack(ffi.cast("int64_t *", entries), 3 * count)
        offsets = flat[1::3]
        self._pending_offsets += offsets
        self._pending_positions += [file_position + p for p in flat[0::3]]
        for timestamp, offset in zip(flat[2::3], offsets):
            if timestamp > self._last_time_entry:
                self._pending_times.append((timestamp, offset))
                self._last_time_entry = timestamp

    def _roll_due(self, incoming_bytes: int, incoming_timestamp: int) -> bool:
        """Size, or age by the log's own clock: the incoming batch's timestamp
        against the active segment's first batch's (Kafka's rolling-based
        timestamp, compared with the data instead of the wall clock), so every
        replica appending the same batches rolls at the same offsets."""
        active = self._segments[-1]
        if active.size_bytes == 0:
            return False
        too_big = active.size_bytes + incoming_bytes > self._config.segment_bytes
        first = active.first_timestamp()
        too_old = first >= 0 and incoming_timestamp - first >= self._config.segment_ms
        return too_big or too_old

    def roll(self) -> None:
        """Seal the active segment and start a new one at the log end offset
        (nothing to do while the active segment is empty)."""
        active = self._segments[-1]
        if active.size_bytes == 0:
            return
        durable = self._config.fsync != "never"
        if durable:
            active.sync()
        active.seal()
        segment = Segment(self.directory, self._log_end_offset, create=True,
                          map_capacity_bytes=self._map_capacity())
        self._segments.append(segment)
        self._segment_bases.append(segment.base_offset)
        self._bytes_since_index = 0
        if durable:
            fsync_directory(self.directory)
            if not self._dirty_since_sync or self._recovery_point >= active.base_offset:
                self._advance_recovery_point(segment.base_offset)

    def _map_capacity(self) -> int:
        return self._config.segment_bytes + self._config.max_batch_bytes

    # ---- read --------------------------------------------------------

    def read(self, offset: int, max_bytes: int, end_offset: int | None = None,
             for_consumer: bool = False) -> LogSlice:
        """Whole batches from the one containing `offset`, below the high watermark
        (and below `end_offset` if given, which must fall on a batch boundary).

        At most `max_bytes` unless the first batch alone is larger (it is then
        returned whole, as Kafka does); never past the end of the segment
        holding `offset` (the next read continues in the next one). Empty at
        the high watermark.

        `for_consumer`: batches without records (what the cleaner leaves to
        keep producer state and segment ends) are not all a read returns while
        records follow: it goes on past them, as a fetch at a removed offset
        returns the next record (clients give up on responses with none).
        """
        high_watermark = self._high_watermark if end_offset is None else min(end_offset, self._high_watermark)
        if not self.log_start_offset <= offset <= high_watermark:
            raise OffsetOutOfRangeError(self.name, offset, self.log_start_offset, high_watermark)
        piece = self._read_at(offset, max_bytes, high_watermark)
        while for_consumer and piece.size_bytes and piece.next_offset < high_watermark \
                and not _holds_records(piece.buffer):
            piece = self._read_at(piece.next_offset, max_bytes, high_watermark)
        return piece

    def _read_at(self, offset: int, max_bytes: int, high_watermark: int) -> LogSlice:
        if offset == high_watermark:
            return LogSlice(memoryview(b""), None, 0, offset)
        segment = self._segment_for(offset)
        view = segment.view()
        data = ffi.from_buffer(view)
        position = lib.rk_seek_offset(data, len(view), self._index_floor(segment, offset), offset)
        next_offset = self._next_offset_out
        next_offset[0] = offset
        size = lib.rk_span(data, len(view), position, max_bytes, high_watermark, next_offset)
        return LogSlice(view[position:position + size], segment.path, position, next_offset[0])

    def offset_for_timestamp(self, timestamp_ms: int) -> int | None:
        """Offset of the first record with timestamp >= timestamp_ms, below the high
        watermark; None if there is none (Kafka's ListOffsets by timestamp)."""
        start = self._time_floor(timestamp_ms)
        segment_index = bisect.bisect_right(self._segment_bases, start) - 1
        position = None
        for segment in self._segments[segment_index:]:
            view = segment.view()
            data = ffi.from_buffer(view)
            if position is None:
                position = lib.rk_seek_offset(data, len(view), self._index_floor(segment, start), start)
            position = lib.rk_seek_timestamp(data, len(view), position, timestamp_ms)
            if position < len(view):
                return self._first_record_at_or_after(view, position, timestamp_ms)
            position = 0
        return None

    def _first_record_at_or_after(self, view: memoryview, position: int, timestamp_ms: int) -> int | None:
        header = read_header(view, position)
        if header.last_offset >= self._high_watermark:
            return None
        batch = view[position:position + header.size_bytes]
        for record in decode_batch(header, batch, self.name, 0, position):
            if record.timestamp_ms >= timestamp_ms and record.offset >= self._log_start_offset:
                return record.offset
        return max(header.base_offset, self._log_start_offset)

    def end_offset_for_epoch(self, leader_epoch: int) -> tuple[int, int]:
        """Kafka's OffsetForLeaderEpoch answer from the batches'
        partitionLeaderEpoch (a replica's Raft term, never decreasing along
        the log), over [log start, log end): (the largest epoch <= leader_epoch
        a batch carries, the first offset of the first batch with a larger
        epoch, else the log end offset). When no batch carries one <= it:
        (leader_epoch, that first offset), as Kafka answers an epoch older
        than its cache. A binary search: O(log n) batch lookups."""
        low, high = self._log_start_offset, self._log_end_offset   # [low, high): the first offset past the epoch
        while low < high:
            middle = (low + high) // 2
            if self._epoch_at(middle) > leader_epoch:
                high = middle
            else:
                low = middle + 1
        if low == self._log_start_offset:
            return leader_epoch, low
        return self._epoch_at(low - 1), low

    def _epoch_at(self, offset: int) -> int:
        """partitionLeaderEpoch of the batch holding `offset` (< log end)."""
        segment = self._segment_for(offset)
        view = segment.view()
        position = lib.rk_seek_offset(ffi.from_buffer(view), len(view), self._index_floor(segment, offset), offset)
        return read_header(view, position).partition_leader_epoch

    def _segment_for(self, offset: int) -> Segment:
        return self._segments[bisect.bisect_right(self._segment_bases, offset) - 1]

    def _index_floor(self, segment: Segment, offset: int) -> int:
        """Position in `segment` of the last indexed batch at or before `offset` (else 0)."""
        i = bisect.bisect_right(self._pending_offsets, offset) - 1
        if i >= 0:
            found = self._pending_offsets[i] >= segment.base_offset
            return self._pending_positions[i] if found else 0
        entry = self._index.offset_floor(self.storage_id, offset)
        if entry is None or entry[0] < segment.base_offset:
            return 0
        return entry[1]

    def _time_floor(self, timestamp_ms: int) -> int:
        """Offset of the last time-index entry whose running max < timestamp_ms."""
        i = bisect.bisect_left(self._pending_times, (timestamp_ms, -1)) - 1
        if i >= 0:
            return self._pending_times[i][1]
        entry = self._index.time_floor(self.storage_id, timestamp_ms)
        if entry is None or entry[1] < self.log_start_offset:
            return self.log_start_offset
        return entry[1]

    # ---- index commits -----------------------------------------------

    @property
    def pending_index_entries(self) -> int:
        return len(self._pending_offsets) + len(self._pending_times)

    def drain_pending(self) -> tuple[list[tuple[int, int, int]], list[tuple[int, int, int]],
                                     list[tuple[int, PartitionState]]]:
        """Hand pending index entries and state to the caller's commit."""
        storage_id = self.storage_id
        offsets = [(storage_id, o, p) for o, p in zip(self._pending_offsets, self._pending_positions)]
        times = [(storage_id, ts, o) for ts, o in self._pending_times if ts >= 0]
        states = ([(storage_id, PartitionState(self._high_watermark, self._applied_index, self._recovery_point,
                                               self._log_start_offset))]
                  if self._state_dirty else [])
        self._pending_offsets, self._pending_positions, self._pending_times = [], [], []
        self._state_dirty = False
        return offsets, times, states

    def flush_index(self, wait: bool = True) -> None:
        """Commit this log's pending index entries and state on their own
        (`wait` False: in the background, see IndexStore)."""
        self._index.commit(*self.drain_pending(), wait=wait)

    def sync(self, force: bool = False) -> None:
        """fsync the active segment if anything was appended since the last
        sync (sealed ones were at their roll unless `fsync=never`)."""
        if self._dirty_since_sync or force:
            self._segments[-1].sync()
            self._dirty_since_sync = False
            if self.on_sync is not None:
                self.on_sync()
            if self._config.fsync != "never":
                self._advance_recovery_point()

    def active_fd(self) -> int | None:
        """The active segment's descriptor (a sync job dups it)."""
        return self._segments[-1].fd

    def synced_to(self, offset: int) -> None:
        """Segment bytes below `offset` were fdatasync'd (a journal's group
        commit; sealed segments were synced at their roll)."""
        if self._config.fsync != "never":
            self._advance_recovery_point(min(offset, self._log_end_offset))

    def read_range(self, start: int, end: int) -> bytes:
        """A copy of the batches of offsets [start, end), committed or not (the
        Raft log sends uncommitted entries to followers). Both must fall on batch
        boundaries."""
        pieces = []
        while start < end:
            k = bisect.bisect_right(self._segment_bases, start) - 1
            segment = self._segments[k]
            view = segment.view()
            data = ffi.from_buffer(view)
            first = lib.rk_seek_offset(data, len(view), self._index_floor(segment, start), start)
            segment_end = self._segment_bases[k + 1] if k + 1 < len(self._segments) else self._log_end_offset
            if end < segment_end:
                last = lib.rk_seek_offset(data, len(view), self._index_floor(segment, end), end)
            else:
                last = len(view)
            pieces.append(bytes(view[first:last]))
            start = segment_end
        return b"".join(pieces)

    @property
    def on_disk_offset(self) -> int:
        """Segment bytes below this offset are on disk (found at open, or synced since)."""
        return self._on_disk_offset

    @property
    def recovery_point(self) -> int:
        """Segment bytes below this offset are known to be on disk."""
        return self._recovery_point

    def _advance_recovery_point(self, offset: int | None = None) -> None:
        offset = self._log_end_offset if offset is None else offset
        self._on_disk_offset = max(self._on_disk_offset, offset)
        if offset > self._recovery_point:
            self._recovery_point = offset
            self._state_dirty = True

    # ---- truncation and retention ------------------------------------

    def truncate(self, offset: int) -> int:
        """Remove every batch whose last offset is >= `offset` (Raft log repair).

        A batch straddling `offset` goes whole, as in Kafka. Returns the new
        log end offset (<= offset); the high watermark follows it down.
        Views from read() over the removed bytes must not be touched after
        this (the file shrinks under the mapping); Raft only truncates above
        the high watermark, where read() never hands out views.
        """
        if offset >= self._log_end_offset:
            return self._log_end_offset
        if offset < self.log_start_offset:
            raise OffsetOutOfRangeError(self.name, offset, self.log_start_offset, self._log_end_offset)
        self.flush_index()
        k = bisect.bisect_right(self._segment_bases, offset) - 1
        segment = self._segments[k]
        view = segment.view()
        position = lib.rk_seek_offset(ffi.from_buffer(view), len(view),
                                      self._index_floor(segment, offset), offset)
        new_end = read_header(view, position).base_offset
        del view
        # index entries first: a stale entry past the cut would misplace reads,
        # a missing one only makes them walk further
        self._index.delete_offsets(self.storage_id, from_offset=new_end)
        self._index.delete_times(self.storage_id, from_offset=new_end)
        if position == 0 and k > 0 and self._segment_bases[k] > self.log_start_offset:
            # the cut undoes the roll that started this segment: appends go on
            # in the one before, as on a replica that never rolled there
            # (segments roll by what they hold; files must stay identical)
            k -= 1
            segment = self._segments[k]
            position = segment.size_bytes
        for doomed in self._segments[k + 1:]:
            doomed.delete()
        del self._segments[k + 1:], self._segment_bases[k + 1:]
        segment.truncate(position)
        segment.make_active(self._map_capacity())
        self._log_end_offset = new_end
        self._high_watermark = min(self._high_watermark, new_end)
        self._log_start_offset = min(self._log_start_offset, new_end)   # the batch holding it went whole
        self._recovery_point = min(self._recovery_point, new_end)
        self._on_disk_offset = min(self._on_disk_offset, new_end)
        self._state_dirty = True
        self._reset_tail_state(position)
        self.flush_index()
        return new_end

    def restart_at(self, offset: int) -> None:
        """Drop every segment and start an empty log at `offset` (a replica whose
        whole log lies below its leader's log start)."""
        self.flush_index()
        self._index.delete_offsets(self.storage_id, from_offset=0)
        self._index.delete_times(self.storage_id, from_offset=0)
        for segment in self._segments:
            segment.delete()
        segment = Segment(self.directory, offset, create=True, map_capacity_bytes=self._map_capacity())
        self._segments, self._segment_bases = [segment], [offset]
        fsync_directory(self.directory)
        self._log_start_offset = self._log_end_offset = self._high_watermark = offset
        self._recovery_point = self._on_disk_offset = offset
        self._state_dirty = True
        self._reset_tail_state(0)
        self.flush_index()

    def enforce_retention(self, now_ms: int | None = None) -> int:
        """Delete the oldest whole segments past retention.bytes or retention.ms.

        Never the active segment, never data at or above the high watermark.
        Returns how many segments were deleted. A replicated log decides here
        but does not delete: `on_retention(offset)` (its replica) replicates
        the decision, and every replica deletes when it commits (delete_below),
        so log start offsets never depend on one replica's clock.
        """
        point = self.retention_point(now_ms)
        if point <= self.log_start_offset:
            return 0
        if self.on_retention is not None:
            self.on_retention(point)
            return 0
        return self.delete_below(point)

    def retention_point(self, now_ms: int | None = None) -> int:
        """The base offset of the first segment retention keeps."""
        now_ms = int(time.time() * 1000) if now_ms is None else now_ms
        if not cleaner.is_deleting(self._config):
            return self._segments[0].base_offset   # cleanup.policy=compact alone: nothing expires
        total = self.size_bytes
        k = 0
        while k + 1 < len(self._segments) and self._segments[k + 1].base_offset <= self._high_watermark:
            first = self._segments[k]
            over_bytes = 0 <= self._config.retention_bytes <= total - first.size_bytes
            over_age = (self._config.retention_ms >= 0
                        and _segment_timestamp(first) < now_ms - self._config.retention_ms)
            if not (over_bytes or over_age):
                break
            total -= first.size_bytes
            k += 1
        return self._segments[k].base_offset

    def delete_below(self, offset: int) -> int:
        """Move the log start offset up to `offset` (never down, never past the
        high watermark) and delete every whole segment below it (never the
        active one); how many segments went. Retention passes a segment's
        base offset, DeleteRecords any offset."""
        start = min(offset, self._high_watermark)
        if start > self._log_start_offset:
            self._log_start_offset = start
            self._state_dirty = True
            self.flush_index()    # recorded before the segments below it go
        deleted = self._delete_segments_below_log_start()
        self._check_offsets()
        return deleted

    def _delete_segments_below_log_start(self) -> int:
        deleted = 0
        while len(self._segments) > 1 and self._segments[1].base_offset <= self._log_start_offset:
            self._segments[0].delete()
            del self._segments[0], self._segment_bases[0]
            deleted += 1
        if deleted:
            self.flush_index()
            first_base = self._segments[0].base_offset   # the rest of its segment is still indexed
            self._index.delete_offsets(self.storage_id, below=first_base)
            self._index.delete_times(self.storage_id, below=first_base)
        return deleted

    def _check_offsets(self) -> None:
        if not self._segments[0].base_offset <= self._log_start_offset <= self._high_watermark \
                <= self._log_end_offset:
            raise AssertionError(f"{self.name}: offsets out of order: first segment {self._segments[0].base_offset}, "
                                 f"log start {self._log_start_offset}, high watermark {self._high_watermark}, "
                                 f"log end {self._log_end_offset}")

    # ---- compaction (the log cleaner, cleaner.py) --------------------

    def compact(self, now_ms: int | None = None) -> CleanPlan | None:
        """If cleanup.policy has `compact` and a clean is due at `now_ms`
        (default: the wall clock), start it and return its plan. A
        replicated log only decides: `on_compaction(plan)` (its replica's
        leader) replicates the plan, and every replica starts it when it
        commits (start_clean), so what goes never depends on one replica's clock."""
        now_ms = int(time.time() * 1000) if now_ms is None else now_ms
        clean_plan = cleaner.plan(self, now_ms, self._cleaned_to, self._tombstone_end(now_ms))
        if clean_plan is None:
            return None
        if self.on_compaction is not None and not self.on_compaction(clean_plan):
            return None
        self._decided_ms.setdefault(clean_plan.end_offset, now_ms)
        if self.on_compaction is None:
            self.start_clean(clean_plan)
        return clean_plan

    def _tombstone_end(self, now_ms: int) -> int:
        """The end of the newest clean decided here delete.retention.ms or
        more before `now_ms` and installed: tombstones below it were kept
        that long after a clean saw them (0 if there is none: none go)."""
        old_enough = [end for decided_ms, end in self._clean_history
                      if decided_ms <= now_ms - self._config.delete_retention_ms]
        return max(old_enough, default=0)

    @property
    def cleaning(self) -> bool:
        return self._clean_job is not None

    def start_clean(self, clean_plan: CleanPlan) -> None:
        """Clean the sealed segments below the plan's end in the cleaner
        thread (after the clean running, if one is); finish_clean swaps the
        result in. Only batches wholly below the end and at or above the log
        start are touched, so the end need not be a segment boundary here."""
        if self._clean_job is not None:
            if self._clean_next is None or clean_plan.end_offset >= self._clean_next.end_offset:
                self._clean_next = clean_plan
            return
        sealed = [segment for segment in self._segments[:-1] if segment.base_offset < clean_plan.end_offset
                  and segment.base_offset < self._high_watermark]
        if not sealed:
            return
        views = [segment.view() for segment in sealed]
        sizes = tuple(s.size_bytes for s in sealed)

        def write(k: int, data: memoryview) -> tuple[Path, list[tuple[int, int]]]:
            """In the cleaner thread: a rewritten segment to its own file, synced, and its index entries."""
            entries = self._index_entries(data, sealed[k].base_offset)
            temporary = sealed[k].path.with_name(sealed[k].path.name + CLEANED_SUFFIX)
            _write_synced(temporary, data)
            return temporary, entries
        stop = threading.Event()
        result = _CLEANER.submit(cleaner.clean, views, self._log_start_offset, clean_plan,
                                 self._config.log_cleaner_dedupe_buffer_size,
                                 self._config.log_cleaner_io_max_bytes_per_second, sleep=stop.wait, emit=write,
                                 cancelled=stop.is_set)
        self._clean_job = CleanJob(clean_plan, tuple(sealed), sizes, stop, result)

    def finish_clean(self, wait: bool = False) -> bool:
        """Swap in the segments a finished clean rewrote (`wait`: for it to
        finish); True if a clean was installed. A replica may hold the swap
        back (`may_install_clean`) while its Raft log can still send entries
        of that range; the next call tries again."""
        job = self._clean_job
        if job is None or not (wait or job.result.done()):
            return False
        if self.may_install_clean is not None and not self.may_install_clean(job.plan.end_offset):
            return False
        self._clean_job = None
        installed = False
        try:
            outputs, stats = job.result.result()
        except (StorageError, CorruptRecordError) as error:
            log.error("%s: the clean below offset %d failed, the log stays as it is: %s", self.name,
                      job.plan.end_offset, error)
            for written in self.directory.glob("*" + CLEANED_SUFFIX):
                written.unlink()
        else:
            self._install_cleaned(job, outputs)
            self.last_clean = stats
            self._cleaned_to = max(self._cleaned_to, job.plan.end_offset)
            self._remember_clean(job.plan.end_offset)
            installed = True
        following, self._clean_next = self._clean_next, None
        if following is not None:
            self.start_clean(following)
        return installed

    def _remember_clean(self, end_offset: int) -> None:
        """A clean this log decided is installed: its time bounds later tombstone ends."""
        decided_ms = self._decided_ms.pop(end_offset, None)
        for superseded in [end for end in self._decided_ms if end < end_offset]:
            del self._decided_ms[superseded]
        if decided_ms is None:
            return   # another replica's decision: its leader keeps the time
        self._clean_history.append((decided_ms, end_offset))
        del self._clean_history[:-CLEAN_HISTORY_MAX]

    def clean_now(self, clean_plan: CleanPlan) -> bool:
        """Run a clean to its end on this thread (tests, embedded use)."""
        self.start_clean(clean_plan)
        return self.finish_clean(wait=True)

    def _stop_cleaning(self) -> None:
        """A running clean gives up (its written files are deleted at the next open)."""
        if self._clean_job is not None:
            self._clean_job.stop.set()
            self._clean_job, self._clean_next = None, None

    def _install_cleaned(self, job: CleanJob, outputs: list[tuple[Path, list[tuple[int, int]]] | None]) -> None:
        """Replace each rewritten segment atomically (its new file, written
        and fdatasync'd by the cleaner thread, renamed over the old one, the
        directory fsync'd) and its offset-index entries with the new
        positions. A segment that changed or went since the clean started
        (retention, a log restart) is left as it is."""
        self.flush_index()   # no pending entry may point into a file about to change
        replaced = 0
        for segment, size, output in zip(job.segments, job.sizes, outputs):
            if output is None:
                continue   # nothing removed from it
            temporary, entries = output
            k = next((i for i, held in enumerate(self._segments[:-1]) if held is segment), None)
            if k is None or segment.size_bytes != size:
                temporary.unlink(missing_ok=True)   # gone or changed meanwhile
                continue
            os.replace(temporary, segment.path)
            segment.close()   # views handed out keep the old file's mapping
            self._segments[k] = Segment(self.directory, segment.base_offset, create=False)
            self._index.replace_offsets(self.storage_id, segment.base_offset, self._segments[k + 1].base_offset,
                                        entries)
            replaced += 1
        if replaced:
            fsync_directory(self.directory)
        self._check_offsets()

    def _index_entries(self, data: bytes | memoryview, base_offset: int) -> list[tuple[int, int]]:
        """(offset, position) index entries of a rewritten segment, checking
        it scans whole before it goes to disk (the pair of recovery's check)."""
        state = self._recovery_scan_state(base_offset)
        entries = ffi.new("rk_index_entry[]", len(data) // self._config.index_interval_bytes + 2)
        lib.rk_scan(ffi.from_buffer(data), len(data), state, entries, len(entries))
        if state.error != lib.RK_OK or state.valid_bytes != len(data):
            raise AssertionError(f"{self.name}: the cleaner's rewrite of segment {base_offset} is invalid after "
                                 f"{state.valid_bytes} of {len(data)} bytes (error {state.error})")
        flat = ffi.unpack(ffi.cast("int64_t *", entries), 3 * state.entry_count)
        return list(zip(flat[1::3], flat[0::3]))

    # ---- open and recovery -------------------------------------------

    def _open(self) -> None:
        state = self._index.load_state(self.storage_id)
        for leftover in self.directory.glob("*" + CLEANED_SUFFIX):
            leftover.unlink()   # a clean interrupted before its rename: the original is intact
        bases = list_segment_offsets(self.directory)
        if not bases:
            bases = [0]
            Segment(self.directory, 0, create=True).close()
            fsync_directory(self.directory)
        self._segments = [Segment(self.directory, base, create=False) for base in bases]
        self._segment_bases = list(bases)
        self._log_start_offset = bases[0]
        self._applied_index = state.applied_index
        self._rescan_sealed(state.recovery_point)
        self._recover_active_segment()
        if self._undo_empty_roll(state.log_start_offset):
            self._recover_active_segment()
        self._recovery_point = min(state.recovery_point, self._log_end_offset)
        self._on_disk_offset = self._log_end_offset
        self._log_start_offset = max(self._segments[0].base_offset, min(state.log_start_offset, self._log_end_offset))
        self._high_watermark = max(self.log_start_offset, min(state.high_watermark, self._log_end_offset))
        if self._high_watermark != state.high_watermark:  # recovery lost data under it
            self.recovered_short = True
            self._applied_index = UNKNOWN_APPLIED_INDEX
            self._state_dirty = True
            self.flush_index()
        elif self._applied_index == UNKNOWN_APPLIED_INDEX:
            self.recovered_short = True    # a previous open found it so, and it is not repaired yet
        self._delete_segments_below_log_start()   # a crash after recording the log start may have left them

    def _undo_empty_roll(self, log_start_offset: int) -> bool:
        """An empty newest segment (after recovery) after another one past the
        log start: the batch it was rolled for was lost (a crash or power loss
        before it was on disk). It goes, and appends go on in the segment
        before, as on replicas that never rolled there (see truncate): segment
        files stay identical. True if it went (recover the one before)."""
        if not (len(self._segments) > 1 and self._segments[-1].size_bytes == 0
                and self._segment_bases[-1] > log_start_offset):
            return False
        self._segments.pop().delete()
        self._segment_bases.pop()
        fsync_directory(self.directory)
        return True

    def _rescan_sealed(self, recovery_point: int) -> None:
        """Validate every sealed segment holding offsets at or past `recovery_point`;
        cut the log at the first invalid byte (later segments go)."""
        first = max(0, bisect.bisect_right(self._segment_bases, recovery_point) - 1)
        for k in range(first, len(self._segments) - 1):
            segment = self._segments[k]
            view = segment.view()
            end, next_offset = self._scan_tail(view, 0, segment.base_offset)
            del view
            segment.release_view()
            self._pending_times = []   # running maxima of this segment alone: not the log's
            if end == segment.size_bytes and next_offset == self._segments[k + 1].base_offset:
                continue
            log.warning("%s: sealed segment %s is invalid after %d of %d bytes (offset %d); cutting the log there",
                        self.name, segment.path.name, end, segment.size_bytes, next_offset)
            for doomed in self._segments[k + 1:]:
                doomed.delete()
            del self._segments[k + 1:], self._segment_bases[k + 1:]
            self._index.delete_offsets(self.storage_id, from_offset=next_offset)
            self._index.delete_times(self.storage_id, from_offset=next_offset)
            self._pending_offsets, self._pending_positions, self._pending_times = [], [], []
            if end < segment.size_bytes:
                segment.truncate(end)
            fsync_directory(self.directory)
            return

    def _recover_active_segment(self) -> None:
        active = self._segments[-1]
        active.make_active(self._map_capacity())
        position, offset = self._recovery_start(active)
        self._index.delete_offsets(self.storage_id, from_offset=offset + 1)
        self._index.delete_times(self.storage_id, from_offset=offset + 1)
        last_time = self._index.last_time_entry(self.storage_id)
        self._last_time_entry = last_time[0] if last_time else -1
        self._max_timestamp = max(self._last_time_entry, self._max_timestamp_before(last_time, position))
        view = active.view()
        end, next_offset = self._scan_tail(view, position, offset)
        del view
        if end < active.size_bytes:
            log.warning("%s: truncating %s from %d to %d bytes: invalid data after offset %d",
                        self.name, active.path.name, active.size_bytes, end, next_offset)
            active.truncate(end)
        self._log_end_offset = next_offset
        self.flush_index()

    def _recovery_start(self, active: Segment) -> tuple[int, int]:
        """(position, base offset) of the newest index entry of `active` that points
        at a valid batch; the segment start if none does."""
        view = active.view()
        data = ffi.from_buffer(view)
        candidates = self._index.offset_entries_before(self.storage_id, 2**63 - 1, _RECOVERY_CANDIDATES_MAX)
        for offset, position in candidates:
            if offset < active.base_offset:
                break
            if position >= len(view) or position <= 0:
                continue
            state = self._recovery_scan_state(offset)
            lib.rk_scan(data + position, min(len(view) - position, self._config.max_batch_bytes),
                        state, self._entries, 0)
            if state.batch_count >= 1:
                return position, offset
        return 0, active.base_offset

    def _recovery_scan_state(self, next_offset: int) -> "ffi.CData":
        state = ffi.new("rk_scan_state *")
        state.check_crc = 1
        state.check_offsets = lib.RK_CHECK_COMPACTED   # the cleaner leaves gaps between batches
        state.max_batch_bytes = self._config.max_batch_bytes
        state.index_interval_bytes = self._config.index_interval_bytes
        state.next_offset = next_offset
        state.max_timestamp = -1
        return state

    def _scan_tail(self, view: memoryview, position: int, offset: int) -> tuple[int, int]:
        """Validate from `position` on, re-indexing as appends would; returns
        (end of the valid prefix, next offset)."""
        data = ffi.from_buffer(view)
        state = self._recovery_scan_state(offset)
        state.max_timestamp = self._max_timestamp
        entries = ffi.new("rk_index_entry[]", _RECOVERY_ENTRIES_MAX)
        while position < len(view):
            lib.rk_scan(data + position, len(view) - position, state, entries, len(entries))
            self._remember_entries(entries, state.entry_count, position)
            position += state.valid_bytes
            if state.error != lib.RK_OK or state.valid_bytes == 0:
                break
        self._bytes_since_index = state.bytes_since_index
        self._max_timestamp = state.max_timestamp
        return position, state.next_offset

    def _max_timestamp_before(self, last_time: tuple[int, int] | None, active_position: int) -> int:
        """Running max of batch timestamps before `active_position` of the active
        segment, starting from the newest time-index entry (batches before it are
        covered by its timestamp)."""
        from_offset = last_time[1] if last_time else self.log_start_offset
        first = max(0, bisect.bisect_right(self._segment_bases, from_offset) - 1)
        best = -1
        for segment in self._segments[first:-1]:
            best = max(best, segment.max_timestamp())
        view = self._segments[-1].view()
        best = max(best, lib.rk_max_timestamp(ffi.from_buffer(view), len(view), 0, active_position))
        return best

    def _reset_tail_state(self, end_position: int) -> None:
        """Recompute the index cursor state after the active segment was cut."""
        active = self._segments[-1]
        entry = self._index.offset_floor(self.storage_id, self._log_end_offset - 1)
        indexed_position = entry[1] if entry and entry[0] >= active.base_offset else 0
        self._bytes_since_index = end_position - indexed_position
        last_time = self._index.last_time_entry(self.storage_id)
        self._last_time_entry = last_time[0] if last_time else -1
        self._max_timestamp = max(self._last_time_entry, self._max_timestamp_before(last_time, end_position))

    # ---- lifecycle ---------------------------------------------------

    def close(self) -> None:
        """A clean shutdown: sync the segments (whatever the policy, as Kafka
        does), record the recovery point, commit the index, release files."""
        self._stop_cleaning()
        self.sync(force=True)
        self._advance_recovery_point()
        self.flush_index()
        for segment in self._segments:
            segment.close()

    def power_loss(self) -> None:
        """Keep only the segment bytes known to be on disk (found at open, or
        synced since) and release files, as a power cut would (the
        simulation's `power` fault, which takes a crashed node's page cache
        as written back before it restarts; LMDB keeps what it committed)."""
        point = self._on_disk_offset
        if point < self._log_end_offset:
            k = bisect.bisect_right(self._segment_bases, point) - 1
            segment = self._segments[k]
            view = segment.view()
            position = lib.rk_seek_offset(ffi.from_buffer(view), len(view), 0, point) if point > segment.base_offset else 0
            del view
            segment.release_view()
            segment.truncate(position)
            for doomed in self._segments[k + 1:]:
                doomed.delete()
        self.abandon()

    def abandon(self) -> None:
        """Release files without committing anything: what a crash leaves behind."""
        self._stop_cleaning()
        for segment in self._segments:
            segment.close()


def _holds_records(buffer: memoryview) -> bool:
    """Any record in these batches (the first batch's count decides at once unless the cleaner emptied it)."""
    if len(buffer) < layout.HEADER_SIZE:
        return True   # nothing to skip
    if int.from_bytes(buffer[layout.RECORD_COUNT_OFF:layout.RECORD_COUNT_OFF + 4], "big", signed=True) > 0:
        return True
    return lib.rk_record_total(ffi.from_buffer(buffer), len(buffer)) > 0


def _write_synced(path: Path, data: bytes | memoryview) -> None:
    """Write a new file and fdatasync it (before it is renamed into place)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fdatasync(fd)
        finally:
            os.close(fd)
    except OSError as exc:
        raise StorageError(f"cannot write cleaned segment {path}: {exc.strerror}") from exc


def _max_timestamp_of_first(batches: bytes | bytearray | memoryview) -> int:
    return int.from_bytes(memoryview(batches)[layout.MAX_TIMESTAMP_OFF:layout.MAX_TIMESTAMP_OFF + 8], "big",
                          signed=True)


def _segment_timestamp(segment: Segment) -> int:
    """What retention.ms compares: the newest batch timestamp, else the file mtime."""
    newest = segment.max_timestamp()
    if newest >= 0:
        return newest
    return int(os.stat(segment.path).st_mtime * 1000)
