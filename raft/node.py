"""RaftNode: a broker's replication engine. It owns the peer network and ticks
every Raft group of the broker on the asyncio event loop (pysyncobj's
autoTick off), so there are no locks and no thread hops: message handlers,
ticks and apply callbacks all run on the event loop's thread.

A group ticks when something happened to it (a message arrived, an append
was proposed: at the next loop iteration) or when its own deadline passes
(heartbeat due as leader, election timeout as follower); idle groups cost
nothing between their deadlines. After each round of ticks the network
flushes, one write per peer for all groups.
"""
from __future__ import annotations

import asyncio
import logging
from typing import Any

from pysyncobj import syncobj as _syncobj

from raft.group import PartitionReplica
from raft.transport import PeerNetwork

log = logging.getLogger(__name__)

DEFAULT_TICK_INTERVAL_S = 0.01


class RaftNode:
    """Every Raft group of one broker, ticked together on the event loop."""

    def __init__(self, network: PeerNetwork, tick_interval_s: float = DEFAULT_TICK_INTERVAL_S) -> None:
        self.network = network
        self.tick_interval_s = tick_interval_s
        self._groups: dict[int, PartitionReplica] = {}
        self._dirty: set[int] = set()
        self._dirty_scheduled = False
        self._task: asyncio.Task | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        network.on_peer_connected(self._peer_connected)
        network.on_peer_disconnected(self._peer_disconnected)

    @property
    def node_id(self) -> int:
        return self.network.config.node_id

    def group(self, group_id: int) -> PartitionReplica:
        return self._groups[group_id]

    def add_group(self, replica: PartitionReplica) -> None:
        """Start ticking `replica`; peers already connected are announced to it."""
        if replica.group_id in self._groups:
            raise ValueError(f"group {replica.group_id} already runs on node {self.node_id}")
        self._groups[replica.group_id] = replica
        replica.transport.on_activity = lambda gid=replica.group_id: self.mark_active(gid)
        self.network.register_group(replica.group_id, replica.transport.deliver)
        for peer_id in self.network.connected_peers:
            replica.transport.peer_connected(peer_id)
        self.mark_active(replica.group_id)

    def remove_group(self, group_id: int) -> PartitionReplica:
        replica = self._groups.pop(group_id)
        self._dirty.discard(group_id)
        self.network.unregister_group(group_id)
        replica.destroy()
        return replica

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        await self.network.start()
        self._task = self._loop.create_task(self._tick_forever())

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
        for group_id in list(self._groups):
            self.remove_group(group_id)
        await self.network.close()

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
        """One round: every group whose deadline passed ticks, then each peer gets one write."""
        now = _syncobj.monotonicTime()
        for replica in list(self._groups.values()):
            if replica.group_id in self._dirty or replica.next_tick_due() <= now:
                self._dirty.discard(replica.group_id)
                self._tick_one(replica)
        self.network.flush()

    def _tick_one(self, replica: PartitionReplica) -> None:
        try:
            replica.doTick(0.0)
        except Exception:  # one bad group must not stop replication for every group
            log.exception("node %d: tick of group %d failed", self.node_id, replica.group_id)

    async def _tick_forever(self) -> None:
        while True:
            self.tick()
            await asyncio.sleep(self.tick_interval_s)

    def _peer_connected(self, peer_id: int) -> None:
        for replica in self._groups.values():
            replica.transport.peer_connected(peer_id)

    def _peer_disconnected(self, peer_id: int) -> None:
        for replica in self._groups.values():
            replica.transport.peer_disconnected(peer_id)

    def status(self) -> dict[str, Any]:
        return {gid: {"leader": r.leader_id, "term": r.leader_epoch,
                      "high_watermark": r.log.high_watermark} for gid, r in self._groups.items()}
