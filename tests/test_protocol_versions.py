"""The current protocol versions against a real `raftka serve` process and
real clients: each raised version works with librdkafka (confluent-kafka),
kafka-python and aiokafka, and the fields it brings are filled in (zstd
batches stored compressed, log start offsets, leader epochs, topic ids,
Kafka's ListOffsets answers)."""
from __future__ import annotations

import asyncio
import base64
import datetime
import subprocess
import uuid

import pytest

from kio.index import load_request_schema
from kio.static.primitive import i8, i32, i64

from raftka.errors import ErrorCode
from raftka.protocol import kafka
from raftka.records.batch import iter_batches
from raftka.records.compression import Compression
from tests.broker_process import BrokerProcess
from tests.test_broker_clients import ask, consume_all

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


# ---- Metadata: leader epochs and topic ids; DescribeCluster --------------------

def test_metadata_reports_leader_epochs_and_a_topic_id_stable_across_requests_and_clients(broker):
    from confluent_kafka.admin import AdminClient, NewTopic
    from confluent_kafka import TopicCollection
    admin = AdminClient({"bootstrap.servers": broker.bootstrap})
    admin.create_topics([NewTopic("ids", 2, 1)])["ids"].result(TIMEOUT_S)
    described = admin.describe_topics(TopicCollection(["ids"]))["ids"].result(TIMEOUT_S)
    body = metadata_v12(broker, "ids")
    (topic,) = body.topics
    kafka_text = base64.b64encode(topic.topic_id.bytes).rstrip(b"=").decode()   # as librdkafka prints a Uuid
    assert str(described.topic_id) == kafka_text and topic.topic_id.int != 0
    assert metadata_v12(broker, "ids").topics[0].topic_id == topic.topic_id
    terms = [list_offsets_answer(broker, "ids", -1, partition=p).leader_epoch for p in range(2)]
    assert [p.leader_epoch for p in topic.partitions] == terms   # the partitions' Raft terms
    assert all(p.leader_epoch >= 1 for p in topic.partitions)
    by_id = ask_raw(broker, 3, 12, metadata_request(topic_id=topic.topic_id))
    assert [(t.name, t.error_code.value) for t in by_id.topics] == [("ids", 0)]
    unknown = ask_raw(broker, 3, 12, metadata_request(topic_id=uuid.UUID(int=7)))
    assert [t.error_code.value for t in unknown.topics] == [ErrorCode.UNKNOWN_TOPIC_ID]


def metadata_request(name: str | None = None, topic_id: uuid.UUID | None = None):
    schema = load_request_schema(3, 12)
    topic = kafka.nested(schema, "MetadataRequestTopic")(topic_id=topic_id or uuid.UUID(int=0), name=name)
    return schema(topics=(topic,), allow_auto_topic_creation=False, include_topic_authorized_operations=False)


def metadata_v12(broker: BrokerProcess, name: str):
    return ask_raw(broker, 3, 12, metadata_request(name=name))


def ask_raw(broker: BrokerProcess, api_key: int, version: int, body):
    return ask(("127.0.0.1", broker.port), api_key, version, body)


def test_describe_cluster_names_the_broker_and_controller(broker):
    from confluent_kafka.admin import AdminClient
    admin = AdminClient({"bootstrap.servers": broker.bootstrap})
    cluster = admin.describe_cluster().result(TIMEOUT_S)
    assert [(n.id, n.host, n.port) for n in cluster.nodes] == [(1, "127.0.0.1", broker.port)]
    assert cluster.controller.id == 1 and cluster.cluster_id == "raftka"
    schema = load_request_schema(60, 1)
    refused = ask_raw(broker, 60, 1, schema(include_cluster_authorized_operations=False, endpoint_type=i8(2)))
    assert refused.error_code.value == ErrorCode.UNSUPPORTED_ENDPOINT_TYPE


# ---- ListOffsets by timestamp: Kafka's semantics -------------------------------

BASE_MS = 1_700_000_000_000


@pytest.fixture(scope="module")
def timed_topic(broker):
    """`timed`: 10 records at BASE_MS + 1000 * i (i = 0..9), then one at BASE_MS + 500 (out of order)."""
    from confluent_kafka import Producer
    producer = Producer({"bootstrap.servers": broker.bootstrap, "linger.ms": 0})
    for i in range(10):
        producer.produce("timed", value=b"t%d" % i, timestamp=BASE_MS + 1000 * i)
        producer.flush(TIMEOUT_S)
    producer.produce("timed", value=b"late", timestamp=BASE_MS + 500)
    assert producer.flush(TIMEOUT_S) == 0
    return "timed"


def list_offsets_answer(broker: BrokerProcess, topic: str, timestamp: int, version: int = 7, partition: int = 0):
    schema = load_request_schema(2, version)
    wanted = kafka.nested(schema, "ListOffsetsPartition")(partition_index=i32(partition), timestamp=i64(timestamp))
    body = kafka.build(schema, replica_id=i32(-1), isolation_level=i8(0),
                  topics=(kafka.nested(schema, "ListOffsetsTopic")(name=topic, partitions=(wanted,)),))
    return ask_raw(broker, 2, version, body).topics[0].partitions[0]


def list_offset(broker: BrokerProcess, topic: str, timestamp: int, version: int = 7) -> tuple[int, int, int]:
    answer = list_offsets_answer(broker, topic, timestamp, version)
    return answer.error_code.value, answer.offset, answer.timestamp


def test_list_offsets_by_timestamp_answers_the_records_own_timestamp_or_minus_one(broker, timed_topic):
    assert list_offset(broker, timed_topic, BASE_MS + 2500) == (0, 3, BASE_MS + 3000)
    assert list_offset(broker, timed_topic, BASE_MS + 3000) == (0, 3, BASE_MS + 3000)
    assert list_offset(broker, timed_topic, BASE_MS) == (0, 0, BASE_MS)
    assert list_offset(broker, timed_topic, BASE_MS + 60_000) == (0, -1, -1)
    assert list_offset(broker, timed_topic, -3) == (0, 9, BASE_MS + 9000)      # max timestamp (v7)
    assert list_offset(broker, timed_topic, -2) == (0, 0, -1)
    assert list_offset(broker, timed_topic, -1) == (0, 11, -1)
    assert list_offset(broker, timed_topic, BASE_MS + 2500, version=1) == (0, 3, BASE_MS + 3000)


def test_offsets_for_times_in_kafka_python_aiokafka_and_kcat(broker, timed_topic):
    from aiokafka import AIOKafkaConsumer
    from aiokafka import TopicPartition as AioPartition
    from kafka import KafkaConsumer, TopicPartition
    consumer = KafkaConsumer(bootstrap_servers=broker.bootstrap)
    found = consumer.offsets_for_times({TopicPartition(timed_topic, 0): BASE_MS + 4200})
    assert tuple(found[TopicPartition(timed_topic, 0)])[:2] == (5, BASE_MS + 5000)
    none = consumer.offsets_for_times({TopicPartition(timed_topic, 0): BASE_MS + 60_000})
    assert none[TopicPartition(timed_topic, 0)] is None
    consumer.close()

    async def aio() -> tuple:
        client = AIOKafkaConsumer(bootstrap_servers=broker.bootstrap)
        await client.start()
        try:
            answer = await client.offsets_for_times({AioPartition(timed_topic, 0): BASE_MS + 7001})
            return tuple(answer[AioPartition(timed_topic, 0)])[:2]
        finally:
            await client.stop()
    assert asyncio.run(aio()) == (8, BASE_MS + 8000)

    read = subprocess.run(["kcat", "-b", broker.bootstrap, "-C", "-t", timed_topic, "-o", f"s@{BASE_MS + 8500}",
                           "-e", "-q", "-f", "%o %T %s\n"], capture_output=True, text=True, timeout=TIMEOUT_S)
    assert read.returncode == 0, read.stderr
    assert read.stdout.splitlines() == [f"9 {BASE_MS + 9000} t9", f"10 {BASE_MS + 500} late"]


# ---- Fetch without sessions (KIP-227) -------------------------------------------

def fetch_v12(broker: BrokerProcess, topic: str, session_id: int, session_epoch: int, leader_epoch: int = -1):
    schema = load_request_schema(1, 12)
    wanted = kafka.nested(schema, "FetchPartition")(partition=i32(0), current_leader_epoch=i32(leader_epoch),
                                                    fetch_offset=i64(0), last_fetched_epoch=i32(-1),
                                                    log_start_offset=i64(-1), partition_max_bytes=i32(1 << 20))
    body = schema(cluster_id=None, replica_id=i32(-1), max_wait=datetime.timedelta(0), min_bytes=i32(0),
                  max_bytes=i32(1 << 20), isolation_level=i8(0), session_id=i32(session_id),
                  session_epoch=i32(session_epoch), topics=(kafka.nested(schema, "FetchTopic")(
                      topic=topic, partitions=(wanted,)),), forgotten_topics_data=(), rack_id="")
    return ask_raw(broker, 1, 12, body)


def test_fetch_answers_a_session_request_with_session_id_0_and_refuses_unknown_sessions(broker, timed_topic):
    asked = fetch_v12(broker, timed_topic, session_id=0, session_epoch=0)    # a client asking for a session
    assert (asked.error_code.value, asked.session_id) == (0, 0)               # none created: full fetches
    partition = asked.responses[0].partitions[0]
    assert partition.records and (partition.high_watermark, partition.log_start_offset) == (11, 0)
    assert fetch_v12(broker, timed_topic, session_id=12345, session_epoch=1).error_code.value \
        == ErrorCode.FETCH_SESSION_ID_NOT_FOUND
    assert fetch_v12(broker, timed_topic, session_id=0, session_epoch=3).error_code.value \
        == ErrorCode.INVALID_FETCH_SESSION_EPOCH


def test_fetch_and_list_offsets_check_the_clients_leader_epoch(broker, timed_topic):
    epoch = list_offsets_answer(broker, timed_topic, -1).leader_epoch
    assert fetch_v12(broker, timed_topic, 0, -1, leader_epoch=epoch).responses[0].partitions[0].error_code.value == 0
    stale = fetch_v12(broker, timed_topic, 0, -1, leader_epoch=epoch - 1).responses[0].partitions[0]
    ahead = fetch_v12(broker, timed_topic, 0, -1, leader_epoch=epoch + 1).responses[0].partitions[0]
    assert (stale.error_code.value, ahead.error_code.value) == (ErrorCode.FENCED_LEADER_EPOCH,
                                                                ErrorCode.UNKNOWN_LEADER_EPOCH)
