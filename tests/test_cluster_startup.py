"""Starting a cluster as a user does: the processes the CLI starts import the
installed package even when run from a clone's root, a CreateTopics sent
while the cluster is still starting is answered (done, or a retriable error)
well within its timeout, and a broker prints its ready line only once it can
serve."""
from __future__ import annotations

import os
import select
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from raftka.broker.local_cluster import raftka_command, stop_processes, write_configs
from raftka.ports import consecutive_free_ports

NODES = 3
START_TIMEOUT_S = 90
RETRIABLE = ("NOT_CONTROLLER", "REQUEST_TIMED_OUT")


def start_cluster(nodes: int, data_dir: Path, cwd: Path | None = None,
                  raftka: list[str] | None = None) -> tuple[subprocess.Popen, int]:
    """`raftka cluster` (run as `raftka`, default raftka_command()) and its base port."""
    base = consecutive_free_ports(nodes)
    command = (raftka or raftka_command()) + ["cluster", "--nodes", str(nodes), "--base-port", str(base),
                                              "--data-dir", str(data_dir)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=cwd)
    return process, base


def wait_for_line(process: subprocess.Popen, text: str) -> list[str]:
    """Lines printed up to the first holding `text`; fails if the process exits first."""
    lines = []
    while not lines or text not in lines[-1]:
        line = process.stdout.readline()
        assert line, f"exited before printing {text!r}:\n{''.join(lines)}"
        lines.append(line)
    return lines


def node_logs(root: Path, lines: int = 20) -> str:
    """The last lines of each node's log under `root`, for a failure's message."""
    return "".join(f"\n--- {log}\n" + "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
                   for log in sorted(root.glob("node-*/broker.log")))


def wait_until_listening(port: int, timeout_s: float = START_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            assert time.monotonic() < deadline, f"nothing listens on port {port}"
            time.sleep(0.01)


def test_a_cluster_started_in_a_clones_root_runs_the_installed_package_not_the_clones_folders(tmp_path):
    clone = tmp_path / "clone"
    # the repository's folders, and a stray raftka/ folder, which only -P keeps from shadowing the install
    for package in ("raftka", "engine", "native", "raft"):
        (clone / package).mkdir(parents=True)
        (clone / package / "__init__.py").write_text('raise ImportError("the clone\'s folder was imported")\n')
    script = shutil.which("raftka", path=str(Path(sys.executable).parent))   # as a user runs it: the console script
    if script is None:
        pytest.skip("no raftka console script beside this interpreter")
    process, _base = start_cluster(1, tmp_path / "data", cwd=clone, raftka=[script])
    try:
        lines = wait_for_line(process, "cluster of")
        assert "cluster of 1 ready" in lines[-1], "".join(lines)
    finally:
        stop_processes([process], grace_s=30)
    assert "clone's folder" not in (tmp_path / "data" / "node-1" / "broker.log").read_text()


def test_create_topics_sent_before_the_cluster_is_ready_is_answered_in_time_and_succeeds_when_retried(tmp_path):
    from confluent_kafka import KafkaException
    from confluent_kafka.admin import AdminClient, NewTopic
    process, base = start_cluster(NODES, tmp_path)
    try:
        wait_until_listening(base)     # broker 1 listens; the cluster has not said it is ready
        admin = AdminClient({"bootstrap.servers": f"127.0.0.1:{base}"})
        outcomes = []
        deadline = time.monotonic() + START_TIMEOUT_S
        while not outcomes or outcomes[-1] not in ("created", "TOPIC_ALREADY_EXISTS"):
            assert time.monotonic() < deadline, outcomes
            sent = time.monotonic()
            try:
                admin.create_topics([NewTopic("early", 3, NODES)])["early"].result(45)
                outcomes.append("created")
            except KafkaException as error:
                outcomes.append(error.args[0].name())
            except TimeoutError:
                outcomes.append("unanswered")
            assert time.monotonic() - sent < 30, f"{outcomes} the last after {time.monotonic() - sent:.1f} s" \
                                                 f"{node_logs(tmp_path)}"
            assert outcomes[-1] in ("created", "TOPIC_ALREADY_EXISTS", *RETRIABLE), f"{outcomes}{node_logs(tmp_path)}"
        wait_for_line(process, "cluster of 3 ready")
        topic = admin.list_topics(timeout=30).topics["early"]
        assert sorted(topic.partitions) == [0, 1, 2]
        assert all(sorted(p.replicas) == [1, 2, 3] for p in topic.partitions.values())
    finally:
        stop_processes([process], grace_s=30)


def printed_something(process: subprocess.Popen) -> bool:
    """Whether the process wrote to its stdout pipe (nothing read from it yet)."""
    return bool(select.select([process.stdout], [], [], 0)[0])


def spawn_node(config: Path, secret: str) -> subprocess.Popen:
    """`raftka serve` of one node written by write_configs, logging beside its config."""
    with open(config.parent / "broker.log", "ab") as log:
        return subprocess.Popen(raftka_command("serve", "--config", str(config)), stdout=subprocess.PIPE,
                                stderr=log, env=dict(os.environ, RAFTKA_CLUSTER_SECRET=secret), text=True)


@pytest.fixture
def lone_broker(tmp_path):
    """Broker 1 of a three-broker cluster whose peers never start: it listens
    but can never serve (no majority elects a metadata leader)."""
    base = consecutive_free_ports(NODES)
    process = spawn_node(write_configs(NODES, base, tmp_path)[0], "lone-secret-for-a-cluster-test")
    try:
        wait_until_listening(base)
        yield process, f"127.0.0.1:{base}"
    finally:
        stop_processes([process], grace_s=30)


def test_a_broker_that_cannot_serve_answers_create_topics_with_not_controller_within_its_timeout(lone_broker):
    from confluent_kafka import KafkaException
    from confluent_kafka.admin import AdminClient, NewTopic
    process, bootstrap = lone_broker
    admin = AdminClient({"bootstrap.servers": bootstrap})
    sent = time.monotonic()
    with pytest.raises(KafkaException) as refused:
        admin.create_topics([NewTopic("never", 1, 1)], operation_timeout=2, request_timeout=20)["never"].result(30)
    assert refused.value.args[0].name() == "NOT_CONTROLLER", refused.value
    assert "elect the metadata leader" in refused.value.args[0].str()
    assert time.monotonic() - sent < 15
    assert process.poll() is None
    with pytest.raises(KafkaException) as refused:   # an impossible request is refused at once, ready or not
        admin.create_topics([NewTopic("wide", 1, 4)], operation_timeout=2)["wide"].result(30)
    assert refused.value.args[0].name() == "INVALID_REPLICATION_FACTOR"


def test_no_topic_is_created_until_every_configured_broker_has_registered(tmp_path):
    from confluent_kafka import KafkaException
    from confluent_kafka.admin import AdminClient, NewTopic
    base = consecutive_free_ports(NODES)
    configs = write_configs(NODES, base, tmp_path)
    processes = [spawn_node(config, "partial-secret-for-a-cluster-test") for config in configs[:2]]   # a majority: a leader, no node 3
    try:
        wait_until_listening(base)
        admin = AdminClient({"bootstrap.servers": f"127.0.0.1:{base}"})
        for name, replication_factor in (("wide", 3), ("spread", 1)):   # neither refused nor placed on nodes 1, 2 only
            with pytest.raises(KafkaException) as refused:
                admin.create_topics([NewTopic(name, 3, replication_factor)], operation_timeout=3,
                                    request_timeout=30)[name].result(40)
            assert refused.value.args[0].name() == "NOT_CONTROLLER", refused.value
        assert not {"wide", "spread"} & set(admin.list_topics(timeout=30).topics)
        assert not any(printed_something(process) for process in processes)   # no ready line: they cannot serve
        processes.append(spawn_node(configs[2], "partial-secret-for-a-cluster-test"))
        for process in processes:
            assert "ready" in process.stdout.readline()
        futures = admin.create_topics([NewTopic("wide", 3, 3), NewTopic("spread", 3, 1)])
        for future in futures.values():
            future.result(60)
        topics = admin.list_topics(timeout=30).topics
        assert all(sorted(p.replicas) == [1, 2, 3] for p in topics["wide"].partitions.values())
        assert sorted(p.replicas[0] for p in topics["spread"].partitions.values()) == [1, 2, 3]
    finally:
        stop_processes(processes, grace_s=30)
