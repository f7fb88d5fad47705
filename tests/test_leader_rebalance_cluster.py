"""Three `raftka serve` processes (LocalBrokers), RF=3, six partitions, the
default auto.leader.rebalance.enable: leaders spread two per broker once the
topic exists; after SIGKILL of one broker its partitions fail over, and once
it restarts and catches up it leads its two again, within bounded time,
through Raft leadership transfers, while a producer writes across every
transfer with acks=all and loses no acknowledged record."""
from __future__ import annotations

import threading
import time

from raftka.broker.local_cluster import LocalBrokers
from tests import test_broker_failover as failover
from tests.test_broker_failover import wait_for

TOPIC = "balanced"
PARTITIONS = 6
BALANCE_DEADLINE_S = 20.0


def partition_leaders(port: int) -> dict[int, int]:
    return failover.partition_leaders(port, TOPIC)


def balanced(brokers: LocalBrokers, node_ids: list[int]) -> dict[int, int] | None:
    """The leaders if every broker in `node_ids` answers the same, each leading PARTITIONS / 3."""
    views = [partition_leaders(brokers.port(n)) for n in node_ids]
    leaders = views[0]
    if len(leaders) != PARTITIONS or any(v != leaders for v in views):
        return None
    counts = [list(leaders.values()).count(n) for n in brokers.node_ids]
    return leaders if counts == [PARTITIONS // 3] * 3 else None


class BackgroundProducer:
    """Produces round robin over the partitions until stopped, acks=all,
    idempotent; remembers every acknowledged (partition, offset) -> value."""

    def __init__(self, bootstrap: str) -> None:
        from confluent_kafka import Producer
        self.producer = Producer({"bootstrap.servers": bootstrap, "acks": "all", "linger.ms": 5,
                                  "enable.idempotence": True, "message.timeout.ms": 60_000})
        self.acked: dict[tuple[int, int], bytes] = {}
        self.errors: list[object] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _delivered(self, error, message) -> None:
        if error:
            self.errors.append(error)
        else:
            self.acked[(message.partition(), message.offset())] = message.value()

    def _run(self) -> None:
        i = 0
        while not self._stop.is_set() and i < 1_000_000:
            self.producer.produce(TOPIC, value=b"r-%d" % i, partition=i % PARTITIONS, on_delivery=self._delivered)
            self.producer.poll(0.002)
            i += 1

    def __enter__(self) -> "BackgroundProducer":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)
        assert self.producer.flush(60) == 0


def records_on_disk(brokers: LocalBrokers, node_id: int, partition: int) -> dict[int, bytes]:
    return failover.records_on_disk(brokers, node_id, partition, TOPIC)


def test_leaders_spread_evenly_again_after_a_broker_restarts_and_no_acknowledged_record_is_lost(tmp_path):
    from confluent_kafka.admin import AdminClient, NewTopic
    brokers = LocalBrokers(tmp_path, nodes=3).start()
    try:
        admin = AdminClient({"bootstrap.servers": brokers.bootstrap()})
        admin.create_topics([NewTopic(TOPIC, PARTITIONS, 3)])[TOPIC].result(30)
        leaders = wait_for(lambda: balanced(brokers, brokers.node_ids), "leaders spread at creation",
                           BALANCE_DEADLINE_S)
        victim = leaders[0]
        survivors = [n for n in brokers.node_ids if n != victim]
        with BackgroundProducer(brokers.bootstrap()) as producing:
            wait_for(lambda: len(producing.acked) >= 200, "records acknowledged before the kill")
            brokers.kill(victim)
            wait_for(lambda: victim not in partition_leaders(brokers.port(survivors[0])).values(),
                     "the victim's partitions to fail over")
            acked_while_down = len(producing.acked)
            wait_for(lambda: len(producing.acked) >= acked_while_down + 200, "records acknowledged while it is down")
            brokers.restart(victim)
            started = time.monotonic()
            wait_for(lambda: balanced(brokers, brokers.node_ids), "leaders spread after the restart",
                     BALANCE_DEADLINE_S)
            rebalanced_s = time.monotonic() - started
            acked_balanced = len(producing.acked)
            wait_for(lambda: len(producing.acked) >= acked_balanced + 200, "records acknowledged after the rebalance")
        assert rebalanced_s < BALANCE_DEADLINE_S
        acked = dict(producing.acked)
        last_acked = {p: max(o for (q, o) in acked if q == p) for p in range(PARTITIONS)}
        for node_id in brokers.node_ids:
            wait_for(lambda: all(max(records_on_disk(brokers, node_id, p), default=-1) >= last_acked[p]
                                 for p in range(PARTITIONS)), f"node {node_id} to hold every acknowledged record")
        brokers.stop()
        for node_id in brokers.node_ids:
            for partition in range(PARTITIONS):
                on_disk = records_on_disk(brokers, node_id, partition)
                missing = {o: v for (p, o), v in acked.items() if p == partition and on_disk.get(o) != v}
                assert not missing, f"node {node_id} partition {partition} lacks acknowledged {missing}"
    finally:
        brokers.stop()
