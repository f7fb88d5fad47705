"""`raftka cluster --nodes 3`: three real broker processes, RF=3. confluent-kafka
bootstrapped from one broker produces with acks=all to every partition
leader and reads everything back exactly once; a produce sent to a follower
gets NOT_LEADER_OR_FOLLOWER; SIGTERM stops the whole cluster."""
from __future__ import annotations

import os
import secrets
import signal
import socket
import struct
import subprocess
import time
from pathlib import Path

import pytest

from raftka.broker.local_cluster import raftka_command, stop_processes
from raftka.ports import consecutive_free_ports
from raftka.errors import ErrorCode
from tests.conftest import make_batch
from tests.test_broker_clients import TIMEOUT_S, consume_all, produce_frame, read_response

NODES = 3


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    root = tmp_path_factory.mktemp("cluster")
    base = consecutive_free_ports(NODES)
    process = subprocess.Popen(raftka_command("cluster", "--nodes", str(NODES), "--base-port", str(base),
                                              "--data-dir", str(root)),
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
    stop_processes([process], grace_s=30)   # if a test stopped early: SIGTERM, as a user would


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


def wait_for_leader(admin, topic: str) -> int:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        leader = admin.list_topics(topic, timeout=TIMEOUT_S).topics[topic].partitions[0].leader
        if leader >= 0:
            return leader
        time.sleep(0.1)
    raise AssertionError(f"{topic} has no leader")


def test_a_produce_sent_to_a_follower_gets_not_leader_or_follower(cluster):
    from confluent_kafka.admin import AdminClient, NewTopic
    _process, base, _root = cluster
    admin = AdminClient({"bootstrap.servers": f"127.0.0.1:{base}"})
    admin.create_topics([NewTopic("redirect", 1, 3)])["redirect"].result(TIMEOUT_S)
    leader = wait_for_leader(admin, "redirect")
    follower = next(node for node in range(1, NODES + 1) if node != leader)
    sock = socket.create_connection(("127.0.0.1", base + follower - 1), timeout=5)
    sock.sendall(produce_frame("redirect", make_batch(1), 3))
    assert struct.pack(">h", ErrorCode.NOT_LEADER_OR_FOLLOWER) in read_response(sock)


def node_pids(cluster_pid: int) -> dict[int, int]:
    """node id -> PID of the `raftka cluster` process's broker children."""
    children = Path(f"/proc/{cluster_pid}/task/{cluster_pid}/children").read_text().split()
    pids = {}
    for pid in map(int, children):
        command = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        config = next(arg for arg in command if arg.endswith(b"broker.toml"))
        pids[int(Path(config.decode()).parent.name.split("-")[1])] = pid
    return pids


def test_an_idempotent_producer_loses_and_duplicates_nothing_when_the_leader_is_sigkilled(cluster):
    from confluent_kafka import Producer
    from confluent_kafka.admin import AdminClient, NewTopic
    process, base, _root = cluster
    bootstrap = ",".join(f"127.0.0.1:{base + i}" for i in range(NODES))
    admin = AdminClient({"bootstrap.servers": bootstrap})
    admin.create_topics([NewTopic("failover", 1, 3)])["failover"].result(TIMEOUT_S)
    wait_for_leader(admin, "failover")
    producer = Producer({"bootstrap.servers": bootstrap, "acks": "all", "enable.idempotence": True,
                         "linger.ms": 2, "message.timeout.ms": 60_000})
    failures, acked = [], []

    def delivered(error, message):
        (failures if error else acked).append(error or message.value())
    values = [b"m%05d" % i for i in range(3000)]
    for i, value in enumerate(values):
        producer.produce("failover", value=value, key=b"one-key", on_delivery=delivered)
        producer.poll(0)
        if i == 1000:   # appends in flight: some committed, their acks lost with the leader
            leader = wait_for_leader(admin, "failover")
            os.kill(node_pids(process.pid)[leader], signal.SIGKILL)
        time.sleep(0.0005)
    assert producer.flush(90) == 0
    assert not failures and sorted(acked) == values
    survivor = next(f"127.0.0.1:{base + i}" for i in range(NODES) if i + 1 != leader)
    got = consume_all(survivor, "failover", 1, len(values))
    assert [m.value() for m in got] == values       # each exactly once, in order


def test_nodes_do_not_outlive_a_sigkilled_cluster_process(tmp_path):
    base = consecutive_free_ports(NODES)
    process = subprocess.Popen(raftka_command("cluster", "--nodes", str(NODES), "--base-port", str(base),
                                              "--data-dir", str(tmp_path)),
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    while "cluster of" not in (line := process.stdout.readline()):
        assert line, "cluster exited before it was ready"
    nodes = list(node_pids(process.pid).values())
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    deadline = time.monotonic() + 30
    while any(is_broker(pid) for pid in nodes):
        assert time.monotonic() < deadline, "broker processes outlived their cluster"
        time.sleep(0.2)


def is_broker(pid: int) -> bool:
    try:
        return b"raftka.cli" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def test_sigterm_stops_every_node(cluster):
    process, base, root = cluster
    os.kill(process.pid, signal.SIGTERM)
    assert process.wait(30) == 0
    for node in range(NODES):
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", base + node), timeout=1).close()


def test_a_broker_waits_for_peers_that_start_late(tmp_path):
    from raftka.broker.broker import READY_LOG_INTERVAL_S
    from raftka.broker.local_cluster import write_configs
    base = consecutive_free_ports(NODES)
    configs = write_configs(NODES, base, tmp_path)
    env = dict(os.environ, RAFTKA_CLUSTER_SECRET=secrets.token_hex(16))
    processes = []

    def spawn(config: Path) -> subprocess.Popen:
        log = open(config.parent / "broker.log", "ab")
        process = subprocess.Popen(raftka_command("serve", "--config", str(config)),
                                   stdout=subprocess.PIPE, stderr=log, env=env, text=True)
        processes.append(process)
        return process
    try:
        first = spawn(configs[0])
        time.sleep(READY_LOG_INTERVAL_S + 2)
        assert first.poll() is None, "the lone broker gave up"
        assert "waiting for a majority" in (configs[0].parent / "broker.log").read_text()
        for config in configs[1:]:
            spawn(config)
        for process in processes:
            assert "ready" in process.stdout.readline()
        listing = subprocess.run(["kcat", "-b", f"127.0.0.1:{base}", "-L"], capture_output=True, text=True,
                                 timeout=TIMEOUT_S)
        assert "3 brokers" in listing.stdout, listing.stderr
    finally:
        stop_processes(processes, grace_s=30)
