"""Configuration: one dataclass holds every setting Raftka reads."""
from __future__ import annotations

import dataclasses
import ipaddress
import os
import tomllib
from pathlib import Path
from typing import Literal

FsyncPolicy = Literal["never", "interval", "always"]
FSYNC_POLICIES: tuple[str, ...] = ("never", "interval", "always")

MIB = 1024 * 1024
GIB = 1024 * MIB
DAY_MS = 24 * 3600 * 1000

# the cluster secret keys every peer link (raft/handshake.py); a shorter one is refused
SECRET_BITS_MIN = 128


# the internal topic of consumer group offsets and metadata (Kafka's name); its
# size and RF are the offsets_topic_* settings below
OFFSETS_TOPIC = "__consumer_offsets"


class ConfigError(ValueError):
    """A configuration file or RAFTKA_* variable that cannot be used."""


class WeakSecretError(ConfigError):
    """cluster_secret is shorter than SECRET_BITS_MIN bits (see secret_strength_bits)."""


def is_loopback(host: str) -> bool:
    """`host` is this machine only: localhost or a loopback address (a name
    that has to be resolved is not)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def secret_strength_bits(secret: str) -> int:
    """What a cluster secret counts for, from its length alone (its entropy
    cannot be measured): a secret of hex digits only counts 4 bits a digit
    (`secrets.token_hex(16)`, `openssl rand -hex 16`: 32 digits, 128 bits);
    any other text counts 6 bits a character, as if it were base64
    (`secrets.token_urlsafe(16)`: 22 characters; `openssl rand -base64 16`: 24).
    So 16 hex digits (64 bits) or a 16-letter word are refused."""
    if secret and all(c in "0123456789abcdefABCDEF" for c in secret):
        return 4 * len(secret)
    return 6 * len(secret)


@dataclasses.dataclass(frozen=True)
class Config:
    """Every Raftka setting, with Kafka's defaults where Kafka has one.

    fsync policies (what a successful append, or an acks=all produce, guarantees):
      always    (default) on disk: embedded, the segment is fdatasync'd before
                append returns; replicated, every replica fdatasyncs its Raft
                journal (group commit, off the event loop) before it
                acknowledges an entry, so a committed append survives a power
                loss of a minority, and of every node at once.
      interval  acknowledged from the page cache; segments and the index are
                fsynced at most `fsync_interval_ms` after an append: a power
                loss loses at most that window.
      never     acknowledged from the OS page cache (Kafka's default:
                replication is the durability mechanism); survives a process
                crash, not a power loss of a majority.
    """

    data_dir: Path = Path("./raftka-data")
    # segment.bytes / log.roll.ms
    segment_bytes: int = GIB
    segment_ms: int = 7 * DAY_MS
    # retention.bytes (-1 = unlimited) / retention.ms (-1 = unlimited)
    retention_bytes: int = -1
    retention_ms: int = 7 * DAY_MS
    # index.interval.bytes: one sparse index entry per this many log bytes.
    # Kafka's 4096 suits its mmap'd index arrays; an LMDB entry costs ~1 us to
    # commit, while walking 64 KiB of batch headers in C to find an offset
    # costs well under that, so we index 16x more sparsely.
    index_interval_bytes: int = 64 * 1024
    # message.max.bytes: the largest record batch accepted, header included
    max_batch_bytes: int = 1024 * 1024 + 12
    # log.cleanup.policy: delete, compact, or compact,delete (the log cleaner,
    # engine/storage/cleaner.py); compression.type, log.message.timestamp.type:
    # only Kafka's defaults are implemented (see engine/cluster/topic_configs.py)
    cleanup_policy: str = "delete"
    compression_type: str = "producer"
    message_timestamp_type: str = "CreateTime"
    # min.insync.replicas: an acks=all produce needs an ISR this large
    # (NOT_ENOUGH_REPLICAS otherwise)
    min_insync_replicas: int = 1
    # log compaction (cleanup.policy=compact): a record younger than
    # min.compaction.lag.ms is not cleaned; a tombstone is kept for
    # delete.retention.ms after its timestamp; the cleaner runs when the dirty
    # share of the cleanable log reaches min.cleanable.dirty.ratio, checked
    # every log.cleaner.backoff.ms, reading at most
    # log.cleaner.io.max.bytes.per.second (0: unthrottled), with at most
    # log.cleaner.dedupe.buffer.size bytes of key map (24 bytes a distinct key)
    min_compaction_lag_ms: int = 0
    delete_retention_ms: int = DAY_MS
    min_cleanable_dirty_ratio: float = 0.5
    log_cleaner_backoff_ms: int = 15_000
    log_cleaner_io_max_bytes_per_second: int = 100 * MIB
    log_cleaner_dedupe_buffer_size: int = 128 * MIB
    fsync: FsyncPolicy = "always"
    fsync_interval_ms: int = 1000
    # LMDB index writes are grouped: committed at most this often, or when
    # this many entries are pending (recovery rebuilds anything uncommitted)
    index_commit_interval_ms: int = 1000
    index_commit_max_pending: int = 65536
    lmdb_map_size_bytes: int = 16 * GIB
    default_partitions: int = 1
    # auto.create.topics.enable: Metadata and Produce for an unknown topic create it
    auto_create_topics: bool = True
    # socket.request.max.bytes: a larger request closes its connection
    max_request_bytes: int = 100 * MIB
    cluster_id: str = "raftka"
    # the Kafka listener, and the address clients are told to use (empty/0: the listener's)
    host: str = "127.0.0.1"
    port: int = 9092
    advertised_host: str = ""
    advertised_port: int = 0
    # partition replicas one broker may hold (each costs descriptors and a Raft group),
    # partitions one topic may have, and partitions one CreateTopics or CreatePartitions
    # request may add (its topics together): INVALID_PARTITIONS past any. The controller
    # that proposes a topic change puts its per-broker and per-topic limits in the
    # command, so every replica refuses alike (engine/cluster/metadata.py)
    max_partitions_per_broker: int = 10_000
    max_partitions_per_topic: int = 100_000
    max_partitions_per_request: int = 10_000
    # fetch.max.bytes: the most record bytes one Fetch response carries, whatever
    # the client asks (its first batch always goes, as Kafka's does)
    fetch_max_bytes: int = 55 * MIB
    # max.connections / max.connections.per.ip: a connection past either is
    # closed as soon as it is accepted (the per-IP limit exempts no address)
    max_connections: int = 10_000
    max_connections_per_ip: int = 1000
    # connections.max.idle.ms: a connection with no request in flight and no
    # bytes either way for this long is closed
    connections_max_idle_ms: int = 600_000
    # queued.max.request.bytes: request bytes being received or handled, all
    # connections together; a frame that does not fit waits before its body is read
    queued_max_request_bytes: int = 512 * MIB
    # message.timestamp.before.max.ms / after.max.ms: how far a produced
    # batch's timestamps may lie behind / ahead of the broker's clock
    # (INVALID_TIMESTAMP past either; Kafka 4.0's defaults)
    message_timestamp_before_max_ms: int = 2**63 - 1
    message_timestamp_after_max_ms: int = 3_600_000
    # TLS on the Kafka listener (PEM files; empty: plaintext). With tls_ca,
    # clients must present a certificate signed by it (mutual TLS)
    tls_cert: str = ""
    tls_key: str = ""
    tls_ca: str = ""
    # SASL on the Kafka listener: a comma-separated list of SCRAM-SHA-512,
    # SCRAM-SHA-256, PLAIN (empty: off, every client trusted: for a trusted
    # network only). PLAIN sends the password itself: offered only over TLS
    # unless sasl_plain_without_tls
    sasl_mechanisms: str = ""
    sasl_plain_without_tls: bool = False
    # super.users: principals ("User:alice,User:bob") no ACL restricts
    super_users: str = ""
    # Prometheus metrics over HTTP on metrics_host:metrics_port (0: off)
    metrics_port: int = 0
    metrics_host: str = "127.0.0.1"
    # ---- cluster (a single node needs none of these) ----
    # broker.id / node.id
    node_id: int = 1
    # the other brokers' peer (Raft) addresses: ((node id, host, port), ...)
    peers: tuple[tuple[int, str, int], ...] = ()
    peer_host: str = "127.0.0.1"
    peer_port: int = 0
    # shared by every broker; peers authenticate with it (HMAC challenge) and
    # key every frame with it; at least SECRET_BITS_MIN bits (secret_strength_bits)
    cluster_secret: str = dataclasses.field(default="", repr=False)   # a secret: kept out of reprs and logs
    # TLS 1.3 between brokers (PEM files, raft/peer_tls.py): this broker's certificate
    # (CN=raftka-node-<node_id>), its key, and the CA every broker's certificate is
    # signed by. Required when any peer address (peer_host, peers) is not loopback
    peer_tls_cert: str = ""
    peer_tls_key: str = ""
    peer_tls_ca: str = ""
    # default.replication.factor, capped at the number of brokers
    default_replication_factor: int = 1
    # replica.lag.time.max.ms: a follower out of the ISR after this long behind
    replica_lag_time_max_ms: int = 10_000
    # auto.leader.rebalance.enable: a partition's leader hands its leadership to
    # the preferred replica (the first) when that one is caught up, checked every
    # leader.imbalance.check.interval.seconds and soon after leadership moved or
    # the preferred replica rejoined, for a broker whose share of preferred
    # partitions led by another is above leader.imbalance.per.broker.percentage
    # (engine/cluster/leader_balance.py)
    auto_leader_rebalance_enable: bool = True
    leader_imbalance_check_interval_seconds: int = 300
    leader_imbalance_per_broker_percentage: int = 10
    # ---- consumer groups ----
    # offsets.topic.num.partitions / offsets.topic.replication.factor (capped
    # at the number of brokers): the internal __consumer_offsets topic
    offsets_topic_partitions: int = 10
    offsets_topic_replication_factor: int = 3
    # offsets.topic.segment.bytes: its segments, small so the cleaner keeps it small
    offsets_topic_segment_bytes: int = 100 * MIB
    # group.initial.rebalance.delay.ms: a new group waits this long (extended
    # by each member joining meanwhile) so its first members join one generation
    group_initial_rebalance_delay_ms: int = 3000
    # group.min/max.session.timeout.ms: the session timeouts members may ask for
    group_min_session_timeout_ms: int = 6000
    group_max_session_timeout_ms: int = 1_800_000
    # group.max.size: members per group
    group_max_size: int = 1000
    # offset.metadata.max.bytes: the metadata string of a committed offset
    offset_metadata_max_bytes: int = 4096
    # producer.id.expiration.ms: an idempotent producer id idle this long, by
    # the log's own timestamps, is forgotten (its next batch starts afresh)
    producer_id_expiration_ms: int = 24 * 3600 * 1000
    # offsets.retention.minutes: an empty group's committed offsets expire this
    # long after it became empty (engine/groups/offset_expiry.py), checked every
    # offsets.retention.check.interval.ms by each group's coordinator
    offsets_retention_minutes: int = 7 * 24 * 60
    offsets_retention_check_interval_ms: int = 600_000

    def __post_init__(self) -> None:
        if self.fsync not in FSYNC_POLICIES:
            raise ValueError(f"fsync must be one of {FSYNC_POLICIES}, got {self.fsync!r}")
        positive = ("segment_bytes", "index_interval_bytes", "max_batch_bytes",
                    "fsync_interval_ms", "index_commit_interval_ms",
                    "index_commit_max_pending", "lmdb_map_size_bytes", "default_partitions",
                    "default_replication_factor", "replica_lag_time_max_ms", "max_request_bytes",
                    "leader_imbalance_check_interval_seconds",
                    "offsets_topic_partitions", "offsets_topic_replication_factor", "group_min_session_timeout_ms",
                    "group_max_session_timeout_ms", "group_max_size", "producer_id_expiration_ms",
                    "offsets_retention_minutes", "offsets_retention_check_interval_ms", "max_connections",
                    "max_connections_per_ip", "max_partitions_per_broker", "max_partitions_per_topic",
                    "max_partitions_per_request", "fetch_max_bytes",
                    "connections_max_idle_ms", "queued_max_request_bytes", "message_timestamp_before_max_ms",
                    "message_timestamp_after_max_ms", "min_insync_replicas", "log_cleaner_backoff_ms",
                    "log_cleaner_dedupe_buffer_size", "offsets_topic_segment_bytes")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        object.__setattr__(self, "data_dir", Path(self.data_dir))
        object.__setattr__(self, "peers", tuple(sorted((int(i), str(h), int(p)) for i, h, p in self.peers)))
        if not 0 <= self.leader_imbalance_per_broker_percentage <= 100:
            raise ValueError(f"leader_imbalance_per_broker_percentage must be in [0, 100], "
                             f"got {self.leader_imbalance_per_broker_percentage}")
        if self.log_cleaner_io_max_bytes_per_second < 0:
            raise ValueError("log_cleaner_io_max_bytes_per_second must not be negative (0: unthrottled)")
        if not 0.0 <= self.min_cleanable_dirty_ratio <= 1.0:
            raise ValueError(f"min_cleanable_dirty_ratio must be in [0, 1], got {self.min_cleanable_dirty_ratio}")
        if self.group_initial_rebalance_delay_ms < 0:
            raise ValueError(f"group_initial_rebalance_delay_ms must not be negative, got {self.group_initial_rebalance_delay_ms}")
        if self.group_min_session_timeout_ms > self.group_max_session_timeout_ms:
            raise ValueError("group_min_session_timeout_ms is above group_max_session_timeout_ms")
        if self.queued_max_request_bytes < self.max_request_bytes:
            raise ValueError(f"queued_max_request_bytes ({self.queued_max_request_bytes}) is below "
                             f"max_request_bytes ({self.max_request_bytes}): such a request could never be read")
        self._check_partition_limits()
        if (self.tls_key or self.tls_ca) and not self.tls_cert:
            raise ValueError("tls_key and tls_ca need tls_cert (the listener's certificate)")
        if any(peer_id == self.node_id for peer_id, _, _ in self.peers):
            raise ValueError(f"node {self.node_id} lists itself among its peers")
        if self.peers and not self.cluster_secret:
            raise ValueError("a cluster with peers needs cluster_secret")
        if self.peers and secret_strength_bits(self.cluster_secret) < SECRET_BITS_MIN:
            raise WeakSecretError(
                f"cluster_secret counts {secret_strength_bits(self.cluster_secret)} bits, at least "
                f"{SECRET_BITS_MIN} are needed: 32 hex digits or 22 other characters, e.g. "
                f"`python3 -c 'import secrets; print(secrets.token_hex(16))'`")
        if self.peers and not self.peer_port:
            raise ValueError("a cluster with peers needs peer_port (the peers dial it)")
        if (self.peer_tls_cert or self.peer_tls_key or self.peer_tls_ca) and not (self.peer_tls_cert and self.peer_tls_ca):
            raise ValueError("peer TLS needs peer_tls_cert and peer_tls_ca (peer_tls_key if not in the cert file)")
        remote = [host for host in (self.peer_host, *(h for _, h, _ in self.peers)) if not is_loopback(host)]
        if self.peers and remote and not self.peer_tls_cert:
            raise ValueError(f"peer addresses {sorted(set(remote))} are not loopback: set peer_tls_cert, "
                             "peer_tls_key and peer_tls_ca (the peer traffic is otherwise readable on the network)")

    def _check_partition_limits(self) -> None:
        """The topics a broker creates by itself must fit the partition limits:
        a default-sized topic any request or auto-creation, the offsets topic
        one broker and one topic."""
        for name, limit in (("max_partitions_per_topic", self.max_partitions_per_topic),
                            ("max_partitions_per_broker", self.max_partitions_per_broker)):
            for sized in ("default_partitions", "offsets_topic_partitions"):
                if getattr(self, sized) > limit:
                    raise ValueError(f"{sized} ({getattr(self, sized)}) is above {name} ({limit})")
        if self.default_partitions > self.max_partitions_per_request:
            raise ValueError(f"default_partitions ({self.default_partitions}) is above max_partitions_per_request "
                             f"({self.max_partitions_per_request}): no topic of the default size could be created")

    @property
    def advertised_address(self) -> tuple[str, int]:
        return self.advertised_host or self.host, self.advertised_port or self.port

    @property
    def broker_ids(self) -> list[int]:
        """Every broker of the cluster, this one included."""
        return sorted([self.node_id, *(peer_id for peer_id, _, _ in self.peers)])

    def replace(self, **changes: object) -> "Config":
        """A copy with some settings changed."""
        return dataclasses.replace(self, **changes)


ENV_PREFIX = "RAFTKA_"


def parse_peers(text: str) -> tuple[tuple[int, str, int], ...]:
    """`2=host:port,3=host:port` -> ((2, host, port), (3, host, port))."""
    peers = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        try:
            node, address = item.split("=", 1)
            host, port = address.rsplit(":", 1)
            peers.append((int(node), host, int(port)))
        except ValueError:
            raise ConfigError(f"peer {item!r} is not id=host:port") from None
    return tuple(peers)


def load_config(path: Path | None = None, environ: dict[str, str] | None = None, **overrides: object) -> Config:
    """Config from a TOML file (keys are Config's field names; `peers` is a list
    of {id, host, port} tables or an "id=host:port,..." string), then RAFTKA_*
    environment variables (RAFTKA_NODE_ID, RAFTKA_PEERS, ...), then `overrides`."""
    values: dict[str, object] = {}
    known = {f.name: f for f in dataclasses.fields(Config)}
    if path is not None:
        try:
            data = tomllib.loads(Path(path).read_text())
        except (OSError, tomllib.TOMLDecodeError) as error:
            raise ConfigError(f"{path}: {error}") from None
        for key, value in data.items():
            if key not in known:
                raise ConfigError(f"{path}: unknown setting {key!r}")
            if key == "peers" and isinstance(value, list):
                value = tuple((int(p["id"]), str(p["host"]), int(p["port"])) for p in value)
            values[key] = value
    for name, raw in (os.environ if environ is None else environ).items():
        if not name.startswith(ENV_PREFIX):
            continue
        key = name[len(ENV_PREFIX):].lower()
        if key not in known:
            continue   # RAFTKA_CLUSTER_SECRET style variables of other tools are not ours to refuse
        values[key] = _from_text(key, known[key].type, raw)
    values.update(overrides)
    if isinstance(values.get("peers"), str):
        values["peers"] = parse_peers(values["peers"])  # type: ignore[arg-type]
    try:
        return Config(**values)  # type: ignore[arg-type]
    except ConfigError:
        raise
    except (TypeError, ValueError) as error:
        raise ConfigError(str(error)) from None


def _from_text(key: str, annotation: object, raw: str) -> object:
    kind = str(annotation)
    if key == "peers":
        return parse_peers(raw)
    try:
        if kind == "bool":
            if raw.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(raw)
            return raw.lower() in ("true", "1", "yes")
        if kind == "int":
            return int(raw)
        if kind == "float":
            return float(raw)
        if kind == "Path":
            return Path(raw)
    except ValueError:
        raise ConfigError(f"{ENV_PREFIX}{key.upper()}={raw!r} is not a valid {kind}") from None
    return raw


# Kafka's topic config names -> the Config field holding the broker default
TOPIC_CONFIGS: dict[str, str] = {
    "retention.ms": "retention_ms",
    "retention.bytes": "retention_bytes",
    "segment.bytes": "segment_bytes",
    "segment.ms": "segment_ms",
    "max.message.bytes": "max_batch_bytes",
    "cleanup.policy": "cleanup_policy",
    "compression.type": "compression_type",
    "message.timestamp.type": "message_timestamp_type",
    "min.insync.replicas": "min_insync_replicas",
    "min.compaction.lag.ms": "min_compaction_lag_ms",
    "delete.retention.ms": "delete_retention_ms",
    "min.cleanable.dirty.ratio": "min_cleanable_dirty_ratio",
}
# Kafka's broker config names -> Config fields
BROKER_CONFIGS: dict[str, str] = {
    "log.retention.ms": "retention_ms",
    "log.retention.bytes": "retention_bytes",
    "log.segment.bytes": "segment_bytes",
    "log.roll.ms": "segment_ms",
    "message.max.bytes": "max_batch_bytes",
    "log.cleanup.policy": "cleanup_policy",
    "compression.type": "compression_type",
    "log.message.timestamp.type": "message_timestamp_type",
    "min.insync.replicas": "min_insync_replicas",
    "log.cleaner.min.compaction.lag.ms": "min_compaction_lag_ms",
    "log.cleaner.delete.retention.ms": "delete_retention_ms",
    "log.cleaner.min.cleanable.ratio": "min_cleanable_dirty_ratio",
    "log.cleaner.backoff.ms": "log_cleaner_backoff_ms",
    "log.cleaner.io.max.bytes.per.second": "log_cleaner_io_max_bytes_per_second",
    "log.cleaner.dedupe.buffer.size": "log_cleaner_dedupe_buffer_size",
    "num.partitions": "default_partitions",
    "default.replication.factor": "default_replication_factor",
    "auto.create.topics.enable": "auto_create_topics",
    "socket.request.max.bytes": "max_request_bytes",
    "replica.lag.time.max.ms": "replica_lag_time_max_ms",
    "auto.leader.rebalance.enable": "auto_leader_rebalance_enable",
    "leader.imbalance.check.interval.seconds": "leader_imbalance_check_interval_seconds",
    "leader.imbalance.per.broker.percentage": "leader_imbalance_per_broker_percentage",
    "offsets.topic.num.partitions": "offsets_topic_partitions",
    "offsets.topic.replication.factor": "offsets_topic_replication_factor",
    "offsets.topic.segment.bytes": "offsets_topic_segment_bytes",
    "group.initial.rebalance.delay.ms": "group_initial_rebalance_delay_ms",
    "group.min.session.timeout.ms": "group_min_session_timeout_ms",
    "group.max.session.timeout.ms": "group_max_session_timeout_ms",
    "group.max.size": "group_max_size",
    "offset.metadata.max.bytes": "offset_metadata_max_bytes",
    "producer.id.expiration.ms": "producer_id_expiration_ms",
    "offsets.retention.minutes": "offsets_retention_minutes",
    "offsets.retention.check.interval.ms": "offsets_retention_check_interval_ms",
    "fetch.max.bytes": "fetch_max_bytes",
    "max.connections": "max_connections",
    "max.connections.per.ip": "max_connections_per_ip",
    "connections.max.idle.ms": "connections_max_idle_ms",
    "queued.max.request.bytes": "queued_max_request_bytes",
    "log.message.timestamp.before.max.ms": "message_timestamp_before_max_ms",
    "log.message.timestamp.after.max.ms": "message_timestamp_after_max_ms",
}


def config_text(value: object) -> str:
    """A setting as Kafka shows it."""
    return str(value).lower() if isinstance(value, bool) else str(value)
