"""Kafka's default partitioner: murmur2(key) mod partitions, as the Java client.

Keyed records always land on the same partition for a given partition count,
so one key's records stay in order. Keyless records are spread by the caller
(round robin per record, or sticky per batch as Kafka's built-in partitioner).
"""
from __future__ import annotations

from raftka.native import ffi, lib


def murmur2(data: bytes) -> int:
    """Kafka's murmur2 hash of `data` as a signed 32-bit int (Utils.murmur2)."""
    return lib.rk_murmur2(ffi.from_buffer(data), len(data))


def partition_for_key(key: bytes, partitions: int) -> int:
    """The partition the Java client's default partitioner picks for `key`."""
    if partitions <= 0:
        raise ValueError(f"partitions must be positive, got {partitions}")
    return (murmur2(key) & 0x7FFFFFFF) % partitions
