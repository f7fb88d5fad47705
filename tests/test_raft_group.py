"""Three brokers in one process over real loopback sockets, one partition group
(RF=3): appends commit on every replica with identical bytes, a new leader
takes over when the leader stops, and a restarted replica re-applies nothing twice."""
from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from raftka.config import Config
from raftka.errors import ErrorCode, NotLeaderOrFollowerError, ReplicationTimeoutError
from raftka.ports import free_ports
from raftka.storage.index import IndexStore
from raftka.storage.partition_log import PartitionLog
from raftka.replication import PartitionReplica
from raftka.raft.node import RaftNode
from raftka.raft.transport import PeerNetwork, PeerNetworkConfig
from tests.conftest import make_batch, readable_bytes, wait_for

SECRET = b"raftka-test-secret-16+"
GROUP = 1
FAST = dict(raftMinTimeout=0.3, raftMaxTimeout=0.6, appendEntriesPeriod=0.05, leaderFallbackTimeout=0.6)


class Broker:
    def __init__(self, root: Path, node_id: int, ports: dict[int, int]) -> None:
        self.root, self.node_id, self.ports = root / f"b{node_id}", node_id, ports
        self.index = IndexStore(self.root / "index.lmdb", 1 << 30)
        peers = {i: ("127.0.0.1", p) for i, p in ports.items() if i != node_id}
        self.node = RaftNode(PeerNetwork(PeerNetworkConfig(node_id=node_id, secret=SECRET, peers=peers,
                                                           listen_port=ports[node_id])))

    async def start(self) -> None:
        await self.node.start()
        log = PartitionLog("t-0", self.root / "t-0", 0, self.index, Config(data_dir=self.root))
        self.node.add_group(PartitionReplica(GROUP, log, self.node_id, list(self.ports), self.node.network,
                                             self.root / "t-0.raft", **FAST))

    async def stop(self) -> None:
        log = self.replica.log
        await self.node.stop()
        log.close()
        self.index.close()

    async def crash(self) -> None:
        """Stop without committing the log's index or state, as a kill would."""
        log = self.replica.log
        await self.node.stop()
        log.abandon()
        self.index.close()

    @property
    def replica(self) -> PartitionReplica:
        return self.node.group(GROUP)

    def readable_bytes(self) -> bytes:
        return readable_bytes(self.replica.log)


def leader_of(brokers):
    leaders = [b for b in brokers if b.replica.is_leader]
    return leaders[0] if len(leaders) == 1 else None


async def append(leader: Broker, batch: bytes) -> int:
    future = asyncio.get_running_loop().create_future()
    leader.replica.propose_append(batch, lambda offset, error: future.set_result((offset, error)))
    offset, error = await asyncio.wait_for(future, 10)
    assert error is None, error
    return offset


async def start_cluster(root: Path) -> tuple[dict[int, int], list[Broker], Broker]:
    """Three brokers with one partition group; returns (ports, brokers, leader)."""
    ports = dict(zip((1, 2, 3), free_ports(3)))
    brokers = [Broker(root, i, ports) for i in (1, 2, 3)]
    for b in brokers:
        await b.start()
    await wait_for(lambda: leader_of(brokers) is not None)
    return ports, brokers, leader_of(brokers)


def test_appends_commit_identically_on_all_replicas_and_survive_a_leader_stop(tmp_path):
    async def scenario():
        ports, brokers, leader = await start_cluster(tmp_path)
        offsets = [await append(leader, make_batch(3, seed=i)) for i in range(5)]
        assert offsets == [0, 3, 6, 9, 12]
        await wait_for(lambda: all(b.replica.log.high_watermark == 15 for b in brokers))
        assert len({b.readable_bytes() for b in brokers}) == 1

        await leader.stop()
        survivors = [b for b in brokers if b is not leader]
        await wait_for(lambda: leader_of(survivors) is not None)
        new_leader = leader_of(survivors)
        assert new_leader.replica.leader_epoch > 0
        assert await append(new_leader, make_batch(2, seed=9)) == 15
        await wait_for(lambda: all(b.replica.log.high_watermark == 17 for b in survivors))
        assert len({b.readable_bytes() for b in survivors}) == 1

        restarted = Broker(tmp_path, leader.node_id, ports)
        await restarted.start()
        everyone = survivors + [restarted]
        await wait_for(lambda: restarted.replica.log.high_watermark == 17)
        assert len({b.readable_bytes() for b in everyone}) == 1  # caught up, nothing applied twice
        for b in everyone:
            await b.stop()
    asyncio.run(scenario())


def test_a_crashed_follower_restarts_and_converges_without_applying_anything_twice(tmp_path):
    async def scenario():
        ports, brokers, leader = await start_cluster(tmp_path)
        for i in range(4):
            await append(leader, make_batch(2, seed=i))
        follower = next(b for b in brokers if b is not leader)
        await wait_for(lambda: follower.replica.log.high_watermark == 8)
        await follower.crash()  # its stored state never recorded these applies
        for i in range(4, 6):
            await append(leader, make_batch(2, seed=i))
        restarted = Broker(tmp_path, follower.node_id, ports)
        await restarted.start()
        everyone = [b for b in brokers if b is not follower] + [restarted]
        await wait_for(lambda: restarted.replica.log.high_watermark == 12)
        await asyncio.sleep(0.3)  # give a double apply the chance to show
        assert restarted.replica.log.log_end_offset == 12
        assert len({b.readable_bytes() for b in everyone}) == 1
        for b in everyone:
            await b.stop()
    asyncio.run(scenario())


def test_once_applied_a_replica_caches_only_its_last_entries_whatever_the_volume(tmp_path):
    """The command cache holds entries in flight: after 40 appends of 20 KB
    every replica, leader and followers, keeps at most its last two cached
    (it kept everything up to 32 MiB per partition, which a broker with many
    partitions multiplied), and what it no longer caches reads back intact."""
    async def scenario():
        ports, brokers, leader = await start_cluster(tmp_path)
        batches = [make_batch(10, value_size=2000, seed=i) for i in range(40)]
        for batch in batches:
            await append(leader, batch)
        total = 10 * len(batches)
        await wait_for(lambda: all(b.replica.log.high_watermark == total
                                   and b.replica.view().applied_index == b.replica.view().last_index
                                   for b in brokers))
        await asyncio.sleep(0.2)   # a tick after the last apply on each
        for b in brokers:
            cached = b.replica.journal._cache.size_bytes
            assert 0 < cached <= 2 * (len(batches[0]) + 64), (b.node_id, cached)
        assert len({b.readable_bytes() for b in brokers}) == 1
        journal = leader.replica.journal     # entries no longer cached read back from the log, byte for byte
        commands = [journal[i][0] for i in range(len(journal))]
        appended = [c for c in commands if len(c) > 5]           # not the term's no-op
        # past the 5-byte command header, a batch differs from what was proposed only in the
        # fields the log writes in (base offset, length, leader epoch, magic, CRC: its first 21 bytes)
        assert [c[5 + 21:] for c in appended] == [b[21:] for b in batches]
        for b in brokers:
            await b.stop()
    asyncio.run(scenario())


def test_after_a_compaction_the_journals_first_entry_is_not_read_back_on_every_lookup(tmp_path, monkeypatch):
    """pysyncobj reads entry 0 of the log on nearly every lookup (for its index).
    Once compaction makes it a real append and the cache has let it go, the
    journal keeps that one command: rebuilding it copied its data from the
    segments about a dozen times per append across the group."""
    monkeypatch.setitem(FAST, "logCompactionMinEntries", 20)
    monkeypatch.setitem(FAST, "logCompactionMinTime", 3600)
    reads = []
    read_range = PartitionLog.read_range
    monkeypatch.setattr(PartitionLog, "read_range",
                        lambda log, start, end: reads.append(end - start) or read_range(log, start, end))

    async def scenario():
        ports, brokers, leader = await start_cluster(tmp_path)
        batches = [make_batch(20, value_size=5000, seed=i) for i in range(4)]
        for i in range(40):
            await append(leader, batches[i % 4])
        await wait_for(lambda: all(b.replica.journal.first_index() > 1 for b in brokers))   # compacted
        reads.clear()
        for i in range(10):
            await append(leader, batches[i % 4])
        await asyncio.sleep(0.3)
        assert len(reads) <= 3 * 2, reads      # at most a read of each new first entry, not one per lookup
        for b in brokers:
            await b.stop()
    asyncio.run(scenario())


def test_an_idle_group_is_kept_alive_by_coalesced_node_heartbeats_not_per_group_messages(tmp_path):
    async def scenario():
        ports, brokers, leader = await start_cluster(tmp_path)
        await append(leader, make_batch(2))
        await wait_for(lambda: all(b.replica.log.high_watermark == 2 for b in brokers))
        await asyncio.sleep(0.5)   # the followers learn the final commit index
        sent: list[str] = []
        send = leader.replica.transport.send
        leader.replica.transport.send = lambda node, message: (sent.append(message.get("type")), send(node, message))[1]
        terms = [b.replica.leader_epoch for b in brokers]
        await asyncio.sleep(2.0)   # over three election timeouts (FAST: 0.3-0.6 s)
        assert sent.count("append_entries") == 0, "pysyncobj's per-group heartbeats still ran"
        assert [b.replica.leader_epoch for b in brokers] == terms and leader.replica.is_leader
        assert await append(leader, make_batch(1)) == 2   # and the group is as live as ever
        await wait_for(lambda: all(b.replica.log.high_watermark == 3 for b in brokers))
        for b in brokers:
            await b.stop()
    asyncio.run(scenario())


def test_raft_view_shows_term_leader_indexes_and_follower_progress(tmp_path):
    async def scenario() -> None:
        _ports, brokers, leader = await start_cluster(tmp_path)
        try:
            await append(leader, make_batch(3))
            last = leader.replica.view().last_index

            def settled() -> bool:
                views = [b.replica.view() for b in brokers]
                return all(v.commit_index == v.applied_index == last for v in views)
            await wait_for(settled)
            view = leader.replica.view()
            assert view.is_leader and view.leader_id == leader.node_id and view.group_id == GROUP
            assert view.term == leader.replica.leader_epoch
            assert set(view.follower_progress) == {b.node_id for b in brokers} - {leader.node_id}
            for progress in view.follower_progress.values():
                assert progress.match_index == last and progress.next_index >= last + 1
            for follower in (b for b in brokers if b is not leader):
                seen = follower.replica.view()
                assert not seen.is_leader and seen.leader_id == leader.node_id and seen.term == view.term
                assert seen.follower_progress == {} and seen.last_index == last
        finally:
            for b in brokers:
                await b.stop()
    asyncio.run(scenario())


def test_raft_errors_reach_clients_as_kafka_errors_at_the_replication_boundary(tmp_path):
    async def scenario() -> None:
        _ports, brokers, leader = await start_cluster(tmp_path)
        followers = [b for b in brokers if b is not leader]
        await wait_for(lambda: followers[0].replica.leader_id == leader.node_id)   # it has heard from the leader
        with pytest.raises(NotLeaderOrFollowerError) as not_leader:
            await followers[0].replica.replicate(make_batch(), 5)
        assert not_leader.value.error_code == ErrorCode.NOT_LEADER_OR_FOLLOWER
        assert not_leader.value.leader_id == leader.node_id
        assert await leader.replica.replicate(make_batch(), 10) == 0
        for follower in followers:                     # no majority left: nothing more can commit
            await follower.stop()
        with pytest.raises(ReplicationTimeoutError) as timed_out:
            await leader.replica.replicate(make_batch(), 0.5)
        assert timed_out.value.error_code == ErrorCode.REQUEST_TIMED_OUT
        await leader.stop()
    asyncio.run(scenario())


def test_appends_in_flight_when_the_group_is_removed_fail_at_once_with_unknown_topic(tmp_path):
    from raftka.errors import UnknownTopicOrPartitionError

    async def scenario() -> None:
        _ports, brokers, leader = await start_cluster(tmp_path)
        followers = [b for b in brokers if b is not leader]
        log = leader.replica.log
        try:
            assert await leader.replica.replicate(make_batch(), 10) == 0
            for follower in followers:   # no majority: nothing more commits
                await follower.stop()
            in_flight = [asyncio.ensure_future(leader.replica.replicate(make_batch(), 60)) for _ in range(3)]
            await asyncio.sleep(0.3)     # proposed, and waiting for a commit that cannot come
            assert not any(f.done() for f in in_flight)
            started = asyncio.get_running_loop().time()
            leader.node.remove_group(GROUP)   # what a topic deletion does on this broker
            for future in in_flight:
                with pytest.raises(UnknownTopicOrPartitionError) as removed:
                    await asyncio.wait_for(future, 5)
                assert removed.value.error_code == ErrorCode.UNKNOWN_TOPIC_OR_PARTITION
            assert asyncio.get_running_loop().time() - started < 1.0
        finally:
            await leader.node.stop()
            log.close()
            leader.index.close()
    asyncio.run(scenario())


def test_appends_in_flight_when_the_node_fails_are_answered_at_once(tmp_path):
    async def scenario() -> None:
        _ports, brokers, leader = await start_cluster(tmp_path)
        try:
            assert await leader.replica.replicate(make_batch(), 10) == 0
            for follower in (b for b in brokers if b is not leader):   # nothing more commits
                await follower.node.stop()
            in_flight = [asyncio.ensure_future(leader.replica.replicate(make_batch(), 60)) for _ in range(3)]
            await asyncio.sleep(0.3)
            assert not any(f.done() for f in in_flight)
            leader.node.fail("EIO from the journal")   # what a storage error does
            for future in in_flight:
                with pytest.raises(NotLeaderOrFollowerError, match="out of service"):
                    await asyncio.wait_for(future, 1)
            assert not leader.replica.is_leader
        finally:
            await leader.node.stop()
    asyncio.run(scenario())
