"""One segment file of a partition log.

On-disk format: `<data>/<topic>-<partition>/<base_offset:020d>.log` holds Kafka
v2 record batches back to back, exactly as they are served to consumers, with
their final baseOffset and partitionLeaderEpoch written in. No other framing:
a segment is valid up to the first byte where native `rk_scan` stops (length,
magic, record count, CRC32C, offset contiguity), and recovery truncates there.

Writes go through native `rk_append` (pwritev straight from the caller's
buffer); reads are zero-copy views of a read-only shared mapping. Only the
active segment keeps a file descriptor open, so thousands of partitions do
not exhaust the descriptor limit.

Neighbours: PartitionLog (partition_log.py) owns the segments, decides when to
roll, and keeps their sparse index in LMDB (index.py).
"""
from __future__ import annotations

import os
from pathlib import Path

from raftka.errors import StorageError
from raftka.native import ffi, lib
from raftka.records import layout

SUFFIX = ".log"


def segment_path(directory: Path, base_offset: int) -> Path:
    return directory / f"{base_offset:020d}{SUFFIX}"


def list_segment_offsets(directory: Path) -> list[int]:
    """Base offsets of the segment files in `directory`, ascending."""
    offsets = []
    for entry in os.scandir(directory):
        stem, suffix = os.path.splitext(entry.name)
        if suffix == SUFFIX and stem.isdigit() and len(stem) == 20:
            offsets.append(int(stem))
    return sorted(offsets)


MAP_MIN_BYTES = 4 * 1024 * 1024   # the smallest mapping of an active segment


class Segment:
    """A segment file: appends at its end, zero-copy views of its bytes."""

    def __init__(self, directory: Path, base_offset: int, *, create: bool,
                 map_capacity_bytes: int = 0) -> None:
        self.base_offset = base_offset
        self.path = segment_path(directory, base_offset)
        self._map_capacity_bytes = map_capacity_bytes
        self._fd: int | None = None
        self._view: memoryview | None = None
        self._max_timestamp: int | None = None
        flags = os.O_RDWR | os.O_CREAT | os.O_EXCL if create else os.O_RDONLY
        try:
            fd = os.open(self.path, flags | os.O_CLOEXEC, 0o644)
            self.size_bytes = os.fstat(fd).st_size
        except OSError as exc:
            raise StorageError(f"cannot open segment {self.path}: {exc.strerror}") from exc
        if create:
            self._fd = fd
        else:
            os.close(fd)

    def __repr__(self) -> str:
        return f"Segment({self.path.name}, size_bytes={self.size_bytes})"

    # ---- writing -------------------------------------------------------

    @property
    def fd(self) -> int | None:
        """The open descriptor of the active segment (None once sealed)."""
        return self._fd

    def make_active(self, map_capacity_bytes: int) -> None:
        """Open for appends (after recovery, or when this segment is the newest)."""
        if self._fd is None:
            try:
                self._fd = os.open(self.path, os.O_RDWR | os.O_CLOEXEC)
            except OSError as exc:
                raise StorageError(f"cannot open segment {self.path}: {exc.strerror}") from exc
        self._map_capacity_bytes = map_capacity_bytes
        self._max_timestamp = None

    def seal(self) -> None:
        """No more appends: release the descriptor and the oversized mapping."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self._map_capacity_bytes = 0
        self._view = None

    def append(self, data: object, size_bytes: int, first_offset: int, leader_epoch: int,
               in_place: bool) -> None:
        """Write validated batches (a cffi buffer) giving them offsets from first_offset;
        `in_place` rewrites their headers in the (writable) buffer itself.

        On failure the file is truncated back, so the segment is unchanged.
        """
        assert self._fd is not None, f"{self.path.name} is sealed"
        written = lib.rk_append(self._fd, self.size_bytes, data, size_bytes, first_offset, leader_epoch,
                                int(in_place))
        if written < 0:
            raise StorageError(f"append to {self.path} failed: {os.strerror(-written)}")
        assert written == size_bytes, f"wrote {written} of {size_bytes} bytes"
        self.size_bytes += size_bytes

    def truncate(self, size_bytes: int) -> None:
        """Cut the file to `size_bytes` (recovery and log truncation)."""
        assert 0 <= size_bytes <= self.size_bytes, (size_bytes, self.size_bytes)
        try:
            if self._fd is not None:
                os.ftruncate(self._fd, size_bytes)
            else:
                os.truncate(self.path, size_bytes)
        except OSError as exc:
            raise StorageError(f"cannot truncate {self.path}: {exc.strerror}") from exc
        self.size_bytes = size_bytes
        self._view = None
        self._max_timestamp = None

    def sync(self) -> None:
        """fdatasync: the bytes appended so far survive a power loss."""
        if self._fd is not None:
            os.fdatasync(self._fd)

    # ---- reading -------------------------------------------------------

    def view(self) -> memoryview:
        """Read-only, zero-copy view of the segment's bytes [0, size_bytes).

        The active segment is mapped past its end, so views keep working as it
        grows, but only to twice its size (at least MAP_MIN_BYTES, at most its
        capacity): a partition's address space follows its data, not
        segment.bytes, and a segment filling up is remapped about log2(capacity
        / MAP_MIN_BYTES) times."""
        if self._view is None or len(self._view) < self.size_bytes:
            ahead = min(self._map_capacity_bytes, max(2 * self.size_bytes, MAP_MIN_BYTES))
            self._view = self._map(max(self.size_bytes, ahead))
        return self._view[:self.size_bytes]

    def release_view(self) -> None:
        """Drop the cached mapping; views handed out keep it alive until dropped."""
        self._view = None

    def first_timestamp(self) -> int:
        """maxTimestamp of the segment's first batch (-1 if empty): what its age is measured from."""
        if self.size_bytes < layout.HEADER_SIZE:
            return -1
        view = self.view()
        return int.from_bytes(view[layout.MAX_TIMESTAMP_OFF:layout.MAX_TIMESTAMP_OFF + 8], "big", signed=True)

    def max_timestamp(self) -> int:
        """Largest batch maxTimestamp in the segment (-1 if empty); cached."""
        if self._max_timestamp is None:
            view = self.view()
            self._max_timestamp = lib.rk_max_timestamp(ffi.from_buffer(view), len(view), 0, len(view))
        return self._max_timestamp

    def _map(self, length: int) -> memoryview:
        if length == 0:
            return memoryview(b"")
        fd = self._fd if self._fd is not None else os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            addr = lib.rk_map(fd, length)
        finally:
            if fd != self._fd:
                os.close(fd)
        if addr == ffi.NULL:
            raise StorageError(f"cannot map {self.path}: {os.strerror(ffi.errno)}")
        addr = ffi.gc(addr, lambda a, n=length: lib.rk_unmap(a, n), size=length)
        return memoryview(ffi.buffer(addr, length)).toreadonly()

    # ---- lifecycle -----------------------------------------------------

    def close(self) -> None:
        self.seal()

    def delete(self) -> None:
        """Remove the file; outstanding views stay readable until dropped."""
        self.close()
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass
