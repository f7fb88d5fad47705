"""A broker no client can crash or exhaust: every hostile input from the
audit, sent to a real `raftka serve` process (under an address-space limit,
so an allocation the input provokes fails as it would on a small host). After
each, the broker is alive, its RSS and descriptors are bounded, and another
client is still served."""
from __future__ import annotations

import os
import socket
import struct
import time
from pathlib import Path

import pytest
from kio.index import load_request_schema
from kio.static.primitive import i32, i64

from raftka.broker.local_cluster import LocalBrokers
from raftka.errors import ErrorCode
from raftka.native import crc32c
from raftka.protocol import kafka
from raftka.records import layout
from raftka.records.batch import Record, build_batch
from tests.conftest import make_batch
from tests.test_broker_clients import (api_versions_frame, closed_by_broker, produce_frame, read_response,
                                       request_frame)

TIMEOUT_S = 30
ADDRESS_SPACE_BYTES = 2 << 30          # the broker runs under `prlimit --as`: a 16 GiB reservation fails
MAX_REQUEST_BYTES = 8 << 20
QUEUED_MAX_REQUEST_BYTES = 3 * MAX_REQUEST_BYTES
MAX_CONNECTIONS_PER_IP = 80
IDLE_MS = 3000
FETCH_MAX_BYTES = 1 << 20
MAX_PARTITIONS_PER_TOPIC = 8
MAX_PARTITIONS_PER_REQUEST = 10
SETTINGS = dict(lmdb_map_size_bytes=64 << 20, segment_bytes=16 << 20, offsets_topic_partitions=2,
                max_request_bytes=MAX_REQUEST_BYTES, queued_max_request_bytes=QUEUED_MAX_REQUEST_BYTES,
                max_connections_per_ip=MAX_CONNECTIONS_PER_IP, connections_max_idle_ms=IDLE_MS,
                fetch_max_bytes=FETCH_MAX_BYTES, max_partitions_per_topic=MAX_PARTITIONS_PER_TOPIC,
                max_partitions_per_request=MAX_PARTITIONS_PER_REQUEST)


class LimitedBroker:
    """One broker process started under prlimit (which execs it: same PID)."""

    def __init__(self, root: Path, limits: list[str], **settings: object) -> None:
        self.brokers = LocalBrokers(root, nodes=1, settings={**SETTINGS, **settings},
                                    command_prefixes=[["prlimit", *limits, "--"]])
        self.port = self.brokers.port(1)

    @property
    def pid(self) -> int:
        return self.brokers.pid(1)

    def status(self, field: str) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
        raise KeyError(field)

    def fds(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def log_text(self) -> str:
        return self.brokers.log_path(1).read_text(errors="replace")

    def connect(self) -> socket.socket:
        return socket.create_connection(("127.0.0.1", self.port), timeout=10)

    def assert_serves_another_client(self) -> None:
        assert self.brokers.alive(1), self.brokers.log_tail(1)
        with self.connect() as sock:
            sock.sendall(api_versions_frame(4242))
            assert read_response(sock)[:4] == struct.pack(">i", 4242)


@pytest.fixture(scope="module")
def broker(tmp_path_factory):
    process = LimitedBroker(tmp_path_factory.mktemp("hostile"), [f"--as={ADDRESS_SPACE_BYTES}"])
    process.brokers.start(60)
    process.baseline_fds = process.fds()
    yield process
    process.brokers.stop()


@pytest.fixture
def bounded(broker):
    """After the test: the broker is alive, serves a new client, and holds
    no more descriptors than it started with (plus slack for its partitions)."""
    yield broker
    broker.assert_serves_another_client()
    deadline = time.monotonic() + TIMEOUT_S
    while broker.fds() > broker.baseline_fds + 40 and time.monotonic() < deadline:
        time.sleep(0.1)     # the broker notices closed connections as it reads them
    assert broker.fds() <= broker.baseline_fds + 40


def frame_of(body: bytes) -> bytes:
    return struct.pack(">i", len(body)) + body


def test_metadata_claiming_two_billion_topics_closes_only_its_connection(bounded):
    rss_before = bounded.status("VmRSS")
    with bounded.connect() as sock:
        # 19 bytes: header (client id null), then a topic array count of 2^31-1
        sock.sendall(frame_of(struct.pack(">hhih", kafka.METADATA, 1, 9, -1) + struct.pack(">i", 2**31 - 1)))
        assert closed_by_broker(sock)
    assert "elements of at least" in bounded.log_text()
    assert bounded.status("VmRSS") < rss_before + (32 << 20)


def test_size_prefixes_of_frames_never_sent_cost_no_memory(bounded):
    rss_before = bounded.status("VmRSS")
    sockets = [bounded.connect() for _ in range(40)]
    try:
        for sock in sockets:   # 40 x 8 MiB claimed, 100 bytes each sent
            sock.sendall(struct.pack(">i", MAX_REQUEST_BYTES) + struct.pack(">hhi", 18, 0, 1) + b"x" * 92)
        bounded.assert_serves_another_client()
        assert bounded.status("VmRSS") < rss_before + (24 << 20)
    finally:
        for sock in sockets:
            sock.close()


def test_large_frames_past_the_in_flight_budget_wait_while_small_requests_pass(bounded):
    from confluent_kafka.admin import AdminClient, NewTopic
    admin = AdminClient({"bootstrap.servers": f"127.0.0.1:{bounded.port}"})
    admin.create_topics([NewTopic("budget", 1, 1)])["budget"].result(TIMEOUT_S)
    holders = [bounded.connect() for _ in range(QUEUED_MAX_REQUEST_BYTES // MAX_REQUEST_BYTES)]
    for sock in holders:   # every byte of the budget reserved by frames that never finish
        sock.sendall(struct.pack(">i", MAX_REQUEST_BYTES) + b"\0" * 1000)
    waiting = bounded.connect()
    batch = make_batch(count=32, value_size=16 << 10)
    assert len(batch) > 256 << 10
    waiting.sendall(produce_frame("budget", batch, 5))
    waiting.settimeout(1.0)
    with pytest.raises(socket.timeout):
        waiting.recv(1)                 # held: no budget for its frame
    bounded.assert_serves_another_client()
    for sock in holders:
        sock.close()
    waiting.settimeout(TIMEOUT_S)
    response = read_response(waiting)
    assert response[:4] == struct.pack(">i", 5) and struct.pack(">hq", ErrorCode.NONE, 0) in response
    waiting.close()


def test_pipelined_requests_past_the_cap_are_all_answered_in_order(bounded):
    count = 350
    with bounded.connect() as sock:
        sock.sendall(b"".join(api_versions_frame(i) for i in range(count)))
        ids = [struct.unpack_from(">i", read_response(sock))[0] for _ in range(count)]
    assert ids == list(range(count))


def test_an_idle_connection_is_closed_and_a_busy_one_is_not(bounded):
    idle, partial = bounded.connect(), bounded.connect()
    partial.sendall(struct.pack(">i", 100) + b"abc")     # a frame begun, then silence
    idle.settimeout(TIMEOUT_S)
    partial.settimeout(TIMEOUT_S)
    assert idle.recv(1) == b"" and partial.recv(1) == b""
    assert f"idle for more than {IDLE_MS} ms" in bounded.log_text()
    idle.close()
    partial.close()


def test_connections_past_the_per_ip_limit_are_refused_and_the_rest_served(bounded):
    sockets = [bounded.connect() for _ in range(MAX_CONNECTIONS_PER_IP + 10)]
    answered = refused = 0
    for i, sock in enumerate(sockets):
        try:
            sock.sendall(api_versions_frame(i))
            read_response(sock)
            answered += 1
        except (ConnectionError, OSError):
            refused += 1
    for sock in sockets:
        sock.close()
    assert answered <= MAX_CONNECTIONS_PER_IP and refused >= 10
    assert "max_connections_per_ip" in bounded.log_text()


def test_produce_and_create_partitions_on_the_offsets_topic_are_refused(bounded):
    from confluent_kafka import KafkaException
    from confluent_kafka.admin import AdminClient, NewPartitions
    with bounded.connect() as sock:
        sock.sendall(produce_frame("__consumer_offsets", make_batch(1), 3))
        assert struct.pack(">h", ErrorCode.INVALID_TOPIC_EXCEPTION) in read_response(sock)
    admin = AdminClient({"bootstrap.servers": f"127.0.0.1:{bounded.port}"})
    future = admin.create_partitions([NewPartitions("__consumer_offsets", 20)])["__consumer_offsets"]
    with pytest.raises(KafkaException) as refused:
        future.result(TIMEOUT_S)
    assert refused.value.args[0].code() == ErrorCode.INVALID_TOPIC_EXCEPTION


def test_partitions_past_the_per_request_and_per_topic_limits_are_refused(bounded):
    from confluent_kafka import KafkaException
    from confluent_kafka.admin import AdminClient, NewPartitions, NewTopic
    admin = AdminClient({"bootstrap.servers": f"127.0.0.1:{bounded.port}"})

    def refusal(future) -> str:
        with pytest.raises(KafkaException) as refused:
            future.result(TIMEOUT_S)
        assert refused.value.args[0].code() == ErrorCode.INVALID_PARTITIONS
        return refused.value.args[0].str()

    wide = admin.create_topics([NewTopic("wide-a", 6, 1), NewTopic("wide-b", 6, 1)])   # 12 in one request
    for name in ("wide-a", "wide-b"):
        assert "max_partitions_per_request=10" in refusal(wide[name])
    assert "max_partitions_per_topic=8" in refusal(admin.create_topics([NewTopic("tall", 9, 1)])["tall"])
    admin.create_topics([NewTopic("grows", 4, 1)])["grows"].result(TIMEOUT_S)
    assert "max_partitions_per_topic=8" in refusal(admin.create_partitions([NewPartitions("grows", 9)])["grows"])
    admin.create_partitions([NewPartitions("grows", 8)])["grows"].result(TIMEOUT_S)
    topics = admin.list_topics(timeout=TIMEOUT_S).topics
    assert not {"wide-a", "wide-b", "tall"} & set(topics) and len(topics["grows"].partitions) == 8


def rewritten(batch: bytes, **fields: int) -> bytes:
    """`batch` with header fields replaced (names as in BatchHeader) and its CRC recomputed."""
    names = ("base_offset", "batch_length", "partition_leader_epoch", "magic", "crc", "attributes",
             "last_offset_delta", "first_timestamp", "max_timestamp", "producer_id", "producer_epoch",
             "base_sequence", "record_count")
    values = dict(zip(names, layout.HEADER.unpack_from(batch)))
    values.update(fields)
    out = bytearray(batch)
    layout.HEADER.pack_into(out, 0, *(values[n] for n in names))
    out[layout.CRC_OFF:layout.CRC_OFF + 4] = crc32c(memoryview(out)[layout.ATTRIBUTES_OFF:]).to_bytes(4, "big")
    return bytes(out)


NOW_MS = int(time.time() * 1000)
GOOD = build_batch([Record(b"v", b"k", (), NOW_MS)])
HOSTILE_BATCHES = {
    "compression-id-6": (rewritten(GOOD, attributes=6), ErrorCode.CORRUPT_MESSAGE),
    "control-bit": (rewritten(GOOD, attributes=layout.CONTROL_MASK), ErrorCode.INVALID_RECORD),
    "transactional-bit": (rewritten(GOOD, attributes=layout.TRANSACTIONAL_MASK), ErrorCode.INVALID_RECORD),
    "two-billion-records-in-61-bytes": (
        rewritten(GOOD[:layout.HEADER_SIZE], batch_length=layout.HEADER_SIZE - layout.LOG_OVERHEAD,
                  record_count=2**31 - 1, last_offset_delta=2**31 - 2), ErrorCode.CORRUPT_MESSAGE),
    "count-disagrees-with-last-delta": (rewritten(GOOD, record_count=2), ErrorCode.CORRUPT_MESSAGE),
    "two-hours-ahead": (rewritten(GOOD, first_timestamp=NOW_MS + 7_200_000, max_timestamp=NOW_MS + 7_200_000),
                        ErrorCode.INVALID_TIMESTAMP),
}


@pytest.mark.parametrize("name", HOSTILE_BATCHES)
def test_batch_a_client_may_not_write_is_refused_and_nothing_is_stored(bounded, name):
    from confluent_kafka.admin import AdminClient, NewTopic
    topic = f"rules-{name}"
    admin = AdminClient({"bootstrap.servers": f"127.0.0.1:{bounded.port}"})
    admin.create_topics([NewTopic(topic, 1, 1)])[topic].result(TIMEOUT_S)
    batch, code = HOSTILE_BATCHES[name]
    with bounded.connect() as sock:
        sock.sendall(produce_frame(topic, batch, 1))
        assert struct.pack(">hq", code, -1) in read_response(sock)
        sock.sendall(produce_frame(topic, GOOD, 2))
        assert struct.pack(">hq", ErrorCode.NONE, 0) in read_response(sock)   # offset 0: nothing was stored


def list_offsets_by_time_frame(topic: str, timestamp_ms: int) -> bytes:
    schema = load_request_schema(kafka.LIST_OFFSETS, 1)
    partition = kafka.nested(schema, "ListOffsetsPartition")(partition_index=i32(0), timestamp=i64(timestamp_ms))
    return request_frame(kafka.LIST_OFFSETS, 1, 8, schema(
        replica_id=i32(-1), topics=(kafka.nested(schema, "ListOffsetsTopic")(name=topic, partitions=(partition,)),)))


def test_zstd_bomb_is_stored_raw_and_its_decompression_stops_at_the_cap(bounded):
    from confluent_kafka.admin import AdminClient, NewTopic
    admin = AdminClient({"bootstrap.servers": f"127.0.0.1:{bounded.port}"})
    admin.create_topics([NewTopic("bomb", 1, 1)])["bomb"].result(TIMEOUT_S)
    bomb = build_batch([Record(bytes(192 << 20), None, (), NOW_MS)], compression="zstd")
    assert len(bomb) < 16 << 10
    peak_before = bounded.status("VmHWM")
    with bounded.connect() as sock:
        sock.sendall(produce_frame("bomb", bomb, 1))
        assert struct.pack(">hq", ErrorCode.NONE, 0) in read_response(sock)
        sock.sendall(list_offsets_by_time_frame("bomb", NOW_MS))    # decodes the batch to find the record
        assert struct.pack(">h", ErrorCode.CORRUPT_MESSAGE) in read_response(sock)
    assert bounded.status("VmHWM") < peak_before + (160 << 20)


def test_topic_config_out_of_kafkas_range_is_refused_and_metadata_keeps_working(bounded):
    from confluent_kafka import KafkaException
    from confluent_kafka.admin import AdminClient, NewTopic
    admin = AdminClient({"bootstrap.servers": f"127.0.0.1:{bounded.port}"})
    for config in ({"segment.bytes": "0"}, {"segment.ms": "0"}, {"retention.ms": "-2"},
                   {"max.message.bytes": str(2**31)}, {"retention.bytes": "9" * 30}):
        with pytest.raises(KafkaException) as refused:
            admin.create_topics([NewTopic("wedge", 1, 1, config=config)])["wedge"].result(TIMEOUT_S)
        assert refused.value.args[0].code() == ErrorCode.INVALID_CONFIG, config
    admin.create_topics([NewTopic("after-wedge", 2, 1, config={"segment.bytes": str(1 << 20)})])[
        "after-wedge"].result(TIMEOUT_S)
    assert "after-wedge" in admin.list_topics(timeout=TIMEOUT_S).topics


def test_data_directory_and_files_are_private_to_the_broker_user(bounded):
    data = bounded.brokers.node_dir(1) / "data"
    modes = {path: path.stat().st_mode & 0o777 for path in [data, *data.rglob("*")] if not path.is_symlink()}
    assert modes
    exposed = {str(p): oct(m) for p, m in modes.items() if m & 0o077}
    assert not exposed


def test_out_of_descriptors_backs_off_without_spinning_and_recovers(tmp_path):
    limited = LimitedBroker(tmp_path, ["--nofile=160:160"], max_connections_per_ip=1000)
    limited.brokers.start(60)
    try:
        sockets = [limited.connect() for _ in range(200)]   # the backlog holds what the broker cannot accept
        time.sleep(0.5)
        cpu_before = limited.brokers.cpu_seconds(1)
        time.sleep(3)
        spent = limited.brokers.cpu_seconds(1) - cpu_before
        for sock in sockets:
            sock.close()
        log_lines = [line for line in limited.log_text().splitlines() if "accept failed" in line]
        assert spent < 1.5, f"{spent:.2f} s of CPU in 3 s while out of descriptors"
        assert 1 <= len(log_lines) <= 3, log_lines
        deadline = time.monotonic() + TIMEOUT_S
        while True:
            try:
                limited.assert_serves_another_client()
                break
            except (ConnectionError, OSError):
                assert time.monotonic() < deadline
                time.sleep(0.2)
    finally:
        limited.brokers.stop()


def test_a_fetch_asking_for_gigabytes_gets_at_most_the_brokers_fetch_max_bytes(bounded):
    from tests.test_broker_in_process import fetch_frame
    from confluent_kafka.admin import AdminClient, NewTopic
    admin = AdminClient({"bootstrap.servers": f"127.0.0.1:{bounded.port}"})
    admin.create_topics([NewTopic("big-fetch", 1, 1)])["big-fetch"].result(TIMEOUT_S)
    batch = make_batch(count=40, value_size=15_000)          # ~600 KB
    with bounded.connect() as sock:
        for i in range(4):
            sock.sendall(produce_frame("big-fetch", batch, i))
            assert struct.pack(">h", ErrorCode.NONE) in read_response(sock)
        sock.sendall(fetch_frame("big-fetch", 2**31 - 1))     # max_bytes and partition_max_bytes: 2 GiB
        response = read_response(sock)
    assert len(batch) < len(response) <= FETCH_MAX_BYTES + 1024   # two whole batches, not four


def test_connections_past_the_global_limit_are_closed_at_once_and_the_rest_served(tmp_path):
    limit = 5
    # no idle closing here: a connection the broker closes is closed by the limit
    limited = LimitedBroker(tmp_path, [f"--as={ADDRESS_SPACE_BYTES}"], max_connections=limit,
                            connections_max_idle_ms=600_000)
    limited.brokers.start(60)
    try:
        held = [limited.connect() for _ in range(limit)]
        for i, sock in enumerate(held):
            sock.sendall(api_versions_frame(i))
            assert read_response(sock)[:4] == struct.pack(">i", i)
        for _ in range(3):                               # past the limit: closed before any request is read
            with limited.connect() as extra:
                assert closed_by_broker(extra)
        held[0].sendall(api_versions_frame(77))          # an existing connection is still served
        assert read_response(held[0])[:4] == struct.pack(">i", 77)
        assert f"max_connections ({limit}) reached" in limited.log_text()

        held.pop().close()                               # room again once the broker sees one close
        deadline = time.monotonic() + TIMEOUT_S
        while True:
            with limited.connect() as sock:
                try:
                    sock.sendall(api_versions_frame(88))
                    assert read_response(sock)[:4] == struct.pack(">i", 88)
                    break
                except (ConnectionError, OSError):
                    assert time.monotonic() < deadline
                    time.sleep(0.1)
    finally:
        for sock in held:
            sock.close()
        limited.brokers.stop()
