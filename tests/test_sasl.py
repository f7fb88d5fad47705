"""SASL on a real broker process: confluent-kafka and kafka-python over
SASL_SSL with SCRAM-SHA-512 and SCRAM-SHA-256, kcat with sasl_ssl; the first
admin comes from RAFTKA_ADMIN_USER/RAFTKA_ADMIN_PASSWORD; a wrong password
is refused; an unauthenticated connection gets nothing but ApiVersions and
the SASL APIs; users made with AlterUserScramCredentials can log in."""
from __future__ import annotations

import socket
import ssl
import struct
import subprocess

import pytest

from raftka.errors import ErrorCode
from raftka.protocol import kafka
from tests.broker_process import BrokerProcess
from tests.certs import Certs, make_certs
from tests.test_tls import confluent_round_trip
from tests.test_broker_clients import api_versions_frame, closed_by_broker, read_response, request_frame

TIMEOUT_S = 30
ADMIN, ADMIN_PASSWORD = "admin", "admin-secret-0123456789"


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> Certs:
    return make_certs(tmp_path_factory.mktemp("certs"))


def start_sasl_broker(root, certs: Certs, **settings) -> BrokerProcess:
    process = BrokerProcess(root, tls_cert=certs.server.cert, tls_key=certs.server.key,
                            sasl_mechanisms="SCRAM-SHA-512,SCRAM-SHA-256,PLAIN", **settings)
    process.brokers.env.update(RAFTKA_ADMIN_USER=ADMIN, RAFTKA_ADMIN_PASSWORD=ADMIN_PASSWORD)
    return process.start()


@pytest.fixture(scope="module")
def broker(tmp_path_factory, certs):
    process = start_sasl_broker(tmp_path_factory.mktemp("sasl") / "data", certs)
    yield process
    process.stop()


def sasl(certs: Certs, mechanism: str, user: str = ADMIN, password: str = ADMIN_PASSWORD) -> dict[str, str]:
    return {"security.protocol": "SASL_SSL", "ssl.ca.location": certs.ca, "sasl.mechanism": mechanism,
            "sasl.username": user, "sasl.password": password}


@pytest.mark.parametrize("mechanism", ["SCRAM-SHA-512", "SCRAM-SHA-256", "PLAIN"])
def test_confluent_kafka_round_trip_as_the_bootstrap_admin(broker, certs, mechanism):
    topic = f"sasl-{mechanism.lower()}"
    assert confluent_round_trip(broker.bootstrap, topic, sasl(certs, mechanism), count=50) == [b"secret-%d" % i for i in range(50)]


@pytest.mark.parametrize("mechanism", ["SCRAM-SHA-512", "SCRAM-SHA-256"])
def test_kafka_python_round_trip_over_sasl_ssl(broker, certs, mechanism):
    from kafka import KafkaConsumer, KafkaProducer
    settings = dict(security_protocol="SASL_SSL", ssl_cafile=certs.ca, sasl_mechanism=mechanism,
                    sasl_plain_username=ADMIN, sasl_plain_password=ADMIN_PASSWORD)
    topic = f"kp-{mechanism.lower()}"
    producer = KafkaProducer(bootstrap_servers=broker.bootstrap, acks="all", **settings)
    for i in range(20):
        producer.send(topic, b"kp-%d" % i)
    producer.flush(TIMEOUT_S)
    producer.close()
    consumer = KafkaConsumer(topic, bootstrap_servers=broker.bootstrap, auto_offset_reset="earliest",
                             consumer_timeout_ms=10_000, **settings)
    got = [m.value for m in consumer]
    consumer.close()
    assert got == [b"kp-%d" % i for i in range(20)]


def test_kcat_produces_and_consumes_over_sasl_ssl(broker, certs):
    common = ["kcat", "-b", broker.bootstrap, "-X", "security.protocol=sasl_ssl", "-X", f"ssl.ca.location={certs.ca}",
              "-X", "sasl.mechanisms=SCRAM-SHA-512", "-X", f"sasl.username={ADMIN}",
              "-X", f"sasl.password={ADMIN_PASSWORD}"]
    subprocess.run([*common, "-P", "-t", "sasl-kcat"], input=b"a\nb\n", check=True, timeout=TIMEOUT_S)
    out = subprocess.run([*common, "-C", "-t", "sasl-kcat", "-o", "beginning", "-e", "-q"], capture_output=True,
                         check=True, timeout=TIMEOUT_S).stdout
    assert out.split() == [b"a", b"b"]


@pytest.mark.parametrize("mechanism", ["SCRAM-SHA-512", "SCRAM-SHA-256", "PLAIN"])
def test_wrong_password_is_refused(broker, certs, mechanism):
    from confluent_kafka import KafkaError, KafkaException
    from confluent_kafka.admin import AdminClient
    errors: list[int] = []
    admin = AdminClient({"bootstrap.servers": broker.bootstrap, **sasl(certs, mechanism, password="nope"),
                         "error_cb": lambda error: errors.append(error.code())})
    with pytest.raises(KafkaException):
        admin.list_topics(timeout=10)
    admin.poll(1)    # error callbacks run from poll
    assert KafkaError._AUTHENTICATION in errors
    assert "closed: SASL authentication failed" in broker.log_text()


def tls_socket(broker, certs: Certs) -> ssl.SSLSocket:
    context = ssl.create_default_context(cafile=certs.ca)
    return context.wrap_socket(socket.create_connection(("127.0.0.1", broker.port), timeout=10),
                               server_hostname="127.0.0.1")


def test_an_unauthenticated_connection_gets_api_versions_and_nothing_else(broker, certs):
    from kio.index import load_request_schema
    with tls_socket(broker, certs) as sock:
        sock.sendall(api_versions_frame(1))
        assert read_response(sock)[:4] == struct.pack(">i", 1)
        metadata = load_request_schema(kafka.METADATA, 1)(topics=None)
        sock.sendall(request_frame(kafka.METADATA, 1, 2, metadata))
        assert closed_by_broker(sock)


def test_sasl_handshake_v0_is_advertised_for_librdkafka_but_refused(broker, certs):
    from kio.index import load_request_schema
    with tls_socket(broker, certs) as sock:
        sock.sendall(api_versions_frame(1))
        versions = kafka.decode_response(kafka.API_VERSIONS, 0, read_response(sock))
        advertised = {key.api_key: (key.min_version, key.max_version) for key in versions.api_keys}
        assert advertised[kafka.SASL_HANDSHAKE] == (0, 1)
        sock.sendall(request_frame(kafka.SASL_HANDSHAKE, 0, 2, load_request_schema(17, 0)(mechanism="SCRAM-SHA-512")))
        assert read_response(sock) == struct.pack(">ih", 2, ErrorCode.UNSUPPORTED_VERSION)


def test_plain_is_not_offered_without_tls(tmp_path, certs):
    process = BrokerProcess(tmp_path / "data", sasl_mechanisms="SCRAM-SHA-512,PLAIN").start()
    try:
        from kio.index import load_request_schema
        with socket.create_connection(("127.0.0.1", process.port), timeout=10) as sock:
            sock.sendall(request_frame(kafka.SASL_HANDSHAKE, 1, 3, load_request_schema(17, 1)(mechanism="PLAIN")))
            body = kafka.decode_response(kafka.SASL_HANDSHAKE, 1, read_response(sock))
        assert body.error_code == ErrorCode.UNSUPPORTED_SASL_MECHANISM and body.mechanisms == ("SCRAM-SHA-512",)
    finally:
        process.stop()


def test_a_user_added_with_alter_user_scram_credentials_logs_in_and_is_listed(broker, certs):
    from confluent_kafka import KafkaException
    from confluent_kafka.admin import (AdminClient, ScramCredentialInfo, ScramMechanism,
                                       UserScramCredentialUpsertion)
    admin = AdminClient({"bootstrap.servers": broker.bootstrap, **sasl(certs, "SCRAM-SHA-512")})
    info = ScramCredentialInfo(ScramMechanism.SCRAM_SHA_512, 8192)
    futures = admin.alter_user_scram_credentials([UserScramCredentialUpsertion("carol", info, b"carol-pass-123")])
    futures["carol"].result(TIMEOUT_S)
    described = {user: future.result(TIMEOUT_S) for user, future in admin.describe_user_scram_credentials(["carol"]).items()}
    assert [(c.mechanism, c.iterations) for c in described["carol"].scram_credential_infos] == \
        [(ScramMechanism.SCRAM_SHA_512, 8192)]
    carol = AdminClient({"bootstrap.servers": broker.bootstrap, **sasl(certs, "SCRAM-SHA-512", "carol", "carol-pass-123")})
    assert carol.list_topics(timeout=TIMEOUT_S).brokers     # authenticated (no ACL: sees no topics)
    wrong = AdminClient({"bootstrap.servers": broker.bootstrap, **sasl(certs, "SCRAM-SHA-256", "carol", "carol-pass-123")})
    with pytest.raises(KafkaException):
        wrong.list_topics(timeout=10)                         # she has no SHA-256 credential
