"""Three `raftka serve` processes (LocalBrokers), RF=3: what the partition
leader enforces for the whole replica set. min.insync.replicas against the
ISR when a broker dies (acks=all refused with NOT_ENOUGH_REPLICAS once the
ISR is below it, acks=1 still taken, acks=all taken again once the broker
is back)."""
from __future__ import annotations

import pytest
from kio.index import load_request_schema

from raftka.broker.local_cluster import LocalBrokers
from raftka.errors import ErrorCode
from raftka.protocol import kafka
from tests.test_broker_clients import ask
from tests.test_broker_clients import produce_error as produce_to
from tests.test_broker_failover import wait_for

DEADLINE_S = 30.0
LAG_MS = 1500       # replica.lag.time.max.ms: a dead follower leaves the ISR after this long


@pytest.fixture(scope="module")
def brokers(tmp_path_factory):
    cluster = LocalBrokers(tmp_path_factory.mktemp("replicated-admin"), nodes=3,
                           settings={"replica_lag_time_max_ms": LAG_MS}).start()
    yield cluster
    cluster.stop()


def create_topic(brokers: LocalBrokers, name: str, **configs: str) -> None:
    from confluent_kafka.admin import AdminClient, NewTopic
    admin = AdminClient({"bootstrap.servers": brokers.bootstrap()})
    admin.create_topics([NewTopic(name, 1, 3, config=configs)])[name].result(DEADLINE_S)


def produce_error(brokers: LocalBrokers, topic: str, acks: int, via: int) -> int:
    return produce_to(("127.0.0.1", brokers.port(via)), topic, acks)


def leader_and_isr(brokers: LocalBrokers, topic: str, via: int) -> tuple[int, list[int]]:
    """(leader, ISR) of partition 0 of `topic` as broker `via` answers Metadata v4."""
    schema = load_request_schema(3, 4)
    body = schema(topics=(kafka.nested(schema, "MetadataRequestTopic")(name=topic),), allow_auto_topic_creation=False)
    response = ask(("127.0.0.1", brokers.port(via)), 3, 4, body)
    partition = next(t for t in response.topics if t.name == topic).partitions[0]
    return int(partition.leader_id), [int(n) for n in partition.isr_nodes]


def test_acks_all_needs_min_insync_replicas_in_the_isr_when_a_broker_is_killed(brokers):
    create_topic(brokers, "min-isr-2", **{"min.insync.replicas": "2"})
    create_topic(brokers, "min-isr-3", **{"min.insync.replicas": "3"})
    leaders = {}
    for topic in ("min-isr-2", "min-isr-3"):
        leaders[topic] = wait_for(lambda t=topic: (lambda li: li[0] if len(li[1]) == 3 else None)(
            leader_and_isr(brokers, t, 1)), f"{topic}'s full ISR")
        assert produce_error(brokers, topic, -1, leaders[topic]) == ErrorCode.NONE
    victim = next(n for n in brokers.node_ids if n not in leaders.values())
    brokers.kill(victim)
    try:
        wait_for(lambda: produce_error(brokers, "min-isr-3", -1, leaders["min-isr-3"]) == ErrorCode.NOT_ENOUGH_REPLICAS,
                 "acks=all refused with an ISR of 2 below min.insync.replicas=3")
        assert produce_error(brokers, "min-isr-3", 1, leaders["min-isr-3"]) == ErrorCode.NONE
        assert produce_error(brokers, "min-isr-2", -1, leaders["min-isr-2"]) == ErrorCode.NONE
    finally:
        brokers.restart(victim)
    wait_for(lambda: produce_error(brokers, "min-isr-3", -1, leaders["min-isr-3"]) == ErrorCode.NONE,
             "acks=all taken again once the killed broker is back in the ISR")
