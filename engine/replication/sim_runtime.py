"""What a simulated broker's RaftNode runs on: an asyncio event loop on the
simulation's fake clock, and an in-memory stand-in for PeerNetwork.

- `FakeTimeLoop`: an asyncio event loop whose `time()` is the fake clock and
  whose selector never waits (there is no I/O). Nothing runs by itself:
  `run_due()` runs every callback that is ready or whose timer is due at the
  fake clock's current reading, until none is left, on the caller's thread
  (there are no threads). A callback that raises is kept (asyncio would only
  log it) and `run_due` re-raises it, so a bug fails the run.
- `running_on(loop)`: `loop` is the running loop inside (so
  `asyncio.get_running_loop()` works for code called from outside a callback,
  as the simulation calls message handlers and proposals); nests.
- `SimPeerNetwork`: exactly what RaftNode and GroupTransport use of
  PeerNetwork (raft/transport.py): `config.node_id`, `before_flush`,
  peer-connected/-disconnected callbacks, `register_group`/`unregister_group`,
  `connected_peers`, `send` (queued, and flushed at the next loop iteration
  or by `flush`, after `before_flush` as PeerNetwork does), `leave`, `start`,
  `close`. Every message is encoded with the real codec when sent and
  decoded on delivery; `flush` hands each frame to the simulation's faulty
  network (`transmit`), which delivers it later with `deliver`.
  Connections are the simulation's to make and break (`connect`, `lose`):
  a link exists while both nodes run, as a TCP connection does.
"""
from __future__ import annotations

import asyncio
import collections
import selectors
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator

from raftka.raft import codec

MAX_CALLBACK_ROUNDS = 10_000   # loop iterations in one run_due; more means a callback reschedules forever

Transmit = Callable[[int, int, bytes], None]   # (peer, group, encoded message)


class _NeverWaits(selectors.BaseSelector):
    """A selector with nothing registered, that returns at once."""

    def register(self, fileobj: Any, events: int, data: Any = None) -> selectors.SelectorKey:
        raise NotImplementedError("the simulation's loop has no I/O")

    def unregister(self, fileobj: Any) -> selectors.SelectorKey:
        raise KeyError(fileobj)

    def select(self, timeout: float | None = None) -> list:
        return []

    def get_map(self) -> dict:
        return {}


class FakeTimeLoop(asyncio.BaseEventLoop):
    """An event loop on a fake clock, run step by step with `run_due` (see the module docstring)."""

    def __init__(self, clock: Callable[[], float], now: Callable[[], float]) -> None:
        """`clock()` reads the time (it may advance a little per reading);
        `now()` is the current time without advancing it."""
        super().__init__()
        self._fake_clock = clock
        self._fake_now = now
        self._selector = _NeverWaits()
        self._raised: list[BaseException] = []
        self.set_exception_handler(self._keep)

    def time(self) -> float:
        return self._fake_clock()

    def _process_events(self, event_list: list) -> None:
        assert not event_list, "the simulation's loop has no I/O"

    def _write_to_self(self) -> None:
        pass   # nothing waits in select: call_soon_threadsafe needs no wake-up

    def _keep(self, _loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        self._raised.append(context.get("exception") or RuntimeError(context.get("message", "loop error")))

    def _anything_due(self) -> bool:
        if self._ready:
            return True
        if not self._scheduled:
            return False
        head = self._scheduled[0]
        return head.cancelled() or head.when() <= self._fake_now()

    def run_due(self) -> None:
        """Run every callback ready or due now, and those they make ready, until none is left."""
        with running_on(self):
            for _ in range(MAX_CALLBACK_ROUNDS):
                if not self._anything_due():
                    return
                self._run_once()
                if self._raised:
                    error, self._raised = self._raised[0], []
                    raise error
        raise RuntimeError(f"the event loop still had callbacks due after {MAX_CALLBACK_ROUNDS} rounds")


@contextmanager
def running_on(loop: asyncio.AbstractEventLoop) -> Iterator[None]:
    """`loop` is the running event loop inside (restored after: nests)."""
    before = asyncio.events._get_running_loop()
    asyncio.events._set_running_loop(loop)
    try:
        yield
    finally:
        asyncio.events._set_running_loop(before)


def run_to_end(coroutine: Any) -> Any:
    """Run a coroutine that never waits (RaftNode.start on a SimPeerNetwork) to its end, now."""
    try:
        coroutine.send(None)
    except StopIteration as done:
        return done.value
    coroutine.close()
    raise RuntimeError("the coroutine waited: the simulation runs only coroutines that do not")


@dataclass(frozen=True)
class SimNetworkConfig:
    node_id: int


class SimPeerNetwork:
    """One simulated broker's peer network (see the module docstring)."""

    def __init__(self, node_id: int, transmit: Transmit) -> None:
        self.config = SimNetworkConfig(node_id)
        self.before_flush: Callable[[], None] | None = None
        self._transmit = transmit
        self._handlers: dict[int, Callable[[int, Any], None]] = {}
        self._connected: set[int] = set()
        self._on_connected: list[Callable[[int], None]] = []
        self._on_disconnected: list[Callable[[int], None]] = []
        self._outbox: list[tuple[int, int, bytes]] = []
        self._flush_scheduled = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self.left: str | None = None
        self.sent: collections.Counter[str] = collections.Counter()   # message type -> messages sent

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()

    async def close(self) -> None:
        self.leave("network closing")

    def leave(self, reason: str) -> None:
        """Out of the network: queued frames dropped, sends refused, nothing delivered."""
        if self.left is None:
            self.left = reason
            self._outbox.clear()

    # ---- what RaftNode and GroupTransport call ---------------------------

    def register_group(self, group_id: int, handler: Callable[[int, Any], None]) -> None:
        self._handlers[group_id] = handler

    def unregister_group(self, group_id: int) -> None:
        self._handlers.pop(group_id, None)

    def on_peer_connected(self, callback: Callable[[int], None]) -> None:
        self._on_connected.append(callback)

    def on_peer_disconnected(self, callback: Callable[[int], None]) -> None:
        self._on_disconnected.append(callback)

    @property
    def connected_peers(self) -> set[int]:
        return set(self._connected)

    def send(self, peer_id: int, group_id: int, message: Any) -> bool:
        if self.left is not None or peer_id not in self._connected:
            return False
        if isinstance(message, dict):
            self.sent[str(message.get("type"))] += 1
        self._outbox.append((peer_id, group_id, codec.encode(message)))
        if not self._flush_scheduled and self._loop is not None:
            self._flush_scheduled = True
            self._loop.call_soon(self.flush)
        return True

    def flush(self) -> None:
        """Hand every queued frame to the network, after `before_flush` (the votes they reflect made durable)."""
        self._flush_scheduled = False
        if self.left is not None:
            return
        if self.before_flush is not None:
            self.before_flush()
        if self.left is not None:   # before_flush failed and took the node out: nothing leaves
            return
        outbox, self._outbox = self._outbox, []
        for peer_id, group_id, frame in outbox:
            self._transmit(peer_id, group_id, frame)

    # ---- what the simulation calls ---------------------------------------

    def connect(self, peer_id: int) -> None:
        if self.left is None and peer_id not in self._connected:
            self._connected.add(peer_id)
            for callback in list(self._on_connected):
                callback(peer_id)

    def lose(self, peer_id: int) -> None:
        if peer_id in self._connected:
            self._connected.discard(peer_id)
            self._outbox = [queued for queued in self._outbox if queued[0] != peer_id]
            for callback in list(self._on_disconnected):
                callback(peer_id)

    def deliver(self, peer_id: int, group_id: int, frame: bytes) -> bool:
        """A frame from `peer_id` arrived: decode it and hand it to its group's
        handler (whatever that raises goes to the caller). False if nobody took it."""
        if self.left is not None or peer_id not in self._connected:
            return False
        handler = self._handlers.get(group_id)
        if handler is None:
            return False
        handler(peer_id, codec.decode(frame))
        return True
