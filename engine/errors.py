"""Kafka error codes and the typed exceptions that carry them.

The one place error codes live: the embedded API raises these, and the broker
will turn `RaftkaError.error_code` into the wire error code.
"""
from __future__ import annotations

import enum


class ErrorCode(enum.IntEnum):
    """Kafka protocol error codes (the subset Raftka produces)."""

    NONE = 0
    OFFSET_OUT_OF_RANGE = 1
    CORRUPT_MESSAGE = 2
    UNKNOWN_TOPIC_OR_PARTITION = 3
    LEADER_NOT_AVAILABLE = 5
    NOT_LEADER_OR_FOLLOWER = 6
    REQUEST_TIMED_OUT = 7
    MESSAGE_TOO_LARGE = 10
    OFFSET_METADATA_TOO_LARGE = 12
    COORDINATOR_LOAD_IN_PROGRESS = 14
    COORDINATOR_NOT_AVAILABLE = 15
    NOT_COORDINATOR = 16
    INVALID_TOPIC_EXCEPTION = 17
    RECORD_LIST_TOO_LARGE = 18
    NOT_ENOUGH_REPLICAS = 19
    ILLEGAL_GENERATION = 22
    INCONSISTENT_GROUP_PROTOCOL = 23
    INVALID_GROUP_ID = 24
    UNKNOWN_MEMBER_ID = 25
    INVALID_SESSION_TIMEOUT = 26
    REBALANCE_IN_PROGRESS = 27
    INVALID_COMMIT_OFFSET_SIZE = 28
    TOPIC_AUTHORIZATION_FAILED = 29
    GROUP_AUTHORIZATION_FAILED = 30
    CLUSTER_AUTHORIZATION_FAILED = 31
    INVALID_TIMESTAMP = 32
    UNSUPPORTED_SASL_MECHANISM = 33
    ILLEGAL_SASL_STATE = 34
    UNSUPPORTED_VERSION = 35
    TOPIC_ALREADY_EXISTS = 36
    INVALID_PARTITIONS = 37
    INVALID_REPLICATION_FACTOR = 38
    INVALID_CONFIG = 40
    NOT_CONTROLLER = 41
    INVALID_REQUEST = 42
    UNSUPPORTED_FOR_MESSAGE_FORMAT = 43
    OUT_OF_ORDER_SEQUENCE_NUMBER = 45
    INVALID_PRODUCER_EPOCH = 47
    SECURITY_DISABLED = 54
    KAFKA_STORAGE_ERROR = 56
    SASL_AUTHENTICATION_FAILED = 58
    NON_EMPTY_GROUP = 68
    GROUP_ID_NOT_FOUND = 69
    FETCH_SESSION_ID_NOT_FOUND = 70
    INVALID_FETCH_SESSION_EPOCH = 71
    FENCED_LEADER_EPOCH = 74
    UNKNOWN_LEADER_EPOCH = 75
    PREFERRED_LEADER_NOT_AVAILABLE = 80
    ELECTION_NOT_NEEDED = 84
    FENCED_INSTANCE_ID = 82
    MEMBER_ID_REQUIRED = 79
    GROUP_MAX_SIZE_REACHED = 81
    GROUP_SUBSCRIBED_TO_TOPIC = 86
    INVALID_RECORD = 87
    RESOURCE_NOT_FOUND = 91
    DUPLICATE_RESOURCE = 92
    UNACCEPTABLE_CREDENTIAL = 93
    UNKNOWN_TOPIC_ID = 100
    UNSUPPORTED_ENDPOINT_TYPE = 115


class RaftkaError(Exception):
    """Base of every Raftka error; `error_code` is what Kafka clients see."""

    error_code: ErrorCode = ErrorCode.INVALID_REQUEST


class CorruptRecordError(RaftkaError):
    """A record batch failed validation (length, magic, record count or CRC32C)."""

    error_code = ErrorCode.CORRUPT_MESSAGE

    def __init__(self, reason: str, position: int) -> None:
        super().__init__(f"corrupt record batch at byte {position}: {reason}")
        self.reason = reason
        self.position = position


class InvalidRecordError(RaftkaError):
    """A well-formed batch a client may not write (a control or transactional batch)."""

    error_code = ErrorCode.INVALID_RECORD


class InvalidTimestampError(RaftkaError):
    """A batch's timestamps lie further from the broker's clock than the topic allows."""

    error_code = ErrorCode.INVALID_TIMESTAMP


class RecordTooLargeError(RaftkaError):
    """A batch is larger than the configured maximum batch size."""

    error_code = ErrorCode.MESSAGE_TOO_LARGE


class OffsetOutOfRangeError(RaftkaError):
    """A read or truncation asked for an offset outside the valid range."""

    error_code = ErrorCode.OFFSET_OUT_OF_RANGE

    def __init__(self, topic_partition: str, offset: int, start: int, end: int) -> None:
        super().__init__(
            f"offset {offset} is out of range for {topic_partition}: "
            f"valid offsets are [{start}, {end}]"
        )
        self.offset = offset
        self.valid_start = start
        self.valid_end = end


class UnknownTopicOrPartitionError(RaftkaError):
    """The topic or partition does not exist."""

    error_code = ErrorCode.UNKNOWN_TOPIC_OR_PARTITION


class InvalidTopicError(RaftkaError):
    """A topic name breaks Kafka's naming rules."""

    error_code = ErrorCode.INVALID_TOPIC_EXCEPTION


class TopicAlreadyExistsError(RaftkaError):
    """create_topic was called for a topic that exists."""

    error_code = ErrorCode.TOPIC_ALREADY_EXISTS


class InvalidPartitionsError(RaftkaError):
    """A partition count is not a positive integer within bounds."""

    error_code = ErrorCode.INVALID_PARTITIONS


class InvalidReplicationFactorError(RaftkaError):
    """A replication factor below 1 or above the number of live brokers."""

    error_code = ErrorCode.INVALID_REPLICATION_FACTOR


class InvalidConfigError(RaftkaError):
    """A topic config name or value Raftka does not accept."""

    error_code = ErrorCode.INVALID_CONFIG


class NoControllerError(RaftkaError):
    """The cluster metadata has no leader right now (an election is running),
    or it did not answer in time: retry."""

    error_code = ErrorCode.NOT_CONTROLLER


class NotLeaderOrFollowerError(RaftkaError):
    """This replica does not lead the partition; `leader_id` is the one it
    knows of (None during an election). Clients refresh metadata and retry."""

    error_code = ErrorCode.NOT_LEADER_OR_FOLLOWER

    def __init__(self, message: str, leader_id: int | None = None) -> None:
        super().__init__(message)
        self.leader_id = leader_id


class ReplicationTimeoutError(RaftkaError):
    """An append was not committed in time, or not at all (leadership moved
    while it was in flight): its outcome is unknown to the client, which retries."""

    error_code = ErrorCode.REQUEST_TIMED_OUT


class OutOfOrderSequenceError(RaftkaError):
    """An idempotent producer's batch does not follow the last sequence stored."""

    error_code = ErrorCode.OUT_OF_ORDER_SEQUENCE_NUMBER


class InvalidProducerEpochError(RaftkaError):
    """A batch from an older epoch of a producer id that has moved on."""

    error_code = ErrorCode.INVALID_PRODUCER_EPOCH


class UnsupportedCompressionError(RaftkaError):
    """A batch uses a compression codec this installation cannot handle."""

    error_code = ErrorCode.UNSUPPORTED_FOR_MESSAGE_FORMAT


class StorageError(RaftkaError):
    """The disk refused a write or a data directory is unusable.

    The log is left as it was before the failed operation.
    """

    error_code = ErrorCode.KAFKA_STORAGE_ERROR


class DataDirLockedError(StorageError):
    """Another process (or another open handle) holds this data directory."""


class ClosedError(RaftkaError):
    """An embedded handle, or one of its consumers, was used after close()."""


class GroupError(RaftkaError):
    """A consumer-group request the coordinator refuses; `error_code` says why
    (UNKNOWN_MEMBER_ID, ILLEGAL_GENERATION, REBALANCE_IN_PROGRESS, ...)."""

    def __init__(self, code: ErrorCode, group: str, detail: str = "") -> None:
        self.error_code = code
        self.group = group
        super().__init__(f"group {group!r}: {code.name}" + (f" ({detail})" if detail else ""))
