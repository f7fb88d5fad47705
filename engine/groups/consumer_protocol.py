"""Kafka's "consumer" embedded protocol: what group members put in JoinGroup
metadata (their subscription) and what the leader hands out in SyncGroup
(their assignment), version 0, as every Kafka client encodes it:

  subscription: version i16 | topics [string] | user data bytes
  assignment:   version i16 | [topic string | partitions [i32]] | user data bytes

The broker never needs these to run a group; it reads subscriptions only to
refuse OffsetDelete for a topic the group still consumes. The embedded group
consumer uses them, and the range assignor below, as a Kafka client would.
"""
from __future__ import annotations

import struct

PROTOCOL_TYPE = "consumer"
_I16, _I32 = struct.Struct(">h"), struct.Struct(">i")


class ProtocolFormatError(ValueError):
    """Bytes that are not a version-0+ consumer subscription or assignment."""


def _string(text: str) -> bytes:
    raw = text.encode()
    return _I16.pack(len(raw)) + raw


def encode_subscription(topics: list[str]) -> bytes:
    return _I16.pack(0) + _I32.pack(len(topics)) + b"".join(_string(t) for t in topics) + _I32.pack(-1)


def encode_assignment(assignment: dict[str, list[int]]) -> bytes:
    out = bytearray(_I16.pack(0) + _I32.pack(len(assignment)))
    for topic, partitions in sorted(assignment.items()):
        out += _string(topic) + _I32.pack(len(partitions)) + b"".join(_I32.pack(p) for p in partitions)
    return bytes(out + _I32.pack(-1))


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data, self.position = data, 0

    def unpack(self, fmt: struct.Struct) -> int:
        try:
            (value,) = fmt.unpack_from(self.data, self.position)
        except struct.error:
            raise ProtocolFormatError(f"truncated at byte {self.position}") from None
        self.position += fmt.size
        return value

    def count(self) -> int:
        count = self.unpack(_I32)
        if not 0 <= count <= len(self.data):
            raise ProtocolFormatError(f"count {count} at byte {self.position}")
        return count

    def string(self) -> str:
        size = self.unpack(_I16)
        if size < 0 or self.position + size > len(self.data):
            raise ProtocolFormatError(f"string of {size} bytes at byte {self.position}")
        try:
            text = self.data[self.position:self.position + size].decode()
        except UnicodeDecodeError as error:
            raise ProtocolFormatError(str(error)) from None
        self.position += size
        return text


def decode_subscription(data: bytes) -> list[str]:
    """The subscribed topics (user data and later versions' fields ignored)."""
    reader = _Reader(data)
    reader.unpack(_I16)
    return [reader.string() for _ in range(reader.count())]


def decode_assignment(data: bytes) -> dict[str, list[int]]:
    if not data:
        return {}
    reader = _Reader(data)
    reader.unpack(_I16)
    assignment = {}
    for _ in range(reader.count()):
        topic = reader.string()
        assignment[topic] = [reader.unpack(_I32) for _ in range(reader.count())]
    return assignment


def range_assign(subscriptions: dict[str, list[str]], partitions: dict[str, int]) -> dict[str, dict[str, list[int]]]:
    """Kafka's RangeAssignor: for each topic, its partitions split in
    contiguous ranges over the subscribed members in member id order (the
    first members get one more when it does not divide)."""
    assignment: dict[str, dict[str, list[int]]] = {member: {} for member in subscriptions}
    for topic in sorted({t for topics in subscriptions.values() for t in topics}):
        members = sorted(m for m, topics in subscriptions.items() if topic in topics)
        count = partitions.get(topic, 0)
        share, extra = divmod(count, len(members))
        start = 0
        for i, member in enumerate(members):
            size = share + (1 if i < extra else 0)
            if size:
                assignment[member][topic] = list(range(start, start + size))
            start += size
    return assignment
