"""Consumer groups against a real `raftka serve` process with real clients:
members of one group split the partitions (each to exactly one member) and
read every record once, partitions move when a member leaves or is killed,
separate groups each see everything, committed offsets survive a consumer
restart, and bad group requests get Kafka's error codes."""
from __future__ import annotations

import asyncio
import datetime
import os
import queue
import signal
import socket
import struct
import subprocess
import sys
import threading
import time

import pytest
from kio.index import load_request_schema
from kio.static.primitive import i32

from raftka.errors import ErrorCode
from raftka.protocol import kafka
from tests.broker_process import BrokerProcess
from tests.test_broker_clients import broker, read_response, request_frame  # noqa: F401  (the broker fixture)

TIMEOUT_S = 60
SESSION_MS = 6000
PARTITIONS = 6


def create_and_fill(bootstrap: str, topic: str, count: int, partitions: int = PARTITIONS) -> list[tuple[bytes, bytes]]:
    from confluent_kafka import Producer
    from confluent_kafka.admin import AdminClient, NewTopic
    admin = AdminClient({"bootstrap.servers": bootstrap})
    admin.create_topics([NewTopic(topic, partitions, 1)])[topic].result(TIMEOUT_S)
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5})
    sent = [(b"k%d" % (i % 17), b"%s-%d" % (topic.encode(), i)) for i in range(count)]
    for key, value in sent:
        producer.produce(topic, key=key, value=value)
    assert producer.flush(TIMEOUT_S) == 0
    return sent


class Member:
    """A confluent-kafka group consumer polling on its own thread."""

    def __init__(self, bootstrap: str, group: str, topic: str, **settings) -> None:
        from confluent_kafka import Consumer
        self.consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": group, "auto.offset.reset": "earliest",
                                  "session.timeout.ms": SESSION_MS, "heartbeat.interval.ms": 500, **settings})
        self.assigned_calls = 0    # on_assign callbacks: one per rebalance this member took part in
        self.consumer.subscribe([topic], on_assign=self._assigned)
        self.messages: list[tuple[int, int, bytes, bytes]] = []
        self.errors: list = []
        self.assignment: set[int] = set()
        self._stop = threading.Event()
        self._calls: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def _assigned(self, _consumer, _partitions) -> None:
        self.assigned_calls += 1

    def commit(self, timeout_s: float = 60.0) -> None:
        """A synchronous commit of what was consumed, made on the polling thread
        (librdkafka hands a commit's result to whichever thread polls)."""
        done = threading.Event()
        self._calls.put(lambda: (self.consumer.commit(asynchronous=False), done.set()))
        assert done.wait(timeout_s), "commit did not complete"

    def _poll(self) -> None:
        while not self._stop.is_set():
            while not self._calls.empty():
                self._calls.get()()
            message = self.consumer.poll(0.2)
            self.assignment = {tp.partition for tp in self.consumer.assignment()}
            if message is None:
                continue
            if message.error():
                self.errors.append(message.error())
                continue
            self.messages.append((message.partition(), message.offset(), message.key(), message.value()))

    def close(self) -> None:
        self._stop.set()
        self._thread.join(10)
        self.consumer.close()


def wait_until(predicate, timeout_s: float, what: str) -> float:
    started = time.monotonic()
    while not predicate():
        assert time.monotonic() - started < timeout_s, f"not within {timeout_s} s: {what}"
        time.sleep(0.1)
    return time.monotonic() - started


def split_evenly(members: list[Member]) -> bool:
    owned = [m.assignment for m in members]
    return all(owned) and sum(map(len, owned)) == PARTITIONS and set().union(*owned) == set(range(PARTITIONS))


def test_three_members_share_six_partitions_each_to_exactly_one_and_a_closed_members_partitions_move(broker):
    sent = create_and_fill(broker.bootstrap, "shared", 1200)
    members = [Member(broker.bootstrap, "queue", "shared") for _ in range(3)]
    try:
        wait_until(lambda: sum(len(m.messages) for m in members) >= len(sent), TIMEOUT_S, "every record consumed")
        wait_until(lambda: split_evenly(members), TIMEOUT_S, "six partitions split among three")
        got = [(k, v) for m in members for _p, _o, k, v in m.messages]
        assert sorted(got) == sorted(sent)                        # every record exactly once
        assert {m_p for m in members for m_p, *_ in m.messages} == set(range(PARTITIONS))
        for m in members:   # nobody read a partition another member owns now
            assert {p for p, *_ in m.messages} <= m.assignment
        leaving = members.pop()
        leaving.close()
        moved_in = wait_until(lambda: split_evenly(members), SESSION_MS / 1000 + 5, "partitions moved to the other two")
        assert moved_in < SESSION_MS / 1000
        assert not any(m.errors for m in members), [m.errors for m in members]
    finally:
        for m in members:
            m.close()


def test_a_restarted_static_member_gets_its_partitions_back_without_a_rebalance(broker):
    create_and_fill(broker.bootstrap, "static", 60)
    static = {"session.timeout.ms": 30_000}
    a = Member(broker.bootstrap, "static-group", "static", **{"group.instance.id": "a"}, **static)
    b = Member(broker.bootstrap, "static-group", "static", **{"group.instance.id": "b"}, **static)
    restarted = None
    try:
        wait_until(lambda: split_evenly([a, b]), TIMEOUT_S, "six partitions split between a and b")
        wait_until(lambda: len(a.messages) + len(b.messages) >= 60, TIMEOUT_S, "every record consumed")
        owned_by_a, owned_by_b, b_assigned = a.assignment, b.assignment, b.assigned_calls
        a.close()                        # a static member does not leave on close
        restarted = Member(broker.bootstrap, "static-group", "static", **{"group.instance.id": "a"}, **static)
        wait_until(lambda: restarted.assignment == owned_by_a, TIMEOUT_S, "the restarted a holds a's partitions")
        time.sleep(1.5)                  # a rebalance would reach b with its next heartbeat (every 0.5 s)
        assert (b.assigned_calls, b.assignment) == (b_assigned, owned_by_b)
        assert restarted.assigned_calls == 1 and not b.errors and not restarted.errors
        assert "(static instance 'a' rejoined)" not in broker.log_text()   # the log line of a rebalance it would start
    finally:
        for member in (b, restarted):
            if member is not None:
                member.close()


KILLABLE_MEMBER = """
import sys
from confluent_kafka import Consumer
consumer = Consumer({"bootstrap.servers": sys.argv[1], "group.id": sys.argv[2], "auto.offset.reset": "earliest",
                     "session.timeout.ms": %d, "heartbeat.interval.ms": 500})
consumer.subscribe([sys.argv[3]], on_assign=lambda c, parts: print("assigned", len(parts), flush=True))
while True:
    consumer.poll(0.2)
""" % SESSION_MS


def test_a_sigkilled_members_partitions_move_after_its_session_timeout(broker):
    create_and_fill(broker.bootstrap, "killed", 60)
    members = [Member(broker.bootstrap, "survivors", "killed") for _ in range(2)]
    doomed = subprocess.Popen([sys.executable, "-c", KILLABLE_MEMBER, broker.bootstrap, "survivors", "killed"],
                              stdout=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: sum(len(m.assignment) for m in members) == 4 and all(m.assignment for m in members),
                   TIMEOUT_S, "three members with two partitions each")
        os.kill(doomed.pid, signal.SIGKILL)
        doomed.wait(10)
        moved_in = wait_until(lambda: split_evenly(members), TIMEOUT_S, "the killed member's partitions moved")
        assert moved_in >= SESSION_MS / 1000 * 0.5, "moved before the session could have expired"
    finally:
        if doomed.poll() is None:
            doomed.kill()
        for m in members:
            m.close()


def test_two_groups_on_one_topic_each_receive_every_record(broker):
    sent = create_and_fill(broker.bootstrap, "broadcast", 300)
    groups = [Member(broker.bootstrap, name, "broadcast") for name in ("audit", "billing")]
    try:
        wait_until(lambda: all(len(m.messages) >= len(sent) for m in groups), TIMEOUT_S, "both groups read all")
        for m in groups:
            assert sorted((k, v) for *_ignored, k, v in m.messages) == sorted(sent)
    finally:
        for m in groups:
            m.close()


def test_kafka_python_group_consumer_resumes_from_its_committed_offset_after_a_restart(broker):
    from kafka import KafkaConsumer
    sent = create_and_fill(broker.bootstrap, "kp-resume", 100, partitions=2)

    def consumer():
        return KafkaConsumer("kp-resume", bootstrap_servers=broker.bootstrap, group_id="kp-group",
                             auto_offset_reset="earliest", enable_auto_commit=False, consumer_timeout_ms=8000,
                             session_timeout_ms=SESSION_MS, heartbeat_interval_ms=500)
    first = consumer()
    seen = []
    for message in first:
        seen.append((message.key, message.value))
        if len(seen) == 60:
            break
    first.commit()
    first.close()
    second = consumer()
    rest = [(m.key, m.value) for m in second]
    second.close()
    assert sorted(seen + rest) == sorted(sent)      # nothing read twice, nothing skipped


def test_aiokafka_group_consumer_commits_and_a_restart_resumes_there(broker):
    from aiokafka import AIOKafkaConsumer
    sent = create_and_fill(broker.bootstrap, "aio-resume", 100, partitions=2)

    async def read(limit: int | None) -> list:
        consumer = AIOKafkaConsumer("aio-resume", bootstrap_servers=broker.bootstrap, group_id="aio-group",
                                    auto_offset_reset="earliest", enable_auto_commit=False,
                                    session_timeout_ms=SESSION_MS, heartbeat_interval_ms=500)
        await consumer.start()
        got = []
        try:
            while limit is None or len(got) < limit:
                batch = await consumer.getmany(timeout_ms=3000)
                if not batch:
                    break
                for messages in batch.values():
                    got.extend((m.key, m.value) for m in messages)
            await consumer.commit()
        finally:
            await consumer.stop()
        return got

    first = asyncio.run(read(40))
    rest = asyncio.run(read(None))
    assert sorted(first + rest) == sorted(sent)


# ---- bad input on the wire ----------------------------------------------------------

def call(broker: BrokerProcess, api_key: int, version: int, body) -> bytes:
    with socket.create_connection(("127.0.0.1", broker.port), timeout=30) as sock:
        sock.sendall(request_frame(api_key, version, 7, body))
        return read_response(sock)


def error_at(response: bytes, offset: int) -> int:
    return struct.unpack_from(">h", response, offset)[0]


def join_body(group: str, protocol_type: str = "consumer", member_id: str = "", session_ms: int = SESSION_MS):
    schema = load_request_schema(kafka.JOIN_GROUP, 1)
    protocol = kafka.nested(schema, "JoinGroupRequestProtocol")(name="range", metadata=b"\x00\x00\x00\x00\x00\x00")
    return schema(group_id=group, session_timeout=datetime.timedelta(milliseconds=session_ms),
                  rebalance_timeout=datetime.timedelta(milliseconds=SESSION_MS),
                  member_id=member_id, protocol_type=protocol_type, protocols=(protocol,))


def wait_for_coordinator(broker: BrokerProcess, group: str) -> None:
    """FindCoordinator until it answers, as clients do (the first creates __consumer_offsets)."""
    find = load_request_schema(kafka.FIND_COORDINATOR, 0)
    wait_until(lambda: error_at(call(broker, kafka.FIND_COORDINATOR, 0, find(key=group)), 4) == ErrorCode.NONE,
               TIMEOUT_S, f"a coordinator for {group!r}")


def test_bad_group_requests_get_kafkas_error_codes_and_the_broker_keeps_serving(broker):
    for group in ("bad-timeout", "stranger", "no-such-group", "meta", "never-existed"):
        wait_for_coordinator(broker, group)
    # JoinGroup v1 response: correlation id, error code, ...
    assert error_at(call(broker, kafka.JOIN_GROUP, 1, join_body("")), 4) == ErrorCode.INVALID_GROUP_ID
    assert error_at(call(broker, kafka.JOIN_GROUP, 1, join_body("bad-timeout", session_ms=10)), 4) \
        == ErrorCode.INVALID_SESSION_TIMEOUT
    assert error_at(call(broker, kafka.JOIN_GROUP, 1, join_body("stranger", member_id="nobody")), 4) \
        == ErrorCode.UNKNOWN_MEMBER_ID
    heartbeat = load_request_schema(kafka.HEARTBEAT, 0)
    assert error_at(call(broker, kafka.HEARTBEAT, 0, heartbeat(group_id="no-such-group", generation_id=i32(1),
                                                              member_id="m")), 4) == ErrorCode.UNKNOWN_MEMBER_ID
    commit = load_request_schema(kafka.OFFSET_COMMIT, 2)
    partition = kafka.nested(commit, "OffsetCommitRequestPartition")(
        partition_index=i32(0), committed_offset=5, committed_metadata="x" * 5000)
    big = commit(group_id="meta", generation_id_or_member_epoch=i32(-1), member_id="",
                 retention_time=datetime.timedelta(milliseconds=-1),
                 topics=(kafka.nested(commit, "OffsetCommitRequestTopic")(name="t", partitions=(partition,)),))
    response = call(broker, kafka.OFFSET_COMMIT, 2, big)
    # correlation id, topics[1], name "t", partitions[1], index 0, error
    assert error_at(response, 4 + 4 + 2 + 1 + 4 + 4) == ErrorCode.OFFSET_METADATA_TOO_LARGE
    delete = load_request_schema(kafka.DELETE_GROUPS, 0)
    response = call(broker, kafka.DELETE_GROUPS, 0, delete(groups_names=("never-existed",)))
    assert error_at(response, len(response) - 2) == ErrorCode.GROUP_ID_NOT_FOUND
    wait_for_coordinator(broker, "after-the-bad-requests")


def test_a_member_with_another_protocol_type_is_refused_while_the_group_keeps_working(broker):
    create_and_fill(broker.bootstrap, "typed", 20, partitions=2)
    member = Member(broker.bootstrap, "typed-group", "typed")
    try:
        wait_until(lambda: len(member.messages) >= 20 and member.assignment == {0, 1}, TIMEOUT_S, "member consuming")
        response = call(broker, kafka.JOIN_GROUP, 1, join_body("typed-group", protocol_type="connect"))
        assert error_at(response, 4) == ErrorCode.INCONSISTENT_GROUP_PROTOCOL
        time.sleep(1.5)
        assert member.assignment == {0, 1} and not member.errors
    finally:
        member.close()


def test_admin_lists_describes_and_deletes_groups(broker):
    from confluent_kafka import ConsumerGroupState
    from confluent_kafka.admin import AdminClient
    create_and_fill(broker.bootstrap, "administered", 10, partitions=2)
    admin = AdminClient({"bootstrap.servers": broker.bootstrap})
    member = Member(broker.bootstrap, "admin-group", "administered")
    try:
        wait_until(lambda: member.assignment == {0, 1}, TIMEOUT_S, "member assigned")
        listed = admin.list_consumer_groups().result(TIMEOUT_S)
        assert "admin-group" in {g.group_id for g in listed.valid}
        described = admin.describe_consumer_groups(["admin-group"])["admin-group"].result(TIMEOUT_S)
        assert described.state == ConsumerGroupState.STABLE
        assert len(described.members) == 1
        assert {tp.partition for tp in described.members[0].assignment.topic_partitions} == {0, 1}
        refused = admin.delete_consumer_groups(["admin-group"])["admin-group"]
        with pytest.raises(Exception, match="NON_EMPTY_GROUP|not empty"):
            refused.result(TIMEOUT_S)
        member.commit()
    finally:
        member.close()
    admin.delete_consumer_groups(["admin-group"])["admin-group"].result(TIMEOUT_S)
    listed = admin.list_consumer_groups().result(TIMEOUT_S)
    assert "admin-group" not in {g.group_id for g in listed.valid}
