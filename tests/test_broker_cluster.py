"""`raftka cluster --nodes 3`: three real broker processes, RF=3. confluent-kafka
bootstrapped from one broker produces with acks=all to every partition
leader and reads everything back exactly once; a produce sent to a follower
gets NOT_LEADER_OR_FOLLOWER; SIGTERM stops the whole cluster."""
from __future__ import annotations

import os
import random
import signal
import socket
import struct
import subprocess
import sys
import time

import pytest

from engine.errors import ErrorCode
from tests.conftest import make_batch
from tests.test_broker_clients import TIMEOUT_S, consume_all, produce_frame, read_response

NODES = 3


def consecutive_free_ports(count: int) -> int:
    for _ in range(100):
        base = random.randint(20000, 60000 - count)
        sockets = []
        try:
            for port in range(base, base + count):
                s = socket.socket()
                s.bind(("127.0.0.1", port))
                sockets.append(s)
            return base
        except OSError:
            continue
        finally:
            for s in sockets:
                s.close()
    raise RuntimeError("no consecutive free ports")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    root = tmp_path_factory.mktemp("cluster")
    base = consecutive_free_ports(NODES)
    process = subprocess.Popen([sys.executable, "-m", "engine.cli", "cluster", "--nodes", str(NODES),
                                "--base-port", str(base), "--data-dir", str(root)],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        lines.append(line)
        if not line or "cluster of" in line:
            break
    assert "cluster of 3 ready" in lines[-1], "".join(lines)
    yield process, base, root
    if process.poll() is None:
        os.kill(process.pid, signal.SIGKILL)
        process.wait()


def test_rf3_produce_with_acks_all_and_consume_exactly_once_from_one_bootstrap_broker(cluster):
    from confluent_kafka import Producer
    from confluent_kafka.admin import AdminClient, NewTopic
    _process, base, _root = cluster
    bootstrap = f"127.0.0.1:{base + 1}"
    admin = AdminClient({"bootstrap.servers": bootstrap})
    admin.create_topics([NewTopic("rf3", 3, 3)])["rf3"].result(TIMEOUT_S)
    producer = Producer({"bootstrap.servers": bootstrap, "acks": "all", "linger.ms": 5, "enable.idempotence": False})
    failures = []
    sent = [(b"k%d" % (i % 13), b"v%d" % i) for i in range(2000)]
    for key, value in sent:
        producer.produce("rf3", key=key, value=value,
                         on_delivery=lambda error, _m: failures.append(error) if error else None)
    assert producer.flush(TIMEOUT_S) == 0 and not failures
    got = consume_all(bootstrap, "rf3", 3, len(sent))
    assert sorted((m.key(), m.value()) for m in got) == sorted(sent)
    for key in {k for k, _ in sent}:
        assert [m.value() for m in got if m.key() == key] == [v for k, v in sent if k == key]
    topic = admin.list_topics("rf3", timeout=TIMEOUT_S).topics["rf3"]
    assert {len(p.replicas) for p in topic.partitions.values()} == {3}
    deadline = time.monotonic() + 20
    while {len(p.isrs) for p in topic.partitions.values()} != {3} and time.monotonic() < deadline:
        time.sleep(0.5)
        topic = admin.list_topics("rf3", timeout=TIMEOUT_S).topics["rf3"]
    assert {len(p.isrs) for p in topic.partitions.values()} == {3}


def test_a_produce_sent_to_a_follower_gets_not_leader_or_follower(cluster):
    from confluent_kafka.admin import AdminClient, NewTopic
    _process, base, _root = cluster
    admin = AdminClient({"bootstrap.servers": f"127.0.0.1:{base}"})
    admin.create_topics([NewTopic("redirect", 1, 3)])["redirect"].result(TIMEOUT_S)
    deadline = time.monotonic() + 20
    leader = -1
    while leader < 0 and time.monotonic() < deadline:
        leader = admin.list_topics("redirect", timeout=TIMEOUT_S).topics["redirect"].partitions[0].leader
        time.sleep(0.2)
    follower = next(node for node in range(1, NODES + 1) if node != leader)
    sock = socket.create_connection(("127.0.0.1", base + follower - 1), timeout=5)
    sock.sendall(produce_frame("redirect", make_batch(1), 3))
    assert struct.pack(">h", ErrorCode.NOT_LEADER_OR_FOLLOWER) in read_response(sock)


def test_sigterm_stops_every_node(cluster):
    process, base, root = cluster
    os.kill(process.pid, signal.SIGTERM)
    assert process.wait(30) == 0
    for node in range(NODES):
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", base + node), timeout=1).close()
