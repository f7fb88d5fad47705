"""acks=all means on disk on a majority (fsync=always, the default): a
replica counts a Raft entry only once its journal fdatasync'd it. Followers
hold their acknowledgements until then, the leader counts itself in the
commit only up to its own synced entries, and the `fsync` setting reaches
the journal that acknowledges. Every broker SIGKILLed at once loses no
acknowledged record."""
from __future__ import annotations

import asyncio
import random
from dataclasses import replace


from raftka.broker.broker import Broker
from raftka.broker.local_cluster import LocalBrokers
from raftka.config import Config
from raftka.raft.pysyncobj_adapter import patched_clock
from raftka.replication.simulation import Faults, Simulation
from tests.conftest import make_batch, wait_for
from tests.test_broker_failover import TOPIC, produce, records_on_disk
from tests.test_broker_failover import wait_for as wait_until


def run_steps(sim: Simulation, steps: int) -> None:
    with patched_clock(sim.clock):
        for _ in range(steps):
            sim.step()


def start_nodes(sim: Simulation, seed: int) -> None:
    random.seed(seed)                 # pysyncobj draws election timeouts from `random`
    with patched_clock(sim.clock):
        for node_id in sim.members:
            sim.start_node(node_id)


def test_nothing_commits_until_a_majority_fdatasyncd_it_then_everything_does(tmp_path):
    sim = Simulation(tmp_path, 3, faults=Faults.of([]))
    held: list[tuple[int, object, object]] = []

    def hold(node_id: int, _incarnation: int, job, done) -> None:   # a disk whose fdatasync never returns
        held.append((node_id, job, done))
    sim._schedule_sync = hold
    start_nodes(sim, 3)
    try:
        run_steps(sim, 150)
        replicas = [m.replicas[1] for m in sim.members.values()]
        leader = next(r for r in replicas if r.is_leader)
        assert leader.journal.last_index() > 5 and held      # appends were proposed and written...
        assert sim.acks == 0                                  # ...but none acknowledged
        assert all(r.view().commit_index <= 1 and r.log.high_watermark == 0 for r in replicas)

        del sim._schedule_sync                                # the disk answers again
        for node_id, job, done in held:
            job.run(fdatasync=False)
            sim._guard(node_id, done, None)                   # RaftNode releases it, on that node's loop
        run_steps(sim, 100)
        assert sim.acks > 5 and leader.view().commit_index > 5
        sim.check_invariants()
    finally:
        sim.stop_all()


def test_the_fsync_setting_reaches_the_journal_that_acknowledges(tmp_path):
    async def scenario(fsync: str | None) -> tuple[bool, bool]:
        settings = {} if fsync is None else {"fsync": fsync}
        broker = Broker(Config(data_dir=tmp_path / str(fsync), port=0, **settings))
        await broker.start()
        try:
            await broker.controller.create_topic("t", 1, 1)
            await wait_for(lambda: (r := broker.controller.replica("t", 0)) is not None and r.is_leader)
            replica = broker.controller.replica("t", 0)
            base = await replica.replicate(make_batch(3), 10)
            assert base == 0 and replica.journal.durable_index >= replica.view().commit_index
            return replica.journal.fsync, broker.controller.metadata.journal.fsync
        finally:
            await broker.stop()
    assert asyncio.run(scenario(None)) == (True, True)        # durable by default
    assert asyncio.run(scenario("always")) == (True, True)
    assert asyncio.run(scenario("never")) == (False, False)   # the opt-out: acknowledged from the page cache


def test_every_broker_sigkilled_at_once_loses_no_acknowledged_record(tmp_path):
    from confluent_kafka import Producer
    from confluent_kafka.admin import AdminClient, NewTopic
    brokers = LocalBrokers(tmp_path, nodes=3).start()
    try:
        admin = AdminClient({"bootstrap.servers": brokers.bootstrap()})
        admin.create_topics([NewTopic(TOPIC, 1, 3)])[TOPIC].result(30)
        producer = Producer({"bootstrap.servers": brokers.bootstrap(), "acks": "all", "linger.ms": 2,
                             "enable.idempotence": True, "message.timeout.ms": 60_000})
        acked: dict[tuple[int, int], bytes] = {}
        produce(producer, 0, 300, acked, "before")
        for i in range(200):    # still in flight when every broker dies: acknowledged or not, never half
            producer.produce(TOPIC, value=b"in-flight-%d" % i, partition=0,
                             on_delivery=lambda e, m: e or acked.__setitem__((m.partition(), m.offset()), m.value()))
        producer.poll(0.05)
        for node_id in brokers.node_ids:
            brokers.kill(node_id)
        producer.poll(1)
        for node_id in brokers.node_ids:   # all at once: none is ready before a majority is up
            brokers.spawn(node_id)
        for node_id in brokers.node_ids:
            brokers.wait_ready(node_id)
        produce(producer, 0, 50, acked, "after")
        last = max(offset for _, offset in acked)
        for node_id in brokers.node_ids:
            wait_until(lambda: max(records_on_disk(brokers, node_id, 0), default=-1) >= last,
                       f"node {node_id} to hold every acknowledged record", timeout_s=60)
        brokers.stop()
        for node_id in brokers.node_ids:
            on_disk = records_on_disk(brokers, node_id, 0)
            missing = {o: v for (_, o), v in acked.items() if on_disk.get(o) != v}
            assert not missing, f"node {node_id} lacks acknowledged records {sorted(missing)[:5]}"

    finally:
        brokers.stop()


def test_retention_is_the_leaders_decision_and_every_replica_carries_it_out_alike(tmp_path):
    sim = Simulation(tmp_path, 5, faults=Faults.of([], retention=0.0, quiet=0.0),
                     log_settings=dict(segment_bytes=1024, retention_bytes=2048))
    start_nodes(sim, 5)
    try:
        run_steps(sim, 300)
        replicas = [m.replicas[1] for m in sim.members.values()]
        leader = next(r for r in replicas if r.is_leader)
        followers = [r for r in replicas if r is not leader]
        assert len(leader.log.segments) > 4
        for follower in followers:     # a follower's own clock, however far ahead, deletes nothing
            assert follower.log.enforce_retention(now_ms=10 ** 15) == 0 and follower.log.log_start_offset == 0
        leader.log.enforce_retention()  # the leader decides, and replicates the decision
        assert leader.log.log_start_offset == 0
        run_steps(sim, 50)
        starts = {r.log.log_start_offset for r in replicas}
        assert len(starts) == 1 and starts.pop() > 0
        with patched_clock(sim.clock):
            sim.heal_and_converge()     # every replica's segment files still byte-identical
    finally:
        sim.stop_all()


def test_a_follower_whose_log_ends_below_the_leaders_log_start_restarts_its_log_there(tmp_path, caplog):
    sim = Simulation(tmp_path, 9, faults=Faults.of([], retention=0.0), log_settings=dict(segment_bytes=1024, retention_bytes=2048))
    start_nodes(sim, 9)
    try:
        run_steps(sim, 60)
        leader = next(m.replicas[1] for m in sim.members.values() if m.alive and m.replicas[1].is_leader)
        away = next(node_id for node_id, m in sim.members.items() if m.replicas[1] is not leader)
        sim.faults = replace(sim.faults, restart=0.0)   # it stays away until the healing restarts it
        sim.crash_node(away)
        for _ in range(6):              # while it is away: appends, retention and compaction on the others
            run_steps(sim, 60)
            leader.log.enforce_retention()
        assert leader.log.log_start_offset > 0
        with caplog.at_level("WARNING", logger="raftka.replication.partition"):
            with patched_clock(sim.clock):
                sim.heal_and_converge()   # restarts it; converges, byte-identical, every acknowledged append held
        assert any("restarting our log there" in r.getMessage() for r in caplog.records)
        assert sim.members[away].replicas[1].log.log_start_offset == leader.log.log_start_offset
    finally:
        sim.stop_all()
