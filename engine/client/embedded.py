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

Records cross into C once per batch (engine/records/codec.py, native/records.c):
produce_batch transposes the caller's Records into columns, read builds each
batch's ConsumerRecords with C-level map/zip, and read_batches hands out the
columns themselves; no Python loop runs per record (README: the cost model).

Thread-safe: one lock serialises access to the data directory; blocking
readers wait on a condition woken by appends. A background thread runs the
periodic duties (index group commits, interval fsync, retention).
"""
from __future__ import annotations

import itertools
import threading
import time
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, NamedTuple, Sequence, overload

from raftka.client.group_consumer import EmbeddedGroups, GroupConsumer
from raftka.config import Config
from raftka.errors import ClosedError, InvalidPartitionsError, RecordTooLargeError
from raftka.records import layout
from raftka.records.batch import (ConsumerRecord, Headers, Record, RecordColumns, iter_batches, iter_columns,
                                  record_fields)
from raftka.records.codec import Columns, encode_batches, partition_keys, validate_records
from raftka.records.compression import Compression
from raftka.storage.log_manager import LogManager
from raftka.storage.partition_log import AppendResult

# bytes a read pulls from the log per step
READ_CHUNK_BYTES = 1024 * 1024
_TICK_INTERVAL_S = 0.1


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
        self._consumers: weakref.WeakSet[GroupConsumer] = weakref.WeakSet()  # closed by close()
        self._stopping = threading.Event()
        self._ticker = threading.Thread(target=self._tick_forever, name="raftka-tick", daemon=True)
        self._ticker.start()

    # ---- topics ------------------------------------------------------

    def create_topic(self, name: str, partitions: int | None = None) -> None:
        """Create a topic (Kafka naming rules) with `partitions` partitions, at
        most max_partitions_per_topic."""
        partitions = self.config.default_partitions if partitions is None else partitions
        if isinstance(partitions, int) and partitions > self.config.max_partitions_per_topic:
            raise InvalidPartitionsError(f"{partitions} partitions, more than max_partitions_per_topic="
                                         f"{self.config.max_partitions_per_topic}")
        with self._lock:
            self._manager.create_topic(name, partitions)

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
                      compression: Compression | str = Compression.NONE) -> "ProducedRecords":
        """Append many records with one write per partition; where each landed, in input order.

        One C call encodes each batch (keys, values, headers, timestamps,
        CRC32C) and one partitions all keys; the only per-record work in
        Python is the caller's building of its Record objects. The result
        makes a RecordMetadata only when one is asked for.
        """
        records = records if isinstance(records, (list, tuple)) else list(records)
        now_ms = int(time.time() * 1000)
        if not records:
            return ProducedRecords(topic, [], {}, [], (), now_ms)
        values, keys, headers, timestamps = record_fields(records)
        with self._lock:
            partitions = self._manager.topic(topic).partitions
            placement = self._place(topic, keys, partitions, partition)
            bases: dict[int, int] = {}
            for target, indexes in placement.groups:
                columns = (values, keys, headers, timestamps) if indexes is None else \
                    [list(map(column.__getitem__, indexes)) for column in (values, keys, headers, timestamps)]
                batches = self._encode(Columns(columns[1], columns[0], columns[2], columns[3], now_ms), compression)
                bases[target] = self._append(topic, target, batches).base_offset
        return ProducedRecords(topic, placement.targets, bases, placement.ranks, timestamps, now_ms)

    def append_batches(self, topic: str, partition: int, batches: bytes | bytearray | memoryview) -> AppendResult:
        """Append raw Kafka v2 record batches as they are, after checking each
        down to its records (validate_records: sizes, magic, CRC32C, record
        count and offset deltas, every record well-formed); CorruptRecordError
        and nothing written otherwise."""
        position = 0
        for _header, batch in iter_batches(batches):
            validate_records(batch, position)
            position += len(batch)
        return self._append(topic, partition, batches)

    def _append(self, topic: str, partition: int, batches: bytes | bytearray | memoryview) -> AppendResult:
        """Append batches the log checks only by header and CRC (ours, built from records)."""
        with self._lock:
            log = self._manager.log(topic, partition)
            result = log.append(batches)
            log.set_high_watermark(log.log_end_offset)
            self._manager.maybe_flush_index()
            self._appended.notify_all()
            return result

    def _place(self, topic: str, keys: Sequence[bytes | None], partitions: int,
               explicit: int | None) -> "_Placement":
        """Which partition each record goes to (Kafka's partitioner), grouped per partition."""
        if explicit is not None:
            if not 0 <= explicit < partitions:
                raise InvalidPartitionsError(f"topic {topic!r} has partitions [0, {partitions - 1}], not {explicit}")
            return _Placement(explicit, None, [(explicit, None)])
        if partitions == 1:
            return _Placement(0, None, [(0, None)])
        null_keys = keys.count(None)
        sticky = next(self._round_robin.setdefault(topic, itertools.count())) % partitions if null_keys else 0
        if null_keys == len(keys):
            return _Placement(sticky, None, [(sticky, None)])
        placed = partition_keys(keys, partitions, sticky)
        groups, start = [], 0
        for target, count in enumerate(placed.per_partition):
            if count:
                groups.append((target, placed.order[start:start + count]))
                start += count
        return _Placement(placed.targets, placed.ranks, groups)

    def _encode(self, columns: Columns, compression: Compression | str) -> bytearray:
        """Encode as few batches as fit under max_batch_bytes (one C call per batch)."""
        limit = self.config.max_batch_bytes
        out, _counts = encode_batches(columns, compression=compression,
                                     max_records_bytes=limit - layout.HEADER_SIZE)
        largest = max(header.size_bytes for header, _ in iter_batches(out))
        if largest > limit:
            raise RecordTooLargeError(f"a record of {largest} bytes as a batch exceeds max_batch_bytes={limit}")
        return out  # writable: the log patches offsets in place and writes it in one go

    # ---- read --------------------------------------------------------

    def read(self, topic: str, partition: int, offset: int = 0, *,
             timeout_s: float | None = 0.0, max_records: int | None = None) -> Iterator[ConsumerRecord]:
        """Records from `offset` on, in order.

        timeout_s: how long to wait for the next record once caught up with
        the high watermark: 0 returns what is there (non-blocking), None waits
        forever. OffsetOutOfRangeError (with the valid range) is raised here,
        before iteration, if `offset` is outside [log start, high watermark].
        Each batch is decoded in one C call and its ConsumerRecords built by
        C-level map/zip; iteration itself never enters Python per record.
        """
        self._check_offset(topic, partition, offset)
        batches = map(RecordColumns.iter_records, self._columns(topic, partition, offset, timeout_s))
        records = itertools.chain.from_iterable(batches)
        return records if max_records is None else itertools.islice(records, max_records)

    def read_batches(self, topic: str, partition: int, offset: int = 0, *,
                     timeout_s: float | None = 0.0) -> Iterator[RecordColumns]:
        """Like read(), one RecordColumns per stored batch: the records at or after
        `offset` as columns (offsets, timestamps, keys, values, headers) over the
        batch's bytes, with no Python object per record until a column is asked for."""
        self._check_offset(topic, partition, offset)
        return self._columns(topic, partition, offset, timeout_s)

    def _check_offset(self, topic: str, partition: int, offset: int) -> None:
        with self._lock:
            self._manager.log(topic, partition).read(offset, 0)  # range check now, not at the first next()

    def _columns(self, topic: str, partition: int, offset: int,
                 timeout_s: float | None) -> Iterator[RecordColumns]:
        while True:
            chunk = self._next_chunk(topic, partition, offset, timeout_s)
            if chunk is None:
                return
            data, next_offset = chunk
            yield from iter_columns(data, topic, partition, offset)
            offset = next_offset

    def _next_chunk(self, topic: str, partition: int, offset: int,
                    timeout_s: float | None) -> tuple[bytes, int] | None:
        """The bytes of the next non-empty read from `offset` (copied out of the
        segment's mapping under the lock, so retention cannot unmap them under
        a reader) and the offset after them; None when timeout_s expires."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        with self._lock:
            while True:
                log = self._manager.log(topic, partition)
                chunk = log.read(offset, READ_CHUNK_BYTES)
                if chunk.size_bytes:
                    return bytes(chunk.buffer), chunk.next_offset
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
            if self._stopping.is_set():
                raise ClosedError("the handle is closed")
            if self._groups is None:
                self._groups = EmbeddedGroups(self)
            consumer = GroupConsumer(self, self._groups, group_id, list(topics), **settings)
            self._consumers.add(consumer)
        return consumer

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
        """Close every consumer still open (each commits, when auto-committing,
        and leaves its group), then stop the groups' loop and thread, the tick
        thread and the storage. Idempotent; nothing it started outlives it."""
        with self._lock:
            if self._stopping.is_set():
                return
            consumers = list(self._consumers)
        for consumer in consumers:
            consumer.close()
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


class _Placement(NamedTuple):
    """Where produce_batch sends records: one partition for all, or per record."""

    targets: int | list[int]       # the partition of all records, or of each
    ranks: list[int] | None        # per record: its place among its partition's records (None: its index)
    groups: list[tuple[int, list[int] | None]]  # (partition, record indexes in order; None: all)


class ProducedRecords(Sequence[RecordMetadata]):
    """Where each record of a produce_batch landed, in input order.

    Holds the per-partition base offsets and, when records went to several
    partitions, per-record partitions and ranks; a RecordMetadata is made
    only when one is indexed, so producing N records does not build N objects.
    """

    def __init__(self, topic: str, targets: int | list[int], bases: dict[int, int], ranks: list[int] | None,
                 timestamps: Sequence[int | None], now_ms: int) -> None:
        self.topic = topic
        self._targets, self._bases, self._ranks = targets, bases, ranks
        self._timestamps, self._now_ms = timestamps, now_ms

    def __len__(self) -> int:
        return len(self._timestamps)

    @overload
    def __getitem__(self, index: int) -> RecordMetadata: ...

    @overload
    def __getitem__(self, index: slice) -> list[RecordMetadata]: ...

    def __getitem__(self, index: int | slice) -> RecordMetadata | list[RecordMetadata]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        timestamp = self._timestamps[index]  # IndexError past the end, as a list
        index %= len(self)
        partition = self._targets if isinstance(self._targets, int) else self._targets[index]
        rank = index if self._ranks is None else self._ranks[index]
        return RecordMetadata(self.topic, partition, self._bases[partition] + rank,
                              self._now_ms if timestamp is None else timestamp)

    def __repr__(self) -> str:
        return f"ProducedRecords({self.topic!r}, {len(self)} records)"


def open(data_dir: str | Path = "./raftka-data", config: Config | None = None, **settings: object) -> Raftka:  # noqa: A001
    """Open (creating if needed) a data directory; settings override Config fields."""
    return Raftka(data_dir, config, **settings)
