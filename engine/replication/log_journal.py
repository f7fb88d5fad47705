"""LogJournal: a partition's Raft log *is* its segment files (one durable log).

pysyncobj reads and writes its Raft log through the Journal interface; for a
partition group that interface is served here, from the PartitionLog, so
every acknowledged byte is written once per replica instead of twice
(journal, then segment at apply). A Raft entry is the record batches it
carries, appended to the segments when the entry is added to the log (not
when it commits), with their baseOffset and partitionLeaderEpoch (= the
entry's term) written in; commit only moves the high watermark, and
applying an entry writes nothing.

What maps Raft indexes to offsets is the entries file,
`<partition dir>/raft.entries`: a header (magic, format version) and one
fixed-size record per entry, `raft index | term | base offset | next
offset | control | clean end | clean tombstone end | crc32c`. Entries that carry no batches take no offset:
their base and next offsets are equal, so consumers never see them and
offsets stay dense. Those are pysyncobj's no-op at the start of each term
(control -1) and the leader's log start decisions (retention, DeleteRecords:
`0x13 | new log start offset`, control = that offset), and its log cleaner
plans (`0x14 | end offset | tombstone end offset`, in the clean fields;
engine/storage/cleaner.py), which every replica carries out when the entry
commits. The file is written
with the segment and synced with it (one group commit covers both), and on
open the two are reconciled: records that are torn or point past the
segments' valid end are cut, and segment bytes past the last recorded entry
(never acknowledged: an acknowledgement needs both synced) are truncated.

Truncating an uncommitted suffix (Raft log repair) truncates the segments;
compaction (a checkpoint) only drops records from the front of the entries
file, the data stays until retention deletes it. A checkpoint's boundary
entries are stored as markers (`0x1F | base offset | next offset`), so a
follower installing one records where those entries' data lies without
writing any: the replica fetches what it lacks from the leader (catch-up).

Durability is DiskJournal's (raft/journal.py): with `fsync`, `durable_index`
is the last entry whose bytes, segment and entries file both, were
fdatasync'd by a completed sync job, and the group acknowledges nothing
past it. A completed job also moves the partition's recovery point.
"""
from __future__ import annotations

import logging
import os
import struct
from pathlib import Path
from typing import Any, Callable

from raftka.native import crc32c
from raftka.native.files import fsync_directory
from raftka.raft.journal import CommandCache, EntryRange, RaftStateJournal, SyncJob
from raftka.raft.pysyncobj_adapter import NO_OP_ENTRY, ForeignCommandError
from raftka.raft.votes import VoteStore
from raftka.storage.partition_log import PartitionLog

log = logging.getLogger(__name__)

ENTRIES_FILE = "raft.entries"
MAGIC = b"RKRE"
FORMAT_VERSION = 2                        # bump (and migrate) when the layout below changes
FILE_HEAD = struct.Struct("<4sHH")        # magic, format version, reserved
# raft index, term, base offset, next offset, control, clean end, clean tombstone end, crc32c of the rest
RECORD = struct.Struct("<QQqqqqqI")
RECORD_BODY = struct.Struct("<QQqqqqq")
RECORD_V1 = struct.Struct("<QQqqqI")      # format 1: no clean fields (migrated on open)
RECORD_BODY_V1 = struct.Struct("<QQqqq")
APPEND_COMMAND = 0x10
APPEND_HEADER = struct.Struct(">Bi")      # command type, leader epoch
MULTI_APPEND_COMMAND = 0x11
MULTI_APPEND_HEADER = struct.Struct(">BiI")
PART_SIZE = struct.Struct(">I")
LOG_START_COMMAND = 0x13                  # the leader's retention or DeleteRecords decision: the new log start
LOG_START = struct.Struct(">Bq")
NO_CONTROL = -1
CLEAN_COMMAND = 0x14                      # the leader's log cleaner plan: clean below an offset
CLEAN = struct.Struct(">Bqq")             # command type, end offset, tombstone end offset
NO_CLEAN = (-1, 0)                        # the clean fields of an entry that is not a clean plan
MARKER_COMMAND = 0x1F                     # a checkpoint's boundary entry: where its data lies
MARKER = struct.Struct(">Bqq")
DEFAULT_CACHE_BYTES = 32 * 1024 * 1024
REWRITE_DEAD_RECORDS = 4096               # compaction rewrites the entries file past this many dropped records

# (raft index, term, base offset, next offset, control, clean end, clean tombstone end)
Slot = tuple[int, int, int, int, int, int, int]


class JournalFormatError(Exception):
    """The entries file is of another format version, or the data directory
    holds a Raft journal of an older Raftka."""


def marker(base_offset: int, next_offset: int) -> bytes:
    return MARKER.pack(MARKER_COMMAND, base_offset, next_offset)


def log_start_command(offset: int) -> bytes:
    return LOG_START.pack(LOG_START_COMMAND, offset)


def clean_command(end_offset: int, tombstone_end_offset: int) -> bytes:
    return CLEAN.pack(CLEAN_COMMAND, end_offset, tombstone_end_offset)


def is_marker(command: Any) -> bool:
    """A checkpoint's boundary entry (only ever added from a checkpoint, never from a peer)."""
    return len(command) == MARKER.size and command[0] == MARKER_COMMAND


def append_parts(command: Any) -> list[memoryview] | None:
    """The record batch sets an append command carries, one per part (None if
    the command is not an append)."""
    view = memoryview(command)
    kind = view[0] if len(view) else None
    if kind == APPEND_COMMAND and len(view) > APPEND_HEADER.size:
        return [view[APPEND_HEADER.size:]]
    if kind != MULTI_APPEND_COMMAND or len(view) < MULTI_APPEND_HEADER.size:
        return None
    _, _, count = MULTI_APPEND_HEADER.unpack_from(view)
    position = MULTI_APPEND_HEADER.size + PART_SIZE.size * count
    if count == 0 or position > len(view):
        return None
    sizes = struct.unpack_from(f">{count}I", view, MULTI_APPEND_HEADER.size)
    if position + sum(sizes) != len(view) or 0 in sizes:
        return None
    parts = []
    for size in sizes:
        parts.append(view[position:position + size])
        position += size
    return parts


class LogJournal(RaftStateJournal):
    """pysyncobj's Raft log for a partition group, served from its segment files."""

    def __init__(self, directory: Path, partition_log: PartitionLog, fsync: bool = False,
                 persist_vote: bool = True, vote_store: "VoteStore | None" = None, group_id: int = 0,
                 accepts: "Callable[[bytes], bool] | None" = None,
                 cache_bytes: int = DEFAULT_CACHE_BYTES) -> None:
        super().__init__(directory, persist_vote, vote_store, group_id)
        if any(self.directory.glob("*.log")):
            raise JournalFormatError(f"{self.directory} holds a Raft journal of an older Raftka (entries kept "
                                     f"apart from the segments); this version cannot read it: start from an "
                                     f"empty data directory")
        self.log = partition_log
        self.fsync = fsync
        self.accepts = accepts
        self.cache_bytes = cache_bytes
        self.on_added: Callable[[list[memoryview], list[int]], None] | None = None   # producer state
        self.on_truncated: Callable[[], None] | None = None
        self._slots: list[Slot] = []
        self._cache = CommandCache(cache_bytes)
        self._outcomes: dict[int, Any] = {}     # raft index -> base offset(s) of its parts, until applied
        self._path = partition_log.directory / ENTRIES_FILE
        self._file_first = 1                    # raft index of the file's first record
        self._file_bytes = 0
        self._synced_bytes = 0                  # entries file bytes a power loss keeps
        self._dirty = False
        self._sync_in_flight = False
        self._generation = 0
        self._fd = -1
        self._open_entries()
        self._durable_index = self._slots[-1][0] if self._slots else 0
        partition_log.on_sync = self._sync_entries   # fsync=interval, clean closes: the entries file goes too

    # ---- pysyncobj's Journal interface ---------------------------------

    def add(self, command: Any, idx: int, term: int) -> None:
        if self.accepts is not None and not self.accepts(command) and not is_marker(command):
            raise ForeignCommandError(self.group_id, command, f"journal add at index {idx}")
        if self._slots and idx != self._slots[-1][0] + 1:
            raise AssertionError(f"journal index {idx} does not follow {self._slots[-1][0]}")
        log_ = self.log
        base = log_.log_end_offset
        outcome: Any = None
        if command == NO_OP_ENTRY:
            slot = (idx, term, base, base, NO_CONTROL, *NO_CLEAN)
        elif is_marker(command):
            _, base, next_offset = MARKER.unpack(bytes(command))
            slot = (idx, term, base, next_offset, NO_CONTROL, *NO_CLEAN)
        elif len(command) == LOG_START.size and command[0] == LOG_START_COMMAND:
            slot = (idx, term, base, base, LOG_START.unpack(bytes(command))[1], *NO_CLEAN)
        elif len(command) == CLEAN.size and command[0] == CLEAN_COMMAND:
            _, end_offset, tombstone_end = CLEAN.unpack(bytes(command))
            slot = (idx, term, base, base, NO_CONTROL, end_offset, tombstone_end)
        else:
            parts = append_parts(command)
            if parts is None:
                raise ForeignCommandError(self.group_id, command, f"journal add at index {idx} (malformed)")
            bases = []
            try:
                for part in parts:
                    bases.append(log_.append(part, leader_epoch=term).base_offset)
            except BaseException:
                if log_.log_end_offset > base:
                    log_.truncate(base)
                raise
            outcome = bases if command[0] == MULTI_APPEND_COMMAND else bases[0]
            slot = (idx, term, base, log_.log_end_offset, NO_CONTROL, *NO_CLEAN)
            if self.on_added is not None:
                self.on_added(parts, bases)
        self._write_record(slot)
        self._slots.append(slot)
        if outcome is not None:
            self._outcomes[idx] = outcome
        if slot[2] != slot[3] or command == NO_OP_ENTRY:
            self._cache.remember(idx, command)   # markers are not: their data is read back when needed

    def clear(self) -> None:
        """Forget every entry (a checkpoint replaces the log); the data stays."""
        self._slots = []
        self._forget_from(0)
        self._outcomes.clear()
        self._rewrite_entries([])
        self._removed_from_end()

    def deleteEntriesFrom(self, entryFrom: int) -> None:
        """Drop entries [entryFrom, end): a follower's conflicting suffix, data included."""
        if entryFrom >= len(self._slots):
            return
        index, base = self._slots[entryFrom][0], self._slots[entryFrom][2]
        del self._slots[entryFrom:]
        self._forget_from(index)
        for stale in [i for i in self._outcomes if i >= index]:
            del self._outcomes[stale]
        if base < self.log.log_end_offset:
            self.log.truncate(base)
        self._file_bytes = FILE_HEAD.size + (index - self._file_first) * RECORD.size
        os.ftruncate(self._fd, self._file_bytes)
        self._synced_bytes = min(self._synced_bytes, self._file_bytes)
        self._removed_from_end()
        if self.on_truncated is not None:
            self.on_truncated()

    def deleteEntriesTo(self, entryTo: int) -> None:
        """Drop entries [0, entryTo) (compaction): records only; the data stays."""
        if entryTo <= 0:
            return
        del self._slots[:entryTo]
        first_kept = self._slots[0][0] if self._slots else None
        self._cache.forget_below(first_kept)
        if first_kept is not None and first_kept - self._file_first > REWRITE_DEAD_RECORDS:
            if self.fsync:
                fsync_directory(self.directory.parent)   # the checkpoint's rename comes first
            self._rewrite_entries(self._slots)

    def __getitem__(self, item: int | slice) -> Any:
        if isinstance(item, slice):
            return EntryRange(lambda p: self._entry(self._slots[p]), range(*item.indices(len(self._slots))))
        return self._entry(self._slots[item])

    def __len__(self) -> int:
        return len(self._slots)

    # ---- ours ------------------------------------------------------------

    def first_index(self) -> int:
        return self._slots[0][0]

    def last_index(self) -> int:
        return self._slots[-1][0]

    def term_at(self, index: int) -> int | None:
        """Term of the entry at raft `index`, None if not held."""
        slot = self.slot(index)
        return slot[1] if slot is not None else None

    def slot(self, index: int) -> tuple[int, int, int, int, int] | None:
        """(index, term, base offset, next offset, control) of the entry at raft `index`, None if not held."""
        held = self._held(index)
        return None if held is None else held[:5]

    def clean_at(self, index: int) -> tuple[int, int] | None:
        """(end offset, tombstone end offset) of the clean plan at raft `index`, None if that is not one."""
        held = self._held(index)
        return None if held is None or held[5] == NO_CLEAN[0] else (held[5], held[6])

    def _held(self, index: int) -> Slot | None:
        if not self._slots:
            return None
        position = index - self._slots[0][0]
        if not 0 <= position < len(self._slots):
            return None
        return self._slots[position]

    def pop_outcome(self, index: int) -> Any:
        """The base offset(s) the entry's parts got here, once (the apply's answer)."""
        return self._outcomes.pop(index, None)

    @property
    def size_bytes(self) -> int:
        """Bytes of Raft log held since the first entry (the data lives in the segments)."""
        if not self._slots:
            return 0
        return max(0, self._slots[-1][3] - self._slots[0][2])

    # ---- durability (as DiskJournal's) ------------------------------------

    @property
    def durable_index(self) -> int:
        last = self._slots[-1][0] if self._slots else 0
        return min(self._durable_index, last) if self.fsync else last

    @property
    def needs_sync(self) -> bool:
        """Written since the last sync job, no job in flight, and acknowledgements wait for syncs."""
        return self.fsync and self._dirty and not self._sync_in_flight

    def sync_job(self) -> SyncJob | None:
        """The group commit of everything written so far (None if not needed,
        or one is in flight); run it anywhere, then `complete` it here."""
        return self._make_job() if self.needs_sync else None

    def _make_job(self) -> SyncJob:
        fds = [os.dup(self._fd)]
        segment_fd = self.log.active_fd()
        if segment_fd is not None:
            fds.append(os.dup(segment_fd))
        job = SyncJob(fds, None, self._slots[-1][0] if self._slots else 0, self._generation,
                      covered=(self.log.log_end_offset, self._file_bytes))   # segment offset, entries-file bytes
        self._dirty, self._sync_in_flight = False, True
        return job

    def complete(self, job: SyncJob) -> None:
        self._sync_in_flight = False
        if job.generation == self._generation:
            self._durable_index = max(self._durable_index, job.target_index)
            log_offset, entries_bytes = job.covered
            self._synced_bytes = max(self._synced_bytes, min(entries_bytes, self._file_bytes))
            self.log.synced_to(log_offset)

    def abort(self, job: SyncJob) -> None:
        self._sync_in_flight = False

    def sync(self) -> None:
        """A group commit now, on this thread."""
        job = self._make_job()
        job.run()
        self.complete(job)

    @property
    def unsynced_bytes(self) -> int:
        """Entries-file bytes a power loss would take now."""
        return self._file_bytes - self._synced_bytes

    def power_loss(self) -> None:
        """Keep only what was fdatasync'd and close (the simulation's `power` fault)."""
        if self._synced_bytes < self._file_bytes:
            os.ftruncate(self._fd, self._synced_bytes)
        self.abandon()

    def abandon(self) -> None:
        """Close without saving anything, as a killed process would."""
        self._meta_dirty = False
        self._close()

    def close(self) -> None:
        self._save_meta_hint()
        self._sync_entries()
        self._close()

    def _sync_entries(self) -> None:
        """fdatasync the entries file (the log synced its segments)."""
        if self._fd >= 0 and self._synced_bytes < self._file_bytes:
            os.fdatasync(self._fd)
            self._synced_bytes = self._file_bytes

    def _close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        self._slots = []
        self._forget_from(0)

    # ---- the entries file ----------------------------------------------------

    def _open_entries(self) -> None:
        if not self._path.exists():
            self._rewrite_entries([])
            self._truncate_log_to_entries()
            return
        self._fd = os.open(self._path, os.O_RDWR | os.O_CLOEXEC)
        data = _read_all(self._fd)
        if len(data) < FILE_HEAD.size:
            self._rewrite_entries([])     # torn at creation: nothing was ever recorded in it
            self._truncate_log_to_entries()
            return
        magic, version, _ = FILE_HEAD.unpack_from(data)
        if magic != MAGIC or version not in (1, FORMAT_VERSION):
            raise JournalFormatError(f"{self._path}: not a Raftka entries file of format {FORMAT_VERSION} "
                                     f"(magic {magic!r}, format {version})")
        record, body = (RECORD, RECORD_BODY) if version == FORMAT_VERSION else (RECORD_V1, RECORD_BODY_V1)
        log_end = self.log.log_end_offset
        position = FILE_HEAD.size
        while position + record.size <= len(data):
            *fields, crc = record.unpack_from(data, position)
            if crc != crc32c(data[position:position + body.size]):
                break
            index, term, base, next_offset, control, *clean = fields
            clean_fields = tuple(clean) if clean else NO_CLEAN
            if self._slots:
                previous = self._slots[-1]
                if index != previous[0] + 1 or base != previous[3]:
                    break
            if not base <= next_offset <= log_end:
                break   # its data did not survive (a power loss took unsynced segment bytes)
            if not self._slots:
                self._file_first = index
            self._slots.append((index, term, base, next_offset, control, *clean_fields))
            position += record.size
        if version != FORMAT_VERSION:
            log.info("%s: entries file migrated from format %d to %d", self.log.name, version, FORMAT_VERSION)
            self._rewrite_entries(self._slots)
            self._truncate_log_to_entries()
            return
        if position < len(data):
            log.warning("%s: entries file cut at byte %d of %d (torn, or its data was lost)", self.log.name,
                        position, len(data))
            os.ftruncate(self._fd, position)
        self._file_bytes = self._synced_bytes = position
        if not self._slots:
            self._file_first = 1
        self._truncate_log_to_entries()

    def _truncate_log_to_entries(self) -> None:
        """Segment bytes past the last recorded entry were never acknowledged: cut them."""
        end = self._slots[-1][3] if self._slots else self.log.log_start_offset
        if self.log.log_end_offset > end >= self.log.log_start_offset:
            log.warning("%s: cutting segment data past the last Raft entry (offset %d to %d)", self.log.name,
                        end, self.log.log_end_offset)
            self.log.truncate(end)

    def _write_record(self, slot: Slot) -> None:
        body = RECORD_BODY.pack(*slot)
        record = body + struct.pack("<I", crc32c(body))
        if not self._slots:
            self._file_first = slot[0]
            self._file_bytes = FILE_HEAD.size
        written = os.pwrite(self._fd, record, self._file_bytes)
        if written != RECORD.size:
            os.ftruncate(self._fd, self._file_bytes)
            raise OSError(f"short write to {self._path} at byte {self._file_bytes}")
        self._file_bytes += RECORD.size
        self._dirty = True

    def _rewrite_entries(self, slots: list[Slot]) -> None:
        """Replace the entries file by one holding `slots` (atomically: temporary
        file, fdatasync, rename, directory fsync)."""
        temporary = self._path.with_name(ENTRIES_FILE + ".tmp")
        out = bytearray(FILE_HEAD.pack(MAGIC, FORMAT_VERSION, 0))
        for slot in slots:
            body = RECORD_BODY.pack(*slot)
            out += body + struct.pack("<I", crc32c(body))
        fd = os.open(temporary, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        try:
            os.write(fd, out)
            os.fdatasync(fd)
        except BaseException:
            os.close(fd)
            raise
        os.replace(temporary, self._path)
        fsync_directory(self._path.parent)
        if self._fd >= 0:
            os.close(self._fd)
        self._fd = fd
        self._file_first = slots[0][0] if slots else 1
        self._file_bytes = self._synced_bytes = len(out)

    # ---- commands --------------------------------------------------------------

    def _entry(self, slot: Slot) -> tuple[Any, int, int]:
        index, term, base, next_offset, control, clean_end, clean_tombstones = slot
        command = self._cache.get(index)
        if command is None:
            if clean_end != NO_CLEAN[0]:
                command = clean_command(clean_end, clean_tombstones)
            elif control != NO_CONTROL:
                command = log_start_command(control)
            elif base == next_offset:
                command = NO_OP_ENTRY
            else:
                command = APPEND_HEADER.pack(APPEND_COMMAND, term) + self.log.read_range(base, next_offset)
                if slot is self._slots[0]:
                    self._cache.remember_first(index, command)
        return command, index, term

    def _forget_from(self, index: int) -> None:
        self._cache.forget_from(index)

    def _removed_from_end(self) -> None:
        self._generation += 1
        last = self._slots[-1][0] if self._slots else 0
        self._durable_index = min(self._durable_index, last)


def _read_all(fd: int) -> bytes:
    size = os.fstat(fd).st_size
    return os.pread(fd, size, 0) if size else b""


class LogJournalPath(str):
    """A journalFile value that makes pysyncobj open a LogJournal on `partition_log`
    (the adapter's journal factory calls `open_journal`)."""

    def __new__(cls, directory: Path, partition_log: PartitionLog, **options: Any) -> "LogJournalPath":
        value = super().__new__(cls, str(directory))
        value.partition_log = partition_log
        value.options = options
        return value

    def open_journal(self) -> LogJournal:
        return LogJournal(Path(self), self.partition_log, **self.options)
