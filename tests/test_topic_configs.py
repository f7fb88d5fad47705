"""Topic and broker configs: which values are taken (only what Raftka
implements), IncrementalAlterConfigs' operations, the metadata state
machine applying changes alike everywhere, and real clients' admin calls
(confluent-kafka, kafka-python, aiokafka, `raftka topics alter`) against a
`raftka serve` process, down to the partition log using the new value."""
from __future__ import annotations

import asyncio
import subprocess
import time

import pytest

from kio.index import load_request_schema
from kio.static.primitive import i8

from raftka.broker.local_cluster import raftka_command
from raftka.cluster import metadata, topic_configs
from raftka.cluster.metadata import RESOURCE_BROKER, RESOURCE_TOPIC, ClusterState
from raftka.errors import ErrorCode, InvalidConfigError
from raftka.protocol import kafka
from tests.broker_process import BrokerProcess
from tests.test_broker_clients import ask, produce_error

TIMEOUT_S = 30


# ---- values and operations ---------------------------------------------------------

@pytest.mark.parametrize("configs, why", [
    ({"cleanup.policy": "shred"}, "cleanup.policy takes delete, compact, or both"),
    ({"min.cleanable.dirty.ratio": "1.5"}, r"outside \[0, 1\]"),
    ({"min.cleanable.dirty.ratio": "half"}, "not a number"),
    ({"compression.type": "zstd"}, "does not recompress"),
    ({"message.timestamp.type": "LogAppendTime"}, "LogAppendTime"),
    ({"min.insync.replicas": "0"}, "below its minimum"),
    ({"retention.ms": "soon"}, "not an integer"),
    ({"segment.bytes": "0"}, "below its minimum"),
    ({"no.such.config": "1"}, "unknown or read-only config"),
])
def test_configs_raftka_does_not_implement_are_refused_saying_why(configs, why):
    with pytest.raises(InvalidConfigError, match=why):
        topic_configs.validate(configs)


@pytest.mark.parametrize("value", ["--5", "-", "", "5-", "\u0663", "1_000", "+5", "0x10"])
def test_integer_configs_parse_as_kafka_does_or_are_refused(value):
    with pytest.raises(InvalidConfigError, match="not an integer"):
        topic_configs.validate({"retention.ms": value})


def test_kafka_defaults_and_integers_in_range_are_taken():
    topic_configs.validate({"cleanup.policy": "delete", "compression.type": "producer", "retention.ms": "-1",
                            "message.timestamp.type": "CreateTime", "min.insync.replicas": "1",
                            "delete.retention.ms": "1000", "min.compaction.lag.ms": "0"})
    topic_configs.validate({"min.insync.replicas": "3"})    # Kafka's range: any value >= 1


def test_incremental_operations_set_delete_append_and_subtract_lists_only():
    current = {"retention.ms": "1000", "segment.bytes": "4096"}
    values, deleted = topic_configs.incremental(current, [
        ("retention.ms", topic_configs.SET, "2000"), ("segment.bytes", topic_configs.DELETE, None),
        ("cleanup.policy", topic_configs.APPEND, "compact")])
    assert values == {"retention.ms": "2000", "cleanup.policy": "delete,compact"} and deleted == ["segment.bytes"]
    values, _ = topic_configs.incremental({"cleanup.policy": "delete,compact"},
                                          [("cleanup.policy", topic_configs.SUBTRACT, "compact")])
    assert values == {"cleanup.policy": "delete"}
    with pytest.raises(InvalidConfigError, match="not a list"):
        topic_configs.incremental(current, [("retention.ms", topic_configs.APPEND, "5")])


def test_the_metadata_state_machine_alters_configs_and_keeps_them_in_snapshots():
    state = ClusterState()
    state.apply(metadata.register_broker(1, "127.0.0.1", 9092))
    state.apply(metadata.create_topic("t", b"\1" * 16, [[1]], {"retention.ms": "1000"}))
    assert state.apply(metadata.alter_configs(RESOURCE_TOPIC, "t", {"segment.bytes": "4096"}, [])) == ErrorCode.NONE
    assert state.topics["t"].configs == {"retention.ms": "1000", "segment.bytes": "4096"}
    assert state.apply(metadata.alter_configs(RESOURCE_TOPIC, "t", {"max.message.bytes": "9"}, [], replace=True)) == 0
    assert state.topics["t"].configs == {"max.message.bytes": "9"}
    assert state.apply(metadata.alter_configs(RESOURCE_TOPIC, "t", {"cleanup.policy": "shred"}, [])) \
        == ErrorCode.INVALID_CONFIG
    assert state.apply(metadata.alter_configs(RESOURCE_BROKER, "", {"log.retention.ms": "5"}, [])) == ErrorCode.NONE
    assert state.apply(metadata.alter_configs(RESOURCE_BROKER, "1", {"num.partitions": "5"}, [])) \
        == ErrorCode.INVALID_CONFIG                          # not changeable at runtime
    restored = ClusterState()
    restored.restore(state.snapshot())
    assert restored.broker_configs == {"": {"log.retention.ms": "5"}}
    assert restored.topics["t"].configs == {"max.message.bytes": "9"}
    assert state.apply(metadata.alter_configs(RESOURCE_BROKER, "", {}, ["log.retention.ms"])) == ErrorCode.NONE
    assert state.broker_configs == {}


def test_a_topic_takes_its_own_value_over_the_dynamic_and_static_broker_ones():
    from raftka.config import Config
    effective = topic_configs.effective(Config(retention_ms=1, segment_ms=7), [
        ({"log.retention.ms": "2", "log.roll.ms": "8"}, topic_configs.DYNAMIC_BROKER_CONFIGS),
        ({"retention.ms": "3"}, topic_configs.TOPIC_CONFIGS)])
    assert (effective.retention_ms, effective.segment_ms) == (3, 8)


# ---- against a broker ------------------------------------------------------------------

@pytest.fixture(scope="module")
def broker(tmp_path_factory):
    process = BrokerProcess(tmp_path_factory.mktemp("configs") / "data").start()
    yield process
    process.stop()


def confluent_admin(broker: BrokerProcess):
    from confluent_kafka.admin import AdminClient
    return AdminClient({"bootstrap.servers": broker.bootstrap})


def described(admin, resource) -> dict:
    return admin.describe_configs([resource], request_timeout=TIMEOUT_S)[resource].result(TIMEOUT_S)


def create_topic(admin, name: str, **configs: str) -> None:
    from confluent_kafka.admin import NewTopic
    admin.create_topics([NewTopic(name, 1, 1, config=configs)])[name].result(TIMEOUT_S)


def test_describe_configs_reports_every_common_topic_config_with_sources_and_synonyms(broker):
    from confluent_kafka.admin import ConfigResource, ConfigSource, ResourceType
    admin = confluent_admin(broker)
    create_topic(admin, "described", **{"retention.ms": "60000"})
    entries = described(admin, ConfigResource(ResourceType.TOPIC, "described"))
    for name in ("cleanup.policy", "retention.ms", "retention.bytes", "segment.bytes", "segment.ms",
                 "max.message.bytes", "min.insync.replicas", "compression.type", "message.timestamp.type",
                 "min.compaction.lag.ms", "delete.retention.ms"):
        assert name in entries, name
    retention = entries["retention.ms"]
    assert (retention.value, retention.source) == ("60000", ConfigSource.DYNAMIC_TOPIC_CONFIG.value)
    assert [(s.name, s.value) for s in retention.synonyms.values()] == [("retention.ms", "60000"),
                                                                      ("log.retention.ms", "604800000")]
    assert (entries["cleanup.policy"].value, entries["cleanup.policy"].source) == ("delete", ConfigSource.DEFAULT_CONFIG.value)
    assert not retention.is_read_only


def test_confluent_alter_configs_replace_and_incremental_alter_configs_change_a_topic(broker):
    from confluent_kafka.admin import AlterConfigOpType, ConfigEntry, ConfigResource, ResourceType
    admin = confluent_admin(broker)
    create_topic(admin, "altered", **{"retention.ms": "60000"})
    replaced = ConfigResource(ResourceType.TOPIC, "altered", set_config={"segment.ms": "3600000"})
    with pytest.warns(DeprecationWarning):    # confluent-kafka deprecates the legacy API; Kafka still serves it
        admin.alter_configs([replaced])[replaced].result(TIMEOUT_S)
    entries = described(admin, ConfigResource(ResourceType.TOPIC, "altered"))
    assert (entries["segment.ms"].value, entries["retention.ms"].value) == ("3600000", "604800000")   # replaced whole
    incremental = ConfigResource(ResourceType.TOPIC, "altered", incremental_configs=[
        ConfigEntry("retention.bytes", "1048576", incremental_operation=AlterConfigOpType.SET),
        ConfigEntry("segment.ms", None, incremental_operation=AlterConfigOpType.DELETE)])
    admin.incremental_alter_configs([incremental])[incremental].result(TIMEOUT_S)
    entries = described(admin, ConfigResource(ResourceType.TOPIC, "altered"))
    assert (entries["retention.bytes"].value, entries["segment.ms"].value) == ("1048576", "604800000")
    compact = ConfigResource(ResourceType.TOPIC, "altered", incremental_configs=[
        ConfigEntry("cleanup.policy", "compact", incremental_operation=AlterConfigOpType.APPEND)])
    admin.incremental_alter_configs([compact])[compact].result(TIMEOUT_S)
    assert described(admin, ConfigResource(ResourceType.TOPIC, "altered"))["cleanup.policy"].value == "delete,compact"


def test_cleanup_policy_compact_is_accepted_at_creation_and_described_with_its_compaction_configs(broker):
    from confluent_kafka.admin import ConfigResource, ConfigSource, ResourceType
    admin = confluent_admin(broker)
    create_topic(admin, "compacted", **{"cleanup.policy": "compact", "min.cleanable.dirty.ratio": "0.01",
                                        "delete.retention.ms": "1000"})
    entries = described(admin, ConfigResource(ResourceType.TOPIC, "compacted"))
    assert entries["cleanup.policy"].value == "compact"
    assert entries["cleanup.policy"].source == ConfigSource.DYNAMIC_TOPIC_CONFIG.value
    assert (entries["min.cleanable.dirty.ratio"].value, entries["delete.retention.ms"].value) == ("0.01", "1000")
    assert entries["min.compaction.lag.ms"].source == ConfigSource.DEFAULT_CONFIG.value


def test_a_new_segment_bytes_reaches_the_partition_log(broker):
    from confluent_kafka import Producer
    from confluent_kafka.admin import AlterConfigOpType, ConfigEntry, ConfigResource, ResourceType
    admin = confluent_admin(broker)
    create_topic(admin, "rolled")
    resource = ConfigResource(ResourceType.TOPIC, "rolled", incremental_configs=[
        ConfigEntry("segment.bytes", "16384", incremental_operation=AlterConfigOpType.SET)])
    admin.incremental_alter_configs([resource])[resource].result(TIMEOUT_S)
    time.sleep(1.0)    # the broker reconfigures its replicas on its next duty round (every 100 ms)
    producer = Producer({"bootstrap.servers": broker.bootstrap, "linger.ms": 0})
    for i in range(40):
        producer.produce("rolled", value=b"x" * 2000)
        producer.flush(TIMEOUT_S)
    assert len(broker.brokers.segment_files(1, "rolled", 0)) >= 4


def alter_cluster_default(broker: BrokerProcess, name: str, value: str | None) -> int:
    """IncrementalAlterConfigs of the cluster-wide default (broker resource ""),
    which confluent-kafka cannot name; the resource's error code."""
    schema = load_request_schema(44, 1)
    operation = topic_configs.SET if value is not None else topic_configs.DELETE
    config = kafka.nested(schema, "AlterableConfig")(name=name, config_operation=i8(operation), value=value)
    resource = kafka.nested(schema, "AlterConfigsResource")(resource_type=i8(RESOURCE_BROKER), resource_name="",
                                                           configs=(config,))
    body = schema(resources=(resource,), validate_only=False)
    return ask(("127.0.0.1", broker.port), 44, 1, body).responses[0].error_code.value


def test_dynamic_broker_configs_apply_to_topics_without_their_own_value(broker):
    from confluent_kafka.admin import AlterConfigOpType, ConfigEntry, ConfigResource, ConfigSource, ResourceType
    admin = confluent_admin(broker)
    create_topic(admin, "defaulted")
    assert alter_cluster_default(broker, "log.retention.ms", "86400000") == ErrorCode.NONE
    try:
        retention = described(admin, ConfigResource(ResourceType.TOPIC, "defaulted"))["retention.ms"]
        assert (retention.value, retention.source) == ("86400000", ConfigSource.DYNAMIC_DEFAULT_BROKER_CONFIG.value)
        this_broker = ConfigResource(ResourceType.BROKER, "1", incremental_configs=[
            ConfigEntry("log.retention.ms", "3600000", incremental_operation=AlterConfigOpType.SET)])
        admin.incremental_alter_configs([this_broker])[this_broker].result(TIMEOUT_S)
        retention = described(admin, ConfigResource(ResourceType.TOPIC, "defaulted"))["retention.ms"]
        assert (retention.value, retention.source) == ("3600000", ConfigSource.DYNAMIC_BROKER_CONFIG.value)
        broker_entries = described(admin, ConfigResource(ResourceType.BROKER, "1"))
        assert broker_entries["log.retention.ms"].value == "3600000" and not broker_entries["log.retention.ms"].is_read_only
        assert broker_entries["num.partitions"].is_read_only
        assert alter_cluster_default(broker, "num.partitions", "4") == ErrorCode.INVALID_CONFIG
    finally:
        assert alter_cluster_default(broker, "log.retention.ms", None) == ErrorCode.NONE
        reset = ConfigResource(ResourceType.BROKER, "1", incremental_configs=[
            ConfigEntry("log.retention.ms", None, incremental_operation=AlterConfigOpType.DELETE)])
        admin.incremental_alter_configs([reset])[reset].result(TIMEOUT_S)
    assert described(admin, ConfigResource(ResourceType.TOPIC, "defaulted"))["retention.ms"].value == "604800000"


def test_kafka_python_and_aiokafka_admins_alter_and_describe_topic_configs(broker):
    from aiokafka.admin import AIOKafkaAdminClient
    from aiokafka.admin.config_resource import ConfigResource as AioResource
    from aiokafka.admin.config_resource import ConfigResourceType as AioType
    from kafka.admin import ConfigResource, ConfigResourceType, KafkaAdminClient, NewTopic
    admin = KafkaAdminClient(bootstrap_servers=broker.bootstrap)
    admin.create_topics([NewTopic("py-configs", 1, 1)])
    admin.alter_configs([ConfigResource(ConfigResourceType.TOPIC, "py-configs", configs={"retention.ms": "120000"})])
    described_py = admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, "py-configs")])
    admin.close()
    text = repr(described_py)
    assert "retention.ms" in text and "120000" in text

    async def aio() -> str:
        client = AIOKafkaAdminClient(bootstrap_servers=broker.bootstrap)
        await client.start()
        try:
            await client.alter_configs([AioResource(AioType.TOPIC, "py-configs", configs={"segment.ms": "7200000"})])
            return repr(await client.describe_configs([AioResource(AioType.TOPIC, "py-configs")]))
        finally:
            await client.close()
    text = asyncio.run(aio())
    assert "7200000" in text and "120000" not in text     # AlterConfigs replaces the whole set


def test_raftka_topics_alter_sets_and_removes_configs(broker):
    from confluent_kafka.admin import ConfigResource, ResourceType
    admin = confluent_admin(broker)
    create_topic(admin, "cli-altered")

    def raftka(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(raftka_command("topics", "alter", "cli-altered", "--bootstrap", broker.bootstrap, *args),
                              capture_output=True, text=True, timeout=TIMEOUT_S)
    done = raftka("--config", "retention.ms=3600000", "--config", "max.message.bytes=65536")
    assert done.returncode == 0 and "altered topic cli-altered" in done.stdout, done.stderr
    entries = described(admin, ConfigResource(ResourceType.TOPIC, "cli-altered"))
    assert (entries["retention.ms"].value, entries["max.message.bytes"].value) == ("3600000", "65536")
    assert raftka("--delete-config", "retention.ms").returncode == 0
    assert described(admin, ConfigResource(ResourceType.TOPIC, "cli-altered"))["retention.ms"].value == "604800000"
    refused = raftka("--config", "cleanup.policy=shred")
    assert refused.returncode == 1 and "cleanup.policy takes delete, compact" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1


def test_min_insync_replicas_above_the_isr_refuses_acks_all_with_not_enough_replicas_but_not_acks_1(broker):
    from confluent_kafka import KafkaError, Producer
    from confluent_kafka.admin import ConfigResource, ResourceType
    admin = confluent_admin(broker)
    create_topic(admin, "min-isr", **{"min.insync.replicas": "2"})      # RF 1: an ISR of one
    assert described(admin, ConfigResource(ResourceType.TOPIC, "min-isr"))["min.insync.replicas"].value == "2"
    assert produce_error(("127.0.0.1", broker.port), "min-isr", acks=-1) == ErrorCode.NOT_ENOUGH_REPLICAS == 19
    assert produce_error(("127.0.0.1", broker.port), "min-isr", acks=1) == ErrorCode.NONE
    errors = []
    producer = Producer({"bootstrap.servers": broker.bootstrap, "acks": "all", "retries": 0,
                         "enable.idempotence": False, "message.timeout.ms": 10_000})
    producer.produce("min-isr", value=b"refused", on_delivery=lambda error, _m: errors.append(error))
    producer.flush(TIMEOUT_S)
    assert [e.code() for e in errors] == [KafkaError.NOT_ENOUGH_REPLICAS]


def test_a_cluster_wide_min_insync_replicas_applies_to_topics_without_their_own(broker):
    admin = confluent_admin(broker)
    create_topic(admin, "min-isr-default")
    assert alter_cluster_default(broker, "min.insync.replicas", "2") == ErrorCode.NONE
    try:
        deadline = time.monotonic() + TIMEOUT_S     # replicas are reconfigured on the next duty round
        while produce_error(("127.0.0.1", broker.port), "min-isr-default", acks=-1) != ErrorCode.NOT_ENOUGH_REPLICAS:
            assert time.monotonic() < deadline, "the cluster-wide min.insync.replicas never applied"
            time.sleep(0.1)
    finally:
        assert alter_cluster_default(broker, "min.insync.replicas", None) == ErrorCode.NONE
