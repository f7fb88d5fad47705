"""Consumer groups in the embedded API: the broker's GroupCoordinator and
GroupStore, run inside the process over an open data directory.

    with raftka.open("./data") as rk:
        consumer = rk.consumer("billing", ["events"])      # joins the group
        for record in consumer:                            # blocking; poll() does not block
            handle(record)                                 # offsets auto-committed every 5 s

EmbeddedGroups hosts the coordinator on an asyncio loop of its own thread
(the coordinator is the same state machine the broker runs, so the rules are
Kafka's: one member per partition, generations, session timeouts). Group
metadata and committed offsets are appended to this data directory's
`__consumer_offsets` topic in Kafka's record format and materialised into
LMDB, exactly as a broker does after Raft commits them, and survive a
reopen. Processes that want to share a group run `raftka serve` and use any
Kafka client: the broker runs this same coordinator. GroupConsumer is a member
that behaves like a Kafka consumer: it subscribes with Kafka's consumer
protocol, assigns partitions with the range assignor when it leads, keeps
its session alive from poll(), rejoins on a rebalance and commits its
positions (automatically, or with commit()).
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time
from typing import TYPE_CHECKING, Any, Callable, Iterator, TypeVar

from raftka.config import OFFSETS_TOPIC
from raftka.errors import ClosedError, ErrorCode, GroupError
from raftka.groups import consumer_protocol
from raftka.groups.coordinator import GROUP_TICK_S, GroupCoordinator, GroupSettings
from raftka.groups.offsets_topic import CommittedOffset, GroupRecord, partition_for_group
from raftka.groups.store import GroupStore, group_record, offset_records
from raftka.records.batch import ConsumerRecord, build_batch, iter_columns

if TYPE_CHECKING:
    from raftka.client.embedded import Raftka

log = logging.getLogger(__name__)

T = TypeVar("T")
CALL_TIMEOUT_S = 120.0
CLOSE_TIMEOUT_S = 5.0
READ_BYTES = 1 << 20
MAX_POLL_RECORDS = 500   # Kafka's max.poll.records default
REJOIN_ERRORS = (ErrorCode.REBALANCE_IN_PROGRESS, ErrorCode.ILLEGAL_GENERATION, ErrorCode.UNKNOWN_MEMBER_ID)


class EmbeddedGroups:
    """The coordinator of an embedded handle's groups; created on first use."""

    def __init__(self, rk: "Raftka") -> None:
        self._rk = rk
        config = rk.config
        self.partitions = config.offsets_topic_partitions
        with rk._lock:
            if OFFSETS_TOPIC not in rk._manager.topics():
                rk._manager.create_topic(OFFSETS_TOPIC, self.partitions)
            self.partitions = rk._manager.topics()[OFFSETS_TOPIC]
            self.store = GroupStore(rk._manager.index)
            for partition in range(self.partitions):
                self.store.materialise(rk._manager.log(OFFSETS_TOPIC, partition))
        self._loop = asyncio.new_event_loop()
        self._submit_lock = threading.Lock()
        self._closing = False   # set once, under _submit_lock: no coroutine reaches the loop after it
        self.coordinator = GroupCoordinator(GroupSettings(
            min_session_timeout_ms=config.group_min_session_timeout_ms,
            max_session_timeout_ms=config.group_max_session_timeout_ms,
            initial_rebalance_delay_ms=config.group_initial_rebalance_delay_ms,
            max_size=config.group_max_size), self._persist_group)
        for group_id in self.store.group_names():
            record = self.store.group(group_id)
            if record is not None:   # the last generation's members had to rejoin anyway: start empty
                self.coordinator.load(group_id, GroupRecord(record.protocol_type, record.generation, None, None,
                                                            record.state_timestamp_ms))
        self._thread = threading.Thread(target=self._run, name="raftka-groups", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.create_task(self._tick_forever())
        self._loop.run_forever()

    async def _tick_forever(self) -> None:
        while True:
            await asyncio.sleep(GROUP_TICK_S)
            self.coordinator.tick()

    def close(self) -> None:
        """Stop the coordinator and every task on its loop, then the loop and its thread.

        Tasks are cancelled and awaited on the loop before it stops, so none is
        left pending (asyncio would warn "Task was destroyed but it is pending!").
        """
        with self._submit_lock:
            if self._closing:
                return
            self._closing = True
        if self._thread.is_alive():
            try:
                asyncio.run_coroutine_threadsafe(self._stop_tasks(), self._loop).result(CLOSE_TIMEOUT_S)
            finally:
                self._loop.call_soon_threadsafe(self._loop.stop)
                self._thread.join(CLOSE_TIMEOUT_S)
        if self._thread.is_alive():
            raise RuntimeError(f"the groups thread did not stop within {CLOSE_TIMEOUT_S} s")
        self._loop.close()

    async def _stop_tasks(self) -> None:
        self.coordinator.close()
        current = asyncio.current_task()
        tasks = [task for task in asyncio.all_tasks() if task is not current]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # ---- calls from consumer threads ---------------------------------------------

    def run(self, coroutine: Any, timeout_s: float = CALL_TIMEOUT_S) -> Any:
        """Run a coroutine on the coordinator's loop and wait for its result.

        ClosedError once close() has begun: the coroutine is then closed
        unstarted (never scheduled, so Python does not warn that it was never
        awaited), and one that close() cancelled in flight ends the same way.
        """
        with self._submit_lock:   # close() sets _closing under it: what is submitted here runs or is cancelled
            if self._closing:
                coroutine.close()
                raise ClosedError("the handle's consumer groups are closed")
            future = asyncio.run_coroutine_threadsafe(coroutine, self._loop)
        try:
            return future.result(timeout_s)
        except concurrent.futures.CancelledError:
            raise ClosedError("the handle's consumer groups closed during the call") from None

    def call(self, function: Callable[..., T], *args: Any) -> T:
        async def call() -> T:
            return function(*args)
        return self.run(call())

    # ---- durability -------------------------------------------------------------

    def _append(self, group_id: str, batch: bytes) -> None:
        partition = partition_for_group(group_id, self.partitions)
        with self._rk._lock:
            self._rk.append_batches(OFFSETS_TOPIC, partition, batch)   # unreplicated: written is committed
            self.store.materialise(self._rk._manager.log(OFFSETS_TOPIC, partition))

    async def _persist_group(self, group_id: str, record: GroupRecord) -> None:
        self._append(group_id, build_batch([group_record(group_id, record)]))

    def commit(self, group_id: str, generation: int, member_id: str,
               offsets: dict[tuple[str, int], CommittedOffset]) -> None:
        self.call(self.coordinator.validate_commit, group_id, generation, member_id)
        if offsets:
            self._append(group_id, build_batch(offset_records(group_id, offsets)))

    def committed(self, group_id: str) -> dict[tuple[str, int], CommittedOffset]:
        with self._rk._lock:
            return self.store.committed(group_id)


class GroupConsumer:
    """A member of a consumer group on an embedded handle (see the module docstring).

    Not thread-safe: use one consumer from one thread, as with Kafka's.
    """

    def __init__(self, rk: "Raftka", groups: EmbeddedGroups, group_id: str, topics: list[str], *,
                 auto_commit: bool = True, auto_commit_interval_s: float = 5.0, session_timeout_s: float = 10.0,
                 rebalance_timeout_s: float = 30.0, auto_offset_reset: str = "earliest",
                 client_id: str = "raftka-embedded") -> None:
        if auto_offset_reset not in ("earliest", "latest"):
            raise ValueError(f"auto_offset_reset must be 'earliest' or 'latest', got {auto_offset_reset!r}")
        self._rk, self._groups = rk, groups
        self.group_id, self.topics = group_id, list(topics)
        self._auto_commit, self._auto_commit_interval_s = auto_commit, auto_commit_interval_s
        self._session_ms, self._rebalance_ms = int(session_timeout_s * 1000), int(rebalance_timeout_s * 1000)
        self._heartbeat_interval_s = session_timeout_s / 3
        self._auto_offset_reset, self._client_id = auto_offset_reset, client_id
        self.member_id = ""
        self.generation = -1
        self._positions: dict[tuple[str, int], int] = {}    # assigned partition -> next offset to read
        self._next_heartbeat = self._next_commit = 0.0
        self._closed = False    # set by close(), from any thread; the polling thread checks it at each step
        for topic in self.topics:
            rk._manager.topic(topic)    # UnknownTopicOrPartitionError now, not at the first poll

    # ---- membership ---------------------------------------------------------

    def assignment(self) -> list[tuple[str, int]]:
        """The partitions this member owns in the current generation."""
        self._ensure_joined()
        return sorted(self._positions)

    def _ensure_joined(self) -> None:
        while self.generation < 0:
            self._check_open()   # a member that close() made leave must not rejoin from an iterating thread
            self._join()

    def _check_open(self) -> None:
        if self._closed:
            raise ClosedError(f"group {self.group_id!r}: the consumer is closed")

    def _join(self) -> None:
        subscription = consumer_protocol.encode_subscription(self.topics)
        try:
            result = self._groups.run(self._groups.coordinator.join(
                self.group_id, self.member_id, self._client_id, "/embedded", self._session_ms, self._rebalance_ms,
                consumer_protocol.PROTOCOL_TYPE, (("range", subscription),)))
            self.member_id = result.member_id
            assignments = self._assign(result.members) if result.member_id == result.leader else {}
            assigned = self._groups.run(self._groups.coordinator.sync(
                self.group_id, result.generation, self.member_id, assignments))
        except GroupError as error:
            if error.error_code == ErrorCode.UNKNOWN_MEMBER_ID:
                self.member_id = ""
            if error.error_code not in REJOIN_ERRORS:
                raise
            return
        self.generation = result.generation
        self._take(consumer_protocol.decode_assignment(assigned))
        self._next_heartbeat = time.monotonic() + self._heartbeat_interval_s
        self._next_commit = time.monotonic() + self._auto_commit_interval_s

    def _assign(self, members: tuple[tuple[str, str | None, bytes], ...]) -> dict[str, bytes]:
        subscriptions = {member_id: consumer_protocol.decode_subscription(metadata) for member_id, _i, metadata in members}
        with self._rk._lock:
            counts = self._rk._manager.topics()
        plan = consumer_protocol.range_assign(subscriptions, counts)
        return {member_id: consumer_protocol.encode_assignment(topics) for member_id, topics in plan.items()}

    def _take(self, assignment: dict[str, list[int]]) -> None:
        committed = self._groups.committed(self.group_id)
        positions = {}
        with self._rk._lock:
            for topic, partitions in assignment.items():
                for partition in partitions:
                    partition_log = self._rk._manager.log(topic, partition)
                    stored = committed.get((topic, partition))
                    if stored is not None and partition_log.log_start_offset <= stored.offset <= partition_log.high_watermark:
                        positions[(topic, partition)] = stored.offset
                    elif self._auto_offset_reset == "earliest":
                        positions[(topic, partition)] = partition_log.log_start_offset
                    else:
                        positions[(topic, partition)] = partition_log.high_watermark
        self._positions = positions

    def _duties(self) -> None:
        """Heartbeat and auto-commit when due; on a rebalance, commit and rejoin."""
        self._ensure_joined()
        now = time.monotonic()
        if self._auto_commit and now >= self._next_commit:
            self._commit_quietly()
            self._next_commit = now + self._auto_commit_interval_s
        if now < self._next_heartbeat:
            return
        self._next_heartbeat = now + self._heartbeat_interval_s
        try:
            self._groups.call(self._groups.coordinator.heartbeat, self.group_id, self.generation, self.member_id)
        except GroupError as error:
            if error.error_code not in REJOIN_ERRORS:
                raise
            if error.error_code == ErrorCode.REBALANCE_IN_PROGRESS and self._auto_commit:
                self._commit_quietly()
            self._lose_assignment(error.error_code)
            self._ensure_joined()

    def _lose_assignment(self, code: ErrorCode) -> None:
        if code == ErrorCode.UNKNOWN_MEMBER_ID:
            self.member_id = ""
        self.generation = -1
        self._positions = {}

    # ---- consuming ----------------------------------------------------------

    def poll(self, timeout_s: float = 0.0, max_records: int = MAX_POLL_RECORDS) -> list[ConsumerRecord]:
        """The next records from this member's partitions, waiting up to
        timeout_s for some (0: return at once); ClosedError after close()."""
        self._check_open()
        return self._poll(timeout_s, max_records)

    def _poll(self, timeout_s: float, max_records: int) -> list[ConsumerRecord]:
        """poll() without the check on entry: [] once close() has begun, from
        any thread (after the group request under way, if any; never a rejoin)."""
        deadline = time.monotonic() + timeout_s
        while not self._closed:
            try:
                self._duties()
            except ClosedError:
                if self._closed:
                    return []
                raise
            records = self._read(max_records)
            remaining_s = deadline - time.monotonic()
            if records or remaining_s <= 0:
                return records
            with self._rk._appended:
                if not self._closed:   # close() notifies under this lock: checked here, no wake-up is lost
                    self._rk._appended.wait(min(remaining_s, self._heartbeat_interval_s))
        return []

    def _read(self, max_records: int) -> list[ConsumerRecord]:
        records: list[ConsumerRecord] = []
        with self._rk._lock:
            if self._closed:   # the handle closes its consumers before its storage, under this lock
                return records
            for (topic, partition), position in self._positions.items():
                chunk = self._rk._manager.log(topic, partition).read(position, READ_BYTES)
                for columns in iter_columns(chunk.buffer, topic, partition, position):
                    taken = columns.records()[:max_records - len(records)]
                    records += taken
                    self._positions[(topic, partition)] = taken[-1].offset + 1
                    if len(records) >= max_records:
                        return records
        return records

    def __iter__(self) -> Iterator[ConsumerRecord]:
        """Records as they come, blocking while there are none; the iteration
        ends when close() is called, from this thread or another."""
        while not self._closed:
            yield from self._poll(self._heartbeat_interval_s, MAX_POLL_RECORDS)

    # ---- offsets ------------------------------------------------------------

    def commit(self) -> None:
        """Commit this member's positions (the next offset to read of each
        partition it owns); GroupError (REBALANCE_IN_PROGRESS, ...) if the
        group moved on, in which case the next poll rejoins; ClosedError after close()."""
        self._check_open()
        self._ensure_joined()
        self._commit_positions()

    def _commit_positions(self) -> None:
        offsets = {tp: CommittedOffset(position, -1, "", int(time.time() * 1000))
                   for tp, position in self._positions.items()}
        self._groups.commit(self.group_id, self.generation, self.member_id, offsets)

    def _commit_quietly(self) -> None:
        try:
            self._commit_positions()
        except GroupError as error:
            log.info("group %r: auto-commit skipped: %s", self.group_id, error)

    def committed(self) -> dict[tuple[str, int], int]:
        """The group's committed offsets."""
        return {tp: value.offset for tp, value in self._groups.committed(self.group_id).items()}

    def close(self) -> None:
        """Commit (when auto-committing) and leave the group, so its partitions move at once.

        A thread iterating over this consumer, or blocked in poll(), is woken:
        its loop ends (poll returns []) once the group request it has under
        way, if any, completes, and it never rejoins.
        """
        if self._closed:
            return
        self._closed = True
        with self._rk._appended:
            self._rk._appended.notify_all()
        if self.generation >= 0:
            if self._auto_commit:
                self._commit_quietly()
            try:
                self._groups.call(self._groups.coordinator.leave, self.group_id, self.member_id)
            except GroupError:
                pass

    def __enter__(self) -> "GroupConsumer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
