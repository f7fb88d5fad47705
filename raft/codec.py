"""A safe codec for Raft messages between brokers: no pickle, nothing executable.

pysyncobj's own transport pickles every message, so anyone who reaches the
peer port can run code. Its messages are plain data (dicts of str keys to
ints, strings, bytes, lists and tuples of those), so a small tagged binary
encoding carries them exactly, and decoding can only ever build those types.

Encoding (integers are zigzag LEB128 varints of at most 10 bytes, as in
protobuf and Kafka; this module owns its own, so raft/ needs nothing of engine/):
  0x00 None | 0x01 False | 0x02 True
  0x03 int (signed, fits in 64 bits)   | 0x04 float (8-byte IEEE, big-endian)
  0x05 bytes: length, bytes            | 0x06 str: length, utf-8
  0x07 list: count, items              | 0x08 tuple: count, items
  0x09 dict: count, (key, value) pairs
Decoding is bounded: nesting depth, and every length and count against the
bytes actually left. Any violation raises CodecError; nothing is partially
returned.
"""
from __future__ import annotations

import struct
from typing import Any

from raftka.native.varint import VarintError, get_varint, put_varint

MAX_DEPTH = 32

_NONE, _FALSE, _TRUE, _INT, _FLOAT, _BYTES, _STR, _LIST, _TUPLE, _DICT = range(10)
_DOUBLE = struct.Struct(">d")
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1


class CodecError(ValueError):
    """Bytes that are not a valid encoded message."""


def encode(value: Any) -> bytes:
    """Encode a message made of None/bool/int/float/bytes/str/list/tuple/dict."""
    out = bytearray()
    _encode(out, value, 0)
    return bytes(out)


def encode_into(out: bytearray, value: Any) -> None:
    """Append the encoding of `value` to `out` (no copy of the whole message,
    for callers that frame it in place)."""
    _encode(out, value, 0)


def decode(data: bytes | bytearray | memoryview) -> Any:
    """Decode exactly one message spanning all of `data`."""
    view = memoryview(data)
    try:
        value, position = _decode(view, 0, 0)
    except VarintError as error:
        raise CodecError(str(error)) from None
    if position != len(view):
        raise CodecError(f"{len(view) - position} trailing bytes after the message")
    return value


def _encode(out: bytearray, value: Any, depth: int) -> None:
    if depth > MAX_DEPTH:
        raise CodecError(f"message nested deeper than {MAX_DEPTH}")
    if value is None:
        out.append(_NONE)
    elif value is True or value is False:
        out.append(_TRUE if value else _FALSE)
    elif isinstance(value, int):
        if not _INT64_MIN <= value <= _INT64_MAX:
            raise CodecError(f"integer {value} does not fit in 64 bits")
        out.append(_INT)
        put_varint(out, value)
    elif isinstance(value, float):
        out.append(_FLOAT)
        out += _DOUBLE.pack(value)
    elif isinstance(value, (bytes, bytearray, memoryview)):
        out.append(_BYTES)
        put_varint(out, len(value))
        out += value
    elif isinstance(value, str):
        raw = value.encode("utf-8")
        out.append(_STR)
        put_varint(out, len(raw))
        out += raw
    elif isinstance(value, (list, tuple)):
        out.append(_LIST if isinstance(value, list) else _TUPLE)
        put_varint(out, len(value))
        for item in value:
            _encode(out, item, depth + 1)
    elif isinstance(value, dict):
        out.append(_DICT)
        put_varint(out, len(value))
        for key, item in value.items():
            _encode(out, key, depth + 1)
            _encode(out, item, depth + 1)
    else:
        raise CodecError(f"cannot encode a {type(value).__name__}")


def _get_length(view: memoryview, position: int) -> tuple[int, int]:
    """A length or count: non-negative and no larger than the bytes left."""
    length, position = get_varint(view, position)
    if not 0 <= length <= len(view) - position:
        raise CodecError(f"length {length} with {len(view) - position} bytes left")
    return length, position


def _decode(view: memoryview, position: int, depth: int) -> tuple[Any, int]:
    if depth > MAX_DEPTH:
        raise CodecError(f"message nested deeper than {MAX_DEPTH}")
    if position >= len(view):
        raise CodecError("message ends where a value should start")
    tag = view[position]
    position += 1
    if tag in (_NONE, _FALSE, _TRUE):
        return (None, False, True)[tag], position
    if tag == _INT:
        return get_varint(view, position)
    if tag == _FLOAT:
        if position + 8 > len(view):
            raise CodecError("float runs past the end")
        return _DOUBLE.unpack_from(view, position)[0], position + 8
    if tag in (_BYTES, _STR):
        length, position = _get_length(view, position)
        raw = bytes(view[position:position + length])
        if tag == _BYTES:
            return raw, position + length
        try:
            return raw.decode("utf-8"), position + length
        except UnicodeDecodeError as exc:
            raise CodecError(f"string is not utf-8: {exc}") from None
    if tag in (_LIST, _TUPLE, _DICT):
        return _decode_container(view, position, depth, tag)
    raise CodecError(f"unknown tag 0x{tag:02x} at byte {position - 1}")


def _decode_container(view: memoryview, position: int, depth: int, tag: int) -> tuple[Any, int]:
    count, position = _get_length(view, position)  # each item takes >= 1 byte
    items = []
    for _ in range(count * 2 if tag == _DICT else count):
        item, position = _decode(view, position, depth + 1)
        items.append(item)
    if tag == _LIST:
        return items, position
    if tag == _TUPLE:
        return tuple(items), position
    try:
        return dict(zip(items[0::2], items[1::2])), position
    except TypeError:
        raise CodecError("dict key of an unhashable type") from None
