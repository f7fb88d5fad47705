"""Committed offsets expire by Kafka's rule (offsets.retention.minutes): an
empty group's offsets once the retention has passed since it became empty,
a self-assigning consumer's offsets each retention after its commit, never
a group with members; the coordinator writes tombstones into the offsets
log, so what expired is in the replicated log, not a replica's judgement."""
from __future__ import annotations

import asyncio
import time

from raftka.broker.broker import Broker
from raftka.config import OFFSETS_TOPIC, Config
from raftka.errors import GroupError
from raftka.groups import offsets_topic
from raftka.groups.offset_expiry import expired
from raftka.groups.offsets_topic import CommittedOffset, GroupRecord, MemberRecord
from raftka.records.batch import parse_records
from tests.conftest import wait_for

RETENTION_MINUTES = 60
RETENTION_MS = RETENTION_MINUTES * 60_000
T0 = 1_700_000_000_000


def offsets(*commit_times: int) -> dict[tuple[str, int], CommittedOffset]:
    return {("t", i): CommittedOffset(10 + i, -1, "", at) for i, at in enumerate(commit_times)}


def group(members: int, became_empty_ms: int = T0) -> GroupRecord:
    member = MemberRecord("m", None, "c", "/h", 1000, 1000, b"", b"")
    return GroupRecord("consumer", 3, "range", "m" if members else None, became_empty_ms, (member,) * members)


def test_a_group_with_members_keeps_every_offset_however_old():
    assert expired(group(1), offsets(T0), T0 + 10 * RETENTION_MS, RETENTION_MS).offsets == ()


def test_an_empty_groups_offsets_all_expire_retention_after_it_became_empty_and_the_group_goes_too():
    committed = offsets(T0 - 5 * RETENTION_MS, T0 + RETENTION_MS // 2)
    assert expired(group(0), committed, T0 + RETENTION_MS - 1, RETENTION_MS).offsets == ()
    gone = expired(group(0), committed, T0 + RETENTION_MS, RETENTION_MS)
    assert gone.offsets == (("t", 0), ("t", 1)) and gone.group


def test_offsets_without_a_group_expire_one_by_one_after_their_own_commit():
    gone = expired(None, offsets(T0, T0 + 1000), T0 + RETENTION_MS, RETENTION_MS)
    assert gone.offsets == (("t", 0),) and not gone.group


async def coordinating(broker: Broker, group_id: str) -> None:
    async def ready() -> bool:
        try:
            await broker.groups.find_coordinator(group_id)
            broker.groups.coordinating(group_id)
            return True
        except GroupError:
            return False
    deadline = asyncio.get_running_loop().time() + 30
    while not await ready():
        assert asyncio.get_running_loop().time() < deadline, "no coordinator in time"
        await asyncio.sleep(0.05)


def test_the_coordinator_expires_offsets_through_the_offsets_log(tmp_path):
    asyncio.run(_expires_through_the_log(tmp_path))


async def _expires_through_the_log(tmp_path):
    broker = Broker(Config(data_dir=tmp_path / "data", port=0, offsets_topic_partitions=1,
                           group_initial_rebalance_delay_ms=0, offsets_retention_minutes=RETENTION_MINUTES))
    await broker.start()
    try:
        service = broker.groups
        for group_id in ("emptied", "solo", "busy"):
            await coordinating(broker, group_id)
        now_ms = int(time.time() * 1000)
        await service.commit_offsets("solo", -1, "", {("t", 0): CommittedOffset(7, -1, "", now_ms)})
        emptied = await join_and_commit(service, "emptied")
        service.coordinator.leave("emptied", emptied)
        await wait_for(lambda: (r := service.store.group("emptied")) is not None and not r.members)
        busy = await join_and_commit(service, "busy")
        assert await service.expire_offsets(now_ms + RETENTION_MS - 60_000) == 0
        assert await service.expire_offsets(now_ms + RETENTION_MS + 60_000) == 2
        assert service.committed_offsets("emptied") == {} and service.committed_offsets("solo") == {}
        assert service.store.group("emptied") is None and "emptied" not in service.store.group_names()
        assert set(service.committed_offsets("busy")) == {("t", 0)}
        service.coordinator.heartbeat("busy", 1, busy)
        tombstones = [offsets_topic.decode_key(r.key) for r in log_records(broker) if r.value is None]
        assert sorted(map(repr, tombstones)) == sorted(map(repr, [
            offsets_topic.OffsetKey("emptied", "t", 0), offsets_topic.OffsetKey("solo", "t", 0),
            offsets_topic.GroupKey("emptied")]))
    finally:
        await broker.stop()


async def join_and_commit(service, group_id: str) -> str:
    """A one-member group that commits offset 5 of t-0; its member id."""
    result = await service.coordinator.join(group_id, "", "client", "/h", 10_000, 10_000, "consumer",
                                            (("range", b""),))
    await service.coordinator.sync(group_id, result.generation, result.member_id, {result.member_id: b""})
    now_ms = int(time.time() * 1000)
    await service.commit_offsets(group_id, result.generation, result.member_id,
                                 {("t", 0): CommittedOffset(5, -1, "", now_ms)})
    return result.member_id


def log_records(broker: Broker) -> list:
    log_ = broker.controller.replica(OFFSETS_TOPIC, 0).log
    return list(parse_records(log_.read(log_.log_start_offset, 1 << 20).buffer))
