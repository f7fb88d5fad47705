"""Record batch compression codecs, as Kafka clients write them.

gzip comes from the standard library; snappy (xerial framing, as the Java
client writes it; raw snappy is read too, as librdkafka may send it), lz4
(frame format, KIP-57) and zstd come from cramjam.

Decompression is bounded: a batch may expand to at most
`DECOMPRESSED_MAX_BYTES` (or the cap a caller passes); past it the batch is
corrupt (CorruptRecordError, CORRUPT_MESSAGE on the wire). The output is
written into a bounded buffer as it decodes, so a few KiB of zstd that claim
gigabytes of zeros cost no more memory than the cap.
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


# the most bytes one batch's records may decompress to: far above what a
# client's batch (message.max.bytes of compressed input) holds in practice
DECOMPRESSED_MAX_BYTES = 64 * 1024 * 1024
_FIRST_GUESS_BYTES = 64 * 1024

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


def _snappy_decode(data: bytes, max_bytes: int) -> bytes:
    if not data.startswith(_XERIAL_MAGIC):
        _check_declared(cramjam.snappy.decompress_raw_len(data), max_bytes)
        return bytes(cramjam.snappy.decompress_raw(data))
    out = bytearray()
    pos = len(_XERIAL_HEADER)
    while pos < len(data):
        (size,) = struct.unpack_from(">i", data, pos)
        pos += 4
        block = data[pos:pos + size]
        _check_declared(len(out) + cramjam.snappy.decompress_raw_len(block), max_bytes)
        out += bytes(cramjam.snappy.decompress_raw(block))
        pos += size
    return bytes(out)


def _check_declared(size: int, max_bytes: int) -> None:
    if size > max_bytes:
        raise _TooLarge(size)


class _TooLarge(Exception):
    """Output past the cap (caught in decompress and reported as corrupt)."""


def _gzip_decode(data: bytes, max_bytes: int) -> bytes:
    """Every gzip member of `data`, at most max_bytes of output."""
    out = bytearray()
    rest = data
    while rest:
        decoder = zlib.decompressobj(wbits=31)
        out += decoder.decompress(rest, max_bytes - len(out) + 1)
        if len(out) > max_bytes:
            raise _TooLarge(len(out))
        if not decoder.eof:
            raise EOFError("truncated gzip member")
        rest = decoder.unused_data
    return bytes(out)


def _decode_into(module: object, data: bytes, max_bytes: int) -> bytes:
    """cramjam's lz4 frame or zstd into a buffer grown x8 per try up to
    max_bytes: it fails rather than write past the buffer's end."""
    size = min(max_bytes, max(_FIRST_GUESS_BYTES, 4 * len(data)))
    while True:
        out = bytearray(size)
        try:
            written = module.decompress_into(data, out)  # type: ignore[attr-defined]
            return bytes(memoryview(out)[:written])
        except cramjam.DecompressionError as error:
            if "whole buffer" not in str(error):
                raise
            if size >= max_bytes:
                raise _TooLarge(size) from None
            size = min(max_bytes, size * 8)


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


def decompress(codec: Compression, data: bytes, position: int = 0,
               max_bytes: int = DECOMPRESSED_MAX_BYTES) -> bytes:
    """Decompress a records section; CorruptRecordError if it does not decode
    or would expand past `max_bytes`."""
    try:
        if codec == Compression.NONE:
            return data
        if codec == Compression.GZIP:
            return _gzip_decode(data, max_bytes)
        if codec == Compression.SNAPPY:
            return _snappy_decode(data, max_bytes)
        if codec == Compression.LZ4:
            return _decode_into(cramjam.lz4, data, max_bytes)
        if codec == Compression.ZSTD:
            return _decode_into(cramjam.zstd, data, max_bytes)
    except _TooLarge:
        raise CorruptRecordError(f"{codec.name.lower()} payload decompresses past the {max_bytes}-byte limit",
                                 position) from None
    except (OSError, EOFError, zlib.error, cramjam.DecompressionError, struct.error) as exc:
        raise CorruptRecordError(f"{codec.name.lower()} payload does not decode: {exc}", position) from exc
    raise UnsupportedCompressionError(f"compression id {int(codec)} is not supported")
