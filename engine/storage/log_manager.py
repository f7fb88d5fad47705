"""LogManager: every partition log of one data directory, and their shared LMDB.

Layout of a data directory:
  .lock                      held (flock) by the one process that has it open
  index.lmdb/                LMDB environment (index.py)
  <topic>-<partition>/       one directory of segment files per partition

The manager creates and deletes topics, opens (and so recovers) every
partition log at start, and runs the periodic duties: group-committing the
logs' pending index entries in one LMDB transaction, fsyncing under the
`interval` policy, and retention. It is not thread-safe by itself: the
broker's event loop or the embedded API's lock serialises callers.
"""
from __future__ import annotations

import fcntl
import os
import re
import shutil
import time
from pathlib import Path

from raftka.config import Config
from raftka.errors import (DataDirLockedError, InvalidPartitionsError, InvalidTopicError, StorageError,
                           TopicAlreadyExistsError, UnknownTopicOrPartitionError)
from raftka.storage.index import IndexStore, TopicRecord
from raftka.storage.partition_log import PartitionLog

TOPIC_NAME_MAX_LENGTH = 249
_TOPIC_NAME = re.compile(r"[a-zA-Z0-9._-]+")
# log.retention.check.interval.ms
RETENTION_CHECK_INTERVAL_MS = 300_000


def validate_topic_name(name: str) -> None:
    """Kafka's rules: 1-249 chars of [a-zA-Z0-9._-], not "." or ".."."""
    if not isinstance(name, str) or not name:
        raise InvalidTopicError("topic name must be a non-empty string")
    if name in (".", ".."):
        raise InvalidTopicError(f"topic name cannot be {name!r}")
    if len(name) > TOPIC_NAME_MAX_LENGTH:
        raise InvalidTopicError(
            f"topic name is {len(name)} characters, the limit is {TOPIC_NAME_MAX_LENGTH}")
    if not _TOPIC_NAME.fullmatch(name):
        raise InvalidTopicError(
            f"topic name {name!r} has characters outside [a-zA-Z0-9._-]")


class LogManager:
    """Owns a data directory: topics, partition logs, index commits, fsync, retention."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.data_dir = Path(config.data_dir)
        self._lock_fd = _lock_data_dir(self.data_dir)
        try:
            self._index = IndexStore(self.data_dir / "index.lmdb", config.lmdb_map_size_bytes)
        except BaseException:
            os.close(self._lock_fd)
            raise
        self._topics: dict[str, TopicRecord] = {t.name: t for t in self._index.topics()}
        self._logs: dict[tuple[str, int], PartitionLog] = {}
        for topic in self._topics.values():
            self._open_logs(topic)
        now = time.monotonic()
        self._last_commit = now
        self._last_fsync = now
        self._last_retention = now
        self._last_clean = now
        self._closed = False

    @property
    def index(self) -> IndexStore:
        """The data directory's LMDB environment (consumer groups keep their view there too)."""
        return self._index

    # ---- topics ------------------------------------------------------

    def create_topic(self, name: str, partitions: int, topic_id: bytes = b"") -> TopicRecord:
        """A new topic of `partitions` empty logs. `topic_id` names this
        incarnation of the topic in a cluster (see TopicRecord). The caller
        holds the count to max_partitions_per_topic: in a cluster the metadata
        did, under the proposing controller's limit, which may not be this broker's."""
        validate_topic_name(name)
        if not isinstance(partitions, int) or partitions <= 0:
            raise InvalidPartitionsError(f"partitions must be a positive integer, got {partitions!r}")
        if name in self._topics:
            raise TopicAlreadyExistsError(f"topic {name!r} already exists")
        for partition in range(partitions):
            stale = self._partition_dir(name, partition)
            if stale.exists():  # left by a delete that crashed before removing it
                shutil.rmtree(stale)
        topic = self._index.create_topic(name, partitions, topic_id)
        self._topics[name] = topic
        self._open_logs(topic)
        return topic

    def add_partitions(self, name: str, total: int) -> TopicRecord:
        """Grow a topic to `total` partitions (Kafka never shrinks one)."""
        topic = self.topic(name)
        if not isinstance(total, int) or total <= topic.partitions:
            raise InvalidPartitionsError(
                f"topic {name!r} has {topic.partitions} partitions; the new count must be more, got {total!r}")
        for partition in range(topic.partitions, total):
            stale = self._partition_dir(name, partition)
            if stale.exists():
                shutil.rmtree(stale)
        topic = self._index.add_partitions(topic, total - topic.partitions)
        self._topics[name] = topic
        self._open_logs(topic)
        return topic

    def delete_topic(self, name: str) -> None:
        topic = self.topic(name)
        for partition in range(topic.partitions):
            self._logs.pop((name, partition)).abandon()
        self._index.delete_topic(topic)
        del self._topics[name]
        for partition in range(topic.partitions):
            shutil.rmtree(self._partition_dir(name, partition), ignore_errors=True)

    def topic(self, name: str) -> TopicRecord:
        try:
            return self._topics[name]
        except KeyError:
            raise UnknownTopicOrPartitionError(f"unknown topic {name!r}") from None

    def topic_records(self) -> list[TopicRecord]:
        return list(self._topics.values())

    def topics(self) -> dict[str, int]:
        """Topic name -> partition count."""
        return {name: topic.partitions for name, topic in sorted(self._topics.items())}

    def log(self, topic: str, partition: int) -> PartitionLog:
        try:
            return self._logs[(topic, partition)]
        except KeyError:
            partitions = self.topic(topic).partitions
            raise UnknownTopicOrPartitionError(
                f"topic {topic!r} has partitions [0, {partitions - 1}], not {partition}") from None

    def logs(self) -> list[PartitionLog]:
        return list(self._logs.values())

    def _partition_dir(self, topic: str, partition: int) -> Path:
        return self.data_dir / f"{topic}-{partition}"

    def _open_logs(self, topic: TopicRecord) -> None:
        for partition, storage_id in enumerate(topic.partition_ids):
            if (topic.name, partition) in self._logs:
                continue
            name = f"{topic.name}-{partition}"
            self._logs[(topic.name, partition)] = PartitionLog(
                name, self._partition_dir(topic.name, partition), storage_id, self._index, self.config)

    # ---- periodic duties ---------------------------------------------

    def maybe_flush_index(self) -> None:
        """Group-commit pending index entries when enough are pending or time is up,
        in the background: the caller (the event loop) does not wait for its fdatasync."""
        pending = sum(log.pending_index_entries for log in self._logs.values())
        elapsed_ms = (time.monotonic() - self._last_commit) * 1000
        if pending >= self.config.index_commit_max_pending or (
                pending and elapsed_ms >= self.config.index_commit_interval_ms):
            self.flush_index(wait=False)

    def flush_index(self, wait: bool = True) -> None:
        """All logs' pending index entries and state in one LMDB transaction
        (`wait` False: committed on the index's writer thread, see IndexStore)."""
        offsets, times, states = [], [], []
        for log in self._logs.values():
            o, t, s = log.drain_pending()
            offsets += o
            times += t
            states += s
        self._index.commit(offsets, times, states, wait=wait)
        self._last_commit = time.monotonic()

    def tick(self) -> None:
        """Run whatever periodic duty is due; call often (e.g. every 100 ms)."""
        now = time.monotonic()
        self.maybe_flush_index()
        if self.config.fsync == "interval" and (now - self._last_fsync) * 1000 >= self.config.fsync_interval_ms:
            self.sync()
        if (now - self._last_retention) * 1000 >= RETENTION_CHECK_INTERVAL_MS:
            self.enforce_retention()
        for log in self._logs.values():
            if log.cleaning:
                log.finish_clean()
        if (now - self._last_clean) * 1000 >= self.config.log_cleaner_backoff_ms:
            self.compact()

    def sync(self, force: bool = False) -> None:
        """fsync every log with unsynced appends (all of them if `force`), then the index."""
        for log in self._logs.values():
            log.sync(force)
        self.flush_index()
        self._index.sync()
        self._last_fsync = time.monotonic()

    def compact(self) -> int:
        """Start the cleans due (cleanup.policy=compact logs); how many were
        decided. Cleans run in the cleaner thread; tick swaps them in."""
        self._last_clean = time.monotonic()
        return sum(log.compact() is not None for log in self._logs.values() if not log.cleaning)

    def enforce_retention(self) -> int:
        self._last_retention = time.monotonic()
        return sum(log.enforce_retention() for log in self._logs.values())

    # ---- lifecycle ---------------------------------------------------

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self.flush_index()  # one transaction for all logs; their own commits are then empty
            for log in self._logs.values():
                log.close()
            self._index.sync()
        finally:
            self._index.close()
            os.close(self._lock_fd)

    def abandon(self) -> None:
        """Drop everything uncommitted, as a killed process would (for crash tests)."""
        if self._closed:
            return
        self._closed = True
        for log in self._logs.values():
            log.abandon()
        self._index.close()
        os.close(self._lock_fd)


def _lock_data_dir(data_dir: Path) -> int:
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(data_dir / ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        raise StorageError(f"data directory {data_dir} is unusable: {exc.strerror}") from exc
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise DataDirLockedError(f"data directory {data_dir} is in use by another process or handle") from None
    return fd
