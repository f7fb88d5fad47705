"""VoteStore: the durable currentTerm and votedFor of every Raft group of a
broker, in one file, with one fdatasync per batch.

Raft needs a group's term and vote on disk before any message reflecting
them leaves. Persisting them per group (a file rewritten and fsynced, plus
its directory) costs two fsyncs per vote; when a thousand groups elect at
once that is seconds of stalls, elections time out faster than they finish,
and they never converge. Here a vote is a record appended to a buffer; the
buffer is written and fdatasynced once, right before the peer network
flushes (PeerNetwork.before_flush), so a whole round of elections costs one
fsync and no message gets ahead of the vote it reflects.

File: records `u32 crc32c | u32 group | i64 term | i64 voted_for (-1: none)`,
the crc covering the rest of the record. The latest record of a group wins.
When dead records dominate, the live ones are rewritten to a new file
(fsynced, renamed, directory fsynced).

I/O errors stop the node (as etcd and PostgreSQL do on a failed fsync).
Votes stay pending until their write and fdatasync have both succeeded. If
either fails (or compaction's I/O does), sync() logs a CRITICAL line naming
the file and the error and calls `on_fatal`, which by default ends the
process at once with FATAL_EXIT_CODE; peers then elect another leader. sync()
never returns after a failure, so the frames that rely on the votes are never
sent, and it never retries: after a failed fdatasync the page cache's state
is unknown, so the store refuses every later sync (VoteStoreFailedError).

On open, a damaged record with no valid record after it is a torn last write
(a crash before its fdatasync) and is cut. A damaged record followed by a
valid one is not: every write starts only after the previous one's fdatasync
succeeded, so damage there hit votes that were durable and may have been
acted on, and the store refuses to open (VoteStoreCorruptError, naming the file and offset)
rather than drop the votes after it. The one crash that can also look like
that: a power loss in the middle of a multi-page write may persist a later
page of it and not an earlier one (a hole of zeros, then valid records);
without batch boundaries in the file that cannot be told apart from lost
synced votes, so it too is refused, loudly.
"""
from __future__ import annotations

import logging
import os
import struct
import sys
from pathlib import Path
from typing import Callable, NoReturn

from raftka.native import crc32c

log = logging.getLogger(__name__)

RECORD = struct.Struct(">IIqq")
COMPACT_MIN_BYTES = 1024 * 1024
FATAL_EXIT_CODE = 74   # EX_IOERR: what the default on_fatal exits with


class VoteStoreError(Exception):
    """The vote store cannot vouch for its votes."""


class VoteStoreCorruptError(VoteStoreError):
    """A damaged record with valid records after it: refusing to open, since
    cutting it would silently drop those later, already durable votes."""

    def __init__(self, path: Path, offset: int, next_valid_offset: int) -> None:
        super().__init__(
            f"{path}: damaged vote record at byte offset {offset} followed by a valid one at "
            f"{next_valid_offset}: refusing to start rather than drop the votes after it "
            f"(not a torn last write; restore this broker's Raft state or replace the broker)")
        self.path, self.offset, self.next_valid_offset = path, offset, next_valid_offset


class VoteStoreFailedError(VoteStoreError):
    """Writing or fdatasyncing votes failed; the pending votes are not durable
    and nothing relying on them may be sent. The store accepts no more syncs."""

    def __init__(self, path: Path, error: BaseException) -> None:
        super().__init__(f"{path}: votes not durable, the vote store has failed: {error}")
        self.path, self.error = path, error


def exit_process(error: BaseException) -> NoReturn:
    """The default `on_fatal`: flush logging and end the process at once with
    FATAL_EXIT_CODE (os._exit: no finally blocks, atexit handlers or event
    loop callbacks run, so no frame gets out)."""
    try:
        logging.shutdown()
        for stream in (sys.stderr, sys.stdout):
            if stream is not None:
                stream.flush()
    finally:
        os._exit(FATAL_EXIT_CODE)


class VoteStore:
    """See the module docstring. One per broker; not thread-safe (event loop only)."""

    def __init__(self, path: Path, *,
                 on_fatal: Callable[[BaseException], NoReturn] = exit_process) -> None:
        """Open (or create) the file at `path`; raises VoteStoreCorruptError if
        a damaged record precedes valid ones. `on_fatal(error)` runs when a
        write or fdatasync fails, and must not return (the default ends the
        process); if it does, sync() raises VoteStoreFailedError."""
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._on_fatal = on_fatal
        self._failure: BaseException | None = None
        self._votes: dict[int, tuple[int, int | None]] = {}
        self._pending = bytearray()
        valid_bytes = self._load()
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
        os.ftruncate(self._fd, valid_bytes)
        self._size = valid_bytes
        self.syncs = 0

    def _load(self) -> int:
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return 0
        position = 0
        while position + RECORD.size <= len(data) and _intact(data, position):
            _, group, term, voted_for = RECORD.unpack_from(data, position)
            self._votes[group] = (term, None if voted_for < 0 else voted_for)
            position += RECORD.size
        if position == len(data):
            return position
        # records are only ever appended whole, so any later one starts on this grid
        for later in range(position + RECORD.size, len(data) - RECORD.size + 1, RECORD.size):
            if _intact(data, later):
                raise VoteStoreCorruptError(self.path, position, later)
        log.warning("%s: cut %d damaged or torn bytes at %d (a torn last write)",
                    self.path, len(data) - position, position)
        return position

    def get(self, group_id: int) -> tuple[int, int | None] | None:
        """(term, voted_for) last recorded for the group, None if never."""
        return self._votes.get(group_id)

    def put(self, group_id: int, term: int, voted_for: int | None) -> None:
        """Record a group's term and vote; durable at the next sync()."""
        if self._votes.get(group_id) == (term, voted_for):
            return
        self._votes[group_id] = (term, voted_for)
        self._pending += _record(group_id, term, voted_for)

    def forget(self, group_id: int) -> None:
        """Drop a deleted group's vote (at the next compaction)."""
        self._votes.pop(group_id, None)

    @property
    def pending(self) -> bool:
        """True while some recorded vote is not yet durable (also after a failed sync)."""
        return bool(self._pending)

    def sync(self) -> None:
        """Make every recorded vote durable: one write, one fdatasync. Returns
        only when they are; on an I/O error, calls on_fatal and raises (see
        the module docstring), and once failed, raises VoteStoreFailedError
        without touching the file again."""
        if self._failure is not None:
            raise VoteStoreFailedError(self.path, self._failure)
        if not self._pending:
            return
        data = bytes(self._pending)
        step = "write"
        try:
            _write_all(self._fd, data, self._size)
            step = "fdatasync"
            os.fdatasync(self._fd)
        except OSError as error:
            self._fail(step, error)
        del self._pending[:len(data)]
        self._size += len(data)
        self.syncs += 1
        if self._size > COMPACT_MIN_BYTES and self._size > 4 * RECORD.size * len(self._votes):
            try:
                self._compact()
            except OSError as error:
                self._fail("compaction", error)

    def _fail(self, step: str, error: OSError) -> NoReturn:
        self._failure = error
        log.critical("%s: %s of votes failed: %s; stopping this node so that nothing relying on "
                     "a vote not known to be durable is sent (%d bytes of votes pending)",
                     self.path, step, error, len(self._pending))
        self._on_fatal(error)
        raise VoteStoreFailedError(self.path, error) from error

    def _compact(self) -> None:
        temporary = self.path.with_suffix(".tmp")
        out = b"".join(_record(group, term, voted_for) for group, (term, voted_for) in self._votes.items())
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        try:
            _write_all(fd, out, 0)
            os.fsync(fd)
            os.replace(temporary, self.path)
            directory = os.open(self.path.parent, os.O_RDONLY)
            try:
                os.fsync(directory)
            finally:
                os.close(directory)
        except BaseException:
            os.close(fd)
            raise
        os.close(self._fd)
        self._fd = fd
        self._size = len(out)

    def abandon(self) -> None:
        """Close as a crash would: votes not yet synced are lost, the file keeps what was
        (for the simulation's SIGKILL and power loss; a broker closes with close())."""
        self._pending.clear()
        os.close(self._fd)

    def close(self) -> None:
        """Sync and close; raises like sync() if the votes cannot be made durable."""
        try:
            self.sync()
        finally:
            os.close(self._fd)


def _record(group_id: int, term: int, voted_for: int | None) -> bytes:
    body = RECORD.pack(0, group_id, term, -1 if voted_for is None else voted_for)[4:]
    return struct.pack(">I", crc32c(body)) + body


def _intact(data: bytes, position: int) -> bool:
    """Whether the whole record at `position` of `data` matches its crc."""
    (crc,) = struct.unpack_from(">I", data, position)
    return crc32c(memoryview(data)[position + 4:position + RECORD.size]) == crc


def _write_all(fd: int, data: bytes, offset: int) -> None:
    """Write `data` at `offset` (pwrite: a retry rewrites the same bytes, the
    file position plays no part)."""
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written
