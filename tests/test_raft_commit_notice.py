"""A partition leader's commit notice (an append_entries that only tells
followers the new commit index) waits PartitionReplica.COMMIT_NOTICE_DELAY_S:
under load the next entries carry the commit index instead, so a stream of
appends sends no empty append_entries between them; an idle group still
tells its followers within the delay."""
from __future__ import annotations

import asyncio
import time

from raftka.raft.group import RaftGroup
from raftka.raft.pysyncobj_adapter import monotonic_time
from raftka.raft.state_machine import StateMachineReplica   # the metadata group's class
from raftka.replication import PartitionReplica
from tests.conftest import make_batch, wait_for
from tests.test_raft_group import GROUP, append, start_cluster

COMMIT_NOTICE_DELAY_S = PartitionReplica.COMMIT_NOTICE_DELAY_S


def _count_sent(broker, kinds: dict[str, int]) -> None:
    """Count the messages `broker` sends for the partition group: append_entries
    with entries ("entries") and without ("empty")."""
    network = broker.node.network
    send = network.send

    def counting(peer_id, group_id, message):
        if group_id == GROUP and isinstance(message, dict) and message.get("type") == "append_entries":
            kinds["entries" if message.get("entries") else "empty"] += 1
        return send(peer_id, group_id, message)
    network.send = counting


def test_back_to_back_appends_carry_the_commit_index_instead_of_empty_append_entries(tmp_path):
    async def scenario() -> None:
        _ports, brokers, leader = await start_cluster(tmp_path)
        try:
            await append(leader, make_batch(1, seed=0))
            await asyncio.sleep(0.5)     # the first append's notice, the election's no-op: sent
            kinds = {"entries": 0, "empty": 0}
            _count_sent(leader, kinds)
            started = time.monotonic()
            for i in range(20):          # each proposed the moment the previous one committed
                await append(leader, make_batch(1, seed=i + 1))
            elapsed = time.monotonic() - started
            assert kinds["entries"] >= 40    # 20 entries to each of 2 followers
            # stock pysyncobj sent one empty append_entries per follower per
            # commit (40); now only heartbeats of the group and the last notice
            heartbeats = 2 * (int(elapsed / leader.replica.conf.appendEntriesPeriod) + 1)
            assert kinds["empty"] <= heartbeats + 2, (kinds, elapsed)
            await wait_for(lambda: all(b.replica.log.high_watermark == 21 for b in brokers))
        finally:
            for b in brokers:
                await b.stop()
    asyncio.run(scenario())


def test_followers_of_an_idle_group_learn_the_commit_index_within_the_notice_delay(tmp_path):
    async def scenario() -> None:
        _ports, brokers, leader = await start_cluster(tmp_path)
        try:
            await asyncio.sleep(0.5)
            followers = [b for b in brokers if b is not leader]
            assert await append(leader, make_batch(3, seed=1)) == 0
            committed = time.monotonic()
            await wait_for(lambda: all(b.replica.log.high_watermark == 3 for b in followers), timeout_s=5)
            # well before the heartbeat period (0.25 s) that would otherwise carry it
            assert time.monotonic() - committed < COMMIT_NOTICE_DELAY_S + 0.15
        finally:
            for b in brokers:
                await b.stop()
    asyncio.run(scenario())


def test_the_commit_notice_is_not_sent_at_once_but_scheduled_within_the_delay():
    class Leader(RaftGroup):
        COMMIT_NOTICE_DELAY_S = COMMIT_NOTICE_DELAY_S

        def __init__(self) -> None:   # only what _after_apply_hook reads
            self.due = monotonic_time() + 100.0   # the next heartbeat

        def _raft_is_leader(self) -> bool:
            return True

        def _other_nodes(self):
            return {object()}

        def _append_entries_due(self) -> float:
            return self.due

        def _set_append_entries_due(self, due: float) -> None:
            self.due = due

    group = Leader()
    before = monotonic_time()
    assert group._after_apply_hook(True) is False
    assert before + COMMIT_NOTICE_DELAY_S <= group.due <= monotonic_time() + COMMIT_NOTICE_DELAY_S
    group.due = 0.0                   # a send already due sooner stays as it is
    assert group._after_apply_hook(True) is False and group.due == 0.0
    assert group._after_apply_hook(False) is False
    Leader.COMMIT_NOTICE_DELAY_S = 0.0   # a group that does not wait (the metadata group) sends at once
    assert group._after_apply_hook(True) is True


def test_only_partition_groups_wait_to_send_the_commit_notice():
    assert PartitionReplica.COMMIT_NOTICE_DELAY_S > 0
    assert StateMachineReplica.COMMIT_NOTICE_DELAY_S == RaftGroup.COMMIT_NOTICE_DELAY_S == 0
