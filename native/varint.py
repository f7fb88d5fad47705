"""Zigzag LEB128 varints (Kafka's varint/varlong): record fields in v2 batches,
and the integers of raft/'s peer message codec. Pure Python, here in native/
(the bottom layer) so that engine/records and raft/ share one copy."""
from __future__ import annotations


class VarintError(ValueError):
    """Bytes that do not hold a whole varint of at most 10 bytes."""


def put_varint(out: bytearray, value: int) -> None:
    value = (value << 1) ^ (value >> 63)  # zigzag
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)


def get_varint(buf: bytes | memoryview, pos: int) -> tuple[int, int]:
    """(value, position after it); VarintError if it runs past the end or past 10 bytes."""
    shift = 0
    result = 0
    while True:
        if pos >= len(buf):
            raise VarintError("varint runs past the end of its buffer")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return (result >> 1) ^ -(result & 1), pos
        shift += 7
        if shift > 63:
            raise VarintError("varint longer than 10 bytes")
