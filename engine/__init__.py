"""Raftka: a Kafka-style event log with a C hot path.

The embedded API, small enough for one README section:
  engine.open(data_dir, **settings) -> Raftka
  Raftka.create_topic / delete_topic / topics
  Raftka.produce / produce_batch / append_batches -> offsets
  Raftka.read(topic, partition, offset, timeout_s=...) -> ConsumerRecord iterator
  Raftka.offsets / offset_for_timestamp / flush / close
  Raftka.consumer(group, topics) -> GroupConsumer (poll / iterate / commit / close)
Errors are typed (engine.errors) and carry Kafka error codes.
"""
from engine.client.embedded import PartitionOffsets, Raftka, RecordMetadata, open
from engine.client.groups import GroupConsumer
from engine.config import Config
from engine.errors import (CorruptRecordError, DataDirLockedError, GroupError, InvalidPartitionsError, InvalidTopicError,
                           OffsetOutOfRangeError, RaftkaError, RecordTooLargeError, StorageError,
                           TopicAlreadyExistsError, UnknownTopicOrPartitionError)
from engine.records.batch import ConsumerRecord, Record, build_batch, parse_records
from engine.records.compression import Compression

__all__ = [
    "Compression", "Config", "ConsumerRecord", "CorruptRecordError", "DataDirLockedError", "GroupConsumer", "GroupError",
    "InvalidPartitionsError", "InvalidTopicError", "OffsetOutOfRangeError", "PartitionOffsets",
    "Raftka", "RaftkaError", "Record", "RecordMetadata", "RecordTooLargeError", "StorageError",
    "TopicAlreadyExistsError", "UnknownTopicOrPartitionError", "build_batch", "open", "parse_records",
]
