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

Durability of entries follows `fsync`: with False (default, like Kafka
relying on replication) an entry survives a process crash (page cache) but
not a power loss of a majority; with True every add is fsynced before
pysyncobj acknowledges it.
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
from raftka.raft.pysyncobj_adapter import AdaptedJournal, ForeignCommandError
from raftka.raft.votes import VoteStore

log = logging.getLogger(__name__)

RECORD_HEADER = struct.Struct("<IIQQ")
DEFAULT_SEGMENT_BYTES = 16 * 1024 * 1024
DEFAULT_CACHE_BYTES = 32 * 1024 * 1024

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


class DiskJournal(AdaptedJournal):
    """pysyncobj's Raft log for one group, on disk with a small in-memory index."""

    def __init__(self, directory: Path, fsync: bool = False, segment_bytes: int = DEFAULT_SEGMENT_BYTES,
                 cache_bytes: int = DEFAULT_CACHE_BYTES, persist_vote: bool = True,
                 vote_store: "VoteStore | None" = None, group_id: int = 0,
                 accepts: "Callable[[bytes], bool] | None" = None) -> None:
        """`accepts(command)`: whether a command may be in this group's log (None: any)."""
        self.directory = Path(directory)
        self.accepts = accepts
        self.directory.mkdir(parents=True, exist_ok=True)
        self.fsync = fsync
        self.segment_bytes = segment_bytes
        self.cache_bytes = cache_bytes
        self.persist_vote = persist_vote  # False only in the simulation's deliberate-bug test
        self._slots: list[_Slot] = []
        self._segments: list[_Segment] = []
        self._cache: OrderedDict[int, bytes] = OrderedDict()   # raft index -> command, ascending
        self._cached_bytes = 0
        # the first entry's command once read from disk: pysyncobj reads
        # entry 0 (for its index) on every lookup, long after the cache let it go
        self._first_command: tuple[int, bytes] | None = None
        self._meta = self._load_meta()
        self._meta_dirty = False
        # with a node's VoteStore, term and vote are made durable there, many
        # groups per fsync; the meta file keeps them only as a hint
        self.vote_store, self.group_id = vote_store, group_id
        stored = vote_store.get(group_id) if vote_store is not None else None
        if stored is not None and stored[0] >= self._meta["term"]:
            self._meta["term"], self._meta["voted_for"] = stored
        self._recover()

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
        if self.fsync:
            os.fdatasync(segment.fd)
        self._slots.append(_Slot(idx, term, segment, position + RECORD_HEADER.size, len(command)))
        self._remember(idx, bytes(command))

    def clear(self) -> None:
        for segment in self._segments:
            segment.remove()
        self._segments, self._slots = [], []
        self._forget_from(0)

    def deleteEntriesFrom(self, entryFrom: int) -> None:
        """Drop entries [entryFrom, end) (a follower's conflicting suffix)."""
        if entryFrom >= len(self._slots):
            return
        cut = self._slots[entryFrom]
        self._forget_from(cut.index)
        del self._slots[entryFrom:]
        while self._segments and self._segments[-1] is not cut.segment:
            self._segments.pop().remove()
        cut_position = cut.position - RECORD_HEADER.size
        if cut_position == 0 and len(self._segments) > 1:
            self._segments.pop().remove()
        else:
            os.ftruncate(cut.segment.fd, cut_position)
            cut.segment.size_bytes = cut_position

    def deleteEntriesTo(self, entryTo: int) -> None:
        """Drop entries [0, entryTo) (compaction); whole files below go away."""
        if entryTo <= 0:
            return
        del self._slots[:entryTo]
        first_kept = self._slots[0].segment if self._slots else None
        while self._segments and self._segments[0] is not first_kept and len(self._segments) > 1:
            self._segments.pop(0).remove()
        first_kept = self._slots[0].index if self._slots else None
        while self._cache:
            index = next(iter(self._cache))
            if first_kept is not None and index >= first_kept:
                break
            self._cached_bytes -= len(self._cache.pop(index))
        self._first_command = None

    def __getitem__(self, item: int | slice) -> Any:
        if isinstance(item, slice):
            return _EntryRange(self, range(*item.indices(len(self._slots))))
        return self._entry(self._slots[item])

    def __len__(self) -> int:
        return len(self._slots)

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

    # ---- ours ------------------------------------------------------------

    def first_index(self) -> int:
        return self._slots[0].index

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
        for segment in self._segments:
            os.fdatasync(segment.fd)

    def abandon(self) -> None:
        """Close without saving anything, as a killed process would (tests)."""
        self._meta_dirty = False
        self.close()

    def close(self) -> None:
        if self._meta_dirty:
            self._store_meta(durable=False)
        for segment in self._segments:
            segment.close()
        self._segments, self._slots = [], []
        self._forget_from(0)

    def _entry(self, slot: _Slot) -> Entry:
        command = self._cache.get(slot.index)
        if command is None:
            first = self._first_command
            if first is not None and first[0] == slot.index:
                return first[1], slot.index, slot.term
            command = os.pread(slot.segment.fd, slot.size, slot.position)
            if len(command) != slot.size:
                raise OSError(f"journal entry {slot.index} short read from {slot.segment.path}")
            if slot is self._slots[0]:
                self._first_command = (slot.index, command)
        return command, slot.index, slot.term

    def _remember(self, index: int, command: bytes) -> None:
        if len(command) > self.cache_bytes:
            return
        self._cache[index] = command
        self._cached_bytes += len(command)
        while self._cached_bytes > self.cache_bytes:
            self._cached_bytes -= len(self._cache.popitem(last=False)[1])

    def _forget_from(self, index: int) -> None:
        while self._cache:
            stale = next(reversed(self._cache))
            if stale < index:
                break
            self._cached_bytes -= len(self._cache.pop(stale))
        if self._first_command is not None and self._first_command[0] >= index:
            self._first_command = None

    def _writable_segment(self, index: int, command_size: int) -> _Segment:
        if self._segments:
            active = self._segments[-1]
            if active.size_bytes == 0 or active.size_bytes + command_size <= self.segment_bytes:
                return active
            if self.fsync:
                os.fdatasync(active.fd)
        segment = _Segment(self.directory / f"{index:020d}.log", index)
        self._segments.append(segment)
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
            self._segments.pop().remove()

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
            directory_fd = os.open(self.directory, os.O_RDONLY)
            try:
                os.fsync(directory_fd)
            finally:
                os.close(directory_fd)
        self._meta_dirty = False


class _EntryRange(Sequence):
    """A slice of the journal whose commands are read only when touched: the
    leader slices from a follower's next index to the end and then stops at
    the batch size, so materialising the slice would read the whole tail."""

    def __init__(self, journal: DiskJournal, positions: range) -> None:
        self._journal = journal
        self._positions = positions

    def __len__(self) -> int:
        return len(self._positions)

    def __getitem__(self, item: int | slice) -> Any:
        if isinstance(item, slice):
            return [self._journal._entry(self._journal._slots[p]) for p in self._positions[item]]
        return self._journal._entry(self._journal._slots[self._positions[item]])

    def __iter__(self) -> Iterator[Entry]:
        for position in self._positions:
            yield self._journal._entry(self._journal._slots[position])


class JournalPath(str):
    """A journalFile value that makes pysyncobj open a DiskJournal (the
    adapter's journal factory patch calls `open_journal`)."""

    def __new__(cls, directory: Path, **options: Any) -> "JournalPath":
        value = super().__new__(cls, str(directory))
        value.options = options
        return value

    def open_journal(self) -> "DiskJournal":
        return DiskJournal(Path(self), **self.options)
