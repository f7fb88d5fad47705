"""ElectLeaders (Kafka API 43, v0-2, type PREFERRED) on three `raftka serve`
processes with auto.leader.rebalance.enable off, so only the API moves
leaders: a broker restarted after SIGKILL leads nothing; an ElectLeaders
sent to a broker that does not lead the partition is forwarded to its
leader, which hands it to the preferred replica; confluent-kafka's
AdminClient.elect_leaders over every partition then spreads the leaders
one per broker; asking again answers ELECTION_NOT_NEEDED, and an unclean
election is refused; `raftka leaders elect` says so."""
from __future__ import annotations

import datetime

from kio.index import load_request_schema

from raftka.broker.local_cluster import LocalBrokers
from raftka.errors import ErrorCode
from raftka.protocol import kafka
from tests import test_broker_failover as failover
from tests.test_broker_clients import ask
from tests.test_broker_failover import wait_for
from tests.test_cli import raftka

TOPIC = "elect"
PARTITIONS = 3


def elect(port: int, version: int, partitions: list[int] | None, election_type: int = 0) -> dict[int, int]:
    """partition -> error code of an ElectLeaders (our own encoder) sent to the broker on `port`."""
    schema = load_request_schema(kafka.ELECT_LEADERS, version)
    wanted = None if partitions is None else (
        kafka.nested(schema, "TopicPartitions")(topic=TOPIC, partitions=tuple(partitions)),)
    values = dict(topic_partitions=wanted, timeout=datetime.timedelta(seconds=10))
    if version >= 1:
        values["election_type"] = election_type
    response = ask(("127.0.0.1", port), kafka.ELECT_LEADERS, version, schema(**values), timeout_s=15)
    return {int(p.partition_id): int(p.error_code) for r in response.replica_election_results
            for p in r.partition_result if r.topic == TOPIC}


def test_elect_leaders_moves_each_partition_to_its_preferred_replica_from_any_broker(tmp_path):
    from confluent_kafka import ElectionType, TopicPartition
    from confluent_kafka.admin import AdminClient, NewTopic
    brokers = LocalBrokers(tmp_path, nodes=3, settings={"auto_leader_rebalance_enable": False}).start()
    try:
        admin = AdminClient({"bootstrap.servers": brokers.bootstrap()})
        admin.create_topics([NewTopic(TOPIC, PARTITIONS, 3)])[TOPIC].result(30)
        leaders = lambda: failover.partition_leaders(brokers.port(1), TOPIC)   # noqa: E731
        wait_for(lambda: min(leaders().values()) > 0, "leaders")
        replicas = {p: m.replicas for p, m in admin.list_topics(TOPIC, timeout=10).topics[TOPIC].partitions.items()}
        brokers.kill(1)
        wait_for(lambda: 1 not in failover.partition_leaders(brokers.port(2), TOPIC).values(), "failover")
        brokers.restart(1)
        wait_for(lambda: min(leaders().values()) > 0 and 1 not in leaders().values(), "broker 1 leading nothing")
        partition = next(p for p, r in replicas.items() if r[0] == 1)
        assert elect(brokers.port(1), 2, [partition], election_type=1) == {partition: ErrorCode.INVALID_REQUEST}
        # sent to broker 1, which is not the leader: forwarded; retried while broker 1 is still catching up
        wait_for(lambda: elect(brokers.port(1), 2, [partition]) == {partition: ErrorCode.NONE},
                 "a forwarded election to succeed")
        wait_for(lambda: leaders()[partition] == 1, "broker 1 to lead its preferred partition")

        # (confluent-kafka 2.16's elect_leaders raises SystemError on any keyword argument: none passed)
        results = admin.elect_leaders(ElectionType.PREFERRED, None).result(30)
        assert all(error is None for error in results.values()), results
        wait_for(lambda: all(leaders()[p] == r[0] for p, r in replicas.items()), "every preferred replica to lead")
        assert sorted(leaders().values()) == [1, 2, 3]

        again = admin.elect_leaders(ElectionType.PREFERRED, [TopicPartition(TOPIC, p) for p in range(PARTITIONS)])
        codes = {tp.partition: error.code() if error else 0 for tp, error in again.result(30).items()}
        assert codes == {p: ErrorCode.ELECTION_NOT_NEEDED for p in range(PARTITIONS)}, codes
        assert elect(brokers.port(2), 0, [0, 1, 2]) == {p: ErrorCode.ELECTION_NOT_NEEDED for p in range(PARTITIONS)}
        assert elect(brokers.port(3), 2, None) == {}   # everything: only the partitions that needed an election

        run = raftka("leaders", "elect", "--topic", TOPIC, "--partition", "0", bootstrap=brokers.bootstrap())
        assert run.returncode == 0 and run.stdout == f"{TOPIC}\t0\talready led by its preferred replica\n", run
    finally:
        brokers.stop()
