"""RaftNode: a broker's replication engine. It owns the peer network and ticks
every Raft group of the broker from one asyncio task (pysyncobj's autoTick
off), so there are no locks and no thread hops: message handlers, ticks and
apply callbacks all run on the event loop's thread. After each round of
ticks the network flushes, one write per peer for all groups.
"""
from __future__ import annotations

import asyncio
import logging
from typing import Any

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
        self._task: asyncio.Task | None = None
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
        self.network.register_group(replica.group_id, replica.transport.deliver)
        for peer_id in self.network.connected_peers:
            replica.transport.peer_connected(peer_id)

    def remove_group(self, group_id: int) -> PartitionReplica:
        replica = self._groups.pop(group_id)
        self.network.unregister_group(group_id)
        replica.destroy()
        return replica

    async def start(self) -> None:
        await self.network.start()
        self._task = asyncio.get_running_loop().create_task(self._tick_forever())

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
        for group_id in list(self._groups):
            self.remove_group(group_id)
        await self.network.close()

    def tick(self) -> None:
        """One round: every group ticks once, then each peer gets one write."""
        for replica in self._groups.values():
            replica.doTick(0.0)
        self.network.flush()

    async def _tick_forever(self) -> None:
        while True:
            try:
                self.tick()
            except Exception:  # one bad tick must not stop replication for every group
                log.exception("node %d: tick failed", self.node_id)
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
