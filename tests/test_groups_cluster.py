"""Consumer groups on a 3-broker RF=3 cluster (`raftka cluster`): the broker
coordinating a group is SIGKILLed; the group finds the new coordinator (the
new leader of its __consumer_offsets partition), keeps consuming without
reading anything twice, and its committed offsets are intact."""
from __future__ import annotations

import os
import signal
import socket
import struct
import time

from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic
from kio.index import load_request_schema

from raftka.broker.local_cluster import raftka_command
from raftka.errors import ErrorCode
from raftka.protocol import kafka
from tests.test_broker_clients import read_response, request_frame
from tests.test_broker_cluster import NODES, cluster, node_pids  # noqa: F401  (the cluster fixture)
from tests.test_groups_clients import SESSION_MS, Member, wait_until

TIMEOUT_S = 90
PARTITIONS = 6


def coordinator_of(port: int, group: str, excluding: int | None = None) -> int:
    """The coordinator's node id, asking FindCoordinator until there is one
    (other than `excluding`, a broker known dead)."""
    find = load_request_schema(kafka.FIND_COORDINATOR, 0)
    deadline = time.monotonic() + TIMEOUT_S
    while time.monotonic() < deadline:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(request_frame(kafka.FIND_COORDINATOR, 0, 1, find(key=group)))
            response = read_response(sock)
        error, node_id = struct.unpack_from(">hi", response, 4)
        if error == ErrorCode.NONE and node_id != excluding:
            return node_id
        time.sleep(0.2)
    raise AssertionError(f"no coordinator for {group!r}")


def produce(bootstrap: str, values: list[bytes]) -> None:
    producer = Producer({"bootstrap.servers": bootstrap, "acks": "all", "linger.ms": 5, "message.timeout.ms": 60_000})
    for i, value in enumerate(values):
        producer.produce("grouped", key=b"k%d" % (i % 7), value=value)
    assert producer.flush(TIMEOUT_S) == 0


def test_operator_status_against_the_cluster_lists_every_broker_and_replica_set(cluster):
    import re
    import subprocess
    _process, base, _root = cluster
    bootstrap = f"127.0.0.1:{base + 1}"
    create = subprocess.run(raftka_command("topics", "create", "ops", "-p", "2", "-b", bootstrap),
                            capture_output=True, text=True, timeout=60)
    assert create.returncode == 0, create.stderr
    deadline = time.monotonic() + TIMEOUT_S
    while True:
        status = subprocess.run(raftka_command("status", "-b", bootstrap),
                                capture_output=True, text=True, timeout=60)
        rows = re.findall(r"^  ops\t(\d)\t(\d)\t([\d,]+)\t([\d,]+)\t(\d+)\t(\d+)$", status.stdout, re.M)
        if len(rows) == 2 and all(len(isr.split(",")) == 3 for *_x, isr, _hw, _term in rows) or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert len(re.findall(r"^  \d\t127\.0\.0\.1:\d+", status.stdout, re.M)) == NODES, status.stdout
    assert len(rows) == 2, status.stdout
    for _partition, leader, replicas, isr, _hw, term in rows:
        assert sorted(replicas.split(",")) == ["1", "2", "3"] and len(isr.split(",")) == 3, status.stdout
        assert int(leader) in (1, 2, 3) and int(term) >= 1


def test_the_group_survives_a_sigkilled_coordinator_with_its_committed_offsets_intact(cluster):
    process, base, _root = cluster
    bootstrap = ",".join(f"127.0.0.1:{base + i}" for i in range(NODES))
    admin = AdminClient({"bootstrap.servers": bootstrap})
    admin.create_topics([NewTopic("grouped", PARTITIONS, 3)])["grouped"].result(TIMEOUT_S)
    first = [b"before-%d" % i for i in range(600)]
    produce(bootstrap, first)

    member = Member(bootstrap, "durable", "grouped", **{"enable.auto.commit": False})
    try:
        wait_until(lambda: len(member.messages) >= len(first), TIMEOUT_S, "the first records consumed")
        member.commit()
        coordinator = coordinator_of(base, "durable")
        os.kill(node_pids(process.pid)[coordinator], signal.SIGKILL)
        survivors = [base + i for i in range(NODES) if i + 1 != coordinator]
        started = time.monotonic()
        coordinator_of(survivors[0], "durable", excluding=coordinator)
        print(f"new coordinator found {time.monotonic() - started:.2f} s after the SIGKILL")

        second = [b"after-%d" % i for i in range(100)]
        produce(",".join(f"127.0.0.1:{port}" for port in survivors), second)
        wait_until(lambda: len(member.messages) >= len(first) + len(second), TIMEOUT_S, "the group consumed on")
        values = [value for *_ignored, value in member.messages]
        assert sorted(values) == sorted(first + second)           # nothing lost, nothing twice
        member.commit()                 # through the new coordinator
    finally:
        member.close()

    successor = Consumer({"bootstrap.servers": ",".join(f"127.0.0.1:{port}" for port in survivors),
                          "group.id": "durable", "session.timeout.ms": SESSION_MS})
    try:
        committed = successor.committed([TopicPartition("grouped", p) for p in range(PARTITIONS)], timeout=30)
        assert sum(tp.offset for tp in committed) == len(first) + len(second)
    finally:
        successor.close()
