"""Idempotent producers: which batches of each producer id a partition holds,
so a retried batch is acknowledged with its original offsets instead of being
written twice, and a gap in sequence numbers is refused.

Kafka keeps the last five batches' (first sequence, last sequence, base
offset) per producer id; a producer has at most five requests in flight, so
any retry falls in that window. The leader decides before proposing, so the
log carries the decision; the state it decides from is a function of the
retained log alone, so every replica that may lead decides alike:

- every replica records the batches added to its Raft log, and a restarted
  or truncated one replays every retained segment (native code walks them;
  Python reads only the headers of batches that carry a producer id);
- a producer counts as unknown (its next batch is accepted as new) when its
  newest batch is older than `expiration_ms` of log time (the newest batch
  timestamp recorded: Kafka's producer.id.expiration.ms, never the wall
  clock), or lies below the log start offset (retention deleted it, as
  Kafka's ProducerStateManager evicts producers below the log start). Both
  rules are applied when a batch is checked or recorded, so when memory is
  reclaimed (`expire`) changes nothing;
- the leader records a batch it accepts at once, provisionally (base offset
  PENDING_OFFSET), so the next request of the same producer in the same
  round follows it; the log's own record then fills the offset in.
"""
from __future__ import annotations

from collections import deque
from typing import Callable, NamedTuple

from raftka.errors import InvalidProducerEpochError, OutOfOrderSequenceError
from raftka.native import ffi, lib
from raftka.records.batch import BatchHeader, read_header

CACHED_BATCHES = 5
NO_PRODUCER_ID = -1
PENDING_OFFSET = -1    # a batch the leader accepted, not yet in its log
DEFAULT_EXPIRATION_MS = 24 * 3600 * 1000   # Kafka's producer.id.expiration.ms
EXPIRY_CHECK_RECORDS = 1024                # batches recorded between two passes that reclaim memory
REBUILD_POSITIONS_MAX = 4096               # producer batch positions fetched per native call


class _Batch(NamedTuple):
    first_sequence: int
    last_sequence: int
    base_offset: int


class _Producer:
    __slots__ = ("epoch", "batches", "last_timestamp")

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch
        self.batches: deque[_Batch] = deque(maxlen=CACHED_BATCHES)
        self.last_timestamp = -1   # newest batch timestamp of this producer in the log


class ProducerState:
    """Per-partition idempotence state; see the module docstring."""

    def __init__(self, expiration_ms: int = DEFAULT_EXPIRATION_MS,
                 log_start_offset: Callable[[], int] = lambda: 0) -> None:
        """`expiration_ms`: a producer id whose newest batch is this much older
        than the newest batch in the log counts as unknown (Kafka's
        producer.id.expiration.ms, by the log's own timestamps). A producer
        whose newest batch lies below `log_start_offset()` counts as unknown too."""
        self._producers: dict[int, _Producer] = {}
        self.expiration_ms = expiration_ms
        self._log_start_offset = log_start_offset
        self._log_time = -1       # newest batch timestamp recorded
        self._since_expiry = 0

    def _known(self, producer_id: int) -> "_Producer | None":
        """The producer's state, unless it expired or retention deleted its batches."""
        producer = self._producers.get(producer_id)
        if producer is None or producer.last_timestamp < self._log_time - self.expiration_ms:
            return None
        newest = producer.batches[-1].base_offset if producer.batches else PENDING_OFFSET
        if newest != PENDING_OFFSET and newest < self._log_start_offset():
            return None
        return producer

    def check(self, header: BatchHeader) -> int | None:
        """None if the batch is new and may be appended; the base offset it was
        stored at if it is a retry; raises OutOfOrderSequenceError or
        InvalidProducerEpochError otherwise."""
        if header.producer_id == NO_PRODUCER_ID:
            return None
        producer = self._known(header.producer_id)
        if producer is None:
            return None   # first sight, expired, or deleted by retention: accept its sequence
        if header.producer_epoch < producer.epoch:
            raise InvalidProducerEpochError(
                f"producer {header.producer_id} epoch {header.producer_epoch} is older than {producer.epoch}")
        if header.producer_epoch > producer.epoch:
            if header.base_sequence != 0:
                raise OutOfOrderSequenceError(
                    f"producer {header.producer_id} new epoch {header.producer_epoch} starts at sequence "
                    f"{header.base_sequence}, not 0")
            return None
        last_sequence = header.base_sequence + header.last_offset_delta
        for batch in producer.batches:
            if (batch.first_sequence, batch.last_sequence) == (header.base_sequence, last_sequence):
                return batch.base_offset
        expected = producer.batches[-1].last_sequence + 1 if producer.batches else header.base_sequence
        if header.base_sequence != expected:
            raise OutOfOrderSequenceError(
                f"producer {header.producer_id} sent sequence {header.base_sequence}, expected {expected}")
        return None

    def record(self, header: BatchHeader, base_offset: int) -> None:
        """Remember an appended batch."""
        if header.producer_id == NO_PRODUCER_ID:
            return
        producer = self._known(header.producer_id)
        if producer is None or header.producer_epoch > producer.epoch:
            producer = self._producers[header.producer_id] = _Producer(header.producer_epoch)
        producer.last_timestamp = max(producer.last_timestamp, header.max_timestamp)
        self._log_time = max(self._log_time, header.max_timestamp)
        self._since_expiry += 1
        if self._since_expiry >= EXPIRY_CHECK_RECORDS:
            self.expire()
        batch = _Batch(header.base_sequence, header.base_sequence + header.last_offset_delta, base_offset)
        for position, held in enumerate(producer.batches):
            if held.base_offset == PENDING_OFFSET and held[:2] == batch[:2]:
                producer.batches[position] = batch   # the provisional record gets its offset
                return
        producer.batches.append(batch)

    def expire(self) -> int:
        """Reclaim the memory of producers idle for expiration_ms of log time
        (they count as unknown already); how many went."""
        self._since_expiry = 0
        cutoff = self._log_time - self.expiration_ms
        idle = [pid for pid, producer in self._producers.items() if producer.last_timestamp < cutoff]
        for pid in idle:
            del self._producers[pid]
        return len(idle)

    def __len__(self) -> int:
        return len(self._producers)

    def rebuild(self, segment_views: list[memoryview]) -> None:
        """Recompute from stored batches: every retained segment of the log, oldest first."""
        self._producers.clear()
        self._log_time = -1
        positions = ffi.new("int64_t[]", REBUILD_POSITIONS_MAX)
        next_position = ffi.new("int64_t *")
        for view in segment_views:
            buffer, position = ffi.from_buffer(view), 0
            while True:
                count = lib.rk_producer_batches(buffer, len(view), position, positions, REBUILD_POSITIONS_MAX,
                                                next_position)
                for i in range(count):
                    header = read_header(view, positions[i])
                    self.record(header, header.base_offset)
                if count < REBUILD_POSITIONS_MAX:
                    break
                position = next_position[0]
        self.expire()
