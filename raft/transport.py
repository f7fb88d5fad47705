"""PeerNetwork: the one authenticated TCP connection per broker pair that every
Raft group of a broker shares.

- The broker with the lower node id dials; the other accepts. Both sides run
  the handshake (handshake.py) with the cluster secret before any frame is
  read, and a peer must be one of the configured node ids.
- After that the stream carries frames (frames.py) tagged with a group id,
  each sealed with this connection's key for its direction and the next
  sequence number; a frame whose tag does not verify (injected, altered,
  replayed, reordered) drops the link before any of it is decoded, counted
  per peer in `refused_frames`, and the dialer redials. RAFT_MESSAGE
  payloads are decoded with the pickle-free codec (codec.py) and handed to
  the handler registered for that group.
- With `tls` (peer_tls.py) every connection is TLS 1.3 with a certificate
  on both ends, and a certificate speaks for one node: the dialer accepts
  only the dialed node's, the acceptor only one naming the node the
  handshake then authenticates. The handshake and frame MACs run inside.
- Everything sent during one event-loop iteration (one tick of all groups)
  goes to each peer in a single write.
- Anything malformed on the wire (bad handshake, wrong secret, unknown peer,
  oversized or garbage frame, undecodable payload) closes that one connection
  and logs why; the network, its other connections and its groups carry on.
- A message that decodes but makes its group's handler raise (a dict missing
  a key, a value of the wrong type, a bug) is dropped, not the connection:
  every group between two brokers shares it. The drop is counted per group
  (`dropped_messages`) and logged with group, peer and exception, at most
  once per group every LOG_INTERVAL_S seconds. Whoever registers a handler
  decides what else an exception means: RaftNode's handlers take the node out
  of service on a storage error (raft/node.py) before it gets here.
- `leave()` takes the whole network out of service at once (RaftNode does, when
  its storage failed): queued frames are dropped, sends refused, nothing more
  delivered, and every connection and the listener closed, so peers see the
  node go away and elect around it.
- Outboxes are bounded: past `max_outbox_bytes` for a peer, sends are refused
  (Raft retries), so a slow peer cannot grow memory without bound.

Runs on one asyncio event loop; all callbacks come from that loop's thread.
"""
from __future__ import annotations

import asyncio
import logging
import math
import socket
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from raftka.raft import handshake
from raftka.raft.peer_tls import PeerTls, node_id_of
from raftka.raft.codec import CodecError, decode, encode_into
from raftka.raft.frames import (DEFAULT_MAX_FRAME_BYTES, TAG_SIZE, FrameAuthError, FrameDecoder, FrameError, FrameKind,
                                FrameSealer, new_frame)

log = logging.getLogger(__name__)

MessageHandler = Callable[[int, Any], None]
PeerCallback = Callable[[int], None]

LOG_INTERVAL_S = 10.0   # per group: at most one logged error in this long


class ErrorTally:
    """Errors counted per key (a group id), logged with their traceback at
    most once per key every `interval_s` seconds; the next logged one says how
    many went unlogged in between. One group failing on every message or
    tick must not flood the log, nor hide another group's first error."""

    def __init__(self, logger: logging.Logger, interval_s: float = LOG_INTERVAL_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.counts: dict[int, int] = {}
        self._logger = logger
        self._interval_s = interval_s
        self._clock = clock
        self._logged_at: dict[int, float] = {}
        self._unlogged: dict[int, int] = {}

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def record(self, key: int, exc: BaseException, what: str, *args: Any) -> None:
        """Count `exc` under `key`; log "`what % args`: exception" unless `key` was logged lately."""
        self.counts[key] = self.counts.get(key, 0) + 1
        now = self._clock()
        logged_at = self._logged_at.get(key)
        if logged_at is not None and now - logged_at < self._interval_s:
            self._unlogged[key] = self._unlogged.get(key, 0) + 1
            return
        self._logged_at[key] = now
        unlogged = self._unlogged.pop(key, 0)
        since = f" ({unlogged} more since the last report)" if unlogged else ""
        self._logger.error(f"{what}: %s: %s%s", *args, type(exc).__name__, exc, since, exc_info=exc)


@dataclass(frozen=True)
class PeerNetworkConfig:
    """Settings of one broker's peer network."""

    node_id: int
    secret: bytes = field(repr=False)       # never in reprs or logs; >= handshake.SECRET_BYTES_MIN with peers
    peers: dict[int, tuple[str, int]]       # node id -> (host, port), self excluded
    listen_host: str = "127.0.0.1"
    listen_port: int = 0
    max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES
    max_outbox_bytes: int = 256 * 1024 * 1024
    handshake_timeout_s: float = 5.0
    reconnect_interval_s: float = 0.2
    # a peer connection whose sent data stays unacknowledged this long, or that
    # answers no keepalive probe for this long when idle, is closed and redialled
    # (TCP_USER_TIMEOUT, keepalive): after a silent cut the old connection would
    # otherwise look established until TCP's backed-off retransmit timer fired,
    # up to a minute after the network healed
    dead_link_timeout_s: float = 5.0
    # TLS 1.3 on every peer connection, mutual, certificates naming node ids (None: plaintext)
    tls: PeerTls | None = None

    def __post_init__(self) -> None:
        if self.peers:   # a lone node never uses it
            handshake.check_secret(self.secret)


def detect_dead_link(sock: socket.socket, timeout_s: float) -> None:
    """Make the kernel drop `sock` when its peer has been unreachable for about
    `timeout_s`: with data in flight (TCP_USER_TIMEOUT) or idle (keepalive
    probes every second after a second of silence). Linux options; others skip."""
    options = [(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)]
    for name, value in (("TCP_KEEPIDLE", 1), ("TCP_KEEPINTVL", 1), ("TCP_KEEPCNT", max(1, math.ceil(timeout_s))),
                        ("TCP_USER_TIMEOUT", int(timeout_s * 1000))):
        if hasattr(socket, name):
            options.append((socket.IPPROTO_TCP, getattr(socket, name), value))
    for level, option, value in options:
        try:
            sock.setsockopt(level, option, value)
        except OSError:
            pass   # not a TCP socket (tests), or not supported here


class PeerNetwork:
    """Connections to every peer broker, shared by all Raft groups of this broker."""

    def __init__(self, config: PeerNetworkConfig) -> None:
        if config.node_id in config.peers:
            raise ValueError(f"node {config.node_id} lists itself as a peer")
        self.config = config
        self.before_flush: Callable[[], None] | None = None
        self._handlers: dict[int, MessageHandler] = {}
        self._links: dict[int, _PeerProtocol] = {}
        self._dialing: set[int] = set()
        self._on_connected: list[PeerCallback] = []
        self._on_disconnected: list[PeerCallback] = []
        self._server: asyncio.base_events.Server | None = None
        self._dialer_task: asyncio.Task | None = None
        self._flush_scheduled = False
        self._closing = False
        self._left: str | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        # group -> messages dropped because its handler raised
        self.dropped_messages = ErrorTally(log)
        # peer -> frames refused because their tag did not verify (each one dropped the link)
        self.refused_frames: dict[int, int] = {}

    # ---- lifecycle -----------------------------------------------------

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._server = await self._loop.create_server(
            lambda: _PeerProtocol(self, dialed_peer=None), self.config.listen_host, self.config.listen_port,
            **self._tls_options(server=True))
        self._dialer_task = self._loop.create_task(self._dial_forever())

    @property
    def address(self) -> tuple[str, int]:
        """The (host, port) the network listens on (the real port when 0 was asked)."""
        assert self._server is not None, "start() first"
        return self._server.sockets[0].getsockname()[:2]

    async def close(self) -> None:
        self._closing = True  # a dial still in flight must not register afterwards
        if self._dialer_task:
            self._dialer_task.cancel()
        if self._server:
            self._server.close()
            await self._server.wait_closed()
        for link in list(self._links.values()):
            link.close("network closing")

    def leave(self, reason: str) -> None:
        """Take this node out of the network at once (its storage failed, say):
        drop every queued frame, refuse every later send, deliver nothing more,
        close every connection and the listener and dial no more. Peers see
        the node leave and elect around it. `close()` still finishes the job."""
        if self._left is not None:
            return
        self._left = reason
        self._closing = True
        log.error("node %d: leaving the peer network: %s", self.config.node_id, reason)
        if self._dialer_task:
            self._dialer_task.cancel()
        if self._server:
            self._server.close()
        for link in list(self._links.values()):
            link.discard_queued()
            link.close(f"node {self.config.node_id} left the peer network: {reason}")

    @property
    def left(self) -> str | None:
        """Why this node left the network (`leave`), or None."""
        return self._left

    # ---- groups and peers ----------------------------------------------

    def register_group(self, group_id: int, handler: MessageHandler) -> None:
        self._handlers[group_id] = handler

    def unregister_group(self, group_id: int) -> None:
        self._handlers.pop(group_id, None)

    def on_peer_connected(self, callback: PeerCallback) -> None:
        self._on_connected.append(callback)

    def on_peer_disconnected(self, callback: PeerCallback) -> None:
        self._on_disconnected.append(callback)

    @property
    def connected_peers(self) -> set[int]:
        return set(self._links)

    def send(self, peer_id: int, group_id: int, message: Any) -> bool:
        """Queue a message for a peer; False if it is not connected or is backed up."""
        link = self._links.get(peer_id)
        if link is None or self._left is not None:
            return False
        frame = new_frame()
        encode_into(frame, message)
        if link.backlog_bytes + len(frame) + TAG_SIZE > self.config.max_outbox_bytes:
            return False
        link.queue(frame, group_id, FrameKind.RAFT_MESSAGE)   # sealed there: in the order frames leave
        if not self._flush_scheduled and self._loop is not None:
            self._flush_scheduled = True
            self._loop.call_soon(self.flush)
        return True

    def flush(self) -> None:
        """Write every queued frame, one write per peer (after `before_flush`,
        which makes the votes those frames reflect durable)."""
        self._flush_scheduled = False
        if self._left is not None:
            return
        if self.before_flush is not None:
            self.before_flush()
        if self._left is not None:   # before_flush failed and took the node out: nothing leaves
            return
        for link in self._links.values():
            link.flush()

    # ---- connection bookkeeping (called by _PeerProtocol) -----------------

    def _authenticated(self, peer_id: int, link: "_PeerProtocol") -> bool:
        if self._closing:
            link.close("network closing")
            return False
        if peer_id not in self.config.peers:
            link.close(f"node {peer_id} is not a configured peer")
            return False
        old = self._links.get(peer_id)
        if old is not None and old is not link:
            old.close(f"replaced by a new connection from node {peer_id}")
        self._links[peer_id] = link
        log.info("node %d: connected to peer %d", self.config.node_id, peer_id)
        self._notify(self._on_connected, peer_id, "connected")
        return True

    def _lost(self, peer_id: int | None, link: "_PeerProtocol") -> None:
        if peer_id is None or self._links.get(peer_id) is not link:
            return
        del self._links[peer_id]
        log.info("node %d: lost peer %d", self.config.node_id, peer_id)
        self._notify(self._on_disconnected, peer_id, "disconnected")

    def _notify(self, callbacks: list[PeerCallback], peer_id: int, what: str) -> None:
        for callback in callbacks:
            try:
                callback(peer_id)
            except Exception:   # a callback's bug must not close the link (or skip the other callbacks)
                log.exception("node %d: a peer-%s callback for peer %d failed", self.config.node_id, what, peer_id)

    def _refused_frame(self, peer_id: int) -> None:
        self.refused_frames[peer_id] = self.refused_frames.get(peer_id, 0) + 1

    def _deliver(self, peer_id: int, group_id: int, message: Any) -> None:
        """Hand one message to its group's handler. An exception from the
        handler drops that message only (counted and logged, see the module
        docstring); the connection and every other group carry on."""
        if self._left is not None:
            return
        handler = self._handlers.get(group_id)
        if handler is None:
            log.debug("node %d: message for unknown group %d from %d dropped",
                      self.config.node_id, group_id, peer_id)
            return
        try:
            handler(peer_id, message)
        except Exception as exc:
            self.dropped_messages.record(group_id, exc, "node %d: dropped a message for group %d from peer %d",
                                         self.config.node_id, group_id, peer_id)

    def _tls_options(self, server: bool) -> dict[str, Any]:
        tls = self.config.tls
        if tls is None:
            return {}
        return {"ssl": tls.server if server else tls.client, "ssl_handshake_timeout": self.config.handshake_timeout_s}

    async def _dial_forever(self) -> None:
        assert self._loop is not None
        while True:
            for peer_id, (host, port) in self.config.peers.items():
                if peer_id > self.config.node_id and peer_id not in self._links and peer_id not in self._dialing:
                    self._dialing.add(peer_id)
                    self._loop.create_task(self._dial(peer_id, host, port))
            await asyncio.sleep(self.config.reconnect_interval_s)

    async def _dial(self, peer_id: int, host: str, port: int) -> None:
        assert self._loop is not None
        try:
            await self._loop.create_connection(lambda: _PeerProtocol(self, dialed_peer=peer_id), host, port,
                                               **self._tls_options(server=False))
        except OSError as exc:
            log.debug("node %d: dialing peer %d at %s:%d failed: %s", self.config.node_id, peer_id, host, port, exc)
        finally:
            self._dialing.discard(peer_id)


class _PeerProtocol(asyncio.Protocol):
    """One peer connection: handshake, then frames."""

    def __init__(self, network: PeerNetwork, dialed_peer: int | None) -> None:
        self._network = network
        self._config = network.config
        self._dialed_peer = dialed_peer
        self._transport: asyncio.Transport | None = None
        self._peer_id: int | None = None
        self._pending = bytearray()      # handshake bytes not yet consumed
        self._outbox: list[bytes | bytearray] = []
        self._outbox_bytes = 0
        self._sealer: FrameSealer | None = None      # both set by the handshake, from its session keys
        self._decoder: FrameDecoder | None = None
        self._acceptor: handshake.Acceptor | None = None
        self._dialer: handshake.Dialer | None = None
        self._hello_answered = False
        self._certificate_node: int | None = None   # the node id the peer's TLS certificate names
        self._closed = False
        self._timeout: asyncio.TimerHandle | None = None

    # ---- asyncio callbacks ---------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            detect_dead_link(sock, self._config.dead_link_timeout_s)
        loop = asyncio.get_running_loop()
        self._timeout = loop.call_later(self._config.handshake_timeout_s, self._handshake_timed_out)
        if self._config.tls is not None and not self._check_certificate():
            return
        if self._dialed_peer is None:
            self._acceptor = handshake.Acceptor(self._config.secret, self._config.node_id)
            self._transport.write(self._acceptor.hello())
        else:
            self._dialer = handshake.Dialer(self._config.secret, self._config.node_id)

    def data_received(self, data: bytes) -> None:
        if self._closed:
            return
        try:
            if self._peer_id is None:
                data = self._handshake(data)
                if self._peer_id is None or not data:
                    return
            assert self._decoder is not None, "authenticated without session keys"
            for frame in self._decoder.feed(data):
                if self._closed:   # the network left while handling an earlier frame
                    return
                self._network._deliver(self._peer_id, frame.group_id, decode(frame.payload))
        except FrameAuthError as exc:
            self._network._refused_frame(self._peer_id)
            self.close(f"{type(exc).__name__}: {exc}")
        except (handshake.AuthError, FrameError, CodecError) as exc:
            self.close(f"{type(exc).__name__}: {exc}")

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        if self._timeout:
            self._timeout.cancel()
        self._network._lost(self._peer_id, self)

    # ---- handshake -----------------------------------------------------

    def _take(self, data: bytes, size: int) -> bytes | None:
        self._pending += data
        if len(self._pending) < size:
            return None
        message = bytes(self._pending[:size])
        del self._pending[:size]
        return message

    def _handshake(self, data: bytes) -> bytes:
        """Consume handshake bytes; return whatever follows the handshake."""
        if self._acceptor is not None:
            auth = self._take(data, handshake.AUTH_SIZE)
            if auth is None:
                return b""
            peer_id, ok = self._acceptor.receive_auth(auth)
            self._transport.write(ok)
            return self._finish_handshake(peer_id, self._acceptor.keys)
        assert self._dialer is not None
        if not self._hello_answered:
            hello = self._take(data, handshake.HELLO_SIZE)
            if hello is None:
                return b""
            self._transport.write(self._dialer.receive_hello(hello))
            self._hello_answered = True
            data = b""
        ok = self._take(data, handshake.OK_SIZE)
        if ok is None:
            return b""
        peer_id = self._dialer.receive_ok(ok)
        if peer_id != self._dialed_peer:
            raise handshake.AuthError(f"dialed node {self._dialed_peer} but node {peer_id} answered")
        return self._finish_handshake(peer_id, self._dialer.keys)

    def _check_certificate(self) -> bool:
        """With TLS (the handshake is done when asyncio calls connection_made):
        the peer's certificate names one node, and a dialed peer is the node dialed."""
        assert self._transport is not None
        self._certificate_node = node_id_of(self._transport.get_extra_info("peercert"))
        if self._certificate_node is None:
            self.close("the peer's TLS certificate names no node (CN=raftka-node-<id>)")
            return False
        if self._dialed_peer is not None and self._certificate_node != self._dialed_peer:
            self.close(f"dialed node {self._dialed_peer} but the certificate is node {self._certificate_node}'s")
            return False
        return True

    def _finish_handshake(self, peer_id: int, keys: handshake.SessionKeys | None) -> bytes:
        if self._timeout:
            self._timeout.cancel()
        if self._config.tls is not None and peer_id != self._certificate_node:
            raise handshake.AuthError(f"node {peer_id} authenticated over TLS with node {self._certificate_node}'s "
                                      "certificate: a node speaks only for itself")
        assert keys is not None, "the handshake succeeded without deriving session keys"
        self._sealer = FrameSealer(keys.send)   # before _authenticated: its callbacks may send at once
        self._decoder = FrameDecoder(keys.receive, self._config.max_frame_bytes)
        if not self._network._authenticated(peer_id, self):
            return b""
        self._peer_id = peer_id
        rest = bytes(self._pending)
        self._pending.clear()
        return rest

    def _handshake_timed_out(self) -> None:
        if self._peer_id is None:
            self.close(f"no handshake within {self._config.handshake_timeout_s} s")

    # ---- sending -------------------------------------------------------

    @property
    def backlog_bytes(self) -> int:
        buffered = self._transport.get_write_buffer_size() if self._transport else 0
        return self._outbox_bytes + buffered

    def queue(self, frame: bytearray, group_id: int, kind: FrameKind) -> None:
        """Seal a frame made with frames.new_frame and queue it: every frame
        sealed is sent, in sealing order, or the link closes."""
        assert self._sealer is not None, "frames queued before the handshake"
        self._sealer.seal(frame, group_id, kind)
        self._outbox.append(frame)
        self._outbox_bytes += len(frame)

    def discard_queued(self) -> None:
        self._outbox.clear()
        self._outbox_bytes = 0

    def flush(self) -> None:
        if self._outbox and self._transport and not self._closed:
            outbox = self._outbox
            self._transport.write(outbox[0] if len(outbox) == 1 else b"".join(outbox))
        self._outbox.clear()
        self._outbox_bytes = 0

    def close(self, reason: str) -> None:
        if self._closed:
            return
        self._closed = True
        peer = self._transport.get_extra_info("peername") if self._transport else None
        log.warning("node %d: closing peer connection %s (node %s): %s",
                    self._config.node_id, peer, self._peer_id, reason)
        if self._transport:
            self._transport.abort()
