"""Three `raftka serve` processes (LocalBrokers), RF=3, three partitions,
written with confluent-kafka acks=all: every acknowledged record survives
SIGKILL of a partition leader; a survivor takes over, every survivor's
Metadata names it with a higher leader epoch; the killed broker restarts on
its own data, catches up, and after a clean stop every replica's segment
files are byte-identical."""
from __future__ import annotations

import struct
import time

from kio.index import load_request_schema

from raftka.broker.local_cluster import LocalBrokers
from raftka.protocol import kafka
from raftka.records.batch import parse_records
from tests.test_broker_clients import ask

TOPIC = "replicated"
PARTITIONS = 3
DEADLINE_S = 30.0


def partition_leaders(port: int, topic_name: str = TOPIC) -> dict[int, int]:
    """partition -> leader of `topic_name` as the broker on `port` itself answers Metadata (v4, what
    librdkafka sends): from its copy of the replicated cluster metadata."""
    schema = load_request_schema(3, 4)
    body = schema(topics=(kafka.nested(schema, "MetadataRequestTopic")(name=topic_name),),
                  allow_auto_topic_creation=False)
    response = ask(("127.0.0.1", port), 3, 4, body)
    topic = next(t for t in response.topics if t.name == topic_name)
    return {int(p.partition_index): int(p.leader_id) for p in topic.partitions}


def leader_epoch(admin, partition: int) -> int:
    """The partition's leader epoch (its Raft term) as its leader answers ListOffsets."""
    from confluent_kafka import TopicPartition
    from confluent_kafka.admin import OffsetSpec
    futures = admin.list_offsets({TopicPartition(TOPIC, partition): OffsetSpec.latest()}, request_timeout=10)
    return next(iter(futures.values())).result(15).leader_epoch


def wait_for(predicate, what: str, timeout_s: float = DEADLINE_S):
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            value = predicate()
            if value:
                return value
        except (OSError, KeyError, ValueError, StopIteration, struct.error):
            pass                      # a broker restarting, or not yet knowing the topic
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def produce(producer, partition: int, count: int, acked: dict, tag: str) -> None:
    """Produce `count` records to one partition and wait for each to be acknowledged (or fail)."""
    failures = []

    def delivered(error, message):
        if error:
            failures.append(error)
        else:
            acked[(message.partition(), message.offset())] = message.value()
    for i in range(count):
        producer.produce(TOPIC, value=f"{tag}-{partition}-{i}".encode(), key=b"k", partition=partition,
                         on_delivery=delivered)
    assert producer.flush(60) == 0 and not failures, failures


def records_on_disk(brokers: LocalBrokers, node_id: int, partition: int, topic: str = TOPIC) -> dict[int, bytes]:
    data = b"".join(brokers.segment_files(node_id, topic, partition).values())
    return {r.offset: r.value for r in parse_records(data)}


def test_leader_sigkill_loses_no_acknowledged_record_and_the_broker_rejoins_byte_identical(tmp_path):
    from confluent_kafka import Producer
    from confluent_kafka.admin import AdminClient, NewTopic
    brokers = LocalBrokers(tmp_path, nodes=3).start()
    try:
        admin = AdminClient({"bootstrap.servers": brokers.bootstrap()})
        admin.create_topics([NewTopic(TOPIC, PARTITIONS, 3)])[TOPIC].result(DEADLINE_S)
        leaders = wait_for(lambda: (lambda m: m if len(m) == PARTITIONS and min(m.values()) > 0 else None)(
            partition_leaders(brokers.port(1))), "leaders")
        producer = Producer({"bootstrap.servers": brokers.bootstrap(), "acks": "all", "linger.ms": 2,
                             "enable.idempotence": True, "message.timeout.ms": 60_000})
        acked: dict[tuple[int, int], bytes] = {}
        for partition in range(PARTITIONS):
            produce(producer, partition, 200, acked, "before")

        victim, epoch_before = leaders[0], leader_epoch(admin, 0)
        for partition in range(PARTITIONS):   # in flight while the leader dies; each waits for its ack
            producer.produce(TOPIC, value=b"in-flight-%d" % partition, partition=partition,
                             on_delivery=lambda e, m: e or acked.__setitem__((m.partition(), m.offset()), m.value()))
        brokers.kill(victim)
        survivors = [n for n in brokers.node_ids if n != victim]
        for node_id in survivors:     # every survivor's (replicated) metadata names the new leader
            wait_for(lambda: partition_leaders(brokers.port(node_id))[0] not in (victim, -1),
                     f"node {node_id} to name a new leader")
        survivor_admin = AdminClient({"bootstrap.servers": brokers.bootstrap(survivors)})
        assert wait_for(lambda: leader_epoch(survivor_admin, 0) or None, "the new leader's epoch") > epoch_before
        for partition in range(PARTITIONS):
            produce(producer, partition, 200, acked, "after")
        assert producer.flush(60) == 0

        brokers.restart(victim)
        last_acked = {p: max(o for (q, o) in acked if q == p) for p in range(PARTITIONS)}
        for node_id in brokers.node_ids:   # the rejoined replica catches up past every acknowledged offset
            wait_for(lambda: all(max(records_on_disk(brokers, node_id, p), default=-1) >= last_acked[p]
                                 for p in range(PARTITIONS)), f"node {node_id} to catch up")
        brokers.stop()
        for partition in range(PARTITIONS):
            files = [brokers.segment_files(n, TOPIC, partition) for n in brokers.node_ids]
            assert files[0] and files[0] == files[1] == files[2], f"partition {partition} differs across replicas"
            for node_id in brokers.node_ids:
                on_disk = records_on_disk(brokers, node_id, partition)
                missing = {o: v for (p, o), v in acked.items() if p == partition and on_disk.get(o) != v}
                assert not missing, f"node {node_id} partition {partition} lacks acknowledged {missing}"
    finally:
        brokers.stop()
