"""GroupStore: committed offsets and group metadata, materialised into LMDB
from this broker's replicas of the `__consumer_offsets` partitions.

Every replica of such a partition (leader or follower) applies the records
below its high watermark to LMDB (IndexStore's group databases), remembering
how far it got, in one transaction per catch-up. The log is the truth and
LMDB a view of it: a replica that caught up by fetching whole segments, or
restarted after a crash, just continues from the offset LMDB recorded. So a
broker that becomes a group's coordinator after a failover finds the group's
offsets and last generation here, at most a few records behind.
"""
from __future__ import annotations

import logging
from typing import Iterator

from raftka.errors import CorruptRecordError
from raftka.groups import offsets_topic
from raftka.groups.offsets_topic import CommittedOffset, GroupKey, GroupRecord, OffsetKey, RecordFormatError
from raftka.records.batch import Record, parse_records
from raftka.storage.index import GroupChange, IndexStore
from raftka.storage.partition_log import PartitionLog

log = logging.getLogger(__name__)

READ_BYTES = 4 << 20   # per log read while materialising


class GroupStore:
    """Reads and materialises the consumer-group view of one broker's LMDB."""

    def __init__(self, index: IndexStore) -> None:
        self._index = index

    def materialise(self, partition_log: PartitionLog) -> int:
        """Apply the partition's records from where LMDB left off up to its
        high watermark; returns how many records were applied."""
        storage_id = partition_log.storage_id
        start = max(self._index.group_materialised_offset(storage_id), partition_log.log_start_offset)
        end = partition_log.high_watermark
        if start >= end:
            return 0
        changes: list[GroupChange] = []
        offset = start
        while offset < end:
            chunk = partition_log.read(offset, READ_BYTES)
            changes.extend(self._changes(chunk.buffer, offset, partition_log.name))
            offset = chunk.next_offset
        self._index.apply_group_changes(storage_id, changes, end)
        return len(changes)

    def _changes(self, buffer: memoryview, min_offset: int, name: str) -> Iterator[GroupChange]:
        try:
            for record in parse_records(buffer, min_offset=min_offset):
                if record.key is None:
                    continue
                try:
                    key = offsets_topic.decode_key(record.key)
                except RecordFormatError as error:
                    log.warning("%s offset %d: skipping a record with an unknown key: %s", name, record.offset, error)
                    continue
                if not _value_decodes(key, record.value):
                    log.warning("%s offset %d: skipping a record for group %r whose value does not decode",
                                name, record.offset, key.group)
                    continue     # one bad record must not break its group's reads, nor others'
                if isinstance(key, OffsetKey):
                    yield (key.group, key.topic, key.partition), record.value
                else:
                    yield key.group, record.value
        except CorruptRecordError as error:   # the log was CRC-checked on append; this is a bug or disk damage
            log.error("%s: cannot materialise from offset %d: %s", name, min_offset, error)
            raise

    # ---- reading ------------------------------------------------------------

    def committed(self, group: str) -> dict[tuple[str, int], CommittedOffset]:
        return {(topic, partition): offsets_topic.decode_offset(value)
                for topic, partition, value in self._index.group_offsets(group)}

    def group(self, group: str) -> GroupRecord | None:
        value = self._index.group_value(group)
        return None if value is None else offsets_topic.decode_group(value)

    def group_names(self) -> set[str]:
        return self._index.group_names()


def _value_decodes(key: OffsetKey | GroupKey, value: bytes | None) -> bool:
    """Whether a record's value is one the readers (committed, group) can decode; a tombstone is."""
    if value is None:
        return True
    try:
        if isinstance(key, OffsetKey):
            offsets_topic.decode_offset(value)
        else:
            offsets_topic.decode_group(value)
    except RecordFormatError:
        return False
    return True


def offset_records(group: str, offsets: dict[tuple[str, int], CommittedOffset | None]) -> list[Record]:
    """The records that commit (or, for None, delete) a group's offsets."""
    return [Record(offsets_topic.encode_offset(value) if value is not None else None,
                   key=offsets_topic.encode_key(OffsetKey(group, topic, partition)))
            for (topic, partition), value in offsets.items()]


def group_record(group: str, value: GroupRecord | None) -> Record:
    """The record that stores (or, for None, deletes) a group's metadata."""
    return Record(offsets_topic.encode_group(value) if value is not None else None,
                  key=offsets_topic.encode_key(GroupKey(group)))
