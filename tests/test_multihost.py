"""Three brokers on three hosts of a real (virtual) network: each `raftka serve`
runs in its own network namespace (tests/netns.py), its Kafka listener and
peer port on its own address, advertising it, and the brokers speak TLS to
each other (required off loopback); the clients (confluent-kafka) run in the
root namespace and reach the brokers over the bridge.

Faults go through the kernel's packet filter in one broker's namespace while
an idempotent producer (acks=all) writes to an RF=3 topic:
  - cut off both ways (nothing in or out),
  - cut off one way (inbound dropped, outbound still flowing),
  - a flaky link (20% of packets lost each way).
For each: no acknowledged record is lost or duplicated (everything is read
back and compared), leadership settles during the fault (leader changes
counted and settle times measured by polling every broker's Metadata; under
the one-way cut the leader of a partition changes at most twice), and once
the fault heals the cluster serves again: a produce succeeds on every
partition and every replica catches up and is back in the ISR. Measurements
are printed (`pytest -s`); nothing is asserted on wall-clock times, only
generous deadlines for things to happen at all.

Needs root, `ip` and nft or iptables; skipped with the reason otherwise,
except where the environment variable CI is set: there it fails."""
from __future__ import annotations

import contextlib
import os
import shutil
import socket
import struct
import subprocess
import threading
import time
from dataclasses import dataclass, field

import pytest
from kio.index import load_request_schema

from raftka.broker.local_cluster import LocalBrokers
from raftka.protocol import kafka
from raftka.records.batch import parse_records
from tests.certs import make_node_certs
from tests.netns import FIREWALLS, NamespaceNetwork, unavailable_reason
from tests.test_broker_clients import ask
from tests.test_broker_failover import wait_for as failover_wait_for

NODES = 3
PARTITIONS = 3
KAFKA_PORT = 9092              # every host has its own address, so the ports need not differ; 9092..9094 anyway
DEADLINE_S = 60.0              # for anything that must happen at all; never a performance bound
BASELINE_S = 2.0               # producing before the fault
FAULT_S = 10.0                 # how long a fault lasts (elections take 1-2 s; several rounds fit)
AFTER_HEAL_S = 3.0             # producing after the heal, before the producer is flushed
POLL_INTERVAL_S = 0.1
RATE_PER_S = 150               # records per second the producer offers
MAX_LEADER_CHANGES_ONE_WAY = 2


def require_namespaces() -> None:
    reason = unavailable_reason()
    if reason is not None:
        message = f"multi-host tests need network namespaces: {reason}"
        if os.environ.get("CI"):
            pytest.fail(f"{message} (CI is set: not skipped)")
        pytest.skip(message)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A NamespaceNetwork of three hosts with one broker on each; both torn down even when a test fails."""
    require_namespaces()
    root = tmp_path_factory.mktemp("multihost")
    with contextlib.ExitStack() as stack:
        net = stack.enter_context(NamespaceNetwork(NODES))
        stack.callback(net.heal)              # runs before the namespaces go (LIFO): a broken test's fault
        make_node_certs(root / "peer-certs", list(range(1, NODES + 1)))   # off loopback peer TLS is required
        brokers = LocalBrokers(root, NODES, base_port=KAFKA_PORT,
                               hosts=[net.address(h) for h in net.host_ids],
                               command_prefixes=[net.exec_prefix(h) for h in net.host_ids],
                               peer_tls_dir=root / "peer-certs")
        stack.callback(brokers.stop)          # before the namespaces are deleted
        brokers.start()
        yield net, brokers


@pytest.fixture
def healed(cluster):
    """The cluster, with every fault removed after the test whatever happened."""
    net, brokers = cluster
    try:
        yield net, brokers
    finally:
        net.heal()


# ---- reading the cluster's own view -------------------------------------------------

@dataclass
class PartitionView:
    leader: int
    isr: tuple[int, ...]


def metadata(host: str, port: int, topic: str, timeout_s: float = 1.0) -> tuple[int, dict[int, PartitionView], dict[int, tuple[str, int]]]:
    """(controller, partition -> leader and ISR, broker -> address) as the broker at host:port answers Metadata v4."""
    schema = load_request_schema(3, 4)
    body = schema(topics=(kafka.nested(schema, "MetadataRequestTopic")(name=topic),), allow_auto_topic_creation=False)
    response = ask((host, port), 3, 4, body, timeout_s)
    brokers = {int(b.node_id): (b.host, int(b.port)) for b in response.brokers}
    found = next((t for t in response.topics if t.name == topic), None)
    partitions = {} if found is None else {
        int(p.partition_index): PartitionView(int(p.leader_id), tuple(sorted(int(r) for r in p.isr_nodes)))
        for p in found.partitions}
    return int(response.controller_id), partitions, brokers


@dataclass
class Sample:
    at: float                                # time.monotonic()
    controller: int
    leaders: dict[int, int]
    isr: dict[int, tuple[int, ...]]


class LeaderWatch:
    """Polls every broker's Metadata for one topic (each broker answers from its own
    copy of the replicated metadata) in a thread; unanswered polls are skipped."""

    def __init__(self, brokers: LocalBrokers, topic: str) -> None:
        self.brokers, self.topic = brokers, topic
        self.samples: dict[int, list[Sample]] = {n: [] for n in brokers.node_ids}
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._poll, args=(n,), daemon=True, name=f"watch-{n}")
                         for n in brokers.node_ids]

    def __enter__(self) -> "LeaderWatch":
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(5)

    def _poll(self, node: int) -> None:
        while not self._stop.is_set():
            try:
                controller, partitions, _ = metadata(self.brokers.host(node), self.brokers.port(node), self.topic)
                self.samples[node].append(Sample(time.monotonic(), controller,
                                                 {p: v.leader for p, v in partitions.items()},
                                                 {p: v.isr for p, v in partitions.items()}))
            except (OSError, struct.error, ValueError):
                pass                        # cut off, or restarting: no sample
            self._stop.wait(POLL_INTERVAL_S)

    def latest(self, node: int) -> Sample | None:
        return self.samples[node][-1] if self.samples[node] else None

    def changes(self, partition: int, start: float, end: float, observers: list[int]) -> int:
        """The most leader changes of `partition` any observer saw in [start, end]: each time
        its Metadata named a leader other than the last one it named (no leader, -1, is no change),
        counting from the leader it named last before `start`."""
        most = 0
        for node in observers:
            before = [s.leaders.get(partition, -1) for s in self.samples[node] if s.at < start]
            last = next((leader for leader in reversed(before) if leader >= 0), None)
            count = 0
            for sample in self.samples[node]:
                leader = sample.leaders.get(partition, -1)
                if start <= sample.at <= end and leader >= 0:
                    if last is not None and leader != last:
                        count += 1
                    last = leader
            most = max(most, count)
        return most

    def settled_at(self, start: float, end: float, observers: list[int]) -> float | None:
        """When the observers' view of leadership stopped changing within [start, end]: the time of
        the first sample after the last change (or `start` if nothing changed); None if the view at
        `end` still lacks a leader."""
        last_change = start
        for node in observers:
            previous = None
            for sample in self.samples[node]:
                if not start <= sample.at <= end:
                    continue
                view = tuple(sorted(sample.leaders.items()))
                if previous is not None and view != previous:
                    last_change = max(last_change, sample.at)
                previous = view
            if previous is None or any(leader < 0 for _, leader in previous) or len(previous) < PARTITIONS:
                return None
        return last_change


def leader_epochs(bootstrap: str, topic: str) -> dict[int, int]:
    """partition -> leader epoch (the partition's Raft term) as its leader answers ListOffsets."""
    from confluent_kafka import TopicPartition
    from confluent_kafka.admin import AdminClient, OffsetSpec
    admin = AdminClient({"bootstrap.servers": bootstrap})
    futures = admin.list_offsets({TopicPartition(topic, p): OffsetSpec.latest() for p in range(PARTITIONS)},
                                 request_timeout=10)
    return {tp.partition: future.result(15).leader_epoch for tp, future in futures.items()}


# ---- the producer under test ------------------------------------------------------

@dataclass
class Writer:
    """An idempotent, acks=all confluent-kafka producer offering RATE_PER_S records a second,
    round robin over the partitions, from its own thread; each value is unique."""

    bootstrap: str
    topic: str
    sent: list[tuple[int, bytes]] = field(default_factory=list)          # (partition, value) in send order
    acked: dict[bytes, tuple[int, int]] = field(default_factory=dict)   # value -> (partition, offset)
    failed: dict[bytes, str] = field(default_factory=dict)
    ack_times: dict[int, list[float]] = field(default_factory=lambda: {p: [] for p in range(PARTITIONS)})

    def __post_init__(self) -> None:
        from confluent_kafka import Producer
        # socket.timeout.ms bounds how long librdkafka waits for a produce response (request.timeout.ms is
        # only the broker's): a leader cut off never answers, and the partition waits for its in-flight
        # requests to end before it produces to the new leader, 60 s by default
        self.producer = Producer({"bootstrap.servers": self.bootstrap, "acks": "all", "enable.idempotence": True,
                                  "linger.ms": 5, "message.timeout.ms": 60_000, "request.timeout.ms": 5_000,
                                  "socket.timeout.ms": 5_000})
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name=f"writer-{self.topic}")
        self._lock = threading.Lock()

    def _delivered(self, error, message) -> None:
        with self._lock:
            if error is not None:
                self.failed[message.value()] = str(error)
            else:
                self.acked[message.value()] = (message.partition(), message.offset())
                self.ack_times[message.partition()].append(time.monotonic())

    def _run(self) -> None:
        sequence = 0
        while not self._stop.is_set():
            partition = sequence % PARTITIONS
            value = f"{self.topic}-{sequence:07d}".encode()
            self.producer.produce(self.topic, value=value, partition=partition, on_delivery=self._delivered)
            self.sent.append((partition, value))
            sequence += 1
            self.producer.poll(0)
            self._stop.wait(1 / RATE_PER_S)

    def start(self) -> "Writer":
        self._thread.start()
        return self

    def acked_count(self) -> int:
        with self._lock:
            return len(self.acked)

    def longest_gap(self, partition: int, start: float, end: float) -> float:
        """The longest time in [start, end] the partition went without an acknowledgement."""
        times = [start, *(t for t in self.ack_times[partition] if start < t < end), end]
        return max(b - a for a, b in zip(times, times[1:]))

    def finish(self) -> None:
        """Stop offering records and wait for every one sent to be acknowledged or to fail."""
        self._stop.set()
        self._thread.join(10)
        remaining = self.producer.flush(DEADLINE_S * 2)
        assert remaining == 0, f"{remaining} records neither acknowledged nor failed"


def read_back(bootstrap: str, topic: str) -> dict[int, list[tuple[int, bytes]]]:
    """partition -> [(offset, value)] of everything up to each partition's high watermark."""
    from confluent_kafka import Consumer, TopicPartition
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "multihost-read-back",
                         "enable.auto.commit": False})
    try:
        high = {p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=15)[1] for p in range(PARTITIONS)}
        consumer.assign([TopicPartition(topic, p, 0) for p in range(PARTITIONS)])
        got: dict[int, list[tuple[int, bytes]]] = {p: [] for p in range(PARTITIONS)}
        done = {p for p in range(PARTITIONS) if high[p] == 0}
        deadline = time.monotonic() + DEADLINE_S
        while len(done) < PARTITIONS:
            assert time.monotonic() < deadline, f"read back {({p: len(v) for p, v in got.items()})} of {high}"
            message = consumer.poll(0.5)
            if message is None:
                continue
            assert message.error() is None, message.error()
            got[message.partition()].append((message.offset(), message.value()))
            if message.offset() + 1 >= high[message.partition()]:
                done.add(message.partition())
        return got
    finally:
        consumer.close()


def records_on_disk(brokers: LocalBrokers, node: int, topic: str, partition: int) -> dict[int, bytes]:
    data = b"".join(brokers.segment_files(node, topic, partition).values())
    return {r.offset: r.value for r in parse_records(data)}


def wait_for(predicate, what: str, timeout_s: float = DEADLINE_S):
    """tests/test_broker_failover.py's wait_for, with this file's longer default deadline."""
    return failover_wait_for(predicate, what, timeout_s)


def complete_leaders(brokers: LocalBrokers, node: int, topic: str) -> dict[int, int] | None:
    _, partitions, _ = metadata(brokers.host(node), brokers.port(node), topic)
    leaders = {p: v.leader for p, v in partitions.items()}
    return leaders if len(leaders) == PARTITIONS and min(leaders.values()) >= 0 else None


# ---- the scenario every fault runs -------------------------------------------------

def run_fault(net: NamespaceNetwork, brokers: LocalBrokers, topic: str, apply_fault) -> dict:
    """Create `topic` (RF=3), write through a fault on the leader of partition 0 and heal it;
    check the records, the leadership and that the cluster serves again; return the measurements."""
    from confluent_kafka import Producer
    from confluent_kafka.admin import AdminClient, NewTopic
    bootstrap = brokers.bootstrap()
    admin = AdminClient({"bootstrap.servers": bootstrap})    # kept: its futures fail once it is collected
    admin.create_topics([NewTopic(topic, PARTITIONS, NODES)])[topic].result(DEADLINE_S)
    leaders = wait_for(lambda: complete_leaders(brokers, 1, topic), "every partition to have a leader")
    epochs_before = leader_epochs(bootstrap, topic)
    victim = leaders[0]
    healthy = [n for n in brokers.node_ids if n != victim]
    writer = Writer(bootstrap, topic)
    with LeaderWatch(brokers, topic) as watch:
        writer.start()
        wait_for(lambda: writer.acked_count() >= BASELINE_S * RATE_PER_S / 2, "the first acknowledgements")
        time.sleep(BASELINE_S)
        acked_before = writer.acked_count()
        fault_at = time.monotonic()
        apply_fault(victim)
        time.sleep(FAULT_S)
        acked_during = writer.acked_count() - acked_before
        healed_at = time.monotonic()
        net.heal(victim)
        time.sleep(AFTER_HEAL_S)
        writer_stopped_at = time.monotonic()
        writer.finish()

        # serves again: a produce succeeds on every partition, and every broker (the victim too) agrees on a leader
        probe, probe_errors = Producer({"bootstrap.servers": bootstrap, "acks": "all", "enable.idempotence": True,
                                        "message.timeout.ms": int(DEADLINE_S * 1000)}), []
        for partition in range(PARTITIONS):
            probe.produce(topic, value=f"{topic}-after-heal-{partition}".encode(), partition=partition,
                          on_delivery=lambda e, m: probe_errors.append(e) if e else
                          writer.acked.__setitem__(m.value(), (m.partition(), m.offset())))
        assert probe.flush(DEADLINE_S) == 0 and not probe_errors, probe_errors
        views = wait_for(lambda: (lambda v: v if len(set(map(str, v))) == 1 else None)(
            [complete_leaders(brokers, n, topic) for n in brokers.node_ids]), "every broker to name the same leaders")
        # every replica catches up past every acknowledged offset and is back in the ISR
        last_acked = {p: max(o for q, o in writer.acked.values() if q == p) for p in range(PARTITIONS)}
        for node in brokers.node_ids:
            wait_for(lambda: all(max(records_on_disk(brokers, node, topic, p), default=-1) >= last_acked[p]
                                 for p in range(PARTITIONS)), f"node {node} to catch up")
        wait_for(lambda: all(v.isr == tuple(brokers.node_ids)
                             for n in brokers.node_ids
                             for v in metadata(brokers.host(n), brokers.port(n), topic)[1].values()),
                 "every replica back in every broker's ISR")
        settled_all_at = time.monotonic()
    epochs_after = leader_epochs(bootstrap, topic)

    # nothing acknowledged lost or duplicated, nothing invented, per-partition order kept
    got = read_back(bootstrap, topic)
    where = {}
    for partition, records in got.items():
        for offset, value in records:
            assert value not in where, f"{value!r} stored twice: at {where[value]} and {(partition, offset)}"
            where[value] = (partition, offset)
    lost = {v: at for v, at in writer.acked.items() if where.get(v) != at}
    assert not lost, f"{len(lost)} acknowledged records missing or moved, e.g. {list(lost.items())[:5]}"
    sent = {v for _, v in writer.sent} | {f"{topic}-after-heal-{p}".encode() for p in range(PARTITIONS)}
    assert set(where) <= sent, f"records nobody sent: {sorted(set(where) - sent)[:5]}"
    for partition in range(PARTITIONS):
        order = [v for p, v in writer.sent if p == partition and v in where]
        assert [v for _, v in got[partition] if not v.endswith(b"-after-heal-%d" % partition)] == order, \
            f"partition {partition} is out of send order"

    settled = watch.settled_at(fault_at, healed_at, healthy)
    # how long after the heal the victim still answered Metadata naming other leaders than the cluster's
    stale = [s for s in watch.samples[victim] if s.at >= healed_at and s.leaders != views[0]]
    report = {
        "victim": victim,
        "led_by_victim": sorted(p for p, leader in leaders.items() if leader == victim),
        "sent": len(writer.sent), "acked": len(writer.acked) - PARTITIONS, "failed": len(writer.failed),
        "acked_during_fault": acked_during,
        "longest_ack_gap_s": {p: round(writer.longest_gap(p, fault_at, writer_stopped_at), 2) for p in range(PARTITIONS)},
        "leader_changes_during_fault": {p: watch.changes(p, fault_at, healed_at, healthy) for p in range(PARTITIONS)},
        "leader_changes_after_heal": {p: watch.changes(p, healed_at, settled_all_at, healthy)
                                      for p in range(PARTITIONS)},
        "settled_s_after_fault": None if settled is None else round(settled - fault_at, 2),
        "leaders_agreed_and_isr_full_s_after_heal": round(settled_all_at - healed_at, 2),
        "epoch_rise": {p: epochs_after[p] - epochs_before[p] for p in range(PARTITIONS)},
        "victim_stale_metadata_s_after_heal": round(stale[-1].at - healed_at, 2) if stale else 0.0,
        "victim_stale_leaders": stale[0].leaders if stale else None,
        "leaders_before": leaders, "leaders_after": views[0],
    }
    print(f"\n{topic}: {report}")
    return report


# ---- the tests ---------------------------------------------------------------------

def test_each_broker_runs_on_its_own_host_and_address(cluster):
    net, brokers = cluster
    for node in brokers.node_ids:
        pids = subprocess.run(["ip", "netns", "pids", net.namespace(node)], capture_output=True, text=True).stdout.split()
        assert str(brokers.pid(node)) in pids, f"broker {node} is not in namespace {net.namespace(node)}"
        assert f"ready on {net.address(node)}:{brokers.port(node)}" in brokers.ready_lines[node]
        _, _, listed = metadata(brokers.host(node), brokers.port(node), "none")
        assert listed == {n: (net.address(n), brokers.port(n)) for n in brokers.node_ids}
    # the peers talk over the bridge: each broker has established connections to the others' addresses
    for node in brokers.node_ids:
        lines = net.run(node, ["ss", "-Htn", "state", "established"]).splitlines()
        remote = {line.split()[-1].rsplit(":", 1)[0] for line in lines}
        assert {net.address(n) for n in brokers.node_ids if n != node} <= remote, lines


def test_cut_off_both_ways(healed):
    net, brokers = healed
    report = run_fault(net, brokers, "cut-both", net.cut_both)
    for partition in report["led_by_victim"]:   # the isolated leader's partitions moved to a reachable broker
        assert report["leader_changes_during_fault"][partition] >= 1, report
    assert report["settled_s_after_fault"] is not None, report


def test_cut_off_one_way(healed):
    net, brokers = healed
    report = run_fault(net, brokers, "cut-inbound", net.cut_inbound)
    assert report["settled_s_after_fault"] is not None, report
    assert max(report["leader_changes_during_fault"].values()) <= MAX_LEADER_CHANGES_ONE_WAY, report
    assert max(report["leader_changes_after_heal"].values()) <= MAX_LEADER_CHANGES_ONE_WAY, report


def test_flaky_link(healed):
    net, brokers = healed
    report = run_fault(net, brokers, "flaky", lambda victim: net.flaky(victim, loss_percent=20))
    assert report["acked_during_fault"] > 0, report


# ---- the harness itself -------------------------------------------------------------

def test_the_faults_drop_what_they_say():
    """UDP between two hosts through each fault, with every packet filter installed (nft, iptables)."""
    require_namespaces()
    tools = [tool for tool in FIREWALLS if shutil.which(tool)]
    for tool in tools:
        check_faults(tool)


def check_faults(firewall: str) -> None:
    with NamespaceNetwork(2, firewall=firewall) as net:
        receivers = {}
        for host in (1, 2):
            receivers[host] = net.socket(host, socket.AF_INET, socket.SOCK_DGRAM)
            receivers[host].bind((net.address(host), 0))
            receivers[host].settimeout(0.05)
        senders = {host: net.socket(host, socket.AF_INET, socket.SOCK_DGRAM) for host in (1, 2)}

        def delivered(source: int, target: int, count: int = 1) -> int:
            received = 0
            for start in range(0, count, 25):   # in rounds, so no receive buffer overflows
                for i in range(start, min(count, start + 25)):
                    with contextlib.suppress(PermissionError):   # EPERM: the sender's own OUTPUT dropped it
                        senders[source].sendto(b"x%d" % i, receivers[target].getsockname())
                with contextlib.suppress(socket.timeout):
                    while True:
                        receivers[target].recv(64)
                        received += 1
            return received
        try:
            assert (delivered(1, 2), delivered(2, 1)) == (1, 1), firewall
            net.cut_inbound(2)
            assert (delivered(1, 2), delivered(2, 1)) == (0, 1), firewall
            net.cut_outbound(2)
            assert (delivered(1, 2), delivered(2, 1)) == (1, 0), firewall
            net.cut_both(2)
            assert (delivered(1, 2), delivered(2, 1)) == (0, 0), firewall
            net.flaky(2, loss_percent=20)
            arrived = delivered(1, 2, 500)       # 400 expected (sd 9)
            assert 300 < arrived < 480, (firewall, arrived)
            net.heal()
            assert (delivered(1, 2), delivered(2, 1)) == (1, 1), firewall
        finally:
            for sock in [*receivers.values(), *senders.values()]:
                sock.close()
    left = os.listdir("/run/netns") if os.path.isdir("/run/netns") else []
    assert not {net.namespace(h) for h in (1, 2)} & set(left), left
    assert not any(name.startswith(net.bridge[:-2]) for name in os.listdir("/sys/class/net")), "interfaces left"
