"""Three `raftka serve` processes (LocalBrokers), RF=3: what the partition
leader enforces for the whole replica set. min.insync.replicas against the
ISR when a broker dies (acks=all refused with NOT_ENOUGH_REPLICAS once the
ISR is below it, acks=1 still taken, acks=all taken again once the broker
is back). DeleteRecords from confluent-kafka's admin: the log start moves
through Raft on every replica (the same segments deleted everywhere), a
consumer from the beginning starts there, reads below it are out of range,
and it holds on a new leader and across restarts of every broker;
kafka-python's and aiokafka's admins delete records too. OffsetForLeaderEpoch
after a failover: the old leader's epoch ends where the new one's records
start."""
from __future__ import annotations

import datetime
import time

import pytest
from kio.index import load_request_schema
from kio.static.primitive import i8, i32, i64

from raftka.broker.local_cluster import LocalBrokers
from raftka.errors import ErrorCode
from raftka.protocol import kafka
from tests.test_broker_clients import ask
from tests.test_broker_clients import produce_error as produce_to
from tests.test_broker_failover import wait_for

TRIMMED = "trimmed"

DEADLINE_S = 30.0
LAG_MS = 1500       # replica.lag.time.max.ms: a dead follower leaves the ISR after this long


@pytest.fixture(scope="module")
def brokers(tmp_path_factory):
    cluster = LocalBrokers(tmp_path_factory.mktemp("replicated-admin"), nodes=3,
                           settings={"replica_lag_time_max_ms": LAG_MS}).start()
    yield cluster
    cluster.stop()


def create_topic(brokers: LocalBrokers, name: str, **configs: str) -> None:
    from confluent_kafka.admin import AdminClient, NewTopic
    admin = AdminClient({"bootstrap.servers": brokers.bootstrap()})
    admin.create_topics([NewTopic(name, 1, 3, config=configs)])[name].result(DEADLINE_S)


def produce_error(brokers: LocalBrokers, topic: str, acks: int, via: int) -> int:
    return produce_to(("127.0.0.1", brokers.port(via)), topic, acks)


def leader_and_isr(brokers: LocalBrokers, topic: str, via: int) -> tuple[int, list[int]]:
    """(leader, ISR) of partition 0 of `topic` as broker `via` answers Metadata v7."""
    partition = metadata_partition(brokers, topic, via)
    return int(partition.leader_id), [int(n) for n in partition.isr_nodes]


def metadata_partition(brokers: LocalBrokers, topic: str, via: int):
    schema = load_request_schema(3, 7)
    body = schema(topics=(kafka.nested(schema, "MetadataRequestTopic")(name=topic),), allow_auto_topic_creation=False)
    response = ask(("127.0.0.1", brokers.port(via)), 3, 7, body)
    return next(t for t in response.topics if t.name == topic).partitions[0]


def test_acks_all_needs_min_insync_replicas_in_the_isr_when_a_broker_is_killed(brokers):
    create_topic(brokers, "min-isr-2", **{"min.insync.replicas": "2"})
    create_topic(brokers, "min-isr-3", **{"min.insync.replicas": "3"})
    leaders = {}
    for topic in ("min-isr-2", "min-isr-3"):
        leaders[topic] = wait_for(lambda t=topic: (lambda li: li[0] if len(li[1]) == 3 else None)(
            leader_and_isr(brokers, t, 1)), f"{topic}'s full ISR")
        assert produce_error(brokers, topic, -1, leaders[topic]) == ErrorCode.NONE
    victim = next(n for n in brokers.node_ids if n not in leaders.values())
    brokers.kill(victim)
    try:
        wait_for(lambda: produce_error(brokers, "min-isr-3", -1, leaders["min-isr-3"]) == ErrorCode.NOT_ENOUGH_REPLICAS,
                 "acks=all refused with an ISR of 2 below min.insync.replicas=3")
        assert produce_error(brokers, "min-isr-3", 1, leaders["min-isr-3"]) == ErrorCode.NONE
        assert produce_error(brokers, "min-isr-2", -1, leaders["min-isr-2"]) == ErrorCode.NONE
    finally:
        brokers.restart(victim)
    wait_for(lambda: produce_error(brokers, "min-isr-3", -1, leaders["min-isr-3"]) == ErrorCode.NONE,
             "acks=all taken again once the killed broker is back in the ISR")


# ---- DeleteRecords ----------------------------------------------------------------

def admin_client(brokers: LocalBrokers):
    from confluent_kafka.admin import AdminClient
    return AdminClient({"bootstrap.servers": brokers.bootstrap()})


def delete_records(brokers: LocalBrokers, topic: str, offset: int) -> int:
    """confluent-kafka's delete_records of partition 0 below `offset`: the low watermark."""
    from confluent_kafka import TopicPartition
    admin = admin_client(brokers)     # kept until the answer: its futures die with it
    futures = admin.delete_records([TopicPartition(topic, 0, offset)], request_timeout=DEADLINE_S)
    return next(iter(futures.values())).result(DEADLINE_S).low_watermark


def earliest(brokers: LocalBrokers, topic: str) -> int:
    """ListOffsets earliest of partition 0, as its leader answers it."""
    from confluent_kafka import TopicPartition
    from confluent_kafka.admin import OffsetSpec
    admin = admin_client(brokers)
    futures = admin.list_offsets({TopicPartition(topic, 0): OffsetSpec.earliest()}, request_timeout=DEADLINE_S)
    return next(iter(futures.values())).result(DEADLINE_S).offset


def earliest_once_led(brokers: LocalBrokers, topic: str) -> int:
    """earliest(), once partition 0 has a leader again (after a failover or a restart)."""
    from confluent_kafka import KafkaException
    deadline = time.monotonic() + DEADLINE_S
    while True:
        try:
            return earliest(brokers, topic)
        except KafkaException:    # NOT_LEADER_OR_FOLLOWER, LEADER_NOT_AVAILABLE while an election runs
            assert time.monotonic() < deadline, f"no leader of {topic} answered ListOffsets"
            time.sleep(0.2)


def consumed_offsets(brokers: LocalBrokers, topic: str, expected: int) -> list[int]:
    """Offsets a consumer reading partition 0 from the beginning gets."""
    from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition
    consumer = Consumer({"bootstrap.servers": brokers.bootstrap(), "group.id": "unused", "enable.auto.commit": False})
    consumer.assign([TopicPartition(topic, 0, OFFSET_BEGINNING)])
    offsets: list[int] = []
    deadline = time.monotonic() + DEADLINE_S
    while len(offsets) < expected and time.monotonic() < deadline:
        message = consumer.poll(0.5)
        if message is not None:
            assert message.error() is None, message.error()
            offsets.append(message.offset())
    consumer.close()
    return offsets


def fetch_at(brokers: LocalBrokers, topic: str, offset: int, via: int) -> tuple[int, int]:
    """(error code, log start offset) of a raw Fetch v5 of partition 0 at `offset`."""
    schema = load_request_schema(1, 5)
    wanted = kafka.nested(schema, "FetchPartition")(partition=i32(0), fetch_offset=i64(offset),
                                                    log_start_offset=i64(-1), partition_max_bytes=i32(1 << 20))
    body = schema(replica_id=i32(-1), max_wait=datetime.timedelta(0), min_bytes=i32(0), max_bytes=i32(1 << 20),
                  isolation_level=i8(0), topics=(kafka.nested(schema, "FetchTopic")(topic=topic, partitions=(wanted,)),))
    partition = ask(("127.0.0.1", brokers.port(via)), 1, 5, body).responses[0].partitions[0]
    return partition.error_code.value, int(partition.log_start_offset)


def segment_bases(brokers: LocalBrokers, node_id: int, topic: str) -> list[int]:
    return [int(name.split(".")[0]) for name in brokers.segment_files(node_id, topic, 0)]


def produce_values(brokers: LocalBrokers, topic: str, count: int) -> None:
    from confluent_kafka import Producer
    producer = Producer({"bootstrap.servers": brokers.bootstrap(), "acks": "all", "linger.ms": 2,
                         "batch.num.messages": 10})
    failures = []
    for i in range(count):
        producer.produce(topic, value=b"%05d" % i * 40, partition=0,
                         on_delivery=lambda error, _m: failures.append(error) if error else None)
    assert producer.flush(DEADLINE_S) == 0 and not failures, failures


def test_delete_records_moves_the_log_start_on_every_replica_and_it_survives_restarts(brokers):
    create_topic(brokers, TRIMMED, **{"segment.bytes": "16384"})
    produce_values(brokers, TRIMMED, 300)                 # 200-byte values, batches of 10: several segments
    start = 155                                           # inside a batch and a segment
    assert delete_records(brokers, TRIMMED, start) == start
    assert earliest(brokers, TRIMMED) == start
    assert consumed_offsets(brokers, TRIMMED, 300 - start) == list(range(start, 300))
    leader, _isr = leader_and_isr(brokers, TRIMMED, 1)
    assert fetch_at(brokers, TRIMMED, 10, leader) == (ErrorCode.OFFSET_OUT_OF_RANGE, start)
    bases = wait_for(lambda: (lambda b: b if all(segment_bases(brokers, n, TRIMMED) == b for n in brokers.node_ids)
                              and b[0] > 0 else None)(segment_bases(brokers, 1, TRIMMED)),
                     "the same whole segments below the log start deleted on every replica")
    assert bases[0] <= start < (bases[1] if len(bases) > 1 else 300)
    brokers.kill(leader)
    try:
        wait_for(lambda: leader_and_isr(brokers, TRIMMED, next(n for n in brokers.node_ids if n != leader))[0]
                 not in (-1, leader), "a new leader")
        assert earliest_once_led(brokers, TRIMMED) == start   # a follower's log start, applied at commit
    finally:
        brokers.restart(leader)
    brokers.stop()
    brokers.start()
    assert earliest_once_led(brokers, TRIMMED) == start   # after a restart of every broker
    assert consumed_offsets(brokers, TRIMMED, 300 - start) == list(range(start, 300))


def test_delete_records_past_the_high_watermark_is_out_of_range_and_minus_one_deletes_everything(brokers):
    from confluent_kafka import OFFSET_END, KafkaError, KafkaException
    create_topic(brokers, "emptied")
    produce_values(brokers, "emptied", 20)
    with pytest.raises(KafkaException) as refused:
        delete_records(brokers, "emptied", 21)
    assert refused.value.args[0].code() == KafkaError.OFFSET_OUT_OF_RANGE
    assert delete_records(brokers, "emptied", OFFSET_END) == 20 == earliest(brokers, "emptied")
    assert delete_records(brokers, "emptied", 5) == 20          # never back


def test_delete_records_of_the_internal_offsets_topic_is_refused_as_kafka_does(brokers):
    schema = load_request_schema(21, 2)
    wanted = kafka.nested(schema, "DeleteRecordsPartition")(partition_index=i32(0), offset=i64(-1))
    body = schema(topics=(kafka.nested(schema, "DeleteRecordsTopic")(name="__consumer_offsets", partitions=(wanted,)),),
                  timeout=datetime.timedelta(seconds=10))
    partition = ask(("127.0.0.1", brokers.port(1)), 21, 2, body).topics[0].partitions[0]
    assert (partition.error_code.value, partition.low_watermark) == (ErrorCode.INVALID_TOPIC_EXCEPTION, -1)


def test_kafka_python_and_aiokafka_admins_delete_records(brokers):
    import asyncio
    from aiokafka.admin import AIOKafkaAdminClient
    from aiokafka.admin.records_to_delete import RecordsToDelete
    from aiokafka.structs import TopicPartition as AioPartition
    from kafka import TopicPartition
    from kafka.admin import KafkaAdminClient
    create_topic(brokers, "py-trimmed")
    produce_values(brokers, "py-trimmed", 30)
    admin = KafkaAdminClient(bootstrap_servers=brokers.bootstrap())
    try:
        answered = admin.delete_records({TopicPartition("py-trimmed", 0): 10}, timeout_ms=DEADLINE_S * 1000)
    finally:
        admin.close()
    assert answered[TopicPartition("py-trimmed", 0)]["low_watermark"] == 10 == earliest(brokers, "py-trimmed")

    async def aio() -> dict:
        client = AIOKafkaAdminClient(bootstrap_servers=brokers.bootstrap())
        await client.start()
        try:
            return await client.delete_records({AioPartition("py-trimmed", 0): RecordsToDelete(20)},
                                               timeout_ms=int(DEADLINE_S * 1000))
        finally:
            await client.close()
    assert asyncio.run(aio()) == {AioPartition("py-trimmed", 0): 20}
    assert earliest(brokers, "py-trimmed") == 20


# ---- OffsetForLeaderEpoch ---------------------------------------------------------

def epoch_end(brokers: LocalBrokers, topic: str, via: int, leader_epoch: int,
              current_leader_epoch: int = -1) -> tuple[int, int, int]:
    """(error code, epoch, end offset) of a raw OffsetForLeaderEpoch v2 (librdkafka's) for partition 0."""
    schema = load_request_schema(23, 2)
    wanted = kafka.nested(schema, "OffsetForLeaderPartition")(partition=i32(0), leader_epoch=i32(leader_epoch),
                                                              current_leader_epoch=i32(current_leader_epoch))
    body = schema(topics=(kafka.nested(schema, "OffsetForLeaderTopic")(topic=topic, partitions=(wanted,)),))
    partition = ask(("127.0.0.1", brokers.port(via)), 23, 2, body).topics[0].partitions[0]
    return partition.error_code.value, int(partition.leader_epoch), int(partition.end_offset)


def test_offset_for_leader_epoch_says_where_the_old_leaders_epoch_ends_after_a_failover(brokers):
    create_topic(brokers, "epochs")
    produce_values(brokers, "epochs", 10)
    first = wait_for(lambda: (lambda p: p if p.leader_id > 0 and len(p.isr_nodes) == 3 else None)(
        metadata_partition(brokers, "epochs", 1)), "a leader with a full ISR")
    old_leader, old_epoch = int(first.leader_id), int(first.leader_epoch)
    assert old_epoch >= 1     # Raft terms start at 1
    assert epoch_end(brokers, "epochs", old_leader, old_epoch) == (ErrorCode.NONE, old_epoch, 10)
    assert epoch_end(brokers, "epochs", old_leader, old_epoch + 1) == (ErrorCode.NONE, -1, -1)   # not yet
    brokers.kill(old_leader)
    try:
        survivor = next(n for n in brokers.node_ids if n != old_leader)
        new = wait_for(lambda: (lambda p: p if p.leader_id not in (-1, old_leader) else None)(
            metadata_partition(brokers, "epochs", survivor)), "a new leader")
        new_leader, new_epoch = int(new.leader_id), int(new.leader_epoch)
        produce_values(brokers, "epochs", 5)
        assert new_epoch > old_epoch
        assert epoch_end(brokers, "epochs", new_leader, old_epoch) == (ErrorCode.NONE, old_epoch, 10)
        assert epoch_end(brokers, "epochs", new_leader, old_epoch - 1) == (ErrorCode.NONE, old_epoch - 1, 0)  # older
        assert epoch_end(brokers, "epochs", new_leader, new_epoch) == (ErrorCode.NONE, new_epoch, 15)
        assert epoch_end(brokers, "epochs", new_leader, old_epoch, current_leader_epoch=old_epoch)[0] \
            == ErrorCode.FENCED_LEADER_EPOCH
    finally:
        brokers.restart(old_leader)
