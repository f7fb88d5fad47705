"""Kafka request/response framing on top of kio's schemas.

A request frame is `size i32 | api_key i16 | api_version i16 | correlation_id
i32 | client_id | (tagged fields) | body`; which header and body schema
apply depends on (api_key, api_version), and kio knows both. Responses are
`size i32 | correlation_id i32 | (tagged fields) | body`. Record bytes are
never decoded here: kio hands Produce's records over as bytes, and Fetch's
response is assembled by hand around views of the log (fetch_response).

The versions we serve are in ADVERTISED, chosen for what the clients we
target negotiate (see DESIGN.md, "Kafka protocol"): librdkafka only enables
compression when Produce v0 is advertised, so v0-2 are advertised and
refused (no v2 record batches before v3), as Kafka 4.0 does.
"""
from __future__ import annotations

import datetime
import io
import struct
import sys
from dataclasses import dataclass, fields
from typing import Any

from kio.index import load_request_schema, load_response_schema
from kio.schema.errors import ErrorCode as KioErrorCode
from kio.serial import entity_reader, entity_writer
from kio.static.primitive import i16, i32

from raftka.errors import ErrorCode

PRODUCE, FETCH, LIST_OFFSETS, METADATA = 0, 1, 2, 3
OFFSET_COMMIT, OFFSET_FETCH, FIND_COORDINATOR, JOIN_GROUP, HEARTBEAT = 8, 9, 10, 11, 12
LEAVE_GROUP, SYNC_GROUP, DESCRIBE_GROUPS, LIST_GROUPS = 13, 14, 15, 16
API_VERSIONS, CREATE_TOPICS, DELETE_TOPICS, INIT_PRODUCER_ID = 18, 19, 20, 22
DESCRIBE_CONFIGS, CREATE_PARTITIONS, DELETE_GROUPS, OFFSET_DELETE = 32, 37, 42, 47
SASL_HANDSHAKE, SASL_AUTHENTICATE, DESCRIBE_ACLS, CREATE_ACLS, DELETE_ACLS = 17, 36, 29, 30, 31
DESCRIBE_USER_SCRAM_CREDENTIALS, ALTER_USER_SCRAM_CREDENTIALS = 50, 51

# api key -> (min, max) advertised in ApiVersions
ADVERTISED: dict[int, tuple[int, int]] = {
    PRODUCE: (0, 3),
    FETCH: (4, 4),
    LIST_OFFSETS: (1, 4),         # v4 reports the leader epoch (the Raft term): `raftka status` shows it
    METADATA: (0, 4),
    OFFSET_COMMIT: (2, 3),
    OFFSET_FETCH: (1, 3),
    FIND_COORDINATOR: (0, 2),
    JOIN_GROUP: (0, 2),           # v5+ would be static membership, not served
    HEARTBEAT: (0, 1),
    LEAVE_GROUP: (0, 1),
    SYNC_GROUP: (0, 1),
    DESCRIBE_GROUPS: (0, 2),
    LIST_GROUPS: (0, 2),
    API_VERSIONS: (0, 3),
    CREATE_TOPICS: (2, 3),
    DELETE_TOPICS: (1, 3),
    INIT_PRODUCER_ID: (0, 1),
    DESCRIBE_CONFIGS: (1, 2),
    CREATE_PARTITIONS: (0, 1),
    DELETE_GROUPS: (0, 1),
    OFFSET_DELETE: (0, 0),
    # security (engine/broker/security_apis.py); ACL APIs stop at v1: kafka-python 2.0.2
    # takes DescribeAcls v2 for a Kafka 2.5 broker and would send versions we do not serve
    SASL_HANDSHAKE: (0, 1),
    SASL_AUTHENTICATE: (0, 2),
    DESCRIBE_ACLS: (1, 1),
    CREATE_ACLS: (1, 1),
    DELETE_ACLS: (1, 1),
    DESCRIBE_USER_SCRAM_CREDENTIALS: (0, 0),
    ALTER_USER_SCRAM_CREDENTIALS: (0, 0),
}
# advertised but refused: Produce before v3 cannot carry v2 record batches
REFUSED: dict[int, range] = {PRODUCE: range(0, 3)}

_HEAD = struct.Struct(">hhi")
_SIZE = struct.Struct(">i")


class MalformedRequest(Exception):
    """Bytes that are not a request we can read: the connection is closed."""


class UnsupportedRequest(Exception):
    """A well-framed request for an API or version we do not serve."""

    def __init__(self, api_key: int, api_version: int, correlation_id: int) -> None:
        super().__init__(f"API {api_key} v{api_version} is not supported")
        self.api_key, self.api_version, self.correlation_id = api_key, api_version, correlation_id


@dataclass(frozen=True)
class Request:
    api_key: int
    api_version: int
    correlation_id: int
    client_id: str | None
    body: Any
    client_host: str = ""        # "/<address>" of the connection, as Kafka shows it
    principal: str = "User:ANONYMOUS"   # who authenticated on the connection (SASL), as Kafka names it


def peek_header(frame: bytes) -> tuple[int, int, int]:
    """(api_key, api_version, correlation_id) of a frame (without its size)."""
    if len(frame) < _HEAD.size:
        raise MalformedRequest(f"request of {len(frame)} bytes is shorter than a header")
    return _HEAD.unpack_from(frame)


def read_request(frame: bytes, client_host: str = "") -> Request:
    """Decode one request frame (the bytes after its size)."""
    api_key, api_version, correlation_id = peek_header(frame)
    supported = ADVERTISED.get(api_key)
    if supported is None or not supported[0] <= api_version <= supported[1] \
            or api_version in REFUSED.get(api_key, ()):
        raise UnsupportedRequest(api_key, api_version, correlation_id)
    schema = load_request_schema(api_key, api_version)
    try:
        header, position = entity_reader(schema.__header_schema__)(frame, 0)
        body, size = entity_reader(schema)(frame, position)   # kio returns the bytes it read
        position += size
    except Exception as error:  # kio raises whatever the bytes provoke
        raise MalformedRequest(f"API {api_key} v{api_version}: {type(error).__name__}: {error}") from None
    if position != len(frame) and not _empty_tag_sections(schema, frame[position:]):
        raise MalformedRequest(f"API {api_key} v{api_version}: {len(frame) - position} trailing bytes")
    return Request(api_key, api_version, correlation_id, getattr(header, "client_id", None), body, client_host)


def _empty_tag_sections(schema: type, rest: bytes | memoryview) -> bool:
    """A few zero bytes after a flexible body: empty tagged-field sections
    librdkafka 2.x writes once too often (AlterUserScramCredentials); Kafka
    ignores them, so do we."""
    return bool(schema.__flexible__) and len(rest) <= 2 and not any(bytes(rest))


def response_schema(request: Request) -> type:
    return load_response_schema(request.api_key, request.api_version)


def build(schema: type, **values: Any) -> Any:
    """An instance of a kio schema from plain values: fields the version lacks
    are dropped, error codes and throttle times converted to kio's types."""
    names = {f.name for f in fields(schema)}
    kwargs = {}
    for name, value in values.items():
        if name not in names:
            continue
        if name == "error_code":
            value = KioErrorCode(int(value))
        elif name == "throttle_time":
            value = datetime.timedelta(milliseconds=value)
        kwargs[name] = value
    return schema(**kwargs)


def answer(request: Request, **values: Any) -> bytes:
    """The whole response frame to `request`, built from plain values (see
    build); the throttle time is 0 unless given."""
    values.setdefault("throttle_time", 0)
    return encode_response(request.correlation_id, build(response_schema(request), **values))


def nested(schema: type, name: str) -> type:
    """A nested entity class of a kio schema's module (e.g. MetadataResponseTopic)."""
    return getattr(sys.modules[schema.__module__], name)


def encode_request(api_key: int, api_version: int, correlation_id: int, body: Any,
                   client_id: str = "raftka") -> bytes:
    """A whole request frame, size included: what a client sends (the
    benchmarks' and tests' raw Kafka clients)."""
    schema = load_request_schema(api_key, api_version)
    header_schema = schema.__header_schema__
    out = io.BytesIO()
    out.write(b"\0\0\0\0")
    entity_writer(header_schema)(out, header_schema(request_api_key=i16(api_key), request_api_version=i16(api_version),
                                                    correlation_id=i32(correlation_id), client_id=client_id))
    entity_writer(schema)(out, body)
    data = out.getbuffer()
    _SIZE.pack_into(data, 0, len(data) - 4)
    return bytes(data)


def decode_response(api_key: int, api_version: int, frame: bytes | memoryview) -> Any:
    """The body of a response frame (its size prefix removed) to an `api_key`
    request of `api_version`: what a client reads."""
    schema = load_response_schema(api_key, api_version)
    _header, position = entity_reader(schema.__header_schema__)(frame, 0)
    body, _ = entity_reader(schema)(frame, position)
    return body


def encode_response(correlation_id: int, response: Any) -> bytes:
    """A whole response frame, size included."""
    schema = type(response)
    header_schema = schema.__header_schema__
    out = io.BytesIO()
    out.write(b"\0\0\0\0")
    entity_writer(header_schema)(out, header_schema(correlation_id=i32(correlation_id)))
    entity_writer(schema)(out, response)
    data = out.getbuffer()
    _SIZE.pack_into(data, 0, len(data) - 4)
    return bytes(data)


def api_versions_fallback(correlation_id: int) -> bytes:
    """The answer to an ApiVersions newer than we serve: the v0 body with
    UNSUPPORTED_VERSION and our ranges, header v0; the client retries lower."""
    schema = load_response_schema(API_VERSIONS, 0)
    return encode_response(correlation_id, api_versions_body(schema, ErrorCode.UNSUPPORTED_VERSION))


def api_versions_body(schema: type, error: int = ErrorCode.NONE) -> Any:
    api_version = nested(schema, "ApiVersion")
    keys = tuple(api_version(api_key=key, min_version=low, max_version=high)
                 for key, (low, high) in sorted(ADVERTISED.items()))
    return build(schema, error_code=error, api_keys=keys, throttle_time=0)


def unsupported_response(correlation_id: int) -> bytes:
    """For an API or version we do not serve (other than ApiVersions): the
    correlation id and error UNSUPPORTED_VERSION (35), which is how every
    response body of ours that has a top-level error code begins."""
    body = struct.pack(">ih", correlation_id, ErrorCode.UNSUPPORTED_VERSION)
    return _SIZE.pack(len(body)) + body


# ---- Fetch v4 response, assembled around views of the log ------------------

_I16, _I32, _I64 = struct.Struct(">h"), struct.Struct(">i"), struct.Struct(">q")
_FETCH_PARTITION = struct.Struct(">ihqqi")   # index, error, high watermark, last stable offset, aborted (-1)


@dataclass
class FetchPartition:
    index: int
    error_code: int
    high_watermark: int
    records: memoryview | bytes


def fetch_response(correlation_id: int, topics: list[tuple[str, list[FetchPartition]]]) -> list[Any]:
    """Fetch v4 response as buffers to write in order; record bytes are the
    log's own views, not copies."""
    parts: list[Any] = []
    head = bytearray(_I32.pack(correlation_id) + _I32.pack(0) + _I32.pack(len(topics)))
    for name, partitions in topics:
        raw = name.encode()
        head += _I16.pack(len(raw)) + raw + _I32.pack(len(partitions))
        for p in partitions:
            head += _FETCH_PARTITION.pack(p.index, p.error_code, p.high_watermark, p.high_watermark, -1)
            head += _I32.pack(len(p.records))
            if len(p.records):
                parts.append(bytes(head))
                parts.append(p.records)
                head = bytearray()
    if head:
        parts.append(bytes(head))
    size = sum(len(p) for p in parts)
    return [_I32.pack(size), *parts]
