"""Raftka: a Raft-replicated, Kafka-compatible event log with a C hot path.

The embedded API, small enough for one README section:
  raftka.open(data_dir, **settings) -> Raftka
  Raftka.create_topic / delete_topic / topics
  Raftka.produce / produce_batch / append_batches -> offsets
  Raftka.read(topic, partition, offset, timeout_s=...) -> ConsumerRecord iterator
  Raftka.read_batches(topic, partition, offset, timeout_s=...) -> RecordColumns iterator
  Raftka.offsets / offset_for_timestamp / flush / close
  Raftka.consumer(group, topics) -> GroupConsumer (poll / iterate / commit / close)
Errors are typed (raftka.errors) and carry Kafka error codes.

This folder (engine/ in the repository) installs as the package `raftka`;
raft/, native/ and bench/ install as raftka.raft, raftka.native and
raftka.bench. The names below load on first use (PEP 562), so importing a
subpackage such as raftka.raft or raftka.native does not load the embedded
API with it.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "raftka.client.embedded": ("PartitionOffsets", "ProducedRecords", "Raftka", "RecordMetadata", "open"),
    "raftka.client.group_consumer": ("GroupConsumer",),
    "raftka.config": ("Config",),
    "raftka.errors": ("ClosedError", "CorruptRecordError", "DataDirLockedError", "GroupError", "InvalidPartitionsError",
                      "InvalidTopicError", "OffsetOutOfRangeError", "RaftkaError", "RecordTooLargeError",
                      "StorageError", "TopicAlreadyExistsError", "UnknownTopicOrPartitionError"),
    "raftka.records.batch": ("ConsumerRecord", "Record", "RecordColumns", "build_batch", "parse_records"),
    "raftka.records.compression": ("Compression",),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_MODULE_OF)

if TYPE_CHECKING:
    from raftka.client.embedded import PartitionOffsets, ProducedRecords, Raftka, RecordMetadata, open
    from raftka.client.group_consumer import GroupConsumer
    from raftka.config import Config
    from raftka.errors import (ClosedError, CorruptRecordError, DataDirLockedError, GroupError,
                               InvalidPartitionsError, InvalidTopicError, OffsetOutOfRangeError, RaftkaError,
                               RecordTooLargeError, StorageError, TopicAlreadyExistsError,
                               UnknownTopicOrPartitionError)
    from raftka.records.batch import ConsumerRecord, Record, RecordColumns, build_batch, parse_records
    from raftka.records.compression import Compression


def __getattr__(name: str) -> Any:
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module 'raftka' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
