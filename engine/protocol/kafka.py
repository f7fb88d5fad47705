"""Kafka request/response framing on top of kio's schemas.

A request frame is `size i32 | api_key i16 | api_version i16 | correlation_id
i32 | client_id | (tagged fields) | body`; which header and body schema
apply depends on (api_key, api_version), and kio knows both. Responses are
`size i32 | correlation_id i32 | (tagged fields) | body`. Record bytes are
never decoded here: kio hands Produce's records over as bytes, and Fetch's
response is assembled by hand around views of the log (fetch_response).

Flexible versions (KIP-482) need nothing per API: the schema kio loads for
(api_key, api_version) names its header (request header v2 and response
header v1, with tagged fields; ApiVersions' response header stays v0) and
reads and writes compact arrays, strings and tagged fields. To serve an
API, flexible or not: add its range to ADVERTISED, its handler to the
broker's table, and answer with `answer(request, **fields)`.

The versions we serve are in ADVERTISED, chosen for what the clients we
target negotiate (see DESIGN.md, "Kafka protocol"): librdkafka only enables
compression when Produce v0 is advertised, so v0-2 are advertised and
refused (no v2 record batches before v3), as Kafka 4.0 does. Each raised
version is exercised by librdkafka, kafka-python and aiokafka in
tests/test_protocol_versions.py and the group and config tests.
"""
from __future__ import annotations

import datetime
import io
import functools
import struct
import sys
from dataclasses import dataclass, fields
from typing import Any

from kio.index import load_request_schema as _load_request_schema
from kio.index import load_response_schema as _load_response_schema
from kio.schema.errors import ErrorCode as KioErrorCode
from kio.serial import entity_reader, entity_writer
from kio.static.primitive import i16, i32

from raftka.errors import ErrorCode

# kio imports a schema's module by name on every call (about 3% of a broker's
# CPU under produce load, twice per request); the schemas never change
load_request_schema = functools.cache(_load_request_schema)
load_response_schema = functools.cache(_load_response_schema)

PRODUCE, FETCH, LIST_OFFSETS, METADATA = 0, 1, 2, 3
OFFSET_COMMIT, OFFSET_FETCH, FIND_COORDINATOR, JOIN_GROUP, HEARTBEAT = 8, 9, 10, 11, 12
LEAVE_GROUP, SYNC_GROUP, DESCRIBE_GROUPS, LIST_GROUPS = 13, 14, 15, 16
API_VERSIONS, CREATE_TOPICS, DELETE_TOPICS, DELETE_RECORDS, INIT_PRODUCER_ID = 18, 19, 20, 21, 22
OFFSET_FOR_LEADER_EPOCH = 23
DESCRIBE_CONFIGS, CREATE_PARTITIONS, DELETE_GROUPS, OFFSET_DELETE = 32, 37, 42, 47
SASL_HANDSHAKE, SASL_AUTHENTICATE, DESCRIBE_ACLS, CREATE_ACLS, DELETE_ACLS = 17, 36, 29, 30, 31
DESCRIBE_USER_SCRAM_CREDENTIALS, ALTER_USER_SCRAM_CREDENTIALS = 50, 51
ALTER_CONFIGS, INCREMENTAL_ALTER_CONFIGS, DESCRIBE_CLUSTER, ELECT_LEADERS = 33, 44, 60, 43

# api key -> (min, max) advertised in ApiVersions
ADVERTISED: dict[int, tuple[int, int]] = {
    PRODUCE: (0, 9),
    FETCH: (4, 12),
    LIST_OFFSETS: (1, 7),
    METADATA: (0, 12),
    OFFSET_COMMIT: (2, 8),
    OFFSET_FETCH: (1, 8),
    FIND_COORDINATOR: (0, 2),
    JOIN_GROUP: (0, 7),           # v5+: static membership (group.instance.id)
    HEARTBEAT: (0, 4),
    LEAVE_GROUP: (0, 4),
    SYNC_GROUP: (0, 5),
    DESCRIBE_GROUPS: (0, 2),
    LIST_GROUPS: (0, 2),
    API_VERSIONS: (0, 3),
    CREATE_TOPICS: (2, 3),
    DELETE_TOPICS: (1, 3),
    DELETE_RECORDS: (0, 2),
    INIT_PRODUCER_ID: (0, 1),
    OFFSET_FOR_LEADER_EPOCH: (2, 4),   # Kafka 4.0's range; librdkafka validates positions with v2
    DESCRIBE_CONFIGS: (1, 4),
    ALTER_CONFIGS: (0, 2),
    INCREMENTAL_ALTER_CONFIGS: (0, 1),
    CREATE_PARTITIONS: (0, 1),
    DELETE_GROUPS: (0, 1),
    OFFSET_DELETE: (0, 0),
    # security (engine/broker/security_apis.py); ACL APIs stop at v1: kafka-python 2.0.2
    # takes DescribeAcls v2 for a Kafka 2.5 broker and would send versions we do not serve.
    # SaslHandshake v0 is advertised for librdkafka (<= 2.10 enables SASL only if the
    # range holds 0; it sends v1) and refused (REFUSED)
    SASL_HANDSHAKE: (0, 1),
    SASL_AUTHENTICATE: (0, 2),
    DESCRIBE_ACLS: (1, 1),
    CREATE_ACLS: (1, 1),
    DELETE_ACLS: (1, 1),
    DESCRIBE_USER_SCRAM_CREDENTIALS: (0, 0),
    ALTER_USER_SCRAM_CREDENTIALS: (0, 0),
    DESCRIBE_CLUSTER: (0, 1),
    ELECT_LEADERS: (0, 2),        # preferred elections only (a Raft leadership transfer)
}
# advertised but refused (UNSUPPORTED_VERSION): Produce before v3 cannot carry v2
# record batches; SaslHandshake v0 is followed by raw SASL tokens outside Kafka's
# framing, which the listener does not read (every client we target sends v1)
REFUSED: dict[int, range] = {PRODUCE: range(0, 3), SASL_HANDSHAKE: range(0, 1)}

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
    # Bytes past the body are ignored, as Kafka's parser ignores them:
    # librdkafka's all-topics Metadata v9+ leaves 3 bytes of an i32
    # placeholder after its compact null array.
    return Request(api_key, api_version, correlation_id, getattr(header, "client_id", None), body, client_host)


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


# ---- flexible versions (KIP-482) -------------------------------------------
#
# kio reads and writes every schema, flexible ones included: request header v2
# and response header v1 carry tagged fields, arrays, strings and bytes are
# "compact" (unsigned varint length + 1, 0 for null). The one response built
# by hand is Fetch's (its record bytes are views of the log); these helpers
# are its compact encoding.

def uvarint(value: int) -> bytes:
    """An unsigned varint (protobuf's): 7 bits per byte, low bits first."""
    assert value >= 0, f"uvarint({value}) < 0"
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


NO_TAGGED_FIELDS = b"\0"


# ---- Fetch response (v4-v12), assembled around views of the log ----------

_I16, _I32, _I64 = struct.Struct(">h"), struct.Struct(">i"), struct.Struct(">q")
_FETCH_PARTITION = struct.Struct(">ihqqq")   # index, error, high watermark, last stable offset, log start
FETCH_FLEXIBLE_VERSION = 12


@dataclass
class FetchPartition:
    index: int
    error_code: int
    high_watermark: int
    log_start_offset: int
    records: memoryview | bytes


def fetch_response(correlation_id: int, api_version: int, topics: list[tuple[str, list[FetchPartition]]],
                   error_code: int = ErrorCode.NONE) -> list[Any]:
    """The Fetch response of `api_version` (4-12) as buffers to write in order;
    record bytes are the log's own views, not copies. No fetch session is
    ever created (session id 0), no transactions (last stable offset = high
    watermark, no aborted transactions), no preferred read replica (-1)."""
    assert 4 <= api_version <= FETCH_FLEXIBLE_VERSION, f"Fetch v{api_version} is not built here"
    flexible = api_version >= FETCH_FLEXIBLE_VERSION

    def count(n: int) -> bytes:
        return uvarint(n + 1) if flexible else _I32.pack(n)

    def string(text: str) -> bytes:
        raw = text.encode()
        return (uvarint(len(raw) + 1) if flexible else _I16.pack(len(raw))) + raw

    parts: list[Any] = []
    head = bytearray(_I32.pack(correlation_id))
    if flexible:
        head += NO_TAGGED_FIELDS
    head += _I32.pack(0)                                   # throttle time
    if api_version >= 7:
        head += _I16.pack(error_code) + _I32.pack(0)       # session id 0: no session
    head += count(len(topics))
    for name, partitions in topics:
        head += string(name) + count(len(partitions))
        for p in partitions:
            packed = _FETCH_PARTITION.pack(p.index, p.error_code, p.high_watermark, p.high_watermark,
                                           p.log_start_offset)
            head += packed if api_version >= 5 else packed[:-8]
            head += uvarint(0) if flexible else _I32.pack(-1)    # aborted transactions: null
            if api_version >= 11:
                head += _I32.pack(-1)                            # preferred read replica: none
            head += uvarint(len(p.records) + 1) if flexible else _I32.pack(len(p.records))
            if len(p.records):
                parts.append(bytes(head))
                parts.append(p.records)
                head = bytearray()
            if flexible:
                head += NO_TAGGED_FIELDS                         # partition
        if flexible:
            head += NO_TAGGED_FIELDS                             # topic
    if flexible:
        head += NO_TAGGED_FIELDS                                 # response
    if head:
        parts.append(bytes(head))
    size = sum(len(p) for p in parts)
    return [_I32.pack(size), *parts]
