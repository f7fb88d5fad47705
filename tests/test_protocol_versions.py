"""The current protocol versions against a real `raftka serve` process and
real clients: each raised version works with librdkafka (confluent-kafka),
kafka-python and aiokafka, and the fields it brings are filled in (zstd
batches stored compressed, log start offsets, leader epochs, topic ids,
Kafka's ListOffsets answers)."""
from __future__ import annotations

import asyncio

import pytest

from raftka.records.batch import iter_batches
from raftka.records.compression import Compression
from tests.broker_process import BrokerProcess
from tests.test_broker_clients import consume_all

TIMEOUT_S = 30


@pytest.fixture(scope="module")
def broker(tmp_path_factory):
    process = BrokerProcess(tmp_path_factory.mktemp("versions") / "data").start()
    yield process
    process.stop()


def stored_batches(broker: BrokerProcess, topic: str, partition: int = 0) -> list:
    """Headers of every batch in the partition's segment files on disk."""
    files = broker.brokers.segment_files(1, topic, partition)
    return [header for data in files.values() for header, _ in iter_batches(data)]


def test_zstd_from_confluent_kafka_is_stored_compressed_and_read_back_by_every_client(broker):
    from confluent_kafka import Producer
    producer = Producer({"bootstrap.servers": broker.bootstrap, "compression.type": "zstd", "linger.ms": 20,
                         "enable.idempotence": True})
    sent = [(b"k%d" % (i % 7), b"zstd value %d " % i * 20) for i in range(2000)]
    for key, value in sent:
        producer.produce("zstd", key=key, value=value)
    assert producer.flush(TIMEOUT_S) == 0
    headers = stored_batches(broker, "zstd")
    assert headers and {h.compression for h in headers} == {Compression.ZSTD}
    assert sum(h.record_count for h in headers) == len(sent)
    assert sum(h.size_bytes for h in headers) < sum(len(v) for _, v in sent) // 5   # compressed, not just labelled
    assert [(m.key(), m.value()) for m in consume_all(broker.bootstrap, "zstd", 1, len(sent))] == sent
    assert kafka_python_values(broker, "zstd") == [v for _, v in sent]
    assert aiokafka_values(broker, "zstd", len(sent)) == [v for _, v in sent]


def kafka_python_values(broker: BrokerProcess, topic: str) -> list[bytes]:
    from kafka import KafkaConsumer, TopicPartition
    consumer = KafkaConsumer(bootstrap_servers=broker.bootstrap, enable_auto_commit=False, consumer_timeout_ms=5000)
    consumer.assign([TopicPartition(topic, 0)])
    consumer.seek_to_beginning()
    values = [m.value for m in consumer]
    consumer.close()
    return values


def aiokafka_values(broker: BrokerProcess, topic: str, expected: int) -> list[bytes]:
    from aiokafka import AIOKafkaConsumer, TopicPartition

    async def scenario() -> list[bytes]:
        consumer = AIOKafkaConsumer(bootstrap_servers=broker.bootstrap, enable_auto_commit=False)
        await consumer.start()
        try:
            consumer.assign([TopicPartition(topic, 0)])
            await consumer.seek_to_beginning()
            got: list[bytes] = []
            while len(got) < expected:
                batch = await asyncio.wait_for(consumer.getmany(timeout_ms=1000), TIMEOUT_S)
                for messages in batch.values():
                    got += [m.value for m in messages]
            return got
        finally:
            await consumer.stop()
    return asyncio.run(scenario())


def test_zstd_from_kafka_python_and_aiokafka_producers_is_stored_compressed(broker):
    from aiokafka import AIOKafkaProducer
    from kafka import KafkaProducer
    producer = KafkaProducer(bootstrap_servers=broker.bootstrap, compression_type="zstd", linger_ms=20)
    for i in range(300):
        producer.send("zstd-py", value=b"kafka-python %d" % i * 10)
    producer.flush(TIMEOUT_S)
    producer.close()

    async def produce_aiokafka() -> None:
        aio = AIOKafkaProducer(bootstrap_servers=broker.bootstrap, compression_type="zstd", linger_ms=20)
        await aio.start()
        try:
            sent = [await aio.send("zstd-py", value=b"aiokafka %d" % i * 10) for i in range(300)]
            await asyncio.gather(*sent)
        finally:
            await aio.stop()
    asyncio.run(produce_aiokafka())
    assert {h.compression for h in stored_batches(broker, "zstd-py")} == {Compression.ZSTD}
    expected = [b"kafka-python %d" % i * 10 for i in range(300)] + [b"aiokafka %d" % i * 10 for i in range(300)]
    assert [m.value() for m in consume_all(broker.bootstrap, "zstd-py", 1, 600)] == expected
