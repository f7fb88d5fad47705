"""Cluster metadata: the state machine's rules, and three brokers (one process,
real loopback sockets, real LMDB and Raft groups) whose metadata group
creates, hosts, grows and deletes topics, and records each partition's
leader, epoch and ISR, across a leader stop and a broker restart."""
from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from raftka.cluster import metadata
from raftka.cluster.controller import ClusterController, MetadataCommandError
from raftka.cluster.metadata import ClusterState
from raftka.config import Config
from raftka.errors import (ErrorCode, InvalidConfigError, InvalidPartitionsError, InvalidReplicationFactorError,
                           InvalidTopicError)
from raftka.ports import free_ports
from tests.conftest import make_batch, wait_for

FAST = dict(raftMinTimeout=0.3, raftMaxTimeout=0.6, appendEntriesPeriod=0.05, leaderFallbackTimeout=0.6)
TOPIC_ID = bytes(range(16))


# ---- the state machine ------------------------------------------------------

def state_with_brokers(*ids: int) -> ClusterState:
    state = ClusterState()
    for node_id in ids:
        assert state.apply(metadata.register_broker(node_id, "127.0.0.1", 9090 + node_id)) == ErrorCode.NONE
    return state


def test_create_topic_allocates_one_raft_group_per_partition_never_reused():
    state = state_with_brokers(1, 2, 3)
    assert state.apply(metadata.create_topic("a", TOPIC_ID, [[1, 2], [2, 3]], {})) == ErrorCode.NONE
    assert state.apply(metadata.delete_topic("a")) == ErrorCode.NONE
    assert state.apply(metadata.create_topic("a", TOPIC_ID, [[3, 1]], {"retention.ms": "1000"})) == ErrorCode.NONE
    topic = state.topics["a"]
    assert [p.group_id for p in topic.partitions] == [3]
    assert topic.configs == {"retention.ms": "1000"}


def test_refused_commands_change_nothing():
    state = state_with_brokers(1, 2)
    state.apply(metadata.create_topic("a", TOPIC_ID, [[1, 2]], {}))
    before = state.snapshot()
    assert state.apply(metadata.create_topic("a", TOPIC_ID, [[1]], {})) == ErrorCode.TOPIC_ALREADY_EXISTS
    assert state.apply(metadata.create_topic("b", TOPIC_ID, [[1, 7]], {})) == ErrorCode.INVALID_REPLICATION_FACTOR
    assert state.apply(metadata.create_topic("b", TOPIC_ID, [[1, 1]], {})) == ErrorCode.INVALID_REPLICATION_FACTOR
    assert state.apply(metadata.create_topic("b/c", TOPIC_ID, [[1]], {})) == ErrorCode.INVALID_TOPIC_EXCEPTION
    assert state.apply(metadata.create_topic("b", b"short", [[1]], {})) == ErrorCode.INVALID_REQUEST
    assert state.apply(metadata.delete_topic("nope")) == ErrorCode.UNKNOWN_TOPIC_OR_PARTITION
    assert state.apply(metadata.create_partitions("nope", [[1]])) == ErrorCode.UNKNOWN_TOPIC_OR_PARTITION
    assert state.apply(b"\x80\x04garbage") == ErrorCode.INVALID_REQUEST
    assert state.apply(metadata.codec.encode({"op": "rm -rf"})) == ErrorCode.INVALID_REQUEST
    assert state.snapshot() == before


def test_leader_reports_with_an_older_epoch_or_for_a_recreated_topic_are_ignored():
    state = state_with_brokers(1, 2, 3)
    state.apply(metadata.create_topic("a", TOPIC_ID, [[1, 2, 3]], {}))
    group = state.topics["a"].partitions[0].group_id
    assert state.apply(metadata.record_leader("a", 0, group, 2, 5, [1, 2, 3])) == ErrorCode.NONE
    assert state.apply(metadata.record_leader("a", 0, group, 1, 4, [1])) == ErrorCode.INVALID_REQUEST
    assert state.apply(metadata.record_leader("a", 0, group + 1, 1, 9, [1])) == ErrorCode.UNKNOWN_TOPIC_OR_PARTITION
    assert state.apply(metadata.record_leader("a", 0, group, 7, 9, [7])) == ErrorCode.INVALID_REQUEST
    info = state.partition("a", 0)
    assert (info.leader, info.leader_epoch, info.isr) == (2, 5, [1, 2, 3])


def test_snapshot_restores_the_same_state():
    state = state_with_brokers(1, 2, 3)
    state.apply(metadata.create_topic("a", TOPIC_ID, metadata.assign_replicas([1, 2, 3], 4, 2), {"retention.ms": "1000"}))
    state.apply(metadata.create_partitions("a", [[3, 1]]))
    state.apply(metadata.record_leader("a", 4, state.topics["a"].partitions[4].group_id, 3, 2, [3]))
    copy = ClusterState()
    copy.restore(state.snapshot())
    assert copy.snapshot() == state.snapshot()
    assert copy.topics == state.topics and copy.brokers == state.brokers
    assert copy.next_group_id == state.next_group_id


def test_round_robin_assignment_spreads_first_replicas():
    assert metadata.assign_replicas([3, 1, 2], 4, 2) == [[1, 2], [2, 3], [3, 1], [1, 2]]
    assert metadata.assign_replicas([1, 2, 3], 2, 3, first_partition=1, start=1) == [[3, 1, 2], [1, 2, 3]]


# ---- three brokers ----------------------------------------------------------

class Cluster:
    def __init__(self, root: Path, **raft_settings) -> None:
        self.root = root
        self.ids = [1, 2, 3]
        self.ports = dict(zip(self.ids, free_ports(3)))
        self.raft_settings = {**FAST, **raft_settings}
        self.controllers: dict[int, ClusterController] = {}

    def config(self, node_id: int) -> Config:
        return Config(data_dir=self.root / f"b{node_id}", node_id=node_id, peer_port=self.ports[node_id],
                      cluster_secret="0123456789abcdef0123456789abcdef", port=9000 + node_id, replica_lag_time_max_ms=2000,
                      peers=tuple((i, "127.0.0.1", p) for i, p in self.ports.items() if i != node_id))

    async def start(self, node_id: int) -> ClusterController:
        controller = ClusterController(self.config(node_id), **self.raft_settings)
        await controller.start()
        self.controllers[node_id] = controller
        return controller

    async def stop(self, node_id: int) -> None:
        await self.controllers.pop(node_id).stop()

    async def close(self) -> None:
        for node_id in list(self.controllers):
            await self.stop(node_id)


def settled(controllers, topic: str, partitions: int) -> bool:
    """Every broker knows the topic, hosts its replicas, and the metadata
    records a leader with a full ISR for each partition."""
    for c in controllers:
        info = c.state.topics.get(topic)
        if info is None or len(info.partitions) != partitions:
            return False
        hosted = [k for k in c.replicas() if k[0] == topic]
        if len(hosted) != sum(c.node_id in p.replicas for p in info.partitions):
            return False
        if any(p.leader < 0 or p.isr != sorted(p.replicas) for p in info.partitions):
            return False
    return True


async def create_settled(via: ClusterController, controllers, name: str, partitions: int, replication_factor: int,
                         **options) -> None:
    """Create a topic through `via` and wait until every broker hosts and leads it."""
    await via.create_topic(name, partitions=partitions, replication_factor=replication_factor, **options)
    await wait_for(lambda: settled(controllers, name, partitions))


def with_cluster(scenario, tmp_path: Path, **raft_settings) -> None:
    """Run `scenario(cluster)` against three started, ready brokers."""
    async def run() -> None:
        cluster = Cluster(tmp_path, **raft_settings)
        try:
            for node_id in cluster.ids:
                await cluster.start(node_id)
            for controller in cluster.controllers.values():
                await controller.wait_ready()
            await scenario(cluster)
        finally:
            await cluster.close()
    asyncio.run(run())


def test_any_broker_creates_a_topic_and_every_replica_hosts_it(tmp_path):
    with_cluster(_any_broker_creates_a_topic_and_every_replica_hosts_it, tmp_path)


async def _any_broker_creates_a_topic_and_every_replica_hosts_it(cluster):
    controllers = list(cluster.controllers.values())
    follower = next(c for c in controllers if c.controller_id != c.node_id)   # forwarded to the leader
    await create_settled(follower, controllers, "orders", 3, 3)
    for c in controllers:
        assert c.state.snapshot() == controllers[0].state.snapshot()
        assert sorted(c.state.brokers) == [1, 2, 3]
        assert c.state.brokers[c.node_id].port == 9000 + c.node_id
    leader_id, epoch = follower.partition_leader("orders", 0)
    leader = cluster.controllers[leader_id].replica("orders", 0)
    assert leader.is_leader and leader.leader_epoch == epoch
    assert await asyncio.wait_for(leader.append(make_batch(1)), 10) == 0

    with pytest.raises(MetadataCommandError) as refused:
        await follower.create_topic("orders", partitions=1, replication_factor=1)
    assert refused.value.error_code == ErrorCode.TOPIC_ALREADY_EXISTS
    with pytest.raises(InvalidReplicationFactorError):
        await follower.create_topic("wide", partitions=1, replication_factor=4)
    with pytest.raises(InvalidTopicError):
        await follower.create_topic("no spaces", partitions=1, replication_factor=1)


def test_partitions_added_and_topic_deleted_on_every_broker(tmp_path):
    with_cluster(_partitions_added_and_topic_deleted_on_every_broker, tmp_path)


async def _partitions_added_and_topic_deleted_on_every_broker(cluster):
    controllers = list(cluster.controllers.values())
    await create_settled(controllers[0], controllers, "t", 1, 2)
    await controllers[2].create_partitions("t", 3)
    await wait_for(lambda: settled(controllers, "t", 3))
    hosting = [c for c in controllers if c.replicas()]
    group_dirs = [r.group_dir for c in hosting for r in c.replicas().values()]
    assert all(d.exists() for d in group_dirs)

    await controllers[1].delete_topic("t")
    await wait_for(lambda: all(not c.replicas() and "t" not in c.logs.topics() for c in controllers))
    assert not any(d.exists() for d in group_dirs)
    assert not any((c.config.data_dir / "t-0").exists() for c in controllers)


def test_a_new_leader_is_recorded_with_a_higher_epoch_after_the_leader_stops(tmp_path):
    with_cluster(_a_new_leader_is_recorded_with_a_higher_epoch_after_the_leader_stops, tmp_path)


async def _a_new_leader_is_recorded_with_a_higher_epoch_after_the_leader_stops(cluster):
    controllers = list(cluster.controllers.values())
    await create_settled(controllers[0], controllers, "p", 1, 3)
    old = controllers[0].state.partition("p", 0)
    old_leader, old_epoch = old.leader, old.leader_epoch
    await cluster.stop(old_leader)
    survivors = list(cluster.controllers.values())

    def moved() -> bool:
        infos = [c.state.partition("p", 0) for c in survivors]
        return all(i.leader not in (-1, old_leader) and i.leader_epoch > old_epoch
                   and old_leader not in i.isr for i in infos)
    # the stopped broker leaves the ISR only after replica_lag_time_max_ms
    await wait_for(moved, timeout_s=30)


def test_a_restarted_broker_rebuilds_metadata_from_its_checkpoint_and_journal(tmp_path):
    with_cluster(_restarted_broker_rebuilds_metadata, tmp_path, logCompactionMinEntries=4, logCompactionMinTime=0.1)


async def _restarted_broker_rebuilds_metadata(cluster):
    first = cluster.controllers[1]
    for i in range(8):
        await first.create_topic(f"t{i}", partitions=1, replication_factor=3)
    await wait_for(lambda: all(settled(cluster.controllers.values(), f"t{i}", 1) for i in range(8)))
    await asyncio.sleep(0.3)   # past logCompactionMinTime
    await create_settled(first, list(cluster.controllers.values()), "last", 1, 3)
    assert (cluster.root / "b3" / "raft" / "metadata" / "checkpoint").exists()
    leader = next(c.replica("t0", 0) for c in cluster.controllers.values() if c.replica("t0", 0).is_leader)
    await asyncio.wait_for(leader.append(make_batch(1)), 10)

    await cluster.stop(3)
    restarted = await cluster.start(3)
    await restarted.wait_ready()
    expected = cluster.controllers[1].state
    await wait_for(lambda: set(restarted.state.topics) == set(expected.topics) and len(restarted.replicas()) == 9)
    assert restarted.state.next_group_id == expected.next_group_id
    await wait_for(lambda: restarted.replica("t0", 0).log.high_watermark == 1)


def test_a_topic_config_reaches_its_partition_logs_on_every_replica(tmp_path):
    with_cluster(_topic_config_reaches_its_partition_logs, tmp_path)


async def _topic_config_reaches_its_partition_logs(cluster):
    controllers = list(cluster.controllers.values())
    await create_settled(controllers[1], controllers, "short", 2, 3,
                         configs={"retention.ms": "60000", "segment.bytes": "1048576"})
    for c in controllers:
        for key, replica in c.replicas().items():
            assert (replica.log.config.retention_ms, replica.log.config.segment_bytes) == (60000, 1048576), key
    with pytest.raises(InvalidConfigError):
        await controllers[0].create_topic("bad", partitions=1, replication_factor=1, configs={"retention.ms": "soon"})


def test_a_broker_may_only_speak_for_its_own_id(tmp_path, caplog):
    with caplog.at_level("WARNING", logger="raftka.cluster.controller"):
        with_cluster(_a_broker_may_only_speak_for_its_own_id, tmp_path)
    assert "a broker speaks only for itself" in caplog.text


async def _a_broker_may_only_speak_for_its_own_id(cluster):
    controllers = list(cluster.controllers.values())
    await create_settled(controllers[0], controllers, "t", 1, 3)
    follower = next(c for c in controllers if c.controller_id != c.node_id)   # forwards to the leader
    victim = next(c.node_id for c in controllers if c.node_id not in (follower.node_id, follower.controller_id))
    group_id = follower.state.topics["t"].partitions[0].group_id
    blocks_before = follower.state.producer_id_blocks.get(victim)
    loop = asyncio.get_running_loop()
    for command in (metadata.register_broker(victim, "evil.example", 1),
                    metadata.allocate_producer_ids(victim, 10),
                    metadata.record_leader("t", 0, group_id, victim, 99, [victim])):
        started = loop.time()
        with pytest.raises(MetadataCommandError) as refused:
            await follower.propose(command, "impersonate", timeout_s=10)
        assert refused.value.error_code == ErrorCode.CLUSTER_AUTHORIZATION_FAILED
        assert loop.time() - started < 1.0, "refused at once, not retried until the timeout"
    for c in controllers:
        assert c.state.brokers[victim].host == "127.0.0.1"
        assert c.state.producer_id_blocks.get(victim) == blocks_before
        assert c.state.partition("t", 0).leader_epoch != 99
    await follower.propose(metadata.register_broker(follower.node_id, "127.0.0.1", 9000 + follower.node_id),
                           "register itself again")   # its own id: still served
    # and only the broker a command was forwarded to may answer it
    answer = loop.create_future()
    follower._forwarded[10**9] = (follower.controller_id, answer)
    follower._on_forwarded(victim, {"type": "rk_proposed", "id": 10**9, "error": 0})
    assert not answer.done()
    follower._on_forwarded(follower.controller_id, {"type": "rk_proposed", "id": 10**9, "error": 0})
    assert answer.result() == 0


def test_concurrent_creates_that_each_fit_alone_do_not_both_pass_the_per_broker_limit(tmp_path):
    """Both creates pass the controller's check against the same state before
    either commits; the state machine refuses the second at apply, with a
    message naming the limits, and the broker never holds more than its limit."""
    async def run() -> None:
        controller = ClusterController(Config(data_dir=tmp_path, max_partitions_per_broker=10), **FAST)
        await controller.start()
        try:
            await controller.wait_ready()
            outcomes = await asyncio.gather(controller.create_topic("a", partitions=6),
                                            controller.create_topic("b", partitions=6), return_exceptions=True)
            refused = [o for o in outcomes if o is not None]
            assert len(refused) == 1 and isinstance(refused[0], InvalidPartitionsError), outcomes
            assert "max_partitions_per_broker=10" in str(refused[0])
            assert controller.state.replica_counts() == {1: 6}
            await controller.create_topic("c", partitions=4)      # what is left still fits
        finally:
            await controller.stop()
    asyncio.run(run())
