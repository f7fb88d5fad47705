"""DiskJournal: a partition group's Raft log (pysyncobj's Journal interface) kept
on disk, so memory does not grow with the data replicated.

pysyncobj's FileJournal keeps every entry in RAM, rewrites the whole file on
compaction, caps the file at 4 GiB and never fsyncs. Here only a small index
per entry (index, term, file, position, size) lives in memory, plus a bounded
cache of recent commands, which are the ones the leader sends right after
adding them.

On-disk format, in directory `<group>.journal/`:
- `meta`: JSON {"term", "voted_for", "commit_index"}; replaced atomically.
  currentTerm and votedFor are fsynced before any message that reflects them
  leaves (Raft §5: a restarted node must never vote twice in a term).
- `<first index, 20 digits>.log`: records, each
    u32 command size | u32 crc32c(command) | u64 raft index | u64 term | command
  little-endian, indexes consecutive across files. Files roll at
  `segment_bytes`; compaction (deleteEntriesTo) deletes whole files below the
  new first entry, so it costs no rewrite.
- Recovery reads headers only (and checks each command's CRC): the first
  short, torn or non-consecutive record ends the journal, and the file is
  cut there. A whole record whose command is not of a type its group
  declares (`accepts`) is refused: ForeignCommandError, the group does not
  start. `add` refuses such a command too.

Durability of entries follows `fsync`. With True (the broker's default,
`fsync=always`) an entry counts as the replica's only once it is
fdatasync'd: `durable_index` says how far that is, the group holds its
acknowledgements (a follower's next_node_idx, the leader's own vote in the
commit count) below it, and the syncs are group commits run off the event
loop (`sync_job()`: every file written since the last job, one fdatasync
each, the directory too when a file was created; one job in flight at a
time, so appends made meanwhile share the next). With False (`fsync=never`)
`durable_index` is the last index: acknowledged from the page cache, which
survives a process crash but not a power loss.
"""
from __future__ import annotations

import json
import logging
import os
import struct
import threading
from collections import OrderedDict, deque
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from raftka.native import crc32c
from raftka.native.files import fsync_directory
from raftka.raft.pysyncobj_adapter import AdaptedJournal, ForeignCommandError
from raftka.raft.votes import VoteStore

log = logging.getLogger(__name__)

RECORD_HEADER = struct.Struct("<IIQQ")
DEFAULT_SEGMENT_BYTES = 16 * 1024 * 1024
DEFAULT_CACHE_BYTES = 32 * 1024 * 1024
CACHE_KEEP_LAST = 2               # entries a journal keeps cached once applied (release_applied)

Entry = tuple[bytes, int, int]  # (command, raft index, term), pysyncobj's shape


class JournalCorruptError(Exception):
    """The journal's meta file cannot be read; refusing to start without our vote."""


class _Slot:
    """Where one entry lives. Invariant: slots are consecutive in raft index."""

    __slots__ = ("index", "term", "segment", "position", "size")

    def __init__(self, index: int, term: int, segment: "_Segment", position: int, size: int) -> None:
        self.index, self.term, self.segment, self.position, self.size = index, term, segment, position, size


class _Segment:
    def __init__(self, path: Path, first_index: int) -> None:
        self.path = path
        self.first_index = first_index
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        self.size_bytes = os.fstat(self.fd).st_size
        self.synced_bytes = self.size_bytes   # what a power loss keeps (a fresh file: see _writable_segment)

    def close(self) -> None:
        os.close(self.fd)

    def remove(self) -> None:
        """Close and delete. The name goes at once (a new segment may take it);
        the unlink itself, which drops the file's cached pages and can take
        milliseconds for a full segment, runs on the remover thread."""
        self.close()
        doomed = self.path.with_name(self.path.name + ".deleted")
        try:
            os.replace(self.path, doomed)
        except FileNotFoundError:
            return
        _REMOVER.remove(doomed)


class _Remover:
    """One daemon thread that unlinks renamed-away journal files, so the
    event loop never waits for the kernel to drop their pages. Bounded: past
    REMOVER_QUEUE_MAX waiting files the caller unlinks itself."""

    def __init__(self) -> None:
        self._queue: deque[Path] = deque()
        self._ready = threading.Condition()
        self._thread: threading.Thread | None = None

    def remove(self, path: Path) -> None:
        with self._ready:
            if len(self._queue) >= REMOVER_QUEUE_MAX:
                path.unlink(missing_ok=True)
                return
            self._queue.append(path)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="journal-remover", daemon=True)
                self._thread.start()
            self._ready.notify()

    def _run(self) -> None:
        while True:
            with self._ready:
                while not self._queue:
                    self._ready.wait()
                path = self._queue.popleft()
            try:
                path.unlink(missing_ok=True)
            except OSError as error:
                log.warning("cannot delete compacted journal file %s: %s", path, error)


REMOVER_QUEUE_MAX = 1024
_REMOVER = _Remover()


class SyncJob:
    """One group commit of a journal: fdatasync every file written since the
    previous job (and the directory, when a file was created), on any thread.
    It holds descriptors of its own, so a file removed meanwhile is still
    synced or harmlessly closed. The journal's `complete(job)` then, on its
    own thread, moves `durable_index` to `target_index` and records what
    `covered` (the journal's own account of the bytes the job synced) says
    is on disk."""

    def __init__(self, fds: list[int], directory: Path | None, target_index: int, generation: int,
                 covered: Any = None) -> None:
        self.fds = fds
        self.directory = directory
        self.target_index = target_index
        self.generation = generation
        self.covered = covered
        self.sync_calls = 0                # fdatasync/fsync calls made by run()

    def run(self, fdatasync: bool = True) -> None:
        """fdatasync each file, then fsync the directory; raises the first OSError.
        (`fdatasync` False: only release the descriptors; the simulation models
        the disk itself, with power_loss.) raft/syncer.py runs the same calls
        on native threads instead."""
        try:
            if fdatasync:
                for fd in self.fds:
                    os.fdatasync(fd)
                    self.sync_calls += 1
                if self.directory is not None:
                    fsync_directory(self.directory)
                    self.sync_calls += 1
        finally:
            self.release()

    def release(self) -> None:
        """Close the job's descriptors (it is done, or abandoned)."""
        for fd in self.fds:
            os.close(fd)
        self.fds = []


class RaftStateJournal(AdaptedJournal):
    """What every journal keeps besides entries: currentTerm and votedFor
    (durable before any message reflecting them leaves: in the node's
    VoteStore, or else fsynced in the `meta` file) and the commit index (a
    hint), in `<directory>/meta`, JSON, replaced atomically."""

    def __init__(self, directory: Path, persist_vote: bool = True, vote_store: "VoteStore | None" = None,
                 group_id: int = 0) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.persist_vote = persist_vote  # False only in the simulation's deliberate-bug test
        self._meta = self._load_meta()
        self._meta_dirty = False
        # with a node's VoteStore, term and vote are made durable there, many
        # groups per fsync; the meta file keeps them only as a hint
        self.vote_store, self.group_id = vote_store, group_id
        stored = vote_store.get(group_id) if vote_store is not None else None
        if stored is not None and stored[0] >= self._meta["term"]:
            self._meta["term"], self._meta["voted_for"] = stored

    _cache: "CommandCache"   # each journal's recent commands (set by the subclass)

    def release_applied(self, applied_index: int) -> None:
        """Drop the cached commands of entries up to `applied_index`, all but
        the last CACHE_KEEP_LAST entries. RaftGroup calls it after every tick:
        an applied entry was already sent to every follower that keeps up (one
        that does not reads it from the log), so the cache holds the entries
        in flight, plus the last ones, which pysyncobj reads all the time (the
        log's last index, the previous entry's term of the next send). An idle
        or following replica so holds a couple of entries, not up to
        `cache_bytes` each, which a broker with many partitions multiplied."""
        if len(self):
            self._cache.release_below(min(applied_index + 1, self.last_index() + 1 - CACHE_KEEP_LAST))

    def setRaftCommitIndex(self, raftCommitIndex: int) -> None:
        if self._meta["commit_index"] != raftCommitIndex:
            self._meta["commit_index"] = raftCommitIndex
            self._meta_dirty = True

    def getRaftCommitIndex(self) -> int:
        return self._meta["commit_index"]

    def setCurrentTerm(self, term: int, votedForNodeId: Any) -> None:
        self._meta["term"] = term
        self._meta["voted_for"] = votedForNodeId
        if self.vote_store is not None and self.persist_vote:
            self.vote_store.put(self.group_id, term, votedForNodeId)
            self._meta_dirty = True
        else:
            self._store_meta(durable=True)

    def getCurrentTerm(self) -> int:
        return self._meta["term"]

    def getVotedForNodeId(self) -> Any:
        return self._meta["voted_for"]

    def onOneSecondTimer(self) -> None:
        if self._meta_dirty:
            self._store_meta(durable=False)

    def _save_meta_hint(self) -> None:
        """At close: the commit index as a hint (term and vote are durable already)."""
        if self._meta_dirty:
            self._store_meta(durable=False)

    def _load_meta(self) -> dict[str, Any]:
        path = self.directory / "meta"
        if not path.exists():
            return {"term": 0, "voted_for": None, "commit_index": 1}
        try:
            meta = json.loads(path.read_bytes())
            return {"term": int(meta["term"]), "voted_for": meta["voted_for"],
                    "commit_index": int(meta["commit_index"])}
        except (ValueError, KeyError, TypeError) as error:
            raise JournalCorruptError(f"{path}: {error}") from error

    def _store_meta(self, durable: bool) -> None:
        meta = dict(self._meta)
        if not self.persist_vote:
            meta["voted_for"] = None
        path, temporary = self.directory / "meta", self.directory / "meta.tmp"
        with open(temporary, "wb") as file:
            file.write(json.dumps(meta).encode())
            if durable:
                file.flush()
                os.fsync(file.fileno())
        os.replace(temporary, path)
        if durable:
            fsync_directory(self.directory)
        self._meta_dirty = False




class DiskJournal(RaftStateJournal):
    """pysyncobj's Raft log for one group, on disk with a small in-memory index."""

    def __init__(self, directory: Path, fsync: bool = False, segment_bytes: int = DEFAULT_SEGMENT_BYTES,
                 cache_bytes: int = DEFAULT_CACHE_BYTES, persist_vote: bool = True,
                 vote_store: "VoteStore | None" = None, group_id: int = 0,
                 accepts: "Callable[[bytes], bool] | None" = None) -> None:
        """`accepts(command)`: whether a command may be in this group's log (None: any)."""
        super().__init__(directory, persist_vote, vote_store, group_id)
        self.accepts = accepts
        self.fsync = fsync
        self.segment_bytes = segment_bytes
        self.cache_bytes = cache_bytes
        self._slots: list[_Slot] = []
        self._segments: list[_Segment] = []
        self._cache = CommandCache(cache_bytes)
        self._durable_index = 0                 # entries up to here are fdatasync'd (with fsync)
        self._unsynced: dict[int, _Segment] = {}   # id -> segment written since the last sync job
        self._new_file = False                  # a segment file created since the last sync job
        self._sync_in_flight = False
        self._generation = 0                    # bumped when entries are removed from the end
        self._recover()
        self._durable_index = self._slots[-1].index if self._slots else 0   # recovered: on disk as far as we know

    # ---- pysyncobj's Journal interface ---------------------------------

    def add(self, command: bytes, idx: int, term: int) -> None:
        if self.accepts is not None and not self.accepts(command):
            raise ForeignCommandError(self.group_id, command, f"journal add at index {idx}")
        if self._slots and idx != self._slots[-1].index + 1:
            raise AssertionError(f"journal index {idx} does not follow {self._slots[-1].index}")
        segment = self._writable_segment(idx, len(command))
        header = RECORD_HEADER.pack(len(command), crc32c(command), idx, term)
        position = segment.size_bytes
        written = os.pwritev(segment.fd, [header, command], position)
        if written != RECORD_HEADER.size + len(command):
            os.ftruncate(segment.fd, position)
            raise OSError(f"short journal write at {segment.path}:{position}")
        segment.size_bytes += written
        self._unsynced[id(segment)] = segment
        self._slots.append(_Slot(idx, term, segment, position + RECORD_HEADER.size, len(command)))
        self._cache.remember(idx, bytes(command))

    def clear(self) -> None:
        for segment in self._segments:
            self._remove(segment)
        self._segments, self._slots = [], []
        self._forget_from(0)
        self._entries_removed()

    def deleteEntriesFrom(self, entryFrom: int) -> None:
        """Drop entries [entryFrom, end) (a follower's conflicting suffix)."""
        if entryFrom >= len(self._slots):
            return
        cut = self._slots[entryFrom]
        self._forget_from(cut.index)
        del self._slots[entryFrom:]
        while self._segments and self._segments[-1] is not cut.segment:
            self._remove(self._segments.pop())
        cut_position = cut.position - RECORD_HEADER.size
        if cut_position == 0 and len(self._segments) > 1:
            self._remove(self._segments.pop())
        else:
            os.ftruncate(cut.segment.fd, cut_position)
            cut.segment.size_bytes = cut_position
            cut.segment.synced_bytes = min(cut.segment.synced_bytes, cut_position)
        self._entries_removed()

    def deleteEntriesTo(self, entryTo: int) -> None:
        """Drop entries [0, entryTo) (compaction); whole files below go away."""
        if entryTo <= 0:
            return
        if self.fsync:
            fsync_directory(self.directory.parent)   # the checkpoint's rename, before what it replaces goes
        del self._slots[:entryTo]
        first_kept = self._slots[0].segment if self._slots else None
        while self._segments and self._segments[0] is not first_kept and len(self._segments) > 1:
            self._remove(self._segments.pop(0))
        self._cache.forget_below(self._slots[0].index if self._slots else None)

    def __getitem__(self, item: int | slice) -> Any:
        if isinstance(item, slice):
            return EntryRange(lambda p: self._entry(self._slots[p]), range(*item.indices(len(self._slots))))
        return self._entry(self._slots[item])

    def __len__(self) -> int:
        return len(self._slots)

    # ---- ours ------------------------------------------------------------

    def first_index(self) -> int:
        return self._slots[0].index

    # ---- durability (see the module docstring) ----------------------------

    @property
    def durable_index(self) -> int:
        """The last entry this replica may acknowledge: fdatasync'd (with
        `fsync`), else simply held (page cache)."""
        last = self._slots[-1].index if self._slots else 0
        return min(self._durable_index, last) if self.fsync else last

    @property
    def needs_sync(self) -> bool:
        """Written since the last sync job, no job in flight, and acknowledgements wait for syncs."""
        return self.fsync and bool(self._unsynced or self._new_file) and not self._sync_in_flight

    def sync_job(self) -> SyncJob | None:
        """The group commit of everything written so far (None if nothing is,
        or a job is still in flight); run it anywhere, then `complete` it here."""
        return self._make_job() if self.needs_sync else None

    def _make_job(self) -> SyncJob:
        segments = list(self._unsynced.values())
        job = SyncJob([os.dup(segment.fd) for segment in segments], self.directory if self._new_file else None,
                      self._slots[-1].index if self._slots else 0, self._generation,
                      covered=[(segment, segment.size_bytes) for segment in segments])
        self._unsynced, self._new_file, self._sync_in_flight = {}, False, True
        return job

    def complete(self, job: SyncJob) -> None:
        """A job's fdatasyncs returned: what it covered is durable (unless
        entries were removed from the end meanwhile: the next job covers them)."""
        self._sync_in_flight = False
        for segment, size in job.covered:
            segment.synced_bytes = max(segment.synced_bytes, min(size, segment.size_bytes))
        if job.generation == self._generation:
            self._durable_index = max(self._durable_index, job.target_index)

    def abort(self, job: SyncJob) -> None:
        """A job failed: nothing it covered counts as durable."""
        self._sync_in_flight = False

    def _entries_removed(self) -> None:
        self._generation += 1
        last = self._slots[-1].index if self._slots else 0
        self._durable_index = min(self._durable_index, last)

    def power_loss(self) -> None:
        """Keep only what was fdatasync'd and close, as a power cut would
        (the simulation's `power` fault)."""
        for segment in self._segments:
            if segment.synced_bytes < segment.size_bytes:
                os.ftruncate(segment.fd, segment.synced_bytes)
        self.abandon()

    def last_index(self) -> int:
        return self._slots[-1].index

    def term_at(self, index: int) -> int | None:
        """Term of the entry at raft `index`, None if not held (no disk read)."""
        if not self._slots:
            return None
        position = index - self._slots[0].index
        if not 0 <= position < len(self._slots):
            return None
        return self._slots[position].term

    @property
    def size_bytes(self) -> int:
        return sum(segment.size_bytes for segment in self._segments)

    def sync(self) -> None:
        """A group commit of every file now, on this thread (waits for none in flight)."""
        self._unsynced.update((id(segment), segment) for segment in self._segments)
        job = self._make_job()
        job.run()
        self.complete(job)

    def abandon(self) -> None:
        """Close without saving anything, as a killed process would (tests)."""
        self._meta_dirty = False
        self.close()

    def close(self) -> None:
        self._save_meta_hint()
        for segment in self._segments:
            segment.close()
        self._segments, self._slots = [], []
        self._forget_from(0)

    def _entry(self, slot: _Slot) -> Entry:
        command = self._cache.get(slot.index)
        if command is None:
            command = os.pread(slot.segment.fd, slot.size, slot.position)
            if len(command) != slot.size:
                raise OSError(f"journal entry {slot.index} short read from {slot.segment.path}")
            if slot is self._slots[0]:
                self._cache.remember_first(slot.index, command)
        return command, slot.index, slot.term

    def _remove(self, segment: _Segment) -> None:
        """Close and delete a segment; the next sync job has nothing to sync
        in it (its descriptor is closed, and its number may be another file's)."""
        self._unsynced.pop(id(segment), None)
        segment.remove()

    def _forget_from(self, index: int) -> None:
        self._cache.forget_from(index)

    def _writable_segment(self, index: int, command_size: int) -> _Segment:
        if self._segments:
            active = self._segments[-1]
            if active.size_bytes == 0 or active.size_bytes + command_size <= self.segment_bytes:
                return active
        segment = _Segment(self.directory / f"{index:020d}.log", index)
        segment.synced_bytes = 0   # its directory entry is not durable until the next sync job
        self._segments.append(segment)
        self._new_file = True
        return segment

    def _recover(self) -> None:
        for leftover in self.directory.glob("*.log.deleted"):   # compacted away before a crash
            leftover.unlink(missing_ok=True)
        paths = sorted(self.directory.glob("*.log"))
        for number, path in enumerate(paths):
            segment = _Segment(path, int(path.stem))
            self._segments.append(segment)
            if not self._scan(segment):
                for stale in paths[number + 1:]:
                    stale.unlink()
                break
        while self._segments and self._segments[-1].size_bytes == 0 and len(self._segments) > 1:
            self._remove(self._segments.pop())

    def _scan(self, segment: _Segment) -> bool:
        """Index `segment`'s records; cut it at the first bad one. False if cut."""
        position = 0
        while position < segment.size_bytes:
            header = os.pread(segment.fd, RECORD_HEADER.size, position)
            if len(header) < RECORD_HEADER.size:
                break
            size, crc, index, term = RECORD_HEADER.unpack(header)
            end = position + RECORD_HEADER.size + size
            if end > segment.size_bytes or (self._slots and index != self._slots[-1].index + 1):
                break
            command = os.pread(segment.fd, size, position + RECORD_HEADER.size)
            if crc32c(command) != crc:
                break
            if self.accepts is not None and not self.accepts(command):
                raise ForeignCommandError(self.group_id, command,
                                          f"journal {segment.path} record at byte {position} (index {index})")
            self._slots.append(_Slot(index, term, segment, position + RECORD_HEADER.size, size))
            position = end
        if position == segment.size_bytes:
            return True
        os.ftruncate(segment.fd, position)
        segment.size_bytes = position
        return False

class CommandCache:
    """The commands of recent entries, up to `max_bytes`, oldest dropped first:
    the leader sends an entry right after adding it and every replica applies
    it once committed, so this saves those reads; applied entries are dropped
    (`release_below`, from RaftStateJournal.release_applied). Apart from them,
    the command of the log's first entry once the journal read it back
    (`remember_first`): pysyncobj reads entry 0 (for its index) on nearly every
    lookup, long after the cache let it go, and rebuilding it each time copied
    its data from disk."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._commands: OrderedDict[int, Any] = OrderedDict()   # raft index -> command, ascending
        self._bytes = 0
        self._first: tuple[int, Any] | None = None               # (raft index, command) of the log's first entry

    def get(self, index: int) -> Any:
        command = self._commands.get(index)
        if command is None and self._first is not None and self._first[0] == index:
            return self._first[1]
        return command

    @property
    def size_bytes(self) -> int:
        return self._bytes

    def remember(self, index: int, command: Any) -> None:
        if len(command) > self.max_bytes:
            return
        self._commands[index] = command
        self._bytes += len(command)
        while self._bytes > self.max_bytes:
            self._bytes -= len(self._commands.popitem(last=False)[1])

    def remember_first(self, index: int, command: Any) -> None:
        """Keep the command of the log's first entry, just read back from disk."""
        self._first = (index, command)

    def forget_from(self, index: int) -> None:
        """Drop entries at `index` and after (a truncated suffix)."""
        while self._commands:
            stale = next(reversed(self._commands))
            if stale < index:
                break
            self._bytes -= len(self._commands.pop(stale))
        if self._first is not None and self._first[0] >= index:
            self._first = None

    def forget_below(self, index: int | None) -> None:
        """Drop entries below `index` (compacted); every entry when None."""
        self.release_below(index)
        if self._first is not None and (index is None or self._first[0] < index):
            self._first = None

    def release_below(self, index: int | None) -> None:
        """Drop the recent commands below `index` (every one when None); the
        log's first entry, if remembered, stays: it is still in the log."""
        while self._commands:
            oldest = next(iter(self._commands))
            if index is not None and oldest >= index:
                break
            self._bytes -= len(self._commands.pop(oldest))


class EntryRange(Sequence):
    """A slice of a journal whose commands are read only when touched: the
    leader slices from a follower's next index to the end and then stops at
    the batch size, so materialising the slice would read the whole tail.
    `entry(position)` is the journal's entry at a position of its log."""

    def __init__(self, entry: Callable[[int], Any], positions: range) -> None:
        self._entry = entry
        self._positions = positions

    def __len__(self) -> int:
        return len(self._positions)

    def __getitem__(self, item: int | slice) -> Any:
        if isinstance(item, slice):
            return [self._entry(p) for p in self._positions[item]]
        return self._entry(self._positions[item])

    def __iter__(self) -> Iterator[Entry]:
        for position in self._positions:
            yield self._entry(position)


class JournalPath(str):
    """A journalFile value that makes pysyncobj open a DiskJournal (the
    adapter's journal factory patch calls `open_journal`)."""

    def __new__(cls, directory: Path, **options: Any) -> "JournalPath":
        value = super().__new__(cls, str(directory))
        value.options = options
        return value

    def open_journal(self) -> "DiskJournal":
        return DiskJournal(Path(self), **self.options)
