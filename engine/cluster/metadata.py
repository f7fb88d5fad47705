"""Cluster metadata: brokers, topics, each partition's replica set and Raft group,
and the current leader, leader epoch and ISR of every partition.

ClusterState is the deterministic state machine of the metadata Raft group
(group 0, every broker a member): commands are built by the functions below
and encoded with raft.codec (no pickle), applied in commit order on every
broker, and answer an ErrorCode. Any broker can then answer Kafka's Metadata
from its own copy. Leaders report themselves (`record_leader`); a report
with an older epoch than the one held, or for a partition group that no
longer exists (the topic was deleted and recreated), changes nothing.

Some commands a broker issues about itself (`speaks_for`): registering,
taking a producer id block, reporting its leadership. A broker forwarding
one to the metadata leader may only name its own id (the controller checks
it against the peer network's authenticated id); the others (topics,
configs, users, ACLs) are cluster-wide, forwarded for the broker's clients.

Partition limits: a topic change carries the proposing controller's
`max_partitions_per_topic` and `max_partitions_per_broker` (PartitionLimits),
and the state machine checks them at apply against the state it holds then,
so two creates that each fit alone cannot both commit past a limit, and every
replica refuses alike whatever its own config says.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

from raftka.cluster import topic_configs
from raftka.config import Config
from raftka.errors import ErrorCode, InvalidPartitionsError, RaftkaError
from raftka.storage.log_manager import validate_topic_name
from raftka.raft import codec
from raftka.security.state import COMMANDS as SECURITY_COMMANDS, SecurityState

METADATA_GROUP_ID = 0
SNAPSHOT_VERSION = 2          # 2 added the dynamic broker configs; 1 is still read
RESOURCE_TOPIC, RESOURCE_BROKER = 2, 4   # Kafka's config resource types


@dataclass(frozen=True)
class BrokerInfo:
    node_id: int
    host: str
    port: int
    rack: str | None = None


@dataclass
class PartitionInfo:
    group_id: int                  # the partition's Raft group, unique in the cluster's lifetime
    replicas: list[int]
    leader: int = -1               # -1: none reported yet
    leader_epoch: int = -1
    isr: list[int] = field(default_factory=list)


@dataclass
class TopicInfo:
    name: str
    topic_id: bytes                # 16 bytes (Kafka's topic UUID)
    partitions: list[PartitionInfo]
    configs: dict[str, str]


@dataclass(frozen=True)
class PartitionLimits:
    """The partition limits a topic change is checked against at apply (see the
    module docstring); a command proposed before they were carried gets the defaults."""
    per_topic: int = Config.max_partitions_per_topic
    per_broker: int = Config.max_partitions_per_broker

    @classmethod
    def of(cls, config: Config) -> "PartitionLimits":
        return cls(config.max_partitions_per_topic, config.max_partitions_per_broker)

    def encode(self) -> dict[str, int]:
        return {"max_partitions_per_topic": self.per_topic, "max_partitions_per_broker": self.per_broker}

    @classmethod
    def decode(cls, command: dict) -> "PartitionLimits":
        default = cls()
        limits = cls(_int(command.get("max_partitions_per_topic", default.per_topic)),
                     _int(command.get("max_partitions_per_broker", default.per_broker)))
        if limits.per_topic <= 0 or limits.per_broker <= 0:
            raise ValueError(f"partition limits must be positive, got {limits}")
        return limits


def register_broker(node_id: int, host: str, port: int, rack: str | None = None) -> bytes:
    return codec.encode({"op": "register_broker", "id": node_id, "host": host, "port": port, "rack": rack})


def create_topic(name: str, topic_id: bytes, replicas: list[list[int]], configs: dict[str, str],
                 limits: PartitionLimits = PartitionLimits()) -> bytes:
    return codec.encode({"op": "create_topic", "name": name, "topic_id": topic_id,
                         "replicas": replicas, "configs": configs, **limits.encode()})


def delete_topic(name: str) -> bytes:
    return codec.encode({"op": "delete_topic", "name": name})


def create_partitions(name: str, new_replicas: list[list[int]], limits: PartitionLimits = PartitionLimits()) -> bytes:
    return codec.encode({"op": "create_partitions", "name": name, "replicas": new_replicas, **limits.encode()})


def record_leader(name: str, partition: int, group_id: int, leader: int, epoch: int, isr: list[int]) -> bytes:
    return codec.encode({"op": "record_leader", "name": name, "partition": partition, "group": group_id,
                         "leader": leader, "epoch": epoch, "isr": isr})


def alter_configs(resource_type: int, name: str, values: dict[str, str], deleted: list[str],
                  replace: bool = False) -> bytes:
    """Set `values` and remove `deleted` from a topic's configs or a broker
    resource's dynamic configs ("" the cluster-wide default, "<id>" one
    broker); `replace` drops every config not in `values` first (AlterConfigs)."""
    return codec.encode({"op": "alter_configs", "type": resource_type, "name": name, "set": values,
                         "delete": deleted, "replace": replace})


def allocate_producer_ids(node_id: int, count: int) -> bytes:
    return codec.encode({"op": "allocate_producer_ids", "id": node_id, "count": count})


# the commands a broker issues about itself, and the field holding its id
_SPEAKER_FIELDS = {"register_broker": "id", "allocate_producer_ids": "id", "record_leader": "leader"}


def speaks_for(payload: bytes) -> int | None:
    """The broker a command is issued by and about, None for a cluster-wide
    command. CodecError, KeyError or TypeError when it is malformed."""
    command = codec.decode(payload)
    if not isinstance(command, dict):
        raise TypeError(f"a metadata command is a dict, got {type(command).__name__}")
    field_name = _SPEAKER_FIELDS.get(command["op"])
    return None if field_name is None else _int(command[field_name])


def assign_replicas(broker_ids: Iterable[int], partitions: int, replication_factor: int,
                    first_partition: int = 0, start: int = 0) -> list[list[int]]:
    """Kafka's round robin: partition p's replicas are the `replication_factor`
    brokers from position start + p, so leaders (the first replica) spread."""
    brokers = sorted(broker_ids)
    n = len(brokers)
    return [[brokers[(start + p + k) % n] for k in range(replication_factor)]
            for p in range(first_partition, first_partition + partitions)]


class ClusterState:
    """The metadata state machine; see the module docstring."""

    def __init__(self) -> None:
        self.brokers: dict[int, BrokerInfo] = {}
        self.topics: dict[str, TopicInfo] = {}
        self.next_group_id = METADATA_GROUP_ID + 1
        self.next_producer_id = 0
        self.producer_id_blocks: dict[int, tuple[int, int]] = {}   # broker -> [first, end) it hands out
        self.security = SecurityState()    # users' SCRAM credentials and ACLs
        # dynamic broker configs by resource name: "" the cluster-wide default, "<id>" one broker
        self.broker_configs: dict[str, dict[str, str]] = {}
        self.version = 0   # bumped by every apply that changed something
        self._listeners: list[Callable[[], None]] = []

    def on_change(self, listener: Callable[[], None]) -> None:
        """Call `listener()` after every apply that changed the state."""
        self._listeners.append(listener)

    def replica_counts(self) -> dict[int, int]:
        """Broker -> the partition replicas assigned to it."""
        counts: dict[int, int] = {}
        for topic in self.topics.values():
            for info in topic.partitions:
                for broker in info.replicas:
                    counts[broker] = counts.get(broker, 0) + 1
        return counts

    def check_partition_limits(self, name: str, new_replicas: list[list[int]], limits: PartitionLimits) -> None:
        """InvalidPartitionsError if adding `new_replicas` to topic `name` (new or
        existing) would give it more than `limits.per_topic` partitions or put
        more than `limits.per_broker` partition replicas on some broker."""
        topic = self.topics.get(name)
        total = len(new_replicas) + (len(topic.partitions) if topic is not None else 0)
        if total > limits.per_topic:
            raise InvalidPartitionsError(f"topic {name!r} would have {total} partitions, more than "
                                         f"max_partitions_per_topic={limits.per_topic}")
        load, added = self.replica_counts(), {broker for replica_set in new_replicas for broker in replica_set}
        for replica_set in new_replicas:
            for broker in replica_set:
                load[broker] = load.get(broker, 0) + 1
        over = sorted(broker for broker in added if load[broker] > limits.per_broker)
        if over:
            raise InvalidPartitionsError(f"brokers {over} would hold more than max_partitions_per_broker="
                                         f"{limits.per_broker} partition replicas")

    def partition(self, name: str, partition: int) -> PartitionInfo | None:
        topic = self.topics.get(name)
        if topic is None or not 0 <= partition < len(topic.partitions):
            return None
        return topic.partitions[partition]

    # ---- applying commands ---------------------------------------------

    def apply(self, payload: bytes | memoryview) -> int:
        try:
            command = codec.decode(payload)
            handler = _HANDLERS[command["op"]]
            outcome = handler(self, command)
        except RaftkaError as error:
            return int(error.error_code)
        except (codec.CodecError, KeyError, TypeError, ValueError):
            return int(ErrorCode.INVALID_REQUEST)   # every replica refuses it alike
        if outcome == ErrorCode.NONE:
            self._changed()
        return int(outcome)

    def _changed(self) -> None:
        self.version += 1
        for listener in self._listeners:
            listener()

    def _register_broker(self, c: dict) -> ErrorCode:
        info = BrokerInfo(_int(c["id"]), _str(c["host"]), _int(c["port"]),
                          None if c.get("rack") is None else _str(c["rack"]))
        if self.brokers.get(info.node_id) == info:
            return ErrorCode.NONE
        self.brokers[info.node_id] = info
        return ErrorCode.NONE

    def _create_topic(self, c: dict) -> ErrorCode:
        name = _str(c["name"])
        validate_topic_name(name)
        if name in self.topics:
            return ErrorCode.TOPIC_ALREADY_EXISTS
        replicas = self._valid_assignment(c["replicas"])
        self.check_partition_limits(name, replicas, PartitionLimits.decode(c))
        configs = {_str(k): _str(v) for k, v in dict(c["configs"]).items()}
        topic_configs.validate(configs)    # InvalidConfigError: a config no log can open never enters the state
        topic_id = c["topic_id"]
        if not isinstance(topic_id, bytes) or len(topic_id) != 16:
            return ErrorCode.INVALID_REQUEST
        self.topics[name] = TopicInfo(name, topic_id, self._new_partitions(replicas), configs)
        return ErrorCode.NONE

    def _delete_topic(self, c: dict) -> ErrorCode:
        if self.topics.pop(_str(c["name"]), None) is None:
            return ErrorCode.UNKNOWN_TOPIC_OR_PARTITION
        return ErrorCode.NONE

    def _create_partitions(self, c: dict) -> ErrorCode:
        topic = self.topics.get(_str(c["name"]))
        if topic is None:
            return ErrorCode.UNKNOWN_TOPIC_OR_PARTITION
        replicas = self._valid_assignment(c["replicas"])
        self.check_partition_limits(topic.name, replicas, PartitionLimits.decode(c))
        topic.partitions += self._new_partitions(replicas)
        return ErrorCode.NONE

    def _record_leader(self, c: dict) -> ErrorCode:
        info = self.partition(_str(c["name"]), _int(c["partition"]))
        if info is None or info.group_id != _int(c["group"]):
            return ErrorCode.UNKNOWN_TOPIC_OR_PARTITION
        leader, epoch = _int(c["leader"]), _int(c["epoch"])
        isr = sorted(_int(i) for i in c["isr"])
        if epoch < info.leader_epoch or leader not in info.replicas or not set(isr) <= set(info.replicas):
            return ErrorCode.INVALID_REQUEST   # a stale or foreign report
        if (leader, epoch, isr) == (info.leader, info.leader_epoch, info.isr):
            return ErrorCode.NONE
        info.leader, info.leader_epoch, info.isr = leader, epoch, isr
        return ErrorCode.NONE

    def _alter_configs(self, c: dict) -> ErrorCode:
        resource_type, name = _int(c["type"]), _str(c["name"])
        values = {_str(k): _str(v) for k, v in dict(c["set"]).items()}
        deleted = [_str(k) for k in c["delete"]]
        if resource_type == RESOURCE_TOPIC:
            topic = self.topics.get(name)
            if topic is None:
                return ErrorCode.UNKNOWN_TOPIC_OR_PARTITION
            current, names = topic.configs, topic_configs.TOPIC_CONFIGS
        elif resource_type == RESOURCE_BROKER and (name == "" or name.isdigit()):
            current, names = self.broker_configs.get(name, {}), topic_configs.DYNAMIC_BROKER_CONFIGS
        else:
            return ErrorCode.INVALID_REQUEST
        updated = {} if c["replace"] else {k: v for k, v in current.items() if k not in deleted}
        updated.update(values)
        topic_configs.validate(updated, names)   # InvalidConfigError: refused alike everywhere
        if resource_type == RESOURCE_TOPIC:
            self.topics[name].configs = updated
        elif updated:
            self.broker_configs[name] = updated
        else:
            self.broker_configs.pop(name, None)
        return ErrorCode.NONE

    def _allocate_producer_ids(self, c: dict) -> ErrorCode:
        node_id, count = _int(c["id"]), _int(c["count"])
        if node_id not in self.brokers or not 0 < count <= 1_000_000:
            return ErrorCode.INVALID_REQUEST
        self.producer_id_blocks[node_id] = (self.next_producer_id, self.next_producer_id + count)
        self.next_producer_id += count
        return ErrorCode.NONE

    def _valid_assignment(self, replicas: Any) -> list[list[int]]:
        if not isinstance(replicas, list) or not replicas:
            raise _Refused(ErrorCode.INVALID_PARTITIONS)
        out = []
        for replica_set in replicas:
            ids = [_int(i) for i in replica_set]
            if not ids or len(set(ids)) != len(ids) or not set(ids) <= set(self.brokers):
                raise _Refused(ErrorCode.INVALID_REPLICATION_FACTOR)
            out.append(ids)
        return out

    def _new_partitions(self, replicas: list[list[int]]) -> list[PartitionInfo]:
        first = self.next_group_id
        self.next_group_id += len(replicas)
        return [PartitionInfo(first + i, ids) for i, ids in enumerate(replicas)]

    # ---- snapshots ---------------------------------------------------------

    def snapshot(self) -> bytes:
        return codec.encode({
            "version": SNAPSHOT_VERSION, "next_group_id": self.next_group_id,
            "next_producer_id": self.next_producer_id,
            "producer_id_blocks": [[b, first, end] for b, (first, end) in self.producer_id_blocks.items()],
            "brokers": [[b.node_id, b.host, b.port, b.rack] for b in self.brokers.values()],
            "broker_configs": self.broker_configs,
            "topics": [[t.name, t.topic_id, t.configs,
                        [[p.group_id, p.replicas, p.leader, p.leader_epoch, p.isr] for p in t.partitions]]
                       for t in self.topics.values()],
            "security": self.security.snapshot_data()})

    def restore(self, snapshot: bytes) -> None:
        data = codec.decode(snapshot)
        if data.get("version") not in (1, SNAPSHOT_VERSION):
            raise ValueError(f"metadata snapshot version {data.get('version')!r} is not 1 or {SNAPSHOT_VERSION}")
        self.next_group_id = data["next_group_id"]
        self.next_producer_id = data["next_producer_id"]
        self.producer_id_blocks = {b: (first, end) for b, first, end in data["producer_id_blocks"]}
        self.brokers = {b[0]: BrokerInfo(*b) for b in data["brokers"]}
        self.broker_configs = {name: dict(configs) for name, configs in data.get("broker_configs", {}).items()}
        self.topics = {name: TopicInfo(name, topic_id, [PartitionInfo(*p) for p in partitions], dict(configs))
                       for name, topic_id, configs, partitions in data["topics"]}
        self.security.restore_data(data.get("security"))
        self._changed()


class _Refused(RaftkaError):
    def __init__(self, code: ErrorCode) -> None:
        super().__init__(code.name)
        self.error_code = code


_HANDLERS: dict[str, Callable[[ClusterState, dict], ErrorCode]] = {
    "register_broker": ClusterState._register_broker,
    "create_topic": ClusterState._create_topic,
    "delete_topic": ClusterState._delete_topic,
    "create_partitions": ClusterState._create_partitions,
    "record_leader": ClusterState._record_leader,
    "allocate_producer_ids": ClusterState._allocate_producer_ids,
    "alter_configs": ClusterState._alter_configs,
    **{op: (lambda state, c, apply=apply: apply(state.security, c)) for op, apply in SECURITY_COMMANDS.items()},
}


def _int(value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"expected an integer, got {value!r}")
    return value


def _str(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError(f"expected a string, got {value!r}")
    return value
