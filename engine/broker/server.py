"""The Kafka listener: an asyncio server whose connections decode request
frames, run them through Handlers, and answer in request order (clients
pipeline several requests on one connection).

A frame whose size is out of range (below a header, above
`max_request_bytes`) or whose bytes do not decode closes that connection
with a logged reason; other connections, and the log, are untouched. An API
or version we do not serve gets UNSUPPORTED_VERSION (ApiVersions: the v0
fallback, so the client retries lower) and the connection stays open.
"""
from __future__ import annotations

import asyncio
import logging
import struct
from typing import Any

from engine.broker.handlers import Handlers, Response
from engine.protocol import kafka

log = logging.getLogger(__name__)

_SIZE = struct.Struct(">i")
MIN_REQUEST_BYTES = 8          # api key, version, correlation id
MAX_PIPELINED = 100            # requests in flight per connection before reading pauses


class KafkaServer:
    """The Kafka listener of one broker."""

    def __init__(self, handlers: Handlers, max_request_bytes: int) -> None:
        self.handlers = handlers
        self.max_request_bytes = max_request_bytes
        self._server: asyncio.base_events.Server | None = None
        self._connections: set[_Connection] = set()

    async def start(self, host: str, port: int) -> int:
        """Listen; returns the bound port (useful when `port` is 0)."""
        self._server = await asyncio.get_running_loop().create_server(lambda: _Connection(self), host, port)
        return self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for connection in list(self._connections):
            connection.close("broker stopping")
        if self._server is not None:
            await self._server.wait_closed()


class _Connection(asyncio.Protocol):
    def __init__(self, server: KafkaServer) -> None:
        self._server = server
        self._buffer = bytearray()
        self._transport: asyncio.Transport | None = None
        self._replies: asyncio.Queue[asyncio.Future[Response]] = asyncio.Queue()
        self._writer: asyncio.Task | None = None
        self._peer: Any = None
        self._paused = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]
        self._peer = transport.get_extra_info("peername")
        self._server._connections.add(self)
        self._writer = asyncio.get_running_loop().create_task(self._write_in_order())

    def connection_lost(self, exc: Exception | None) -> None:
        self._server._connections.discard(self)
        if self._writer is not None:
            self._writer.cancel()

    def close(self, reason: str) -> None:
        if self._transport is not None and not self._transport.is_closing():
            log.warning("kafka connection %s closed: %s", self._peer, reason)
            self._transport.close()

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        while len(self._buffer) >= 4 and not self._transport.is_closing():
            (size,) = _SIZE.unpack_from(self._buffer)
            if not MIN_REQUEST_BYTES <= size <= self._server.max_request_bytes:
                self.close(f"request size {size} outside [{MIN_REQUEST_BYTES}, {self._server.max_request_bytes}]")
                return
            if len(self._buffer) < 4 + size:
                return
            frame = bytes(self._buffer[4:4 + size])
            del self._buffer[:4 + size]
            self._dispatch(frame)
        if self._replies.qsize() >= MAX_PIPELINED and not self._paused:
            self._paused = True
            self._transport.pause_reading()

    def _dispatch(self, frame: bytes) -> None:
        loop = asyncio.get_running_loop()
        try:
            request = kafka.read_request(frame)
        except kafka.UnsupportedRequest as unsupported:
            log.info("kafka connection %s: %s", self._peer, unsupported)
            done: asyncio.Future[Response] = loop.create_future()
            if unsupported.api_key == kafka.API_VERSIONS:
                done.set_result(kafka.api_versions_fallback(unsupported.correlation_id))
            else:
                done.set_result(kafka.unsupported_response(unsupported.correlation_id))
            self._replies.put_nowait(done)
            return
        except kafka.MalformedRequest as malformed:
            self.close(f"malformed request: {malformed}")
            return
        self._replies.put_nowait(loop.create_task(self._server.handlers.handle(request)))

    async def _write_in_order(self) -> None:
        while True:
            pending = await self._replies.get()
            try:
                reply = await pending
            except Exception:
                log.exception("kafka connection %s: request failed", self._peer)
                self.close("internal error answering a request")
                return
            if self._paused and self._replies.qsize() < MAX_PIPELINED // 2:
                self._paused = False
                self._transport.resume_reading()
            if reply is None or self._transport.is_closing():
                continue
            if isinstance(reply, list):
                self._transport.writelines(reply)
            else:
                self._transport.write(reply)
