"""A bounds walk over a request frame before kio decodes it.

kio's native reader reserves room for an array from the count the frame
claims, before it reads a single element: a 19-byte Metadata request whose
topic count is 2^31-1 asks for 16 GiB, and where that allocation fails the
process aborts. So every frame is first walked here, from the same kio
schema the decoder will use: each string, bytes field and array is checked
against the bytes left, and an array's count times the smallest size one
element can have must fit in them. Only a frame that passes is handed to
kio; one that does not is malformed (its connection is closed).

The walk is compiled once per (api key, version) into a list of steps, so
checking a Produce request costs a few dozen Python operations, not a decode.
Layouts (Kafka's): non-flexible strings i16 length (-1 null), bytes and
records i32 length, arrays i32 count (-1 null); flexible ones use unsigned
varints of length + 1 (0 null) and end every entity with a tagged-fields
section (uvarint count, then tag uvarint, size uvarint, bytes).
"""
from __future__ import annotations

import dataclasses
import functools
import struct
import types
import typing
from typing import Callable

from raftka.protocol import kafka

# skip(frame, position, end) -> position after the field; raises MalformedRequest
Skip = Callable[[memoryview | bytes, int, int], int]

_FIXED: dict[str, int] = {
    "bool": 1, "int8": 1, "uint8": 1, "int16": 2, "uint16": 2, "error_code": 2,
    "int32": 4, "uint32": 4, "timedelta_i32": 4, "int64": 8, "uint64": 8, "float64": 8,
    "timedelta_i64": 8, "datetime_i64": 8, "uuid": 16,
}
_VARIABLE = ("string", "bytes", "records")
_I16, _I32 = struct.Struct(">h"), struct.Struct(">i")
_HEAD_BYTES = 8      # api key, version, correlation id


class _Malformed(kafka.MalformedRequest):
    pass


def check_request(frame: memoryview | bytes) -> None:
    """Raise MalformedRequest unless every length and count in `frame` (a
    request without its size prefix) fits in the bytes that follow it.
    Frames for APIs or versions we do not serve pass untouched: they are
    answered UNSUPPORTED_VERSION from their header alone."""
    api_key, api_version, _ = kafka.peek_header(frame)
    supported = kafka.ADVERTISED.get(api_key)
    if supported is None or not supported[0] <= api_version <= supported[1] \
            or api_version in kafka.REFUSED.get(api_key, ()):
        return
    header_flexible, body = _plan(api_key, api_version)
    end = len(frame)
    position = _skip_legacy_string(frame, _HEAD_BYTES, end)   # client_id: never compact
    if header_flexible:
        position = _skip_tagged_fields(frame, position, end)
    body(frame, position, end)


@functools.lru_cache(maxsize=None)
def _plan(api_key: int, api_version: int) -> tuple[bool, Skip]:
    schema = kafka.load_request_schema(api_key, api_version)
    return bool(schema.__header_schema__.__flexible__), _entity_skip(schema)[0]


def _entity_skip(cls: type) -> tuple[Skip, int]:
    """The skip of one entity, and the fewest bytes it can take."""
    flexible = bool(getattr(cls, "__flexible__", False))
    hints = typing.get_type_hints(cls)
    steps: list[Skip] = []
    least = 0
    for field in dataclasses.fields(cls):
        if "tag" in field.metadata:
            continue     # tagged fields travel in the trailing tagged-fields section
        step, size = _field_skip(field, hints[field.name], flexible)
        steps.append(step)
        least += size
    if flexible:
        steps.append(_skip_tagged_fields)
        least += 1

    def skip(frame: memoryview | bytes, position: int, end: int) -> int:
        for step in steps:
            position = step(frame, position, end)
        return position
    return skip, least


def _field_skip(field: dataclasses.Field, annotation: object, flexible: bool) -> tuple[Skip, int]:
    element = _array_element(annotation)
    kafka_type = field.metadata.get("kafka_type")
    if element is None:
        return _primitive_skip(kafka_type, flexible, field.name)
    if dataclasses.is_dataclass(element):
        item, item_bytes = _entity_skip(element)   # type: ignore[arg-type]
    else:
        item, item_bytes = _primitive_skip(kafka_type, flexible, field.name)
    return _array_skip(item, max(item_bytes, 1), flexible), 1 if flexible else 4


def _array_element(annotation: object) -> object | None:
    """The element type if `annotation` is tuple[X, ...] (or that | None)."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
    if typing.get_origin(annotation) is tuple:
        return typing.get_args(annotation)[0]
    if dataclasses.is_dataclass(annotation):
        raise TypeError(f"nested entity {annotation} outside an array is not walked")
    return None


def _primitive_skip(kafka_type: object, flexible: bool, name: str) -> tuple[Skip, int]:
    if isinstance(kafka_type, str) and kafka_type in _FIXED:
        size = _FIXED[kafka_type]
        return _fixed(size), size
    if kafka_type in _VARIABLE:
        if flexible:
            return _skip_compact_bytes, 1
        return (_skip_legacy_string, 2) if kafka_type == "string" else (_skip_legacy_bytes, 4)
    raise TypeError(f"field {name}: kafka type {kafka_type!r} has no bounds walk")


def _fixed(size: int) -> Skip:
    def skip(frame: memoryview | bytes, position: int, end: int) -> int:
        position += size
        if position > end:
            raise _Malformed(f"{size}-byte field runs past the end of the request")
        return position
    return skip


def _array_skip(item: Skip, item_bytes: int, flexible: bool) -> Skip:
    def skip(frame: memoryview | bytes, position: int, end: int) -> int:
        if flexible:
            count, position = _uvarint(frame, position, end)
            count -= 1
        else:
            position = _need(position, 4, end)
            count = _I32.unpack_from(frame, position - 4)[0]
        if count < 0:
            if count == -1:
                return position     # null
            raise _Malformed(f"array count {count}")
        if count * item_bytes > end - position:
            raise _Malformed(f"array of {count} elements of at least {item_bytes} bytes in the "
                             f"{end - position} bytes left")
        for _ in range(count):
            position = item(frame, position, end)
        return position
    return skip


def _need(position: int, size: int, end: int) -> int:
    if position + size > end:
        raise _Malformed("length field runs past the end of the request")
    return position + size


def _skip_legacy_string(frame: memoryview | bytes, position: int, end: int) -> int:
    position = _need(position, 2, end)
    return _skip_payload(_I16.unpack_from(frame, position - 2)[0], position, end)


def _skip_legacy_bytes(frame: memoryview | bytes, position: int, end: int) -> int:
    position = _need(position, 4, end)
    return _skip_payload(_I32.unpack_from(frame, position - 4)[0], position, end)


def _skip_compact_bytes(frame: memoryview | bytes, position: int, end: int) -> int:
    length, position = _uvarint(frame, position, end)
    return _skip_payload(length - 1, position, end)


def _skip_payload(length: int, position: int, end: int) -> int:
    if length < -1:
        raise _Malformed(f"length {length}")
    if length > 0:
        position += length
        if position > end:
            raise _Malformed(f"{length}-byte field runs past the end of the request")
    return position


def _skip_tagged_fields(frame: memoryview | bytes, position: int, end: int) -> int:
    count, position = _uvarint(frame, position, end)
    if count * 2 > end - position:
        raise _Malformed(f"{count} tagged fields in the {end - position} bytes left")
    for _ in range(count):
        _tag, position = _uvarint(frame, position, end)
        size, position = _uvarint(frame, position, end)
        position = _skip_payload(size, position, end)
    return position


def _uvarint(frame: memoryview | bytes, position: int, end: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if position >= end or shift > 28:
            raise _Malformed("unsigned varint runs past the end of the request or past 32 bits")
        byte = frame[position]
        position += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, position
        shift += 7
