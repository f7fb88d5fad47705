"""Nemesis: three real `raftka serve` processes (LocalBrokers), one topic of 3
partitions at RF=3, and a confluent-kafka idempotent producer (acks=all)
writing keyed, numbered messages throughout a 60 s loop that repeatedly
  (a) SIGKILLs a partition leader and restarts it a few seconds later,
  (b) SIGSTOPs a partition leader for longer than the election timeout
      (raftMinTimeout/raftMaxTimeout 1-2 s), then SIGCONTs it,
  (c) restarts a follower (SIGTERM, then start it again on its own data).
One fault at a time; every event is healed before the next one starts. Then
everything is healed and flushed, and: every acknowledged message is read back
exactly once from offset 0 at the offset it was acknowledged with, each key's
sequence numbers increase with no gap and no duplicate, no two brokers ever
claimed leadership of a partition in the same epoch, and after a clean stop the
segment files of every partition are byte-identical on all three replicas.

The schedule (kinds, partitions, durations, gaps) comes from one seed, printed
with the run: RAFTKA_NEMESIS_SEED overrides it, RAFTKA_NEMESIS_SECONDS the loop's
length. Which node a fault hits depends on who leads at that moment, which the
seed does not fix; the printed event log names every victim. Run with -s to see
the report (it is also shown when the test fails)."""
from __future__ import annotations

import collections
import os
import random
import signal
import subprocess
import threading
import time

import pytest
from kio.index import load_request_schema

from raftka.broker.local_cluster import LocalBrokers
from raftka.protocol import kafka
from raftka.records.batch import parse_records
from tests.test_broker_clients import ask

TOPIC = "nemesis"
PARTITIONS = 3
KEYS = [f"key-{i}".encode() for i in range(9)]          # key i goes to partition i % 3
DEFAULT_SEED = 20261125
SEED = int(os.environ.get("RAFTKA_NEMESIS_SEED", DEFAULT_SEED))
NEMESIS_S = float(os.environ.get("RAFTKA_NEMESIS_SECONDS", 60))
PRODUCE_INTERVAL_S = 0.004                                # about 250 messages/s, paced
MESSAGE_TIMEOUT_MS = 90_000                               # retry through every fault rather than fail
DEADLINE_S = 30.0


def log(text: str) -> None:
    print(f"[nemesis {time.strftime('%H:%M:%S')}] {text}", flush=True)


# ---- who leads: ListOffsets v4 to each healthy broker ---------------------------------------

def leadership_claims(port: int, timeout_s: float = 2.0) -> dict[int, tuple[int, int]]:
    """partition -> (leader epoch, high watermark) for the partitions the broker on `port`
    says it leads now (ListOffsets v4 latest: only a leader answers, with its Raft term)."""
    schema = load_request_schema(2, 4)
    topic = kafka.nested(schema, "ListOffsetsTopic")
    partition = kafka.nested(schema, "ListOffsetsPartition")
    body = schema(replica_id=-1, isolation_level=0, topics=(topic(name=TOPIC, partitions=tuple(
        partition(partition_index=p, current_leader_epoch=-1, timestamp=-1) for p in range(PARTITIONS))),))
    response = ask(("127.0.0.1", port), 2, 4, body, timeout_s)
    return {int(p.partition_index): (int(p.leader_epoch), int(p.offset))
            for t in response.topics if t.name == TOPIC for p in t.partitions if p.error_code == 0}


class LeaderTracker:
    """Samples every healthy broker's leadership claims; counts leader changes (a
    higher epoch with a leader) and records any two brokers claiming one epoch."""

    def __init__(self, brokers: LocalBrokers) -> None:
        self.brokers = brokers
        self.lock = threading.Lock()
        self.unhealthy: set[int] = set()                       # killed, stopped or paused right now
        self.latest: dict[int, tuple[int, int]] = {}           # partition -> (epoch, leader)
        self.by_epoch: dict[tuple[int, int], int] = {}         # (partition, epoch) -> leader
        self.changes: list[tuple[float, int, int, int, int]] = []   # (t, partition, old, new, epoch)
        self.conflicts: list[tuple[int, int, int, int]] = []   # (partition, epoch, leader a, leader b)
        self.samples = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="leader-tracker", daemon=True)

    def mark(self, node_id: int, healthy: bool) -> None:
        with self.lock:
            (self.unhealthy.discard if healthy else self.unhealthy.add)(node_id)

    def sample(self) -> dict[int, int]:
        """partition -> leader now (the healthy claimant with the highest epoch)."""
        with self.lock:
            nodes = [n for n in self.brokers.node_ids if n not in self.unhealthy]
        claims: dict[int, tuple[int, int]] = {}
        for node_id in nodes:
            try:
                for partition, (epoch, _hw) in leadership_claims(self.brokers.port(node_id)).items():
                    if epoch > claims.get(partition, (-1, -1))[0]:
                        claims[partition] = (epoch, node_id)
                    self._record(partition, epoch, node_id)
            except Exception:   # noqa: BLE001 - a broker going down, restarting or paused mid-request
                pass
        with self.lock:
            self.samples += 1
            for partition, (epoch, node_id) in claims.items():
                old = self.latest.get(partition)
                if old is None or epoch > old[0]:
                    self.latest[partition] = (epoch, node_id)
                    if old is not None:
                        self.changes.append((time.monotonic(), partition, old[1], node_id, epoch))
        return {p: node for p, (_e, node) in claims.items()}

    def epoch(self, partition: int) -> int:
        with self.lock:
            return self.latest[partition][0]

    def _record(self, partition: int, epoch: int, node_id: int) -> None:
        with self.lock:
            other = self.by_epoch.setdefault((partition, epoch), node_id)
            if other != node_id:
                self.conflicts.append((partition, epoch, other, node_id))

    def _run(self) -> None:
        while not self.stop.wait(0.25):
            self.sample()

    def wait_for_leaders(self, timeout_s: float = DEADLINE_S) -> dict[int, int]:
        deadline = time.monotonic() + timeout_s
        while True:
            leaders = self.sample()
            if len(leaders) == PARTITIONS:
                return leaders
            assert time.monotonic() < deadline, f"partitions without a healthy leader: {leaders}"
            time.sleep(0.1)


# ---- the producer -----------------------------------------------------------------------

class KeyedProducer:
    """Produces `key:seq` messages round robin over KEYS (paced) from its own thread until
    stopped, then flushes; records every acknowledgement and every error the client reports."""

    def __init__(self, bootstrap: str) -> None:
        from confluent_kafka import Producer
        self.started = time.monotonic()
        self.client_errors: list[tuple[float, object]] = []           # (t, KafkaError) from error_cb
        self.producer = Producer({
            "bootstrap.servers": bootstrap, "acks": "all", "enable.idempotence": True, "linger.ms": 5,
            "message.timeout.ms": MESSAGE_TIMEOUT_MS, "socket.timeout.ms": 10_000,
            "error_cb": lambda error: self.client_errors.append((time.monotonic() - self.started, error))})
        self.produced_at: dict[tuple[bytes, int], float] = {}         # (key, seq) -> when produced
        self.slowest_ack_s = 0.0
        self.sent: dict[bytes, int] = {key: 0 for key in KEYS}       # key -> next sequence number
        self.acked: list[tuple[int, int, bytes, int]] = []           # (partition, offset, key, seq)
        self.failures: list[tuple[bytes, bytes, object]] = []        # (key, value, KafkaError)
        self.stop = threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="producer", daemon=True)

    def _delivered(self, error, message) -> None:
        if error is not None:
            self.failures.append((message.key(), message.value(), error))
            return
        key, seq = message.value().split(b":")
        assert key == message.key()
        self.acked.append((message.partition(), message.offset(), key, int(seq)))
        self.slowest_ack_s = max(self.slowest_ack_s, time.monotonic() - self.produced_at.pop((key, int(seq))))

    def _run(self) -> None:
        try:
            i, next_at = 0, time.monotonic()
            while not self.stop.is_set():
                key = KEYS[i % len(KEYS)]
                value = b"%s:%08d" % (key, self.sent[key])
                self.produced_at[(key, self.sent[key])] = time.monotonic()
                while True:
                    try:
                        self.producer.produce(TOPIC, key=key, value=value, partition=KEYS.index(key) % PARTITIONS,
                                              on_delivery=self._delivered)
                        break
                    except BufferError:
                        self.producer.poll(0.1)
                self.sent[key] += 1
                i += 1
                self.producer.poll(0)
                next_at += PRODUCE_INTERVAL_S
                delay = next_at - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                else:
                    next_at = time.monotonic()
        except BaseException as error:   # noqa: BLE001 - reported by the test
            self.error = error

    def finish(self, timeout_s: float) -> int:
        """Stop producing, wait for every outstanding message; the number still undelivered."""
        self.stop.set()
        self.thread.join(30)
        return self.producer.flush(timeout_s)


# ---- the nemesis ------------------------------------------------------------------------

class Nemesis:
    def __init__(self, brokers: LocalBrokers, tracker: LeaderTracker, rng: random.Random) -> None:
        self.brokers, self.tracker, self.rng = brokers, tracker, rng
        self.events: list[str] = []
        self.moved: dict[str, list[bool]] = collections.defaultdict(list)   # kind -> did the leadership move
        self.paused: set[int] = set()
        self.faults: collections.Counter[str] = collections.Counter()
        self.started = time.monotonic()

    def note(self, text: str) -> None:
        line = f"t={time.monotonic() - self.started:5.1f}s {text}"
        self.events.append(line)
        log(line)

    def run(self, seconds: float) -> None:
        bag: list[str] = []
        while time.monotonic() - self.started < seconds:
            if not bag:   # every kind recurs: a shuffled round of the three at a time
                bag = ["kill-leader", "pause-leader", "restart-follower"]
                self.rng.shuffle(bag)
            kind = bag.pop()
            # every draw happens whatever the cluster does, so a seed fixes the whole schedule
            partition, duration, pick, gap = (self.rng.randrange(PARTITIONS), self.rng.uniform(2.0, 5.0),
                                              self.rng.random(), self.rng.uniform(1.0, 3.0))
            leader = self.tracker.wait_for_leaders()[partition]
            if kind == "kill-leader":
                self.kill_and_restart(leader, partition, duration)
            elif kind == "pause-leader":
                self.pause(leader, partition, duration + 1.0)   # 3-6 s: longer than the 1-2 s election timeout
            else:
                followers = [n for n in self.brokers.node_ids if n != leader]
                self.restart_follower(followers[int(pick * len(followers))], partition, duration - 1.5)
            self.faults[kind] += 1
            time.sleep(gap)

    def kill_and_restart(self, node_id: int, partition: int, down_s: float) -> None:
        self.note(f"SIGKILL node {node_id} (leader of partition {partition}); restart in {down_s:.1f}s")
        self.tracker.mark(node_id, healthy=False)
        epoch = self.tracker.epoch(partition)
        self.brokers.kill(node_id, signal.SIGKILL)
        time.sleep(down_s)
        self.note_takeover("kill-leader", partition, epoch)
        self.brokers.restart(node_id)
        self.tracker.mark(node_id, healthy=True)
        self.note(f"node {node_id} restarted")

    def pause(self, node_id: int, partition: int, pause_s: float) -> None:
        self.note(f"SIGSTOP node {node_id} (leader of partition {partition}) for {pause_s:.1f}s")
        self.tracker.mark(node_id, healthy=False)
        self.paused.add(node_id)
        epoch = self.tracker.epoch(partition)
        self.brokers.kill(node_id, signal.SIGSTOP)
        time.sleep(pause_s)
        self.note_takeover("pause-leader", partition, epoch)
        self.brokers.kill(node_id, signal.SIGCONT)
        self.paused.discard(node_id)
        self.tracker.mark(node_id, healthy=True)
        self.note(f"SIGCONT node {node_id}")

    def note_takeover(self, kind: str, partition: int, epoch_before: int) -> None:
        """Whether another broker took the partition over while its leader was down or paused."""
        epoch, leader = self.tracker.latest[partition]
        self.moved[kind].append(epoch > epoch_before)
        self.note(f"partition {partition}: " + (f"node {leader} leads it at epoch {epoch}" if epoch > epoch_before
                                               else f"no new leader yet (epoch still {epoch_before})"))

    def restart_follower(self, node_id: int, partition: int, down_s: float) -> None:
        self.note(f"restart node {node_id} (a follower of partition {partition}): SIGTERM, "
                  f"start again in {down_s:.1f}s")
        self.tracker.mark(node_id, healthy=False)
        self.brokers.kill(node_id, signal.SIGTERM)
        try:
            self.brokers.processes[node_id].wait(20)
        except subprocess.TimeoutExpired:
            self.note(f"node {node_id} ignored SIGTERM for 20 s; SIGKILL")
            self.brokers.kill(node_id, signal.SIGKILL)
        time.sleep(down_s)
        self.brokers.restart(node_id)
        self.tracker.mark(node_id, healthy=True)
        self.note(f"node {node_id} restarted")

    def heal(self) -> None:
        """SIGCONT every paused node, start every dead one."""
        for node_id in sorted(self.paused):
            self.brokers.kill(node_id, signal.SIGCONT)
            self.tracker.mark(node_id, healthy=True)
        self.paused.clear()
        for node_id in self.brokers.node_ids:
            if not self.brokers.alive(node_id):
                self.brokers.restart(node_id)
                self.tracker.mark(node_id, healthy=True)


# ---- reading back -----------------------------------------------------------------------

def records_on_disk(brokers: LocalBrokers, node_id: int, partition: int) -> dict[int, tuple[bytes, bytes]]:
    data = b"".join(brokers.segment_files(node_id, TOPIC, partition).values())
    return {r.offset: (r.key, r.value) for r in parse_records(data)}


def wait_for_catch_up(brokers: LocalBrokers, ends: dict[int, int]) -> None:
    """Every replica holds every partition up to `ends[p]` (exclusive) on disk."""
    deadline = time.monotonic() + DEADLINE_S
    for node_id in brokers.node_ids:
        for partition, end in ends.items():
            while True:
                try:
                    if max(records_on_disk(brokers, node_id, partition), default=-1) >= end - 1:
                        break
                except Exception:   # noqa: BLE001 - a batch being written as we read
                    pass
                assert time.monotonic() < deadline, f"node {node_id} partition {partition} did not reach {end}"
                time.sleep(0.2)


def consume_everything(bootstrap: str) -> dict[tuple[int, int], tuple[bytes, bytes]]:
    """(partition, offset) -> (key, value) of every message from offset 0 to the high watermark."""
    from confluent_kafka import Consumer, TopicPartition
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "nemesis-check",
                         "enable.auto.commit": False, "enable.partition.eof": False})
    try:
        ends = {p: consumer.get_watermark_offsets(TopicPartition(TOPIC, p), timeout=10)[1] for p in range(PARTITIONS)}
        consumer.assign([TopicPartition(TOPIC, p, 0) for p in range(PARTITIONS)])
        got: dict[tuple[int, int], tuple[bytes, bytes]] = {}
        duplicates_read = 0
        next_offset = {p: 0 for p in range(PARTITIONS)}
        deadline = time.monotonic() + 60
        while any(next_offset[p] < ends[p] for p in range(PARTITIONS)):
            assert time.monotonic() < deadline, f"consumed up to {next_offset}, high watermarks {ends}"
            message = consumer.poll(0.5)
            if message is None:
                continue
            assert message.error() is None, message.error()
            where = (message.partition(), message.offset())
            duplicates_read += where in got
            got[where] = (message.key(), message.value())
            next_offset[message.partition()] = max(next_offset[message.partition()], message.offset() + 1)
        assert duplicates_read == 0, f"the consumer was handed {duplicates_read} offsets twice"
        return got
    finally:
        consumer.close()


# ---- the test ---------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.timeout(240)
def test_idempotent_producer_under_nemesis_loses_duplicates_and_reorders_nothing(tmp_path):
    from confluent_kafka.admin import AdminClient, NewTopic
    log(f"seed {SEED} (RAFTKA_NEMESIS_SEED to replay), {NEMESIS_S:g}s of nemesis")
    brokers = LocalBrokers(tmp_path, nodes=3).start()
    tracker = LeaderTracker(brokers)
    nemesis = Nemesis(brokers, tracker, random.Random(SEED))
    producer: KeyedProducer | None = None
    try:
        admin = AdminClient({"bootstrap.servers": brokers.bootstrap()})
        admin.create_topics([NewTopic(TOPIC, PARTITIONS, 3)])[TOPIC].result(DEADLINE_S)
        del admin
        initial = tracker.wait_for_leaders()
        log(f"leaders at start: {initial}")
        tracker.thread.start()
        producer = KeyedProducer(brokers.bootstrap())
        producer.thread.start()

        nemesis.started = time.monotonic()
        nemesis.run(NEMESIS_S)
        nemesis.heal()
        tracker.wait_for_leaders()
        nemesis.note("healed: every node up, every partition led")
        undelivered = producer.finish(MESSAGE_TIMEOUT_MS / 1000 + 10)
        nemesis.note(f"flushed ({undelivered} undelivered)")
        tracker.stop.set()
        tracker.thread.join(10)

        acked, failures = producer.acked, producer.failures
        error_names = collections.Counter(e.name() for _t, e in producer.client_errors)
        fatal = [e for _t, e in producer.client_errors if e.fatal()]
        for t, error in producer.client_errors:
            log(f"client error at t={t - (nemesis.started - producer.started):5.1f}s: {error.name()} {error.str()}")
        epochs = {p: tracker.latest[p][0] for p in range(PARTITIONS)}
        report = [
            f"seed {SEED}",
            f"nemesis events: {sum(nemesis.faults.values())} {dict(nemesis.faults)}",
            f"leader changes seen: {len(tracker.changes)} "
            f"(per partition {dict(collections.Counter(p for _t, p, *_ in tracker.changes))}; "
            f"epochs now {epochs}; {tracker.samples} samples)",
            "faults after which another broker had taken the partition over: "
            + ", ".join(f"{kind} {sum(moved)}/{len(moved)}" for kind, moved in sorted(nemesis.moved.items())),
            f"messages produced: {sum(producer.sent.values())}, acknowledged: {len(acked)} "
            f"(slowest acknowledgement {producer.slowest_ack_s:.1f}s after produce)",
            f"delivery failures: {len(failures)} {collections.Counter(str(e) for *_x, e in failures)}",
            f"client-reported errors (error_cb, informational unless fatal): {dict(error_names)}; fatal: {fatal}",
        ]
        for line in report:
            log("REPORT " + line)

        assert producer.error is None, f"the producer thread raised {producer.error!r}"
        assert not fatal, f"fatal client errors: {fatal}"
        assert undelivered == 0, f"{undelivered} messages neither acknowledged nor failed"
        assert not failures, f"delivery failures: {failures[:10]}"
        assert not tracker.conflicts, f"two leaders claimed one epoch (partition, epoch, a, b): {tracker.conflicts}"

        # acknowledged offsets are distinct: two messages acknowledged at one offset means one was lost
        by_offset: dict[tuple[int, int], tuple[bytes, int]] = {}
        for partition, offset, key, seq in acked:
            previous = by_offset.setdefault((partition, offset), (key, seq))
            assert previous == (key, seq), f"partition {partition} offset {offset} acknowledged twice: {previous}, {(key, seq)}"

        # every acknowledged message is read back exactly once, where it was acknowledged
        got = consume_everything(brokers.bootstrap())
        mismatched = [(p, o, k, s, got.get((p, o))) for p, o, k, s in acked if got.get((p, o)) != (k, b"%s:%08d" % (k, s))]
        assert not mismatched, f"{len(mismatched)} acknowledged messages not read back at their offsets: {mismatched[:10]}"
        per_key: dict[bytes, list[int]] = collections.defaultdict(list)
        for (partition, offset), (key, value) in sorted(got.items()):
            assert partition == KEYS.index(key) % PARTITIONS, f"{key!r} read from partition {partition}"
            per_key[key].append(int(value.split(b":")[1]))
        for key in KEYS:
            seqs = per_key[key]
            duplicated = [s for s, n in collections.Counter(seqs).items() if n > 1]
            assert not duplicated, f"{key!r}: sequence numbers stored more than once: {duplicated[:20]}"
            assert seqs == sorted(seqs), f"{key!r}: out of order: {[(a, b) for a, b in zip(seqs, seqs[1:]) if b < a][:20]}"
            # nothing failed, so every message sent was acknowledged: none missing, nothing extra
            assert seqs == list(range(producer.sent[key])), \
                f"{key!r}: stored {len(seqs)} of {producer.sent[key]}, missing {sorted(set(range(producer.sent[key])) - set(seqs))[:20]}"
        offsets = collections.defaultdict(list)
        for partition, offset in got:
            offsets[partition].append(offset)
        for partition, found in offsets.items():   # dense: no holes in any partition's log
            assert sorted(found) == list(range(len(found))), f"partition {partition} has holes"

        # every replica catches up, then after a clean stop every replica is byte-identical
        ends = {p: len(offsets[p]) for p in range(PARTITIONS)}
        wait_for_catch_up(brokers, ends)
        brokers.stop()
        for partition in range(PARTITIONS):
            files = [brokers.segment_files(n, TOPIC, partition) for n in brokers.node_ids]
            sizes = [{name: len(data) for name, data in f.items()} for f in files]
            assert files[0], f"partition {partition}: no segment files on node 1"
            assert files[0] == files[1] == files[2], f"partition {partition} differs across replicas: {sizes}"
            assert max(records_on_disk(brokers, 1, partition)) == ends[partition] - 1
        log(f"REPORT verified: {len(acked)} acknowledged messages exactly once, in per-key order; "
            f"segments byte-identical on 3 replicas of {PARTITIONS} partitions")
    finally:
        tracker.stop.set()
        if producer is not None:
            producer.stop.set()
        for node_id in sorted(nemesis.paused):   # a paused broker would sit out SIGTERM
            brokers.kill(node_id, signal.SIGCONT)
        brokers.stop()
