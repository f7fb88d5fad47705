"""GroupService: consumer groups on one broker, between the Kafka handlers and
the GroupCoordinator state machine.

A group's coordinator is the leader of its `__consumer_offsets` partition
(`partition_for_group`, Kafka's hash), so coordination fails over with Raft
leadership. This module:
- creates `__consumer_offsets` on the first FindCoordinator (as Kafka does),
  with unlimited retention;
- answers which broker coordinates a group, and refuses requests for groups
  this broker does not coordinate (NOT_COORDINATOR), or not yet
  (COORDINATOR_LOAD_IN_PROGRESS until the new leader applied everything
  committed before its term);
- on taking over a partition, materialises it and loads its groups (their
  generation, members and assignments) from LMDB; on losing it, drops them;
- makes group metadata and committed offsets durable by appending records to
  the partition through Raft; every replica materialises them into LMDB
  (GroupStore), so the next coordinator finds them;
- expires the committed offsets of empty groups after
  `offsets.retention.minutes` (offset_expiry), by appending tombstones to
  the partitions it coordinates.
"""
from __future__ import annotations

import asyncio
import logging
import time

from raftka.config import OFFSETS_TOPIC, Config
from raftka.cluster.controller import ClusterController
from raftka.errors import ErrorCode, GroupError, NotLeaderOrFollowerError, RaftkaError, ReplicationTimeoutError
from raftka.groups.consumer_protocol import PROTOCOL_TYPE, ProtocolFormatError, decode_subscription
from raftka.groups.coordinator import GROUP_TICK_S, GroupCoordinator, GroupSettings
from raftka.groups.offset_expiry import expired
from raftka.groups.offsets_topic import CommittedOffset, GroupRecord, partition_for_group
from raftka.groups.store import GroupStore, group_record, offset_records
from raftka.records.batch import build_batch
from raftka.replication import PartitionReplica

log = logging.getLogger(__name__)

APPEND_TIMEOUT_S = 10.0


def offsets_topic_configs(config: Config) -> dict[str, str]:
    """__consumer_offsets is compacted, as Kafka's: the latest record of each
    group and of each of its partitions stays, the tombstones of deleted or
    expired ones go delete.retention.ms later; never deleted by age or size."""
    return {"cleanup.policy": "compact", "retention.ms": "-1", "retention.bytes": "-1",
            "segment.bytes": str(config.offsets_topic_segment_bytes)}


class GroupService:
    """One per broker; see the module docstring."""

    def __init__(self, controller: ClusterController) -> None:
        self.controller = controller
        config = controller.config
        self.store = GroupStore(controller.logs.index)
        self.coordinator = GroupCoordinator(GroupSettings(
            min_session_timeout_ms=config.group_min_session_timeout_ms,
            max_session_timeout_ms=config.group_max_session_timeout_ms,
            initial_rebalance_delay_ms=config.group_initial_rebalance_delay_ms,
            max_size=config.group_max_size), self._persist_group)
        self._loaded: dict[int, int] = {}     # offsets partition -> leader epoch its groups were loaded at
        self._materialising: set[int] = set()
        self._creating: asyncio.Task[None] | None = None
        self._ticker: asyncio.Task[None] | None = None
        self._expirer: asyncio.Task[None] | None = None

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._ticker = loop.create_task(self._tick_forever())
        self._expirer = loop.create_task(self._expire_forever())

    async def stop(self) -> None:
        for task in (self._ticker, self._expirer):
            if task is not None:
                task.cancel()
        self.coordinator.close()

    def replica_started(self, partition: int, replica: PartitionReplica) -> None:
        """Keep LMDB's view of this offsets partition following its commits."""
        wake = replica.on_high_watermark

        def on_high_watermark() -> None:
            if wake is not None:
                wake()
            if partition not in self._materialising:
                self._materialising.add(partition)
                asyncio.get_running_loop().call_soon(self._materialise, partition)
        replica.on_high_watermark = on_high_watermark

    def _materialise(self, partition: int) -> None:
        self._materialising.discard(partition)
        replica = self.controller.replica(OFFSETS_TOPIC, partition)
        if replica is not None:
            try:
                self.store.materialise(replica.log)
            except RaftkaError:
                log.exception("materialising %s-%d failed", OFFSETS_TOPIC, partition)

    async def _tick_forever(self) -> None:
        while True:
            await asyncio.sleep(GROUP_TICK_S)
            try:
                self._drop_lost_partitions()
                self.coordinator.tick()
            except Exception:
                log.exception("group coordinator tick failed")

    async def _expire_forever(self) -> None:
        interval_s = self.controller.config.offsets_retention_check_interval_ms / 1000
        while True:
            await asyncio.sleep(interval_s)
            try:
                await self.expire_offsets()
            except Exception:
                log.exception("expiring committed offsets failed")

    async def expire_offsets(self, now_ms: int | None = None) -> int:
        """Tombstone the expired offsets (and emptied groups) of every group
        this broker coordinates, at `now_ms` (default: the wall clock);
        returns how many offsets expired. A group whose write fails keeps
        its offsets until the next round."""
        now_ms = int(time.time() * 1000) if now_ms is None else now_ms
        retention_ms = self.controller.config.offsets_retention_minutes * 60_000
        partitions = self._partitions()
        count = 0
        for group_id in sorted(self.store.group_names()) if partitions is not None else ():
            replica = self.controller.replica(OFFSETS_TOPIC, partition_for_group(group_id, partitions))
            group = self.coordinator.groups.get(group_id)
            if replica is None or not replica.is_leader or (group is not None and group.members):
                continue
            gone = expired(self.store.group(group_id), self.store.committed(group_id), now_ms, retention_ms)
            if not gone.offsets and not gone.group:
                continue
            records = offset_records(group_id, dict.fromkeys(gone.offsets))
            try:
                self.coordinating(group_id)
                await self._append(group_id, replica, build_batch(
                    [*records, group_record(group_id, None)] if gone.group else records))
            except GroupError as error:
                log.info("group %r: expiring offsets postponed: %s", group_id, error)
                continue
            if gone.group:
                self.coordinator.unload(group_id)
            log.info("group %r: %d committed offsets expired%s", group_id, len(gone.offsets),
                     ", group deleted" if gone.group else "")
            count += len(gone.offsets)
        return count

    # ---- where groups live -------------------------------------------------------

    def _partitions(self) -> int | None:
        topic = self.controller.state.topics.get(OFFSETS_TOPIC)
        return len(topic.partitions) if topic is not None else None

    async def find_coordinator(self, group_id: str) -> tuple[int, str, int]:
        """(node id, host, port) of the group's coordinator; GroupError with
        COORDINATOR_NOT_AVAILABLE while there is none (yet)."""
        partitions = self._partitions()
        if partitions is None:
            self._create_offsets_topic()
            raise GroupError(ErrorCode.COORDINATOR_NOT_AVAILABLE, group_id, f"creating {OFFSETS_TOPIC}")
        leader, _epoch = self.controller.partition_leader(OFFSETS_TOPIC, partition_for_group(group_id, partitions))
        broker = self.controller.state.brokers.get(leader)
        if broker is None:
            raise GroupError(ErrorCode.COORDINATOR_NOT_AVAILABLE, group_id, "its partition has no leader yet")
        return broker.node_id, broker.host, broker.port

    def _create_offsets_topic(self) -> None:
        if self._creating is not None and not self._creating.done():
            return
        config = self.controller.config
        replication = min(config.offsets_topic_replication_factor, max(len(self.controller.state.brokers), 1))

        async def create() -> None:
            try:
                await self.controller.create_topic(OFFSETS_TOPIC, config.offsets_topic_partitions, replication,
                                                   offsets_topic_configs(config))
            except RaftkaError as error:
                if error.error_code != ErrorCode.TOPIC_ALREADY_EXISTS:
                    log.warning("creating %s failed: %s", OFFSETS_TOPIC, error)
        self._creating = asyncio.get_running_loop().create_task(create())

    def coordinating(self, group_id: str) -> PartitionReplica:
        """The offsets replica through which this broker coordinates the
        group, its groups loaded; GroupError (NOT_COORDINATOR,
        COORDINATOR_LOAD_IN_PROGRESS) when it cannot."""
        if not group_id:
            raise GroupError(ErrorCode.INVALID_GROUP_ID, group_id, "empty group id")
        partitions = self._partitions()
        if partitions is None:
            raise GroupError(ErrorCode.COORDINATOR_NOT_AVAILABLE, group_id, f"no {OFFSETS_TOPIC} yet")
        partition = partition_for_group(group_id, partitions)
        replica = self.controller.replica(OFFSETS_TOPIC, partition)
        if replica is None or not replica.is_leader:
            raise GroupError(ErrorCode.NOT_COORDINATOR, group_id)
        if not replica.leader_ready or replica.catching_up:
            raise GroupError(ErrorCode.COORDINATOR_LOAD_IN_PROGRESS, group_id)
        if self._loaded.get(partition) != replica.leader_epoch:
            self._load(partition, partitions, replica)
        return replica

    def _load(self, partition: int, partitions: int, replica: PartitionReplica) -> None:
        started = time.perf_counter()
        self._unload(partition, partitions)
        self.store.materialise(replica.log)
        loaded = 0
        for group_id in self.store.group_names():
            if partition_for_group(group_id, partitions) == partition:
                self.coordinator.load(group_id, self.store.group(group_id))
                loaded += 1
        self._loaded[partition] = replica.leader_epoch
        log.info("node %d: coordinating %s-%d at epoch %d: %d groups loaded in %.1f ms", self.controller.node_id,
                 OFFSETS_TOPIC, partition, replica.leader_epoch, loaded, (time.perf_counter() - started) * 1000)

    def _unload(self, partition: int, partitions: int) -> None:
        self._loaded.pop(partition, None)
        for group_id in [g for g in self.coordinator.groups if partition_for_group(g, partitions) == partition]:
            self.coordinator.unload(group_id)

    def _drop_lost_partitions(self) -> None:
        partitions = self._partitions()
        for partition, epoch in list(self._loaded.items()):
            replica = self.controller.replica(OFFSETS_TOPIC, partition)
            if partitions is None or replica is None or not replica.is_leader or replica.leader_epoch != epoch:
                log.info("node %d: no longer coordinating %s-%d", self.controller.node_id, OFFSETS_TOPIC, partition)
                if partitions is None:
                    self._loaded.pop(partition, None)
                else:
                    self._unload(partition, partitions)

    # ---- durability ---------------------------------------------------------------

    async def _append(self, group_id: str, replica: PartitionReplica, batch: bytes) -> None:
        try:
            await replica.replicate(batch, APPEND_TIMEOUT_S)
        except NotLeaderOrFollowerError:
            raise GroupError(ErrorCode.NOT_COORDINATOR, group_id, "leadership moved") from None
        except ReplicationTimeoutError:
            raise GroupError(ErrorCode.COORDINATOR_NOT_AVAILABLE, group_id, "the write did not commit") from None
        self.store.materialise(replica.log)

    async def _persist_group(self, group_id: str, record: GroupRecord) -> None:
        await self._append(group_id, self.coordinating(group_id), build_batch([group_record(group_id, record)]))

    async def commit_offsets(self, group_id: str, generation: int, member_id: str,
                             offsets: dict[tuple[str, int], CommittedOffset],
                             group_instance_id: str | None = None) -> None:
        """Store the offsets through Raft; GroupError if this member may not."""
        replica = self.coordinating(group_id)
        self.coordinator.validate_commit(group_id, generation, member_id, group_instance_id)
        if offsets:
            await self._append(group_id, replica, build_batch(offset_records(group_id, offsets)))

    def committed_offsets(self, group_id: str) -> dict[tuple[str, int], CommittedOffset]:
        replica = self.coordinating(group_id)
        self.store.materialise(replica.log)
        return self.store.committed(group_id)

    async def delete_offsets(self, group_id: str, partitions: list[tuple[str, int]]) -> dict[tuple[str, int], ErrorCode]:
        """OffsetDelete: drop committed offsets of topics the group does not consume."""
        replica = self.coordinating(group_id)
        group = self.coordinator.groups.get(group_id)
        subscribed = set()
        if group is not None and group.protocol_type == PROTOCOL_TYPE and group.protocol:
            for member in group.members.values():
                try:
                    subscribed.update(decode_subscription(member.metadata(group.protocol)))
                except ProtocolFormatError:
                    continue
        if group is None and group_id not in self.store.group_names():
            raise GroupError(ErrorCode.GROUP_ID_NOT_FOUND, group_id)
        outcome = {tp: ErrorCode.GROUP_SUBSCRIBED_TO_TOPIC if tp[0] in subscribed else ErrorCode.NONE for tp in partitions}
        doomed = {tp: None for tp, code in outcome.items() if code == ErrorCode.NONE}
        if doomed:
            await self._append(group_id, replica, build_batch(offset_records(group_id, doomed)))
        return outcome

    async def delete_group(self, group_id: str) -> None:
        replica = self.coordinating(group_id)
        self.coordinator.check_deletable(group_id)
        if group_id not in self.coordinator.groups and group_id not in self.store.group_names():
            raise GroupError(ErrorCode.GROUP_ID_NOT_FOUND, group_id)
        tombstones = offset_records(group_id, {tp: None for tp in self.store.committed(group_id)})
        await self._append(group_id, replica, build_batch([*tombstones, group_record(group_id, None)]))
        self.coordinator.unload(group_id)   # empty: nobody to tell

    def listed_groups(self) -> list[tuple[str, str]]:
        """(group id, protocol type) of the groups this broker coordinates."""
        partitions = self._partitions()
        if partitions is None:
            return []
        found: dict[str, str] = {}
        for group_id in self.store.group_names():
            if self._leads(partition_for_group(group_id, partitions)):
                record = self.store.group(group_id)
                found[group_id] = record.protocol_type if record is not None else ""
        for group_id, group in self.coordinator.groups.items():
            if self._leads(partition_for_group(group_id, partitions)):
                found[group_id] = group.protocol_type or ""
        return sorted(found.items())

    def coordinated_groups(self) -> list[str]:
        return [group_id for group_id, _ in self.listed_groups()]

    def _leads(self, partition: int) -> bool:
        replica = self.controller.replica(OFFSETS_TOPIC, partition)
        return replica is not None and replica.is_leader
