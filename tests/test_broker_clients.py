"""A real `raftka serve` broker process driven by real Kafka clients
(confluent-kafka / librdkafka, kafka-python, aiokafka, kcat) and by raw bytes
on its socket: round trips are exact and ordered per key, and bad input gets
an error code or closes only its own connection, writing nothing."""
from __future__ import annotations

import asyncio
import datetime
import socket
import struct
import subprocess
import time

import pytest
from kio.index import load_request_schema
from kio.static.primitive import i16, i32

from raftka.errors import ErrorCode
from raftka.protocol import kafka
from tests.broker_process import BrokerProcess
from tests.conftest import make_batch

TIMEOUT_S = 30


@pytest.fixture(scope="module")
def broker(tmp_path_factory):
    process = BrokerProcess(tmp_path_factory.mktemp("broker") / "data").start()
    yield process
    process.stop()


def consume_all(bootstrap: str, topic: str, partitions: int, expected: int) -> list:
    from confluent_kafka import Consumer, TopicPartition
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "unused", "enable.auto.commit": False})
    consumer.assign([TopicPartition(topic, p, 0) for p in range(partitions)])
    got, deadline = [], time.monotonic() + TIMEOUT_S
    while len(got) < expected and time.monotonic() < deadline:
        message = consumer.poll(0.5)
        if message is not None:
            assert message.error() is None, message.error()
            got.append(message)
    consumer.close()
    return got


def test_confluent_kafka_round_trip_keeps_per_key_order_and_reads_every_message_once(broker):
    from confluent_kafka import Producer
    from confluent_kafka.admin import AdminClient, NewTopic
    admin = AdminClient({"bootstrap.servers": broker.bootstrap})
    admin.create_topics([NewTopic("orders", 3, 1)])["orders"].result(TIMEOUT_S)
    producer = Producer({"bootstrap.servers": broker.bootstrap, "acks": "all", "linger.ms": 5,
                         "enable.idempotence": True})
    failures = []
    sent = [(f"key-{i % 11}".encode(), f"value-{i}".encode() * (i % 5 + 1)) for i in range(3000)]
    for key, value in sent:
        producer.produce("orders", key=key, value=value, headers=[("n", value[:8])],
                         on_delivery=lambda error, _m: failures.append(error) if error else None)
    assert producer.flush(TIMEOUT_S) == 0 and not failures
    got = consume_all(broker.bootstrap, "orders", 3, len(sent))
    assert sorted((m.key(), m.value()) for m in got) == sorted(sent)   # each exactly once, byte-equal
    for key in {k for k, _ in sent}:
        assert [m.value() for m in got if m.key() == key] == [v for k, v in sent if k == key]
    assert len({m.partition() for m in got}) == 3


def test_kafka_python_admin_and_round_trip_with_headers_and_timestamps(broker):
    from kafka import KafkaConsumer, KafkaProducer, TopicPartition
    from kafka.admin import KafkaAdminClient, NewTopic
    admin = KafkaAdminClient(bootstrap_servers=broker.bootstrap)
    admin.create_topics([NewTopic("kp", 2, 1)])
    producer = KafkaProducer(bootstrap_servers=broker.bootstrap, acks="all", enable_idempotence=False)
    futures = [producer.send("kp", key=b"k%d" % (i % 3), value=b"v%d" % i, headers=[("h", b"%d" % i)],
                             timestamp_ms=1_700_000_000_000 + i) for i in range(200)]
    producer.flush()
    assert all(f.get(TIMEOUT_S).offset >= 0 for f in futures)
    consumer = KafkaConsumer(bootstrap_servers=broker.bootstrap, enable_auto_commit=False, consumer_timeout_ms=5000)
    consumer.assign([TopicPartition("kp", 0), TopicPartition("kp", 1)])
    consumer.seek_to_beginning()
    got = sorted(consumer, key=lambda m: int(m.value[1:]))
    assert [(m.key, m.value, m.timestamp, m.headers) for m in got] == [
        (b"k%d" % (i % 3), b"v%d" % i, 1_700_000_000_000 + i, [("h", b"%d" % i)]) for i in range(200)]
    consumer.close()
    assert admin.delete_topics(["kp"])
    admin.close()


def test_aiokafka_round_trip(broker):
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

    async def scenario() -> list:
        producer = AIOKafkaProducer(bootstrap_servers=broker.bootstrap, acks="all")
        await producer.start()
        try:
            for i in range(100):
                await producer.send_and_wait("aio", key=b"k", value=b"m%d" % i, headers=[("x", b"y")])
        finally:
            await producer.stop()
        consumer = AIOKafkaConsumer(bootstrap_servers=broker.bootstrap, enable_auto_commit=False)
        await consumer.start()
        try:
            consumer.assign([TopicPartition("aio", 0)])
            await consumer.seek_to_beginning()
            got = []
            while len(got) < 100:
                batch = await asyncio.wait_for(consumer.getmany(timeout_ms=1000), TIMEOUT_S)
                for messages in batch.values():
                    got += messages
            return got
        finally:
            await consumer.stop()
    got = asyncio.run(scenario())
    assert [(m.key, m.value, list(m.headers)) for m in got] == [(b"k", b"m%d" % i, [("x", b"y")]) for i in range(100)]


def test_kcat_lists_produces_and_consumes(broker):
    listing = subprocess.run(["kcat", "-b", broker.bootstrap, "-L"], capture_output=True, text=True, timeout=TIMEOUT_S)
    assert listing.returncode == 0 and "1 brokers" in listing.stdout, listing.stderr
    lines = "".join(f"line {i}\n" for i in range(50))
    produced = subprocess.run(["kcat", "-b", broker.bootstrap, "-P", "-t", "kc"], input=lines, text=True,
                              capture_output=True, timeout=TIMEOUT_S)
    assert produced.returncode == 0, produced.stderr
    consumed = subprocess.run(["kcat", "-b", broker.bootstrap, "-C", "-t", "kc", "-o", "beginning", "-e", "-q"],
                              capture_output=True, text=True, timeout=TIMEOUT_S)
    assert consumed.stdout == lines, consumed.stderr


# ---- raw bytes on the socket ---------------------------------------------------

def request_frame(api_key: int, version: int, correlation_id: int, body) -> bytes:
    return kafka.encode_request(api_key, version, correlation_id, body, client_id="raw")


def ask(address: tuple[str, int], api_key: int, version: int, body, timeout_s: float = 5.0):
    """One request to the broker at `address` on a connection of its own; the decoded response body."""
    with socket.create_connection(address, timeout=timeout_s) as sock:
        sock.settimeout(timeout_s)
        sock.sendall(request_frame(api_key, version, 1, body))
        return kafka.decode_response(api_key, version, read_response(sock))


def api_versions_frame(correlation_id: int) -> bytes:
    return request_frame(18, 0, correlation_id, load_request_schema(18, 0)())


def read_response(sock: socket.socket) -> bytes:
    head = recv_exactly(sock, 4)
    return recv_exactly(sock, struct.unpack(">i", head)[0])


def recv_exactly(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise ConnectionError("closed by the broker")
        data += chunk
    return data


def closed_by_broker(sock: socket.socket) -> bool:
    sock.settimeout(5)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


def connect(broker) -> socket.socket:
    return socket.create_connection(("127.0.0.1", broker.port), timeout=5)


@pytest.mark.parametrize("junk", [
    b"\xff\xff\xff\xff" + b"x" * 8,                   # negative size
    struct.pack(">i", 3) + b"abc",                  # shorter than a header
    struct.pack(">i", 200 * 1024 * 1024),           # over max_request_bytes
    struct.pack(">i", 12) + struct.pack(">hhi", 3, 4, 1) + b"\xff\xff\x00\x05",   # metadata body cut short
    struct.pack(">i", 10) + b"\x00\x00\x00\x03" + b"\x00\x00\x00\x01\x00\x10",   # produce v3 header, no body
], ids=["negative-size", "short", "oversized", "truncated-body", "missing-body"])
def test_bad_frames_close_only_their_connection(broker, junk):
    bystander = connect(broker)
    bad = connect(broker)
    bad.sendall(junk)
    assert closed_by_broker(bad)
    bystander.sendall(api_versions_frame(9))
    assert struct.unpack_from(">ih", read_response(bystander)) == (9, ErrorCode.NONE)
    assert "closed:" in broker.log_text()


def test_an_unknown_api_gets_unsupported_version_and_the_connection_stays_usable(broker):
    sock = connect(broker)
    sock.sendall(struct.pack(">ihhi", 10, 999, 0, 41) + b"\x00\x00")
    assert struct.unpack_from(">ih", read_response(sock)) == (41, ErrorCode.UNSUPPORTED_VERSION)
    sock.sendall(api_versions_frame(42))
    assert struct.unpack_from(">ih", read_response(sock)) == (42, ErrorCode.NONE)


def test_a_newer_api_versions_gets_the_v0_fallback_with_our_ranges(broker):
    sock = connect(broker)
    sock.sendall(struct.pack(">ihhi", 10, 18, 99, 5) + b"\xff\xff")
    body = read_response(sock)
    correlation, error, count = struct.unpack_from(">ihi", body)
    assert (correlation, error, count) == (5, ErrorCode.UNSUPPORTED_VERSION, len(kafka.ADVERTISED))


def produce_frame(topic: str, records: bytes, correlation_id: int, acks: int = -1) -> bytes:
    schema = load_request_schema(0, 3)
    partition = kafka.nested(schema, "PartitionProduceData")(index=i32(0), records=records)
    topic_data = kafka.nested(schema, "TopicProduceData")(name=topic, partition_data=(partition,))
    body = schema(transactional_id=None, acks=i16(acks), timeout=datetime.timedelta(seconds=10),
                  topic_data=(topic_data,))
    return request_frame(0, 3, correlation_id, body)


def produce_error(address: tuple[str, int], topic: str, acks: int = -1) -> int:
    """The error code of one raw Produce v3 of one record to partition 0 (acks 1 or -1: answered)."""
    with socket.create_connection(address, timeout=TIMEOUT_S) as sock:
        sock.settimeout(TIMEOUT_S)
        sock.sendall(produce_frame(topic, make_batch(1), 1, acks=acks))
        response = kafka.decode_response(0, 3, read_response(sock))
    return response.responses[0].partition_responses[0].error_code.value


def test_a_batch_with_a_bad_crc_is_refused_with_corrupt_message_and_nothing_is_written(broker):
    from confluent_kafka.admin import AdminClient, NewTopic
    admin = AdminClient({"bootstrap.servers": broker.bootstrap})
    admin.create_topics([NewTopic("crc", 1, 1)])["crc"].result(TIMEOUT_S)
    sock = connect(broker)
    good = make_batch(3)
    bad = bytearray(good)
    bad[-1] ^= 0xFF
    sock.sendall(produce_frame("crc", bytes(bad), 7))
    response = read_response(sock)
    assert response[:4] == struct.pack(">i", 7)
    assert struct.pack(">h", ErrorCode.CORRUPT_MESSAGE) in response
    sock.sendall(produce_frame("crc", good, 8))
    assert struct.pack(">hq", ErrorCode.NONE, 0) in read_response(sock)   # offset 0: the bad one took nothing
    got = consume_all(broker.bootstrap, "crc", 1, 3)
    assert [m.offset() for m in got] == [0, 1, 2]


def test_an_idempotent_retry_is_acknowledged_with_its_first_offset_and_written_once(broker):
    from confluent_kafka.admin import AdminClient, NewTopic
    from raftka.records.batch import Record, build_batch
    admin = AdminClient({"bootstrap.servers": broker.bootstrap})
    admin.create_topics([NewTopic("idem", 1, 1)])["idem"].result(TIMEOUT_S)
    sock = connect(broker)

    def produce(sequence: int, correlation_id: int) -> bytes:
        batch = build_batch([Record(b"v%d" % sequence, b"k"), Record(b"w", b"k")], producer_id=12345,
                            producer_epoch=0, base_sequence=sequence)
        sock.sendall(produce_frame("idem", batch, correlation_id))
        return read_response(sock)
    deadline = time.monotonic() + TIMEOUT_S
    while struct.pack(">hq", ErrorCode.NONE, 0) not in produce(0, 2):   # until its leader is elected
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert struct.pack(">hq", ErrorCode.NONE, 0) in produce(0, 3)     # the retry: same offset
    assert struct.pack(">hq", ErrorCode.NONE, 2) in produce(2, 4)     # the next batch
    assert struct.pack(">h", ErrorCode.OUT_OF_ORDER_SEQUENCE_NUMBER) in produce(9, 5)
    got = consume_all(broker.bootstrap, "idem", 1, 4)
    assert [(m.offset(), m.value()) for m in got] == [(0, b"v0"), (1, b"w"), (2, b"v2"), (3, b"w")]


def test_admin_grows_partitions_and_describes_topic_configs(broker):
    from confluent_kafka.admin import AdminClient, ConfigResource, NewPartitions, NewTopic
    admin = AdminClient({"bootstrap.servers": broker.bootstrap})
    admin.create_topics([NewTopic("grow", 1, 1, config={"retention.ms": "60000"})])["grow"].result(TIMEOUT_S)
    admin.create_partitions([NewPartitions("grow", 4)])["grow"].result(TIMEOUT_S)
    deadline = time.monotonic() + TIMEOUT_S
    while len(admin.list_topics("grow", timeout=TIMEOUT_S).topics["grow"].partitions) != 4:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    with pytest.raises(Exception, match="INVALID_PARTITIONS"):
        admin.create_partitions([NewPartitions("grow", 2)])["grow"].result(TIMEOUT_S)
    with pytest.raises(Exception, match="INVALID_CONFIG"):
        admin.create_topics([NewTopic("badconf", 1, 1, config={"no.such": "1"})])["badconf"].result(TIMEOUT_S)
    [described] = admin.describe_configs([ConfigResource("topic", "grow")]).values()
    configs = described.result(TIMEOUT_S)
    assert configs["retention.ms"].value == "60000" and configs["segment.bytes"].value == str(1 << 30)
    [broker_configs] = admin.describe_configs([ConfigResource("broker", "1")]).values()
    assert broker_configs.result(TIMEOUT_S)["auto.create.topics.enable"].value == "true"
