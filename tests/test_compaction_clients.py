"""Log compaction through Kafka clients, against a real broker process:
a compacted topic created by confluent-kafka, kafka-python and aiokafka
admins; many versions per key produced, the cleaner let run (small
segments, min.cleanable.dirty.ratio near 0, a short cleaner backoff), and a
consumer from the beginning sees the latest record of each key below the
active segment plus every record of the active segment; `__consumer_offsets`
is compacted too and committed offsets survive its cleaning."""
from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from raftka.records.batch import parse_records
from tests.broker_process import BrokerProcess
from tests.test_broker_clients import consume_all

TIMEOUT_S = 30
COMPACTED = {"cleanup.policy": "compact", "segment.bytes": "4096", "min.cleanable.dirty.ratio": "0.01",
             "delete.retention.ms": "0"}


@pytest.fixture(scope="module")
def broker(tmp_path_factory):
    process = BrokerProcess(tmp_path_factory.mktemp("compaction") / "data", log_cleaner_backoff_ms=200,
                            offsets_topic_partitions=1, offsets_topic_segment_bytes=2048).start()
    yield process
    process.stop()


def data_dir(broker: BrokerProcess) -> Path:
    return broker.brokers.root / "node-1" / "data"


def segment_records(broker: BrokerProcess, partition_dir: str) -> list:
    """Every record in the partition's segment files, read straight from disk."""
    directory = data_dir(broker) / partition_dir
    return [record for path in sorted(directory.glob("*.log")) for record in parse_records(path.read_bytes())]


def cleaned_records(broker: BrokerProcess, partition_dir: str, fewer_than: int) -> list:
    """The partition's records on disk once the cleaner left fewer than
    `fewer_than` and they stay so for a second (a clean swaps segments in one by one)."""
    seen: list = []

    def settled() -> bool:
        records = segment_records(broker, partition_dir)
        stable = len(records) < fewer_than and records == seen
        seen[:] = records
        return stable
    wait_until(settled, f"the cleaner to rewrite {partition_dir}", interval_s=1.0)
    return seen


def wait_until(condition, what: str, timeout_s: float = TIMEOUT_S, interval_s: float = 0.2) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(interval_s)


def test_confluent_kafka_consumer_sees_the_latest_record_per_key_after_the_cleaner_ran(broker):
    from confluent_kafka import KafkaError, Producer
    from confluent_kafka.admin import AdminClient, NewTopic
    admin = AdminClient({"bootstrap.servers": broker.bootstrap})
    admin.create_topics([NewTopic("table", 1, 1, config=COMPACTED)])["table"].result(TIMEOUT_S)
    producer = Producer({"bootstrap.servers": broker.bootstrap, "acks": "all", "linger.ms": 0,
                         "batch.num.messages": 1})
    sent, failures = [], []
    for i in range(600):
        key, value = b"key-%d" % (i % 20), (b"version-%d-" % i) * 4
        sent.append((key, value))
        producer.produce("table", key=key, value=value, on_delivery=lambda e, m: failures.append(e) if e else None)
        if i % 50 == 0:
            producer.flush(TIMEOUT_S)
    assert producer.flush(TIMEOUT_S) == 0 and not failures
    refused = []
    producer.produce("table", key=None, value=b"keyless", on_delivery=lambda e, m: refused.append(e))
    producer.flush(TIMEOUT_S)
    assert refused and refused[0] is not None and refused[0].code() == KafkaError.INVALID_RECORD, refused
    records = cleaned_records(broker, "table-0", 200)
    got = consume_all(broker.bootstrap, "table", 1, len(records))
    assert [(m.offset(), m.key(), m.value()) for m in got] == [(r.offset, r.key, r.value) for r in records]
    assert got[-1].offset() == len(sent) - 1                    # offsets unchanged: the last is still 599
    latest = {key: offset for offset, (key, _value) in enumerate(sent)}
    for message in got:
        key, value = sent[message.offset()]
        assert (message.key(), message.value()) == (key, value)   # each record is the one produced there
    seen = [m.offset() for m in got]
    assert set(latest.values()) <= set(seen)                      # the latest of every key is there
    assert len(seen) < len(sent) // 3                             # and most older versions are not
    assert kafka_python_offsets(broker, "table", len(records)) == seen   # kafka-python reads the same


def kafka_python_offsets(broker: BrokerProcess, topic: str, expected: int) -> list[int]:
    """Offsets a kafka-python consumer reads from the beginning (empty batches the cleaner left included)."""
    from kafka import KafkaConsumer, TopicPartition
    consumer = KafkaConsumer(bootstrap_servers=broker.bootstrap, enable_auto_commit=False, consumer_timeout_ms=5000)
    consumer.assign([TopicPartition(topic, 0)])
    consumer.seek_to_beginning()
    offsets = []
    for message in consumer:
        offsets.append(message.offset)
        if len(offsets) == expected:
            break
    consumer.close()
    return offsets


def test_lz4_batches_of_a_compacted_topic_are_compacted_too(broker):
    from confluent_kafka import Producer
    from confluent_kafka.admin import AdminClient, NewTopic
    admin = AdminClient({"bootstrap.servers": broker.bootstrap})
    admin.create_topics([NewTopic("lz4-table", 1, 1, config=COMPACTED)])["lz4-table"].result(TIMEOUT_S)
    producer = Producer({"bootstrap.servers": broker.bootstrap, "compression.type": "lz4", "linger.ms": 2})
    for i in range(2000):
        producer.produce("lz4-table", key=b"key-%d" % (i % 10), value=b"lz4-version-%d" % i * 3)
        if i % 100 == 99:
            producer.flush(TIMEOUT_S)
    assert producer.flush(TIMEOUT_S) == 0
    records = cleaned_records(broker, "lz4-table-0", 1000)
    got = consume_all(broker.bootstrap, "lz4-table", 1, len(records))
    assert [(m.offset(), m.key(), m.value()) for m in got] == [(r.offset, r.key, r.value) for r in records]
    assert {m.key() for m in got} == {b"key-%d" % k for k in range(10)} and got[-1].offset() == 1999


def test_kafka_python_and_aiokafka_admins_create_compacted_topics(broker):
    from aiokafka.admin import AIOKafkaAdminClient
    from aiokafka.admin import NewTopic as AioNewTopic
    from kafka.admin import ConfigResource, ConfigResourceType, KafkaAdminClient, NewTopic
    admin = KafkaAdminClient(bootstrap_servers=broker.bootstrap)
    admin.create_topics([NewTopic("py-compacted", 1, 1, topic_configs={"cleanup.policy": "compact"})])
    described = repr(admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, "py-compacted")]))
    admin.close()
    assert "'cleanup.policy', 'compact'" in described or "cleanup.policy', config_value='compact'" in described \
        or ("cleanup.policy" in described and "compact" in described)

    async def aio() -> None:
        client = AIOKafkaAdminClient(bootstrap_servers=broker.bootstrap)
        await client.start()
        try:
            await client.create_topics([AioNewTopic("aio-compacted", 1, 1,
                                                    topic_configs={"cleanup.policy": "compact,delete"})])
        finally:
            await client.close()
    asyncio.run(aio())
    from confluent_kafka.admin import AdminClient, ConfigResource as Resource, ResourceType
    confluent = AdminClient({"bootstrap.servers": broker.bootstrap})
    for name, policy in (("py-compacted", "compact"), ("aio-compacted", "compact,delete")):
        resource = Resource(ResourceType.TOPIC, name)
        entries = confluent.describe_configs([resource], request_timeout=TIMEOUT_S)[resource].result(TIMEOUT_S)
        assert entries["cleanup.policy"].value == policy


def test_consumer_offsets_is_compacted_and_committed_offsets_survive_its_cleaning(broker):
    from confluent_kafka import Consumer, Producer, TopicPartition
    from confluent_kafka.admin import AdminClient, ConfigResource, NewTopic, ResourceType
    admin = AdminClient({"bootstrap.servers": broker.bootstrap})
    admin.create_topics([NewTopic("tracked", 1, 1)])["tracked"].result(TIMEOUT_S)
    producer = Producer({"bootstrap.servers": broker.bootstrap})
    for i in range(10):
        producer.produce("tracked", key=b"k", value=b"%d" % i)
    producer.flush(TIMEOUT_S)
    consumer = Consumer({"bootstrap.servers": broker.bootstrap, "group.id": "committer", "enable.auto.commit": False})
    for offset in range(1, 301):                                  # many commits of one key
        consumer.commit(offsets=[TopicPartition("tracked", 0, offset % 10 + 1)], asynchronous=False)
    consumer.commit(offsets=[TopicPartition("tracked", 0, 7)], asynchronous=False)
    resource = ConfigResource(ResourceType.TOPIC, "__consumer_offsets")
    entries = admin.describe_configs([resource], request_timeout=TIMEOUT_S)[resource].result(TIMEOUT_S)
    assert entries["cleanup.policy"].value == "compact"
    cleaned_records(broker, "__consumer_offsets-0", 60)
    assert consumer.committed([TopicPartition("tracked", 0)], timeout=TIMEOUT_S)[0].offset == 7
    consumer.close()
    again = Consumer({"bootstrap.servers": broker.bootstrap, "group.id": "committer", "enable.auto.commit": False})
    assert again.committed([TopicPartition("tracked", 0)], timeout=TIMEOUT_S)[0].offset == 7
    again.close()
