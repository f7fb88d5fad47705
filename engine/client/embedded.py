"""The embedded API: Raftka as a storage layer inside a Python process.

    import raftka
    with raftka.open("./data") as rk:
        rk.create_topic("events", partitions=3)
        meta = rk.produce("events", b"hello", key=b"user-1")
        for record in rk.read("events", meta.partition, offset=0):
            print(record.offset, record.key, record.value)

Producing follows the Java client: a keyed record goes to
murmur2(key) mod partitions, so one key's records stay in order; keyless
records are spread round robin (one partition per produce_batch call, as
Kafka's sticky partitioner does per batch). There is no replication here:
an append is committed as soon as it is written, so the high watermark is the
log end offset.

Thread-safe: one lock serialises access to the data directory; blocking
readers wait on a condition woken by appends. A background thread runs the
periodic duties (index group commits, interval fsync, retention).
"""
from __future__ import annotations

import itertools
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

from raftka.client.group_consumer import EmbeddedGroups, GroupConsumer
from raftka.config import Config
from raftka.errors import InvalidPartitionsError, RecordTooLargeError
from raftka.partitioner import partition_for_key
from raftka.records.batch import ConsumerRecord, Headers, Record, build_batch, parse_records
from raftka.records.compression import Compression
from raftka.storage.log_manager import LogManager
from raftka.storage.partition_log import AppendResult, LogSlice

# bytes a read pulls from the log per step
READ_CHUNK_BYTES = 1024 * 1024
_TICK_INTERVAL_S = 0.1
# per-record framing allowance when splitting a produce_batch into batches
_RECORD_OVERHEAD_BYTES = 32


@dataclass(frozen=True, slots=True)
class RecordMetadata:
    """Where a produced record landed."""

    topic: str
    partition: int
    offset: int
    timestamp_ms: int


@dataclass(frozen=True, slots=True)
class PartitionOffsets:
    """A partition's offsets: readable records are [log_start_offset, high_watermark)."""

    log_start_offset: int
    high_watermark: int
    log_end_offset: int


class Raftka:
    """An open data directory: topics, produce, read."""

    def __init__(self, data_dir: str | Path = "./raftka-data", config: Config | None = None,
                 **settings: object) -> None:
        base = config or Config()
        self.config = base.replace(data_dir=Path(data_dir), **settings)
        self._manager = LogManager(self.config)
        for log in self._manager.logs():  # unreplicated: whatever recovered is committed
            log.set_high_watermark(log.log_end_offset)
        self._lock = threading.RLock()
        self._appended = threading.Condition(self._lock)
        self._round_robin: dict[str, Iterator[int]] = {}
        self._groups: EmbeddedGroups | None = None
        self._stopping = threading.Event()
        self._ticker = threading.Thread(target=self._tick_forever, name="raftka-tick", daemon=True)
        self._ticker.start()

    # ---- topics ------------------------------------------------------

    def create_topic(self, name: str, partitions: int | None = None) -> None:
        """Create a topic (Kafka naming rules) with `partitions` partitions."""
        with self._lock:
            self._manager.create_topic(name, self.config.default_partitions if partitions is None else partitions)

    def delete_topic(self, name: str) -> None:
        with self._lock:
            self._manager.delete_topic(name)
            self._round_robin.pop(name, None)

    def topics(self) -> dict[str, int]:
        """Topic name -> partition count."""
        with self._lock:
            return self._manager.topics()

    # ---- produce -----------------------------------------------------

    def produce(self, topic: str, value: bytes | None, *, key: bytes | None = None,
                headers: Headers | Sequence[tuple[str, bytes | None]] = (),
                timestamp_ms: int | None = None, partition: int | None = None,
                compression: Compression | str = Compression.NONE) -> RecordMetadata:
        """Append one record; returns its partition, offset and timestamp."""
        record = Record(value, key, tuple(headers), timestamp_ms)
        return self.produce_batch(topic, [record], partition=partition, compression=compression)[0]

    def produce_batch(self, topic: str, records: Iterable[Record], *, partition: int | None = None,
                      compression: Compression | str = Compression.NONE) -> list[RecordMetadata]:
        """Append many records with one write per partition; metadata in input order."""
        records = list(records)
        now_ms = int(time.time() * 1000)
        with self._lock:
            partitions = self._manager.topic(topic).partitions
            targets = self._choose_partitions(topic, records, partitions, partition)
            by_partition: dict[int, list[int]] = {}
            for i, target in enumerate(targets):
                by_partition.setdefault(target, []).append(i)
            results: list[RecordMetadata | None] = [None] * len(records)
            for target, indexes in by_partition.items():
                group = [records[i] for i in indexes]
                batches = self._encode(group, compression, now_ms)
                appended = self.append_batches(topic, target, batches)
                for n, i in enumerate(indexes):
                    ts = records[i].timestamp_ms
                    results[i] = RecordMetadata(topic, target, appended.base_offset + n,
                                                now_ms if ts is None else ts)
        return results  # type: ignore[return-value]

    def append_batches(self, topic: str, partition: int, batches: bytes | bytearray | memoryview) -> AppendResult:
        """Append raw Kafka v2 record batches (validated, CRC-checked) as they are."""
        with self._lock:
            log = self._manager.log(topic, partition)
            result = log.append(batches)
            log.set_high_watermark(log.log_end_offset)
            self._manager.maybe_flush_index()
            self._appended.notify_all()
            return result

    def _choose_partitions(self, topic: str, records: list[Record], partitions: int,
                           explicit: int | None) -> list[int]:
        if explicit is not None:
            if not 0 <= explicit < partitions:
                raise InvalidPartitionsError(f"topic {topic!r} has partitions [0, {partitions - 1}], not {explicit}")
            return [explicit] * len(records)
        sticky = None
        targets = []
        for record in records:
            if record.key is not None:
                targets.append(partition_for_key(record.key, partitions))
                continue
            if sticky is None:
                counter = self._round_robin.setdefault(topic, itertools.count())
                sticky = next(counter) % partitions
            targets.append(sticky)
        return targets

    def _encode(self, records: list[Record], compression: Compression | str, now_ms: int) -> bytearray:
        """Encode as few batches as fit under max_batch_bytes."""
        limit = self.config.max_batch_bytes
        out = bytearray()
        for chunk in _chunks_under(records, limit):
            batch = build_batch(chunk, compression=compression, now_ms=now_ms)
            if len(batch) > limit:
                raise RecordTooLargeError(
                    f"a record of {len(batch)} bytes as a batch exceeds max_batch_bytes={limit}")
            out += batch
        return out  # writable: the log patches offsets in place and writes it in one go

    # ---- read --------------------------------------------------------

    def read(self, topic: str, partition: int, offset: int = 0, *,
             timeout_s: float | None = 0.0, max_records: int | None = None) -> Iterator[ConsumerRecord]:
        """Records from `offset` on, in order.

        timeout_s: how long to wait for the next record once caught up with
        the high watermark: 0 returns what is there (non-blocking), None waits
        forever. OffsetOutOfRangeError (with the valid range) is raised here,
        before iteration, if `offset` is outside [log start, high watermark].
        """
        with self._lock:
            log = self._manager.log(topic, partition)
            log.read(offset, 0)  # range check now, not at the first next()
        return self._iterate(topic, partition, offset, timeout_s, max_records)

    def _iterate(self, topic: str, partition: int, offset: int, timeout_s: float | None,
                 max_records: int | None) -> Iterator[ConsumerRecord]:
        remaining = max_records if max_records is not None else -1
        while remaining != 0:
            chunk = self._next_chunk(topic, partition, offset, timeout_s)
            if chunk is None:
                return
            for record in parse_records(chunk.buffer, topic, partition, offset):
                yield record
                offset = record.offset + 1
                remaining -= 1
                if remaining == 0:
                    return

    def _next_chunk(self, topic: str, partition: int, offset: int, timeout_s: float | None) -> LogSlice | None:
        """The next non-empty read from `offset`, waiting per timeout_s; None when it expires."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        with self._lock:
            while True:
                log = self._manager.log(topic, partition)
                chunk = log.read(offset, READ_CHUNK_BYTES)
                if chunk.size_bytes:
                    return chunk
                wait_s = None if deadline is None else deadline - time.monotonic()
                if self._stopping.is_set() or (wait_s is not None and wait_s <= 0):
                    return None
                self._appended.wait(wait_s)

    def offsets(self, topic: str, partition: int) -> PartitionOffsets:
        with self._lock:
            log = self._manager.log(topic, partition)
            return PartitionOffsets(log.log_start_offset, log.high_watermark, log.log_end_offset)

    def offset_for_timestamp(self, topic: str, partition: int, timestamp_ms: int) -> int | None:
        """First offset whose record timestamp is >= timestamp_ms, None if none."""
        with self._lock:
            return self._manager.log(topic, partition).offset_for_timestamp(timestamp_ms)

    # ---- consumer groups ---------------------------------------------

    def consumer(self, group_id: str, topics: Iterable[str], **settings: Any) -> GroupConsumer:
        """Join consumer group `group_id` on `topics`: each partition is read
        by exactly one member of the group (a queue), every group reads every
        record (broadcast). Settings: auto_commit, auto_commit_interval_s,
        session_timeout_s, rebalance_timeout_s, auto_offset_reset, client_id."""
        with self._lock:
            if self._groups is None:
                self._groups = EmbeddedGroups(self)
        return GroupConsumer(self, self._groups, group_id, list(topics), **settings)

    # ---- lifecycle ---------------------------------------------------

    def flush(self) -> None:
        """fsync every segment and the index, whatever the fsync policy."""
        with self._lock:
            self._manager.sync(force=True)

    def enforce_retention(self) -> int:
        """Apply retention now; returns the number of segments deleted."""
        with self._lock:
            return self._manager.enforce_retention()

    def close(self) -> None:
        if self._groups is not None:
            self._groups.close()
        self._stopping.set()
        with self._lock:
            self._appended.notify_all()
            self._manager.close()
        self._ticker.join(timeout=5)

    def __enter__(self) -> "Raftka":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _tick_forever(self) -> None:
        while not self._stopping.wait(_TICK_INTERVAL_S):
            with self._lock:
                if self._stopping.is_set():
                    return
                self._manager.tick()


def _chunks_under(records: list[Record], limit: int) -> Iterator[list[Record]]:
    chunk: list[Record] = []
    size = 0
    for record in records:
        record_size = (_RECORD_OVERHEAD_BYTES + len(record.key or b"") + len(record.value or b"")
                       + sum(len(k) + len(v or b"") + 10 for k, v in record.headers))
        if chunk and size + record_size > limit - 128:
            yield chunk
            chunk, size = [], 0
        chunk.append(record)
        size += record_size
    if chunk:
        yield chunk


def open(data_dir: str | Path = "./raftka-data", config: Config | None = None, **settings: object) -> Raftka:  # noqa: A001
    """Open (creating if needed) a data directory; settings override Config fields."""
    return Raftka(data_dir, config, **settings)
