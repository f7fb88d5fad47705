"""The records of the `__consumer_offsets` topic, in Kafka's own format.

Committed offsets and group metadata are replicated by appending records to
the group's partition of `__consumer_offsets` (a Raft group like any other),
so every replica can materialise them. The byte layout is Kafka's, so Kafka
tooling that decodes that topic reads ours too (strings are i16 length +
utf-8, -1 for null; bytes are i32 length + bytes):

  key, version 1 (offset commit):   version i16 | group | topic | partition i32
  key, version 2 (group metadata):  version i16 | group
  offset value, version 3:          version i16 | offset i64 | leader epoch i32 |
                                    metadata | commit timestamp i64
  group value, version 3:           version i16 | protocol type | generation i32 |
                                    protocol (nullable) | leader (nullable) |
                                    state timestamp i64 | member count i32 |
                                    members: member id | instance id (nullable) |
                                    client id | client host | rebalance timeout i32 |
                                    session timeout i32 | subscription bytes |
                                    assignment bytes
A record with a null value is a tombstone: the offset, or the whole group,
was deleted.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass, field

OFFSET_KEY_VERSION, GROUP_KEY_VERSION = 1, 2
OFFSET_VALUE_VERSION, GROUP_VALUE_VERSION = 3, 3

_I16, _I32, _I64 = struct.Struct(">h"), struct.Struct(">i"), struct.Struct(">q")


class RecordFormatError(ValueError):
    """Bytes that are not a __consumer_offsets key or value we know."""


@dataclass(frozen=True)
class OffsetKey:
    group: str
    topic: str
    partition: int


@dataclass(frozen=True)
class GroupKey:
    group: str


@dataclass(frozen=True)
class CommittedOffset:
    offset: int
    leader_epoch: int = -1
    metadata: str = ""
    commit_timestamp_ms: int = -1


@dataclass(frozen=True)
class MemberRecord:
    member_id: str
    group_instance_id: str | None
    client_id: str
    client_host: str
    rebalance_timeout_ms: int
    session_timeout_ms: int
    subscription: bytes
    assignment: bytes


@dataclass(frozen=True)
class GroupRecord:
    protocol_type: str
    generation: int
    protocol: str | None
    leader: str | None
    state_timestamp_ms: int
    members: tuple[MemberRecord, ...] = field(default_factory=tuple)


# ---- encoding ----------------------------------------------------------------

def _string(out: bytearray, text: str | None) -> None:
    if text is None:
        out += _I16.pack(-1)
        return
    raw = text.encode()
    out += _I16.pack(len(raw)) + raw


def _bytes(out: bytearray, data: bytes) -> None:
    out += _I32.pack(len(data)) + data


def encode_key(key: OffsetKey | GroupKey) -> bytes:
    out = bytearray()
    if isinstance(key, OffsetKey):
        out += _I16.pack(OFFSET_KEY_VERSION)
        _string(out, key.group)
        _string(out, key.topic)
        out += _I32.pack(key.partition)
    else:
        out += _I16.pack(GROUP_KEY_VERSION)
        _string(out, key.group)
    return bytes(out)


def encode_offset(value: CommittedOffset) -> bytes:
    out = bytearray(_I16.pack(OFFSET_VALUE_VERSION) + _I64.pack(value.offset) + _I32.pack(value.leader_epoch))
    _string(out, value.metadata)
    out += _I64.pack(value.commit_timestamp_ms)
    return bytes(out)


def encode_group(value: GroupRecord) -> bytes:
    out = bytearray(_I16.pack(GROUP_VALUE_VERSION))
    _string(out, value.protocol_type)
    out += _I32.pack(value.generation)
    _string(out, value.protocol)
    _string(out, value.leader)
    out += _I64.pack(value.state_timestamp_ms) + _I32.pack(len(value.members))
    for m in value.members:
        _string(out, m.member_id)
        _string(out, m.group_instance_id)
        _string(out, m.client_id)
        _string(out, m.client_host)
        out += _I32.pack(m.rebalance_timeout_ms) + _I32.pack(m.session_timeout_ms)
        _bytes(out, m.subscription)
        _bytes(out, m.assignment)
    return bytes(out)


# ---- decoding ----------------------------------------------------------------

class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data, self.position = data, 0

    def _take(self, size: int) -> bytes:
        end = self.position + size
        if size < 0 or end > len(self.data):
            raise RecordFormatError(f"field of {size} bytes runs past the end at byte {self.position}")
        chunk, self.position = self.data[self.position:end], end
        return chunk

    def int16(self) -> int:
        return _I16.unpack(self._take(2))[0]

    def int32(self) -> int:
        return _I32.unpack(self._take(4))[0]

    def int64(self) -> int:
        return _I64.unpack(self._take(8))[0]

    def string(self) -> str | None:
        size = self.int16()
        if size == -1:
            return None
        try:
            return self._take(size).decode()
        except UnicodeDecodeError as error:
            raise RecordFormatError(f"string is not utf-8: {error}") from None

    def required_string(self) -> str:
        text = self.string()
        if text is None:
            raise RecordFormatError(f"null string at byte {self.position}")
        return text

    def bytes_(self) -> bytes:
        return self._take(self.int32())

    def done(self) -> None:
        if self.position != len(self.data):
            raise RecordFormatError(f"{len(self.data) - self.position} trailing bytes")


def decode_key(data: bytes) -> OffsetKey | GroupKey:
    reader = _Reader(data)
    version = reader.int16()
    if version in (0, OFFSET_KEY_VERSION):
        key: OffsetKey | GroupKey = OffsetKey(reader.required_string(), reader.required_string(), reader.int32())
    elif version == GROUP_KEY_VERSION:
        key = GroupKey(reader.required_string())
    else:
        raise RecordFormatError(f"unknown key version {version}")
    reader.done()
    return key


def decode_offset(data: bytes) -> CommittedOffset:
    reader = _Reader(data)
    version = reader.int16()
    if version != OFFSET_VALUE_VERSION:
        raise RecordFormatError(f"unknown offset value version {version}")
    offset, leader_epoch = reader.int64(), reader.int32()
    value = CommittedOffset(offset, leader_epoch, reader.string() or "", reader.int64())
    reader.done()
    return value


def decode_group(data: bytes) -> GroupRecord:
    reader = _Reader(data)
    version = reader.int16()
    if version != GROUP_VALUE_VERSION:
        raise RecordFormatError(f"unknown group value version {version}")
    protocol_type, generation = reader.required_string(), reader.int32()
    protocol, leader, timestamp = reader.string(), reader.string(), reader.int64()
    count = reader.int32()
    if not 0 <= count <= len(data):
        raise RecordFormatError(f"member count {count}")
    members = tuple(MemberRecord(reader.required_string(), reader.string(), reader.required_string(),
                                 reader.required_string(), reader.int32(), reader.int32(),
                                 reader.bytes_(), reader.bytes_()) for _ in range(count))
    reader.done()
    return GroupRecord(protocol_type, generation, protocol, leader, timestamp, members)


def java_string_hash(text: str) -> int:
    """Java's String.hashCode (over UTF-16 code units), as a signed 32-bit int."""
    h = 0
    units = text.encode("utf-16-be")
    for i in range(0, len(units), 2):
        h = (31 * h + ((units[i] << 8) | units[i + 1])) & 0xFFFFFFFF
    return h - (1 << 32) if h >= 1 << 31 else h


def partition_for_group(group: str, partitions: int) -> int:
    """A group's __consumer_offsets partition: (hashCode & 0x7fffffff) %
    partitions. Kafka's Utils.abs(hashCode) % partitions agrees for
    non-negative hashes only; this one stays because existing groups'
    records are in the partitions it chose (clients never compute it)."""
    return (java_string_hash(group) & 0x7FFFFFFF) % partitions
