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
A torn or damaged tail is cut on open. When dead records dominate, the live
ones are rewritten to a new file (fsynced, renamed, directory fsynced).
"""
from __future__ import annotations

import logging
import os
import struct
from pathlib import Path

from raftka.native import crc32c

log = logging.getLogger(__name__)

RECORD = struct.Struct(">IIqq")
COMPACT_MIN_BYTES = 1024 * 1024


class VoteStore:
    """See the module docstring. One per broker; not thread-safe (event loop only)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._votes: dict[int, tuple[int, int | None]] = {}
        self._pending = bytearray()
        valid_bytes = self._load()
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
        os.ftruncate(self._fd, valid_bytes)
        os.lseek(self._fd, valid_bytes, os.SEEK_SET)
        self._size = valid_bytes
        self.syncs = 0

    def _load(self) -> int:
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return 0
        position = 0
        while position + RECORD.size <= len(data):
            crc, group, term, voted_for = RECORD.unpack_from(data, position)
            if crc32c(memoryview(data)[position + 4:position + RECORD.size]) != crc:
                break
            self._votes[group] = (term, None if voted_for < 0 else voted_for)
            position += RECORD.size
        if position != len(data):
            log.warning("%s: cut %d damaged or torn bytes at %d", self.path, len(data) - position, position)
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
        return bool(self._pending)

    def sync(self) -> None:
        """Make every recorded vote durable: one write, one fdatasync."""
        if not self._pending:
            return
        data, self._pending = bytes(self._pending), bytearray()
        _write_all(self._fd, data)
        os.fdatasync(self._fd)
        self._size += len(data)
        self.syncs += 1
        if self._size > COMPACT_MIN_BYTES and self._size > 4 * RECORD.size * len(self._votes):
            self._compact()

    def _compact(self) -> None:
        temporary = self.path.with_suffix(".tmp")
        out = b"".join(_record(group, term, voted_for) for group, (term, voted_for) in self._votes.items())
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        try:
            _write_all(fd, out)
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            raise
        os.replace(temporary, self.path)
        directory = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)
        os.close(self._fd)
        self._fd = fd
        self._size = len(out)

    def close(self) -> None:
        self.sync()
        os.close(self._fd)


def _record(group_id: int, term: int, voted_for: int | None) -> bytes:
    body = RECORD.pack(0, group_id, term, -1 if voted_for is None else voted_for)[4:]
    return struct.pack(">I", crc32c(body)) + body


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
