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
    ("cleanup.policy", "compact"), ("unknown.config", "1"),
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
    from raftka.cluster.controller import check_broker_partition_limit
    from raftka.errors import InvalidPartitionsError
    state = state_with_brokers(1, 2)
    assert state.apply(metadata.create_topic("a", TOPIC_ID, [[1, 2]] * 6, {})) == ErrorCode.NONE
    check_broker_partition_limit(state, [[1, 2]] * 4, limit=10)          # 10 each: at the limit
    with pytest.raises(InvalidPartitionsError, match=r"\[1, 2\]"):
        check_broker_partition_limit(state, [[1, 2]] * 5, limit=10)
