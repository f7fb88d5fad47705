"""Limits and security settings of the one Config. Topic configs are checked against Kafka's ranges in both places they can
enter: the controller's CreateTopics check and the metadata state machine, so
a config no partition log can open (segment.bytes=0) never reaches the state,
even from a command that skipped the first check."""
from __future__ import annotations

import pytest

from raftka.cluster import metadata
from raftka.cluster import topic_configs
from raftka.config import Config, ConfigError, load_config
from raftka.errors import InvalidConfigError
from raftka.errors import ErrorCode
from tests.test_cluster_metadata import TOPIC_ID, state_with_brokers


@pytest.mark.parametrize("name,value", [
    ("segment.bytes", "0"), ("segment.bytes", str(2**31)), ("segment.ms", "0"), ("retention.ms", "-2"),
    ("retention.bytes", "-5"), ("max.message.bytes", "-1"), ("retention.ms", "9" * 25), ("retention.ms", "1e3"),
    ("cleanup.policy", "shred"), ("min.cleanable.dirty.ratio", "2"), ("unknown.config", "1"),
])
def test_values_outside_kafkas_range_are_refused(name: str, value: str) -> None:
    with pytest.raises(InvalidConfigError):
        topic_configs.validate({name: value})


@pytest.mark.parametrize("name,value", [
    ("segment.bytes", str(1 << 20)), ("retention.ms", "-1"), ("retention.bytes", "-1"),
    ("segment.ms", "1"), ("max.message.bytes", "1"), ("segment.bytes", str(2**31 - 1)),
    ("retention.ms", str(2**63 - 1)),
])
def test_values_at_kafkas_bounds_are_accepted(name: str, value: str) -> None:
    topic_configs.validate({name: value})


def test_state_machine_refuses_a_create_with_a_config_no_log_can_open_and_stays_usable() -> None:
    state = state_with_brokers(1)
    command = metadata.create_topic("wedge", TOPIC_ID, [[1]], {"segment.bytes": "0"})
    assert state.apply(command) == ErrorCode.INVALID_CONFIG
    assert "wedge" not in state.topics
    assert state.apply(metadata.create_topic("fine", TOPIC_ID, [[1]], {})) == ErrorCode.NONE


def test_in_flight_budget_below_the_largest_request_is_refused() -> None:
    with pytest.raises(ConfigError, match="queued_max_request_bytes"):
        load_config(None, environ={}, max_request_bytes=10 << 20, queued_max_request_bytes=1 << 20)


def test_metrics_listen_on_loopback_unless_told() -> None:
    assert Config().metrics_host == "127.0.0.1"


def test_cluster_secret_stays_out_of_the_config_repr() -> None:
    assert "s3cret-value" not in repr(Config(cluster_secret="s3cret-value"))


def test_unknown_sasl_mechanism_is_refused_by_name() -> None:
    from raftka.broker.security_apis import enabled_mechanisms
    with pytest.raises(ConfigError, match="GSSAPI"):
        enabled_mechanisms(Config(sasl_mechanisms="SCRAM-SHA-512,GSSAPI"))
    assert enabled_mechanisms(Config(sasl_mechanisms="scram-sha-256, PLAIN")) == ("SCRAM-SHA-256", "PLAIN")


def test_partitions_past_the_per_broker_limit_are_refused_before_proposing() -> None:
    from raftka.errors import InvalidPartitionsError
    state = state_with_brokers(1, 2, 3)
    limits = metadata.PartitionLimits(per_topic=100, per_broker=10)
    assert state.apply(metadata.create_topic("a", TOPIC_ID, [[1, 2]] * 6, {})) == ErrorCode.NONE
    state.check_partition_limits("b", [[1, 2]] * 4, limits)          # 10 each: at the limit
    with pytest.raises(InvalidPartitionsError, match=r"\[1, 2\]"):
        state.check_partition_limits("b", [[1, 2]] * 5, limits)
    state.check_partition_limits("b", [[3]] * 6, metadata.PartitionLimits(per_topic=100, per_broker=6))  # 1, 2 hold 6 already: untouched


def test_two_creates_that_each_fit_alone_cannot_both_commit_past_the_per_broker_limit() -> None:
    """Both controllers checked the same state before either command
    committed; the state machine refuses the second at apply, on every replica alike."""
    limits = metadata.PartitionLimits(per_topic=100, per_broker=10)
    commands = [metadata.create_topic("a", TOPIC_ID, [[1, 2]] * 6, {}, limits),
                metadata.create_topic("b", TOPIC_ID, [[2, 1]] * 6, {}, limits),
                metadata.create_topic("c", TOPIC_ID, [[3]] * 10, {}, limits)]
    replicas = [state_with_brokers(1, 2, 3), state_with_brokers(1, 2, 3)]
    for state in replicas:
        assert [state.apply(c) for c in commands] == [ErrorCode.NONE, ErrorCode.INVALID_PARTITIONS, ErrorCode.NONE]
        assert state.replica_counts() == {1: 6, 2: 6, 3: 10}
    assert replicas[0].snapshot() == replicas[1].snapshot()


def test_partitions_past_the_per_topic_limit_carried_in_the_command_are_refused_at_apply() -> None:
    state = state_with_brokers(1)
    limits = metadata.PartitionLimits(per_topic=4, per_broker=100)
    assert state.apply(metadata.create_topic("a", TOPIC_ID, [[1]] * 5, {}, limits)) == ErrorCode.INVALID_PARTITIONS
    assert state.apply(metadata.create_topic("a", TOPIC_ID, [[1]] * 3, {}, limits)) == ErrorCode.NONE
    assert state.apply(metadata.create_partitions("a", [[1]] * 2, limits)) == ErrorCode.INVALID_PARTITIONS
    assert state.apply(metadata.create_partitions("a", [[1]], limits)) == ErrorCode.NONE
    assert len(state.topics["a"].partitions) == 4
    bad = metadata.codec.encode({**metadata.codec.decode(metadata.create_partitions("a", [[1]], limits)),
                                 "max_partitions_per_topic": 0})
    assert state.apply(bad) == ErrorCode.INVALID_REQUEST


@pytest.mark.parametrize("settings,named", [
    (dict(default_partitions=9, max_partitions_per_topic=8), "max_partitions_per_topic"),
    (dict(offsets_topic_partitions=20, max_partitions_per_broker=10), "max_partitions_per_broker"),
    (dict(default_partitions=12, max_partitions_per_request=10), "max_partitions_per_request"),
    (dict(max_partitions_per_request=0), "max_partitions_per_request"),
])
def test_partition_limits_below_the_topics_a_broker_creates_itself_are_refused(settings, named) -> None:
    with pytest.raises(ConfigError, match=named):
        load_config(None, environ={}, **settings)
