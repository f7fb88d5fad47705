"""The Kafka listener: non-blocking sockets on the broker's event loop whose
connections decode request frames, run them through Handlers, and answer in
request order (clients pipeline several requests on one connection).

Connections are plain sockets driven by loop.add_reader/add_writer rather
than asyncio transports: replies go out with writev straight from their
buffers, so a Fetch's record bytes travel from the segment mapping to the
kernel without a copy in Python (a transport joins and buffers them).

No client can make the broker allocate what it has not sent, or hold more
than its share (every limit is a Config field):
  - a frame's size must be in [8, max_request_bytes]; its bytes are
    received into a buffer that grows as they arrive, never one of the
    size the prefix claims; each frame is walked for lengths and array
    counts before kio decodes it (raftka.security.request_bounds);
  - the request bytes being received or handled on all connections together
    stay within queued_max_request_bytes: a frame larger than the receive
    buffer is reserved in full when its size prefix is read, and a connection
    whose next such frame does not fit stops reading until replies free room
    (a reserved frame needs nothing more to complete, so waiting cannot
    deadlock); frames that fit the receive buffer are counted, never held;
  - at most MAX_PIPELINED requests per connection are in flight: the frame
    loop stops cutting at the cap and reading resumes as replies go out;
  - max_connections and max_connections_per_ip: a connection past either is
    closed when accepted; connections_max_idle_ms closes a connection with
    nothing in flight and no bytes either way for that long;
  - accept failing for want of descriptors (EMFILE) pauses accepting for
    ACCEPT_BACKOFF_S and is logged once per LOG_INTERVAL_S, not per try.

A frame whose size is out of range or whose bytes do not decode closes that
connection with a logged reason; other connections, and the log, are
untouched. An API or version we do not serve gets UNSUPPORTED_VERSION
(ApiVersions: the v0 fallback, so the client retries lower) and the
connection stays open.
"""
from __future__ import annotations

import asyncio
import collections
import dataclasses
import errno
import itertools
import logging
import mmap
import os
import socket
import ssl
import struct
import time
from typing import Any

from raftka.broker.handlers import Handlers, Response
from raftka.broker.security_apis import SASL_APIS, Security, sasl_disabled_answer
from raftka.config import Config
from raftka.protocol import kafka
from raftka.security.request_bounds import check_request
from raftka.security.tls import server_context

log = logging.getLogger(__name__)

_SIZE = struct.Struct(">i")
MIN_REQUEST_BYTES = 8          # api key, version, correlation id
MAX_PIPELINED = 100            # requests in flight per connection before reading pauses
RECEIVE_BYTES = 256 << 10      # receive buffer (its pages are touched only as bytes arrive)
IOV_MAX = 1024                 # buffers per writev call (Linux's limit)
OUTPUT_LOW_WATER = 1 << 20     # queued reply bytes below which the next reply is written
ACCEPT_BACKOFF_S = 0.1         # accepting pauses this long when the process is out of descriptors
LOG_INTERVAL_S = 10.0          # a repeated listener warning is logged at most this often
IDLE_CHECK_MAX_S = 10.0        # idle connections are looked for at least this often
TLS_WRITE_BYTES = 256 << 10    # plaintext handed to one SSL write (TLS cannot use writev)
_RETRY = (BlockingIOError, InterruptedError)
# a TLS socket may need the other direction first (a handshake message, a key update)
_TLS_RETRY = (ssl.SSLWantReadError, ssl.SSLWantWriteError, BlockingIOError, InterruptedError)
_OUT_OF_RESOURCES = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)


class _RateLimitedLog:
    """One warning per interval for a repeated event, with how often it happened."""

    def __init__(self, interval_s: float = LOG_INTERVAL_S) -> None:
        self.interval_s = interval_s
        self._last = -interval_s
        self._suppressed = 0

    def warning(self, message: str, *args: object) -> None:
        now = time.monotonic()
        if now - self._last < self.interval_s:
            self._suppressed += 1
            return
        suffix = f" (and {self._suppressed} more like it in the last {self.interval_s:.0f} s)" if self._suppressed else ""
        log.warning(message + suffix, *args)
        self._last, self._suppressed = now, 0


class KafkaServer:
    """The Kafka listener of one broker, with the limits of `config`."""

    def __init__(self, handlers: Handlers, config: Config, security: Security | None = None) -> None:
        self.handlers = handlers
        self.security = security
        self.config = config
        self.max_request_bytes = config.max_request_bytes
        self._listener: socket.socket | None = None
        self._connections: set[_Connection] = set()
        self._per_ip: collections.Counter[str] = collections.Counter()
        # request bytes reserved by frames being received or handled; invariant: <= queued_max_request_bytes
        self.queued_request_bytes = 0
        self._budget_waiters: collections.deque[_Connection] = collections.deque()
        self._waking = False
        self._accept_log = _RateLimitedLog()
        self._refused_log = _RateLimitedLog()
        self._idle_task: asyncio.Task[None] | None = None
        self.tls = server_context(config)     # None: plaintext
        self.handshake_log = _RateLimitedLog()

    @property
    def connection_count(self) -> int:
        return len(self._connections)

    async def start(self, host: str, port: int) -> int:
        """Listen; returns the bound port (useful when `port` is 0)."""
        self._listener = socket.create_server((host, port), backlog=1024)
        self._listener.setblocking(False)
        asyncio.get_running_loop().add_reader(self._listener.fileno(), self._accept)
        self._idle_task = asyncio.get_running_loop().create_task(self._close_idle())
        return self._listener.getsockname()[1]

    async def stop(self) -> None:
        if self._idle_task is not None:
            self._idle_task.cancel()
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
            except OSError as error:
                if error.errno in _OUT_OF_RESOURCES:
                    self._back_off_accepting(error)
                    return
                self._accept_log.warning("kafka listener: accept failed: %s", error)
                continue
            host = peer[0] if isinstance(peer, tuple) else ""
            refusal = self._refusal(host)
            if refusal:
                self._refused_log.warning("kafka listener: connection from %s refused: %s", peer, refusal)
                sock.close()
                continue
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._per_ip[host] += 1
            if self.tls is not None:
                sock = self.tls.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
            self._connections.add(_Connection(self, sock, peer, host))

    def _refusal(self, host: str) -> str:
        if len(self._connections) >= self.config.max_connections:
            return f"max_connections ({self.config.max_connections}) reached"
        if self._per_ip[host] >= self.config.max_connections_per_ip:
            return f"max_connections_per_ip ({self.config.max_connections_per_ip}) reached for {host}"
        return ""

    def _back_off_accepting(self, error: OSError) -> None:
        """Out of descriptors: stop accepting for a moment (the pending
        connection stays in the backlog) instead of spinning on it."""
        self._accept_log.warning("kafka listener: accept failed: %s; accepting again in %.1f s",
                                 error, ACCEPT_BACKOFF_S)
        loop = asyncio.get_running_loop()
        assert self._listener is not None
        fd = self._listener.fileno()
        loop.remove_reader(fd)

        def resume() -> None:
            if self._listener is not None:
                loop.add_reader(fd, self._accept)
        loop.call_later(ACCEPT_BACKOFF_S, resume)

    def forget(self, connection: "_Connection") -> None:
        if connection in self._connections:
            self._connections.discard(connection)
            self._per_ip[connection.host] -= 1
            if self._per_ip[connection.host] <= 0:
                del self._per_ip[connection.host]

    # ---- the in-flight request bytes budget -----------------------------------

    def reserve(self, size: int, wait: bool = True) -> bool:
        """Take `size` bytes of the budget if they fit. A frame that fits the
        receive buffer (`wait` False) is counted but never waits: its bytes
        are already here, and a budget held by other connections' large frames
        must not stall a client's small requests."""
        if wait and self.queued_request_bytes + size > self.config.queued_max_request_bytes:
            return False
        self.queued_request_bytes += size
        return True

    def release(self, size: int) -> None:
        self.queued_request_bytes -= size
        assert self.queued_request_bytes >= 0, f"queued request bytes {self.queued_request_bytes} < 0"
        if self._budget_waiters and not self._waking:
            self._waking = True
            asyncio.get_running_loop().call_soon(self._wake_budget_waiters)

    def _wake_budget_waiters(self) -> None:
        self._waking = False
        while self._budget_waiters:
            waiter = self._budget_waiters.popleft()
            waiter.budget_freed()
            if waiter.waiting_for_budget:
                return     # it still does not fit: the others keep waiting

    def wait_for_budget(self, connection: "_Connection") -> None:
        self._budget_waiters.append(connection)

    async def _close_idle(self) -> None:
        idle_s = self.config.connections_max_idle_ms / 1000
        while True:
            await asyncio.sleep(min(idle_s / 2, IDLE_CHECK_MAX_S))
            now = asyncio.get_running_loop().time()
            for connection in [c for c in self._connections if c.idle_since(now) > idle_s]:
                connection.close(f"idle for more than {self.config.connections_max_idle_ms} ms")


class _Connection:
    def __init__(self, server: KafkaServer, sock: socket.socket, peer: Any, host: str) -> None:
        self._server = server
        self._sock = sock
        self._fd = sock.fileno()
        # TLS: no request is read before the handshake completes
        self._tls = isinstance(sock, ssl.SSLSocket)
        self._handshaking = self._tls
        self._handshake_writer = False
        # SASL (None: off): until it authenticates, only ApiVersions and the SASL APIs are served
        self._sasl = server.security.session(self._tls) if server.security is not None else None
        self._close_when_sent: str | None = None
        self._peer = peer
        self.host = host
        self._client_host = f"/{host}" if host else ""
        self._loop = asyncio.get_running_loop()
        self._closed = False
        self._last_active = self._loop.time()
        # input: frames are cut from [_start, _end) of the receive buffer; a
        # frame too large for it grows in _large as its bytes arrive, up to
        # _large_size (reserved in the server's budget when its prefix was read)
        self._input = mmap.mmap(-1, RECEIVE_BYTES)
        self._input_view = memoryview(self._input)
        self._start = self._end = 0
        self._large: bytearray | None = None
        self._large_size = 0
        self._reading = True
        self.waiting_for_budget = False
        self._reserved = 0         # budget bytes this connection holds
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

    def idle_since(self, now: float) -> float:
        """Seconds without bytes either way and with nothing in flight (0 if busy)."""
        if self._replies or self._output:
            return 0.0
        return now - self._last_active

    def close(self, reason: str | None) -> None:
        """Close the socket; `reason` is logged (None: the client closed it)."""
        if self._closed:
            return
        self._closed = True
        if reason is not None:
            log.warning("kafka connection %s closed: %s", self._peer, reason)
        if self._reading:
            self._loop.remove_reader(self._fd)
        if self._writing or self._handshake_writer:
            self._loop.remove_writer(self._fd)
        self._output.clear()
        self._drained.set()
        self._writer.cancel()
        self._sock.close()
        self._large = None
        self._server.forget(self)
        if self._reserved:
            reserved, self._reserved = self._reserved, 0
            self._server.release(reserved)

    # ---- input ------------------------------------------------------------

    def _set_reading(self, reading: bool) -> None:
        if reading == self._reading or self._closed:
            return
        self._reading = reading
        if reading:
            self._loop.add_reader(self._fd, self._on_readable)
            self._read_tls_pending()
        else:
            self._loop.remove_reader(self._fd)

    def _can_read(self) -> bool:
        return not self.waiting_for_budget and len(self._replies) < MAX_PIPELINED and self._close_when_sent is None

    def _handshake(self) -> None:
        try:
            self._sock.do_handshake()   # type: ignore[attr-defined]
        except ssl.SSLWantReadError:
            self._set_handshake_writer(False)
            return
        except ssl.SSLWantWriteError:
            self._set_handshake_writer(True)
            return
        except (ssl.SSLError, OSError) as error:
            self._server.handshake_log.warning("kafka connection %s: TLS handshake failed: %s", self._peer, error)
            self.close(None)
            return
        self._set_handshake_writer(False)
        self._handshaking = False
        self._last_active = self._loop.time()
        self._read_tls_pending()

    def _set_handshake_writer(self, on: bool) -> None:
        if on != self._handshake_writer and not self._closed:
            self._handshake_writer = on
            if on:
                self._loop.add_writer(self._fd, self._handshake)
            else:
                self._loop.remove_writer(self._fd)

    def _read_tls_pending(self) -> None:
        """Bytes TLS already decrypted do not make the socket readable: read them now."""
        if self._tls and self._reading and not self._closed and self._sock.pending():  # type: ignore[attr-defined]
            self._loop.call_soon(self._on_readable)

    def _on_readable(self) -> None:
        if self._closed or not self._reading:
            return
        if self._handshaking:
            self._handshake()
            return
        large = self._large
        try:
            if large is not None:   # into the front of the (empty) receive buffer, then onto the frame
                wanted = min(self._large_size - len(large), RECEIVE_BYTES)
                received = self._sock.recv_into(self._input_view[:wanted])
            else:
                received = self._sock.recv_into(self._input_view[self._end:])
        except _TLS_RETRY:
            return
        except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
            self.close(None)
            return
        except OSError as error:
            self.close(f"receive failed: {error}")
            return
        if received == 0:
            self.close(None)
            return
        self._last_active = self._loop.time()
        if large is not None:
            large += self._input_view[:received]
            if len(large) < self._large_size:
                self._read_tls_pending()
                return
            self._large = None
            self._dispatch(memoryview(large).toreadonly(), self._large_size)   # kio reads only read-only buffers
        else:
            self._end += received
        self._cut_frames()
        self._set_reading(self._can_read())
        self._read_tls_pending()

    def budget_freed(self) -> None:
        """The server has budget again: try the frame that waited for it."""
        self.waiting_for_budget = False
        if not self._closed:
            self._cut_frames()
            self._set_reading(self._can_read())

    def _cut_frames(self) -> None:
        view = self._input_view
        while self._end - self._start >= 4 and not self._closed and self._large is None:
            if len(self._replies) >= MAX_PIPELINED:
                break                      # resumed by _write_in_order as replies go out
            (size,) = _SIZE.unpack_from(self._input, self._start)
            if not MIN_REQUEST_BYTES <= size <= self._server.max_request_bytes:
                self.close(f"request size {size} outside [{MIN_REQUEST_BYTES}, {self._server.max_request_bytes}]")
                return
            body, available = self._start + 4, self._end - self._start - 4
            if available < size and 4 + size <= RECEIVE_BYTES:
                break                      # the rest will arrive into the buffer
            if not self._server.reserve(size, wait=4 + size > RECEIVE_BYTES):
                if not self.waiting_for_budget:
                    self.waiting_for_budget = True
                    self._server.wait_for_budget(self)
                break
            self._reserved += size
            if available >= size:
                self._start = body + size
                self._dispatch(bytes(view[body:body + size]), size)
                continue
            self._large = bytearray(view[body:self._end])   # grows as the rest arrives
            self._large_size = size
            self._start = self._end = 0
            return
        # keep the partial frame at the front so the next receive has room
        remaining = self._end - self._start
        if self._start:
            view[:remaining] = view[self._start:self._end]
            self._start, self._end = 0, remaining

    def _dispatch(self, frame: bytes | memoryview, reserved: int) -> None:
        """Answer one frame; its `reserved` budget bytes are released once its handler is done."""
        try:
            check_request(frame)
            request = kafka.read_request(frame, self._client_host)
        except kafka.UnsupportedRequest as unsupported:
            log.info("kafka connection %s: %s", self._peer, unsupported)
            done: asyncio.Future[Response] = self._loop.create_future()
            if unsupported.api_key == kafka.API_VERSIONS:
                done.set_result(kafka.api_versions_fallback(unsupported.correlation_id))
            else:
                done.set_result(kafka.unsupported_response(unsupported.correlation_id))
            self._release(reserved)
            self._queue_reply(done)
            return
        except kafka.MalformedRequest as malformed:
            self._release(reserved)
            self.close(f"malformed request: {malformed}")
            return
        gated = self._gate(request)
        if gated is None:
            self._release(reserved)
            return
        request = gated
        task = self._loop.create_task(self._server.handlers.handle(request))
        task.add_done_callback(lambda _: self._release(reserved))
        self._queue_reply(task)

    def _gate(self, request: kafka.Request) -> kafka.Request | None:
        """SASL: answer its own APIs here, refuse other requests before
        authentication, and stamp the principal on the rest. None: handled."""
        sasl = self._sasl
        if request.api_key in SASL_APIS:
            done: asyncio.Future[Response] = self._loop.create_future()
            done.set_result(sasl.answer(request) if sasl is not None else sasl_disabled_answer(request))
            if sasl is not None and sasl.failed:
                self._close_when_sent = "SASL authentication failed"
                self._set_reading(False)
            self._queue_reply(done)
            return None
        if sasl is None:
            return request
        if sasl.authenticated:
            return dataclasses.replace(request, principal=sasl.principal)
        if request.api_key == kafka.API_VERSIONS:
            return request
        self.close(f"API {request.api_key} before SASL authentication")
        return None

    def _release(self, size: int) -> None:
        if self._closed:
            return      # close() gave back everything this connection held
        self._reserved -= size
        self._server.release(size)

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
                self._cut_frames()         # frames already received come first
                self._set_reading(self._can_read())
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
                if self._tls:   # the same buffer is retried after a want-write, as OpenSSL requires
                    sent = self._sock.send(self._output[0][:TLS_WRITE_BYTES])
                else:
                    sent = os.writev(self._fd, list(itertools.islice(self._output, IOV_MAX)))
            except _TLS_RETRY:
                break
            except OSError as error:
                self.close(f"send failed: {error}")
                return
            self._output_bytes -= sent
            self._last_active = self._loop.time()
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
        if self._close_when_sent is not None and not self._output and not self._replies:
            self.close(self._close_when_sent)
