"""Idempotent producers: which batches of each producer id a partition holds,
so a retried batch is acknowledged with its original offsets instead of being
written twice, and a gap in sequence numbers is refused.

Kafka keeps the last five batches' (first sequence, last sequence, base
offset) per producer id; a producer has at most five requests in flight, so
any retry falls in that window. The state follows the log: every replica records the batches added to its
Raft log (a restarted one rebuilds from the tail of its log), and the leader
decides before proposing, so the log carries the decision and replicas never
differ on it. The leader records a batch it accepts at once, provisionally
(base offset PENDING_OFFSET), so the next request of the same producer in the
same round follows it; the log's own record then fills the offset in.
"""
from __future__ import annotations

from collections import deque
from typing import NamedTuple

from raftka.errors import InvalidProducerEpochError, OutOfOrderSequenceError
from raftka.records.batch import BatchHeader, iter_batches

CACHED_BATCHES = 5
NO_PRODUCER_ID = -1
REBUILD_SEGMENTS = 2   # the tail of the log a restart rebuilds the state from
PENDING_OFFSET = -1    # a batch the leader accepted, not yet in its log
DEFAULT_EXPIRATION_MS = 24 * 3600 * 1000   # Kafka's producer.id.expiration.ms
EXPIRY_CHECK_RECORDS = 1024                # batches recorded between two expiry passes


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

    def __init__(self, expiration_ms: int = DEFAULT_EXPIRATION_MS) -> None:
        """`expiration_ms`: a producer id whose newest batch is this much older
        than the newest batch in the log is forgotten (Kafka's
        producer.id.expiration.ms, measured by the log's own timestamps, never
        the wall clock: the same log expires the same ids)."""
        self._producers: dict[int, _Producer] = {}
        self.expiration_ms = expiration_ms
        self._log_time = -1       # newest batch timestamp recorded
        self._since_expiry = 0

    def check(self, header: BatchHeader) -> int | None:
        """None if the batch is new and may be appended; the base offset it was
        stored at if it is a retry; raises OutOfOrderSequenceError or
        InvalidProducerEpochError otherwise."""
        if header.producer_id == NO_PRODUCER_ID:
            return None
        producer = self._producers.get(header.producer_id)
        if producer is None:
            return None   # first sight (or state past the rebuilt tail): accept its sequence
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
        producer = self._producers.get(header.producer_id)
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
        """Forget producers idle for expiration_ms of log time; how many went."""
        self._since_expiry = 0
        cutoff = self._log_time - self.expiration_ms
        idle = [pid for pid, producer in self._producers.items() if producer.last_timestamp < cutoff]
        for pid in idle:
            del self._producers[pid]
        return len(idle)

    def __len__(self) -> int:
        return len(self._producers)

    def rebuild(self, segment_views: list[memoryview]) -> None:
        """Recompute from stored batches (the log's last segments, oldest first)."""
        self._producers.clear()
        self._log_time = -1
        for view in segment_views:
            for header, _batch in iter_batches(view):
                self.record(header, header.base_offset)
        self.expire()
