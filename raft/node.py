"""RaftNode: a broker's replication engine. It owns the peer network and ticks
every Raft group of the broker on the asyncio event loop (pysyncobj's
autoTick off), so there are no locks and no thread hops: message handlers,
ticks and apply callbacks all run on the event loop's thread.

A group ticks when something happened to it (a message arrived, an append
was proposed: at the next loop iteration) or when its own deadline passes
(heartbeat due as leader, election timeout as follower). Deadlines sit in a
heap behind one loop timer, so idle groups cost nothing between them. After
each round of ticks the network flushes, one write per peer for all groups.

Idle groups' heartbeats are coalesced (see RaftGroup.coalesced_heartbeat):
every heartbeat period, one message per peer lists every idle group this
broker leads and the peer follows, and one answer lists which it accepted.
A thousand idle groups then cost a few messages per second, not thousands
of pysyncobj ticks.
"""
from __future__ import annotations

import asyncio
import heapq
import logging
import math
import struct
from typing import Any

from raftka.raft.group import RaftGroup
from raftka.raft.pysyncobj_adapter import monotonic_time
from raftka.raft.transport import PeerNetwork
from raftka.raft.votes import VoteStore

log = logging.getLogger(__name__)

NODE_CHANNEL = 0xFFFFFFFF        # frames for the node itself, not a group
HEARTBEAT = struct.Struct(">IQQQ")   # group, term, last index, commit index
GROUP_IDS = struct.Struct(">I")


class RaftNode:
    """Every Raft group of one broker, ticked together on the event loop."""

    def __init__(self, network: PeerNetwork, votes: VoteStore | None = None) -> None:
        """`votes`: the store this node's groups keep term and vote in (pass
        it to them as `vote_store`); synced before every network flush."""
        self.network = network
        self.votes = votes
        if votes is not None:
            network.before_flush = votes.sync
        self._groups: dict[int, RaftGroup] = {}
        self._dirty: set[int] = set()
        self._dirty_scheduled = False
        self._due: dict[int, float] = {}          # group -> its scheduled tick (pysyncobj's clock)
        self._heap: list[tuple[float, int]] = []  # (due, group); entries not in _due are stale
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = math.inf
        self._heartbeat_interval_s = math.inf
        self._heartbeat_timer: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        network.on_peer_connected(self._peer_connected)
        network.on_peer_disconnected(self._peer_disconnected)
        network.register_group(NODE_CHANNEL, self._on_node_message)

    @property
    def node_id(self) -> int:
        return self.network.config.node_id

    def group(self, group_id: int) -> RaftGroup:
        return self._groups[group_id]

    def groups(self) -> list[RaftGroup]:
        return list(self._groups.values())

    def add_group(self, replica: RaftGroup) -> None:
        """Start ticking `replica`; peers already connected are announced to it."""
        if replica.group_id in self._groups or replica.group_id == NODE_CHANNEL:
            raise ValueError(f"group {replica.group_id} already runs on node {self.node_id}")
        self._groups[replica.group_id] = replica
        replica.transport.on_activity = lambda gid=replica.group_id: self.mark_active(gid)
        self.network.register_group(replica.group_id, replica.transport.deliver)
        for peer_id in self.network.connected_peers:
            replica.transport.peer_connected(peer_id)
        period = replica.conf.appendEntriesPeriod
        if period < self._heartbeat_interval_s:
            self._heartbeat_interval_s = period
            self._arm_heartbeats()
        self.mark_active(replica.group_id)

    def remove_group(self, group_id: int) -> RaftGroup:
        replica = self._groups.pop(group_id)
        self._dirty.discard(group_id)
        self._due.pop(group_id, None)
        self.network.unregister_group(group_id)
        replica.destroy()
        return replica

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        await self.network.start()
        self._arm_heartbeats()
        for group_id in self._groups:
            self.mark_active(group_id)

    async def stop(self) -> None:
        for timer in (self._timer, self._heartbeat_timer):
            if timer is not None:
                timer.cancel()
        self._timer = self._heartbeat_timer = None
        for group_id in list(self._groups):
            self.remove_group(group_id)
        self._loop = None
        await self.network.close()
        if self.votes is not None:
            self.votes.close()

    # ---- ticking -------------------------------------------------------------

    def mark_active(self, group_id: int) -> None:
        """Tick `group_id` at the next loop iteration."""
        self._dirty.add(group_id)
        if not self._dirty_scheduled and self._loop is not None:
            self._dirty_scheduled = True
            self._loop.call_soon(self._tick_active)

    def _tick_active(self) -> None:
        self._dirty_scheduled = False
        active, self._dirty = self._dirty, set()
        for group_id in active:
            replica = self._groups.get(group_id)
            if replica is not None:
                self._tick_one(replica)
        self.network.flush()

    def tick(self) -> None:
        """Tick every group that is marked active or whose deadline passed, then flush."""
        now = monotonic_time()
        while self._heap and self._heap[0][0] <= now:
            due, group_id = heapq.heappop(self._heap)
            if self._due.get(group_id) != due:
                continue  # superseded by a later schedule
            del self._due[group_id]
            self._dirty.add(group_id)
        self._tick_active()

    def _tick_one(self, replica: RaftGroup) -> None:
        try:
            replica.doTick(0.0)
        except Exception:  # one bad group must not stop replication for every group
            log.exception("node %d: tick of group %d failed", self.node_id, replica.group_id)
        self._schedule(replica)

    def _schedule(self, replica: RaftGroup) -> None:
        due = replica.next_tick_due()
        if self._due.get(replica.group_id) == due:
            return
        self._due[replica.group_id] = due
        heapq.heappush(self._heap, (due, replica.group_id))
        if due < self._timer_at:
            self._arm(due)

    def _arm(self, due: float) -> None:
        if self._loop is None:
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = due
        self._timer = self._loop.call_later(max(0.0, due - monotonic_time()), self._on_timer)

    def _on_timer(self) -> None:
        self._timer, self._timer_at = None, math.inf
        self.tick()
        while self._heap and self._due.get(self._heap[0][1]) != self._heap[0][0]:
            heapq.heappop(self._heap)  # drop stale entries so the timer is armed for a real one
        if self._heap:
            self._arm(self._heap[0][0])

    # ---- coalesced heartbeats --------------------------------------------------

    def _arm_heartbeats(self) -> None:
        if self._loop is None or math.isinf(self._heartbeat_interval_s):
            return
        if self._heartbeat_timer is not None:
            self._heartbeat_timer.cancel()
        self._heartbeat_timer = self._loop.call_later(self._heartbeat_interval_s, self._heartbeat_round)

    def _heartbeat_round(self) -> None:
        self._arm_heartbeats()
        now = monotonic_time()
        hold_s = 2 * self._heartbeat_interval_s
        per_peer: dict[int, bytearray] = {}
        connected = self.network.connected_peers
        for replica in self._groups.values():
            entry = replica.coalesced_heartbeat(now, hold_s)
            if entry is None:
                continue
            self._schedule(replica)
            packed = HEARTBEAT.pack(*entry)
            for peer_id in replica.replica_ids:
                if peer_id != self.node_id and peer_id in connected:
                    per_peer.setdefault(peer_id, bytearray()).extend(packed)
        for peer_id, entries in per_peer.items():
            self.network.send(peer_id, NODE_CHANNEL, {"type": "rk_hb", "g": bytes(entries)})
        self.network.flush()

    def _on_node_message(self, peer_id: int, message: Any) -> None:
        if not isinstance(message, dict):
            return
        kind = message.get("type")
        if kind == "rk_hb":
            self._on_heartbeats(peer_id, message.get("g"))
        elif kind == "rk_hb_ack":
            self._on_heartbeat_answers(peer_id, message.get("ok"), message.get("stale"))

    def _on_heartbeats(self, peer_id: int, entries: Any) -> None:
        if not isinstance(entries, bytes) or len(entries) % HEARTBEAT.size:
            log.warning("node %d: malformed heartbeats from peer %d", self.node_id, peer_id)
            return
        now = monotonic_time()
        accepted, stale = bytearray(), bytearray()
        for group_id, term, last, commit in HEARTBEAT.iter_unpack(entries):
            replica = self._groups.get(group_id)
            if replica is not None and replica.accept_coalesced_heartbeat(peer_id, term, last, commit, now):
                accepted += GROUP_IDS.pack(group_id)
                self._schedule(replica)
            else:
                stale += GROUP_IDS.pack(group_id)
        self.network.send(peer_id, NODE_CHANNEL, {"type": "rk_hb_ack", "ok": bytes(accepted), "stale": bytes(stale)})
        self.network.flush()

    def _on_heartbeat_answers(self, peer_id: int, accepted: Any, stale: Any) -> None:
        if not all(isinstance(v, bytes) and len(v) % GROUP_IDS.size == 0 for v in (accepted, stale)):
            log.warning("node %d: malformed heartbeat answers from peer %d", self.node_id, peer_id)
            return
        now = monotonic_time()
        for (group_id,) in GROUP_IDS.iter_unpack(accepted):
            replica = self._groups.get(group_id)
            if replica is not None:
                replica.coalesced_heartbeat_answered(peer_id, True, now)
        for (group_id,) in GROUP_IDS.iter_unpack(stale):
            replica = self._groups.get(group_id)
            if replica is not None:
                replica.coalesced_heartbeat_answered(peer_id, False, now)
                self.mark_active(group_id)

    # ---- peers ---------------------------------------------------------------

    def _peer_connected(self, peer_id: int) -> None:
        for replica in self._groups.values():
            replica.transport.peer_connected(peer_id)

    def _peer_disconnected(self, peer_id: int) -> None:
        for replica in self._groups.values():
            replica.transport.peer_disconnected(peer_id)

    def status(self) -> dict[str, Any]:
        return {gid: {"leader": r.leader_id, "term": r.leader_epoch} for gid, r in self._groups.items()}
