"""Record batch compression codecs, as Kafka clients write them.

gzip comes from the standard library; snappy (xerial framing, as the Java
client writes it; raw snappy is read too, as librdkafka may send it), lz4
(frame format, KIP-57) and zstd come from cramjam.
"""
from __future__ import annotations

import enum
import gzip
import struct
import zlib

import cramjam

from raftka.errors import CorruptRecordError, UnsupportedCompressionError


class Compression(enum.IntEnum):
    """The codec ids in bits 0-2 of the batch attributes."""

    NONE = 0
    GZIP = 1
    SNAPPY = 2
    LZ4 = 3
    ZSTD = 4

    @classmethod
    def parse(cls, value: "Compression | str | int") -> "Compression":
        """Accept a member, its id, or a name such as "gzip"."""
        if isinstance(value, str):
            try:
                return cls[value.upper()]
            except KeyError:
                raise UnsupportedCompressionError(f"unknown compression {value!r}") from None
        try:
            return cls(value)
        except ValueError:
            raise UnsupportedCompressionError(f"unknown compression id {value}") from None


_XERIAL_MAGIC = b"\x82SNAPPY\x00"
_XERIAL_HEADER = _XERIAL_MAGIC + struct.pack(">ii", 1, 1)
_XERIAL_BLOCK_BYTES = 32 * 1024


def _snappy_encode(data: bytes) -> bytes:
    out = bytearray(_XERIAL_HEADER)
    view = memoryview(data)
    for start in range(0, len(view), _XERIAL_BLOCK_BYTES):
        block = bytes(cramjam.snappy.compress_raw(view[start:start + _XERIAL_BLOCK_BYTES]))
        out += struct.pack(">i", len(block))
        out += block
    return bytes(out)


def _snappy_decode(data: bytes) -> bytes:
    if not data.startswith(_XERIAL_MAGIC):
        return bytes(cramjam.snappy.decompress_raw(data))
    out = bytearray()
    pos = len(_XERIAL_HEADER)
    while pos < len(data):
        (size,) = struct.unpack_from(">i", data, pos)
        pos += 4
        out += bytes(cramjam.snappy.decompress_raw(data[pos:pos + size]))
        pos += size
    return bytes(out)


def compress(codec: Compression, data: bytes) -> bytes:
    """Compress the records section of a batch with `codec`."""
    if codec == Compression.NONE:
        return data
    if codec == Compression.GZIP:
        return gzip.compress(data, compresslevel=6, mtime=0)
    if codec == Compression.SNAPPY:
        return _snappy_encode(data)
    if codec == Compression.LZ4:
        return bytes(cramjam.lz4.compress(data))
    if codec == Compression.ZSTD:
        return bytes(cramjam.zstd.compress(data))
    raise UnsupportedCompressionError(f"compression {codec!r} is not supported")


def decompress(codec: Compression, data: bytes, position: int = 0) -> bytes:
    """Decompress a records section; CorruptRecordError if it does not decode."""
    try:
        if codec == Compression.NONE:
            return data
        if codec == Compression.GZIP:
            return gzip.decompress(data)
        if codec == Compression.SNAPPY:
            return _snappy_decode(data)
        if codec == Compression.LZ4:
            return bytes(cramjam.lz4.decompress(data))
        if codec == Compression.ZSTD:
            return bytes(cramjam.zstd.decompress(data))
    except (OSError, EOFError, zlib.error, cramjam.DecompressionError, struct.error) as exc:
        raise CorruptRecordError(f"{codec.name.lower()} payload does not decode: {exc}", position) from exc
    raise UnsupportedCompressionError(f"compression id {int(codec)} is not supported")
