"""Configuration: one dataclass holds every setting Raftka reads."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Literal

FsyncPolicy = Literal["never", "interval", "always"]
FSYNC_POLICIES: tuple[str, ...] = ("never", "interval", "always")

MIB = 1024 * 1024
GIB = 1024 * MIB
DAY_MS = 24 * 3600 * 1000


@dataclasses.dataclass(frozen=True)
class Config:
    """Every Raftka setting, with Kafka's defaults where Kafka has one.

    fsync policies (what a successful append guarantees):
      never     data is in the OS page cache; survives a process crash, not a
                power loss or kernel crash (Kafka's default: replication is the
                durability mechanism).
      interval  as `never`, plus segments and the index are fsynced at most
                `fsync_interval_ms` after an append: a power loss loses at
                most that window.
      always    the segment is fdatasync'ed before append returns: survives
                power loss once append returns.
    """

    data_dir: Path = Path("./raftka-data")
    # segment.bytes / log.roll.ms
    segment_bytes: int = GIB
    segment_ms: int = 7 * DAY_MS
    # retention.bytes (-1 = unlimited) / retention.ms (-1 = unlimited)
    retention_bytes: int = -1
    retention_ms: int = 7 * DAY_MS
    # index.interval.bytes: one sparse index entry per this many log bytes.
    # Kafka's 4096 suits its mmap'd index arrays; an LMDB entry costs ~1 us to
    # commit, while walking 64 KiB of batch headers in C to find an offset
    # costs well under that, so we index 16x more sparsely.
    index_interval_bytes: int = 64 * 1024
    # message.max.bytes: the largest record batch accepted, header included
    max_batch_bytes: int = 1024 * 1024 + 12
    fsync: FsyncPolicy = "never"
    fsync_interval_ms: int = 1000
    # LMDB index writes are grouped: committed at most this often, or when
    # this many entries are pending (recovery rebuilds anything uncommitted)
    index_commit_interval_ms: int = 1000
    index_commit_max_pending: int = 65536
    lmdb_map_size_bytes: int = 16 * GIB
    default_partitions: int = 1

    def __post_init__(self) -> None:
        if self.fsync not in FSYNC_POLICIES:
            raise ValueError(f"fsync must be one of {FSYNC_POLICIES}, got {self.fsync!r}")
        positive = ("segment_bytes", "index_interval_bytes", "max_batch_bytes",
                    "fsync_interval_ms", "index_commit_interval_ms",
                    "index_commit_max_pending", "lmdb_map_size_bytes", "default_partitions")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        object.__setattr__(self, "data_dir", Path(self.data_dir))

    def replace(self, **changes: object) -> "Config":
        """A copy with some settings changed."""
        return dataclasses.replace(self, **changes)
