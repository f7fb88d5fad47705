"""PartitionReplica: one replica of a partition's Raft group (pysyncobj), whose
replicated command is "append these record batches" to a PartitionLog.

- Commands travel over the broker's shared PeerNetwork through GroupTransport,
  never pysyncobj's pickling TCP transport.
- Apply is deterministic: the batches get base offset = log end offset and the
  leader epoch the leader stamped into the command, so every replica writes
  the same bytes. High watermark = end of the last applied command.
- Apply is idempotent across restarts: the partition state stores the high
  watermark together with the Raft index it was reached at. On start the log
  is cut back to that high watermark (anything later was never recorded as
  applied), and entries the journal replays at or below that index are
  skipped; the rest are applied again.
- currentTerm and votedFor are durable: pysyncobj persists them only with a
  journal file, so every replica has one.

Not yet here (see the replication issue's notes): compaction of the journal
with a small checkpoint, follower catch-up past the compaction point, and the
metadata group.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable

from pysyncobj import FAIL_REASON, SyncObj, SyncObjConf, replicated
from pysyncobj.node import Node
from pysyncobj.transport import Transport

from engine.storage.partition_log import PartitionLog
from raft.transport import PeerNetwork

log = logging.getLogger(__name__)

AppendCallback = Callable[[int | None, Exception | None], None]


class NotLeaderError(Exception):
    """Appends go through the partition's leader; this replica is not it."""

    def __init__(self, group_id: int, leader_id: int | None) -> None:
        super().__init__(f"group {group_id}: not the leader (leader is {leader_id})")
        self.leader_id = leader_id


class ReplicationError(Exception):
    """A proposed append was not committed (leadership moved, queue full, ...)."""


class PeerNode(Node):
    """A pysyncobj node standing for a broker of the peer network."""

    def __init__(self, broker_id: int) -> None:
        super().__init__(f"broker-{broker_id}")
        self.broker_id = broker_id


class GroupTransport(Transport):
    """pysyncobj's Transport for one group, over the broker's PeerNetwork."""

    def __init__(self, network: PeerNetwork, group_id: int, peers: dict[int, PeerNode]) -> None:
        super().__init__(None, None, list(peers.values()))
        self._network = network
        self._group_id = group_id
        self._peers = peers

    def send(self, node: PeerNode, message: Any) -> bool:
        return self._network.send(node.broker_id, self._group_id, message)

    def deliver(self, peer_id: int, message: Any) -> None:
        node = self._peers.get(peer_id)
        if node is not None:
            self._onMessageReceived(node, message)

    def peer_connected(self, peer_id: int) -> None:
        if peer_id in self._peers:
            self._onNodeConnected(self._peers[peer_id])

    def peer_disconnected(self, peer_id: int) -> None:
        if peer_id in self._peers:
            self._onNodeDisconnected(self._peers[peer_id])


def raft_conf(journal_path: Path, **overrides: Any) -> SyncObjConf:
    """pysyncobj settings for a group ticked by RaftNode (never its own thread)."""
    settings = dict(autoTick=False, journalFile=str(journal_path), appendEntriesUseBatch=True,
                    commandsWaitLeader=False, dynamicMembershipChange=False,
                    appendEntriesBatchSizeBytes=4 * 1024 * 1024)
    settings.update(overrides)
    return SyncObjConf(**settings)


class PartitionReplica(SyncObj):
    """This broker's replica of one partition's Raft group."""

    def __init__(self, group_id: int, partition_log: PartitionLog, self_id: int, replica_ids: list[int],
                 network: PeerNetwork, journal_path: Path, **raft_settings: Any) -> None:
        self.group_id = group_id
        self.self_id = self_id
        self._log = partition_log
        self._recorded_applied_index = partition_log.applied_index
        partition_log.truncate(partition_log.high_watermark)
        peers = {rid: PeerNode(rid) for rid in replica_ids if rid != self_id}
        self.transport = GroupTransport(network, group_id, peers)
        super().__init__(PeerNode(self_id), list(peers.values()), raft_conf(journal_path, **raft_settings),
                         transport=self.transport)

    # ---- leadership ----------------------------------------------------

    @property
    def is_leader(self) -> bool:
        return self._isLeader()

    @property
    def leader_id(self) -> int | None:
        leader = self._getLeader()
        return leader.broker_id if isinstance(leader, PeerNode) else None

    @property
    def leader_epoch(self) -> int:
        """The Raft term: Kafka's leader epoch for this partition."""
        return self.raftCurrentTerm

    @property
    def log(self) -> PartitionLog:
        return self._log

    # ---- appends -------------------------------------------------------

    def propose_append(self, batches: bytes, callback: AppendCallback) -> None:
        """Replicate an append; `callback(base_offset, None)` once committed and
        applied here, or `callback(None, error)`. Leader only."""
        if not self.is_leader:
            raise NotLeaderError(self.group_id, self.leader_id)

        def done(result: int | None, reason: int) -> None:
            if reason == FAIL_REASON.SUCCESS:
                callback(result, None)
            else:
                callback(None, ReplicationError(f"group {self.group_id}: append failed, reason {reason}"))
        self._apply_append(bytes(batches), self.leader_epoch, callback=done)

    @replicated
    def _apply_append(self, batches: bytes, leader_epoch: int) -> int | None:
        index = self._SyncObj__raftLastApplied + 1  # pysyncobj bumps it after the apply returns
        if index <= self._recorded_applied_index:
            return None  # applied before a restart; the journal replays it
        result = self._log.append(batches, leader_epoch=leader_epoch)
        self._log.set_high_watermark(self._log.log_end_offset, applied_index=index)
        return result.base_offset
