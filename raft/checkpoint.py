"""The checkpoint a group's Raft log is compacted to.

For a partition group the partition log itself is the state machine's data,
so a checkpoint only has to say how far it goes: the Raft index applied and
the log end offset it left. A small in-memory state machine (the cluster
metadata) instead puts its whole state in `state`. pysyncobj also keeps the
two entries at the compaction boundary (previous and last applied) as the
new start of its journal, and a follower may be sent the last one again, so
they travel with their commands.

File format (all integers big-endian):
    magic "RKCP" | u8 version (2) | u64 applied_index | u64 log_end_offset
    | 2 x (u64 raft index | u64 term | u32 size | command bytes)
    | u32 size | state bytes
    | u32 crc32c of everything before it
Written to a temporary file, fdatasync'd, and renamed by pysyncobj's
serializer; the journal fsyncs the directory (the rename) before it deletes
the files the checkpoint replaces. A file that fails any check is refused
(CheckpointError), never half-used.
"""
from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path

from raftka.native import crc32c

MAGIC = b"RKCP"
VERSION = 2
HEAD = struct.Struct(">4sBQQ")
ENTRY = struct.Struct(">QQI")
TRAILER = struct.Struct(">I")

JournalEntry = tuple[bytes, int, int]   # (command, raft index, term)


class CheckpointError(ValueError):
    """A checkpoint file that is short, foreign or damaged."""


@dataclass(frozen=True)
class Checkpoint:
    applied_index: int
    log_end_offset: int
    entries: tuple[JournalEntry, JournalEntry]  # (previous, last applied)
    state: bytes = b""                           # a state machine's snapshot, if it has one


def encode(point: Checkpoint) -> bytes:
    out = bytearray(HEAD.pack(MAGIC, VERSION, point.applied_index, point.log_end_offset))
    for command, index, term in point.entries:
        out += ENTRY.pack(index, term, len(command))
        out += command
    out += TRAILER.pack(len(point.state))
    out += point.state
    out += TRAILER.pack(crc32c(out))
    return bytes(out)


def decode(data: bytes) -> Checkpoint:
    if len(data) < HEAD.size + 2 * ENTRY.size + 2 * TRAILER.size:
        raise CheckpointError(f"checkpoint of {len(data)} bytes is too short")
    (crc,) = TRAILER.unpack_from(data, len(data) - TRAILER.size)
    if crc32c(memoryview(data)[:-TRAILER.size]) != crc:
        raise CheckpointError("checkpoint CRC mismatch")
    magic, version, applied_index, log_end_offset = HEAD.unpack_from(data)
    if magic != MAGIC or version != VERSION:
        raise CheckpointError(f"not a version {VERSION} checkpoint: {magic!r} v{version}")
    position, entries = HEAD.size, []
    for _ in range(2):
        index, term, size = ENTRY.unpack_from(data, position)
        position += ENTRY.size
        if position + size > len(data) - TRAILER.size:
            raise CheckpointError("checkpoint entry runs past the end")
        entries.append((bytes(data[position:position + size]), index, term))
        position += size
    if position + TRAILER.size > len(data) - TRAILER.size:
        raise CheckpointError("checkpoint state size runs past the end")
    (size,) = TRAILER.unpack_from(data, position)
    position += TRAILER.size
    state = bytes(data[position:position + size])
    position += size
    if position != len(data) - TRAILER.size:
        raise CheckpointError(f"{len(data) - TRAILER.size - position} stray or missing bytes in checkpoint")
    return Checkpoint(applied_index, log_end_offset, (entries[0], entries[1]), state)


def write(path: Path, point: Checkpoint) -> None:
    """Write and fdatasync (the caller renames it into place)."""
    with open(path, "wb") as file:
        file.write(encode(point))
        file.flush()
        os.fdatasync(file.fileno())


def read(path: Path) -> Checkpoint:
    return decode(path.read_bytes())
