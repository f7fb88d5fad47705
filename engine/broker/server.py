"""The Kafka listener: non-blocking sockets on the broker's event loop whose
connections decode request frames, run them through Handlers, and answer in
request order (clients pipeline several requests on one connection).

Connections are plain sockets driven by loop.add_reader/add_writer rather
than asyncio transports, for two reasons. Replies go out with writev straight
from their buffers, so a Fetch's record bytes travel from the segment mapping
to the kernel without a copy in Python (a transport joins and buffers them).
And a large request is received with recv_into into a buffer of its exact
size, not gathered from chunks.

A frame whose size is out of range (below a header, above
`max_request_bytes`) or whose bytes do not decode closes that connection
with a logged reason; other connections, and the log, are untouched. An API
or version we do not serve gets UNSUPPORTED_VERSION (ApiVersions: the v0
fallback, so the client retries lower) and the connection stays open.
"""
from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import os
import socket
import struct
from typing import Any

from raftka.broker.handlers import Handlers, Response
from raftka.protocol import kafka

log = logging.getLogger(__name__)

_SIZE = struct.Struct(">i")
MIN_REQUEST_BYTES = 8          # api key, version, correlation id
MAX_PIPELINED = 100            # requests in flight per connection before reading pauses
RECEIVE_BYTES = 256 << 10      # receive buffer; larger frames get a buffer of their own
IOV_MAX = 1024                 # buffers per writev call (Linux's limit)
OUTPUT_LOW_WATER = 1 << 20     # queued reply bytes below which the next reply is written
_RETRY = (BlockingIOError, InterruptedError)


class KafkaServer:
    """The Kafka listener of one broker."""

    def __init__(self, handlers: Handlers, max_request_bytes: int) -> None:
        self.handlers = handlers
        self.max_request_bytes = max_request_bytes
        self._listener: socket.socket | None = None
        self._connections: set[_Connection] = set()

    async def start(self, host: str, port: int) -> int:
        """Listen; returns the bound port (useful when `port` is 0)."""
        self._listener = socket.create_server((host, port), backlog=1024)
        self._listener.setblocking(False)
        asyncio.get_running_loop().add_reader(self._listener.fileno(), self._accept)
        return self._listener.getsockname()[1]

    async def stop(self) -> None:
        if self._listener is not None:
            asyncio.get_running_loop().remove_reader(self._listener.fileno())
            self._listener.close()
            self._listener = None
        for connection in list(self._connections):
            connection.close("broker stopping")

    def _accept(self) -> None:
        while self._listener is not None:
            try:
                sock, peer = self._listener.accept()
            except _RETRY:
                return
            except OSError as error:    # e.g. out of descriptors: the listener stays up
                log.warning("kafka listener: accept failed: %s", error)
                return
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._connections.add(_Connection(self, sock, peer))


class _Connection:
    def __init__(self, server: KafkaServer, sock: socket.socket, peer: Any) -> None:
        self._server = server
        self._sock = sock
        self._fd = sock.fileno()
        self._peer = peer
        self._client_host = f"/{peer[0]}" if isinstance(peer, tuple) else ""
        self._loop = asyncio.get_running_loop()
        self._closed = False
        # input: frames are cut from [_start, _end) of the receive buffer; a
        # frame too large for it is received into _large (its exact size)
        self._input = bytearray(RECEIVE_BYTES)
        self._input_view = memoryview(self._input)
        self._start = self._end = 0
        self._large: bytearray | None = None
        self._large_received = 0
        self._reading = True
        # output: buffers queued for writev, oldest first
        self._output: collections.deque[memoryview] = collections.deque()
        self._output_bytes = 0
        self._writing = False
        self._drained = asyncio.Event()
        self._drained.set()
        # replies in request order; _replies_waiting is set while it is non-empty
        self._replies: collections.deque[asyncio.Future[Response]] = collections.deque()
        self._replies_waiting = asyncio.Event()
        self._writer = self._loop.create_task(self._write_in_order())
        self._loop.add_reader(self._fd, self._on_readable)

    def close(self, reason: str | None) -> None:
        """Close the socket; `reason` is logged (None: the client closed it)."""
        if self._closed:
            return
        self._closed = True
        if reason is not None:
            log.warning("kafka connection %s closed: %s", self._peer, reason)
        if self._reading:
            self._loop.remove_reader(self._fd)
        if self._writing:
            self._loop.remove_writer(self._fd)
        self._output.clear()
        self._drained.set()
        self._writer.cancel()
        self._sock.close()
        self._server._connections.discard(self)

    # ---- input ------------------------------------------------------------

    def _on_readable(self) -> None:
        try:
            if self._large is not None:
                received = self._sock.recv_into(memoryview(self._large)[self._large_received:])
            else:
                received = self._sock.recv_into(self._input_view[self._end:])
        except _RETRY:
            return
        except OSError as error:
            self.close(f"receive failed: {error}")
            return
        if received == 0:
            self.close(None)
            return
        if self._large is not None:
            self._large_received += received
            if self._large_received < len(self._large):
                return
            frame, self._large = self._large, None
            self._dispatch(memoryview(frame).toreadonly())   # kio reads only read-only buffers
        else:
            self._end += received
            self._cut_frames()
        if len(self._replies) >= MAX_PIPELINED and self._reading and not self._closed:
            self._reading = False
            self._loop.remove_reader(self._fd)

    def _cut_frames(self) -> None:
        view = self._input_view
        while self._end - self._start >= 4 and not self._closed:
            (size,) = _SIZE.unpack_from(self._input, self._start)
            if not MIN_REQUEST_BYTES <= size <= self._server.max_request_bytes:
                self.close(f"request size {size} outside [{MIN_REQUEST_BYTES}, {self._server.max_request_bytes}]")
                return
            body, available = self._start + 4, self._end - self._start - 4
            if available >= size:
                self._start = body + size
                self._dispatch(bytes(view[body:body + size]))
                continue
            if 4 + size > len(self._input):   # receive the rest straight into a buffer of its size
                self._large = bytearray(size)
                self._large[:available] = view[body:self._end]
                self._large_received = available
                self._start = self._end = 0
                return
            break
        # keep the partial frame at the front so the next receive has room
        remaining = self._end - self._start
        if self._start:
            view[:remaining] = view[self._start:self._end]
            self._start, self._end = 0, remaining

    def _dispatch(self, frame: bytes | memoryview) -> None:
        try:
            request = kafka.read_request(frame, self._client_host)
        except kafka.UnsupportedRequest as unsupported:
            log.info("kafka connection %s: %s", self._peer, unsupported)
            done: asyncio.Future[Response] = self._loop.create_future()
            if unsupported.api_key == kafka.API_VERSIONS:
                done.set_result(kafka.api_versions_fallback(unsupported.correlation_id))
            else:
                done.set_result(kafka.unsupported_response(unsupported.correlation_id))
            self._queue_reply(done)
            return
        except kafka.MalformedRequest as malformed:
            self.close(f"malformed request: {malformed}")
            return
        self._queue_reply(self._loop.create_task(self._server.handlers.handle(request)))

    def _queue_reply(self, reply: "asyncio.Future[Response]") -> None:
        self._replies.append(reply)
        self._replies_waiting.set()

    # ---- output -----------------------------------------------------------

    async def _write_in_order(self) -> None:
        """Answer in request order. Every reply already done behind the one
        awaited goes out in the same writev (a Raft entry commits many
        pipelined produces at once: one send and one client wakeup, not one each)."""
        while True:
            if not self._replies:
                self._replies_waiting.clear()
                await self._replies_waiting.wait()
                continue
            parts: list[Any] = []
            try:
                self._add_reply(parts, await self._replies[0])
                self._replies.popleft()
                while self._replies and self._replies[0].done():
                    self._add_reply(parts, self._replies.popleft().result())
            except Exception:
                log.exception("kafka connection %s: request failed", self._peer)
                self.close("internal error answering a request")
                return
            if not self._reading and len(self._replies) < MAX_PIPELINED // 2 and not self._closed:
                self._reading = True
                self._loop.add_reader(self._fd, self._on_readable)
            if not parts or self._closed:
                continue
            self._send(parts)
            await self._drained.wait()

    @staticmethod
    def _add_reply(parts: list[Any], reply: Response) -> None:
        if reply is not None:
            parts.extend(reply if isinstance(reply, list) else [reply])

    def _send(self, parts: list[Any]) -> None:
        for part in parts:
            if len(part):
                view = memoryview(part)
                self._output.append(view if view.format == "B" and view.ndim == 1 else view.cast("B"))
                self._output_bytes += len(view)
        self._flush()

    def _flush(self) -> None:
        while self._output:
            try:
                sent = os.writev(self._fd, list(itertools.islice(self._output, IOV_MAX)))
            except _RETRY:
                break
            except OSError as error:
                self.close(f"send failed: {error}")
                return
            self._output_bytes -= sent
            while sent:
                head = self._output[0]
                if len(head) <= sent:
                    sent -= len(head)
                    self._output.popleft()
                else:
                    self._output[0] = head[sent:]
                    sent = 0
        if self._output and not self._writing:
            self._writing = True
            self._loop.add_writer(self._fd, self._flush)
        elif not self._output and self._writing:
            self._writing = False
            self._loop.remove_writer(self._fd)
        if self._output_bytes > OUTPUT_LOW_WATER:
            self._drained.clear()
        else:
            self._drained.set()
