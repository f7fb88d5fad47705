"""TLS on the Kafka listener: confluent-kafka, kafka-python and kcat round
trips over SSL against a real broker process; plaintext to the TLS port is
refused; with a client CA, only clients holding a current certificate it
signed get in."""
from __future__ import annotations

import socket
import ssl
import struct
import subprocess
import time

import pytest

from tests.broker_process import BrokerProcess
from tests.certs import Certs, make_certs
from tests.test_broker_clients import api_versions_frame, closed_by_broker, read_response

TIMEOUT_S = 30


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> Certs:
    return make_certs(tmp_path_factory.mktemp("certs"))


@pytest.fixture(scope="module")
def tls_broker(tmp_path_factory, certs):
    process = BrokerProcess(tmp_path_factory.mktemp("tls") / "data", tls_cert=certs.server.cert,
                            tls_key=certs.server.key).start()
    yield process
    process.stop()


@pytest.fixture(scope="module")
def mtls_broker(tmp_path_factory, certs):
    process = BrokerProcess(tmp_path_factory.mktemp("mtls") / "data", tls_cert=certs.server.cert,
                            tls_key=certs.server.key, tls_ca=certs.ca).start()
    yield process
    process.stop()


def confluent_round_trip(bootstrap: str, topic: str, settings: dict[str, str], count: int = 200) -> list[bytes]:
    from confluent_kafka import Consumer, Producer
    producer = Producer({"bootstrap.servers": bootstrap, "acks": "all", **settings})
    for i in range(count):
        producer.produce(topic, value=b"secret-%d" % i)
    assert producer.flush(TIMEOUT_S) == 0
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"g-{topic}", "auto.offset.reset": "earliest",
                         **settings})
    consumer.subscribe([topic])
    got: list[bytes] = []
    deadline = time.monotonic() + TIMEOUT_S
    while len(got) < count and time.monotonic() < deadline:
        message = consumer.poll(0.5)
        if message is not None and message.error() is None:
            got.append(message.value())
    consumer.close()
    return got


def test_confluent_kafka_round_trip_over_tls_with_a_consumer_group(tls_broker, certs):
    got = confluent_round_trip(tls_broker.bootstrap, "tls-confluent",
                               {"security.protocol": "SSL", "ssl.ca.location": certs.ca})
    assert got == [b"secret-%d" % i for i in range(200)]


def test_kafka_python_round_trip_over_tls(tls_broker, certs):
    from kafka import KafkaConsumer, KafkaProducer
    ssl_settings = dict(security_protocol="SSL", ssl_cafile=certs.ca, ssl_check_hostname=True)
    producer = KafkaProducer(bootstrap_servers=tls_broker.bootstrap, acks="all", **ssl_settings)
    for i in range(50):
        producer.send("tls-kafka-python", b"kp-%d" % i)
    producer.flush(TIMEOUT_S)
    producer.close()
    consumer = KafkaConsumer("tls-kafka-python", bootstrap_servers=tls_broker.bootstrap,
                             auto_offset_reset="earliest", consumer_timeout_ms=10_000, **ssl_settings)
    got = [m.value for m in consumer]
    consumer.close()
    assert got == [b"kp-%d" % i for i in range(50)]


def test_kcat_produces_and_consumes_over_tls(tls_broker, certs):
    common = ["kcat", "-b", tls_broker.bootstrap, "-X", "security.protocol=ssl", "-X", f"ssl.ca.location={certs.ca}"]
    subprocess.run([*common, "-P", "-t", "tls-kcat"], input=b"one\ntwo\nthree\n", check=True, timeout=TIMEOUT_S)
    out = subprocess.run([*common, "-C", "-t", "tls-kcat", "-o", "beginning", "-e", "-q"], capture_output=True,
                         check=True, timeout=TIMEOUT_S).stdout
    assert out.split() == [b"one", b"two", b"three"]


def test_a_large_fetch_arrives_whole_over_tls(tls_broker, certs):
    from confluent_kafka import Consumer, Producer, TopicPartition
    settings = {"security.protocol": "SSL", "ssl.ca.location": certs.ca}
    producer = Producer({"bootstrap.servers": tls_broker.bootstrap, **settings})
    values = [bytes([i % 251]) * 200_000 for i in range(30)]   # ~6 MB, fetched in large responses
    for value in values:
        producer.produce("tls-large", value=value)
    assert producer.flush(TIMEOUT_S) == 0
    consumer = Consumer({"bootstrap.servers": tls_broker.bootstrap, "group.id": "large", **settings})
    consumer.assign([TopicPartition("tls-large", 0, 0)])
    got = []
    deadline = time.monotonic() + TIMEOUT_S
    while len(got) < len(values) and time.monotonic() < deadline:
        message = consumer.poll(0.5)
        if message is not None and message.error() is None:
            got.append(message.value())
    consumer.close()
    assert got == values


def test_plaintext_to_the_tls_port_is_refused_and_tls_clients_still_served(tls_broker, certs):
    with socket.create_connection(("127.0.0.1", tls_broker.port), timeout=10) as sock:
        sock.sendall(api_versions_frame(1))
        assert closed_by_broker(sock)
    with tls_connect(tls_broker, certs.ca) as sock:
        sock.sendall(api_versions_frame(2))
        assert read_response(sock)[:4] == struct.pack(">i", 2)


def tls_connect(broker, ca: str, client: tuple[str, str] | None = None) -> ssl.SSLSocket:
    context = ssl.create_default_context(cafile=ca)
    if client is not None:
        context.load_cert_chain(*client)
    raw = socket.create_connection(("127.0.0.1", broker.port), timeout=10)
    return context.wrap_socket(raw, server_hostname="127.0.0.1")


def test_mutual_tls_lets_in_a_client_certificate_the_ca_signed(mtls_broker, certs):
    got = confluent_round_trip(mtls_broker.bootstrap, "mtls", {
        "security.protocol": "SSL", "ssl.ca.location": certs.ca,
        "ssl.certificate.location": certs.client.cert, "ssl.key.location": certs.client.key}, count=20)
    assert len(got) == 20


@pytest.mark.parametrize("who", ["none", "expired", "unknown-ca"])
def test_mutual_tls_refuses_clients_without_a_current_certificate_from_the_ca(mtls_broker, certs, who):
    client = {"none": None, "expired": (certs.expired_client.cert, certs.expired_client.key),
              "unknown-ca": (certs.rogue_client.cert, certs.rogue_client.key)}[who]
    with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
        with tls_connect(mtls_broker, certs.ca, client) as sock:   # TLS 1.3: refusal may come at the first read
            sock.sendall(api_versions_frame(3))
            read_response(sock)
    with tls_connect(mtls_broker, certs.ca, (certs.client.cert, certs.client.key)) as sock:
        sock.sendall(api_versions_frame(4))
        assert read_response(sock)[:4] == struct.pack(">i", 4)
