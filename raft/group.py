"""PartitionReplica: one replica of a partition's Raft group (pysyncobj), whose
replicated command is "append these record batches" to a PartitionLog.

- Commands travel over the broker's shared PeerNetwork through GroupTransport,
  never pysyncobj's pickling TCP transport. A command is raw bytes,
  `0x10 | leader epoch (i32) | record batches`, not a pickled method call, so
  applying it copies nothing and unpickles nothing.
- Appends proposed during one event-loop iteration (the produce requests read
  together) become one entry, `0x11 | leader epoch (i32) | part count (u32) |
  part sizes (u32 each) | parts`, each part applied as its own append with
  its own outcome: the Raft cost (journal write, one message per follower,
  acknowledgement, commit) is paid per iteration, not per request.
- Apply is deterministic: the batches get base offset = log end offset and the
  leader epoch the leader stamped into the command, so every replica writes
  the same bytes. Batches every replica rejects (corrupt) are rejected by all
  alike, and the proposer gets the error. High watermark = end of the last
  applied command.
- Apply is idempotent across restarts: the partition state stores the high
  watermark together with the Raft index it was reached at. On start the log
  is cut back to that high watermark (anything later was never recorded as
  applied), and entries the journal replays at or below that index are
  skipped; the rest are applied again.
- The Raft log is a DiskJournal (journal.py): on disk, durable term and vote.
- Compaction writes a small checkpoint (checkpoint.py) instead of pickling the
  object: the Raft index, the log end offset at that index, and the two
  boundary entries pysyncobj keeps. A follower that receives a checkpoint
  beyond its own log fetches the missing offset range from the leader
  (catch-up, below), applying later commands only once it has it.
"""
from __future__ import annotations

import asyncio
import logging
import struct
from pathlib import Path
from typing import Any, Callable

from pysyncobj import FAIL_REASON, SyncObj, SyncObjConf
from pysyncobj import syncobj as _syncobj
from pysyncobj.node import Node
from pysyncobj.transport import Transport

from engine.errors import (CorruptRecordError, InvalidProducerEpochError, OutOfOrderSequenceError,
                           RecordTooLargeError)
from engine.records import layout
from engine.records.batch import read_header
from engine.storage.producer_state import REBUILD_SEGMENTS, ProducerState
from engine.storage.partition_log import PartitionLog
from raft import checkpoint
from raft.journal import JournalPath
from raft.votes import VoteStore

log = logging.getLogger(__name__)

AppendCallback = Callable[[int | None, Exception | None], None]

APPEND_COMMAND = 0x10                  # after pysyncobj's own command types 0..3
APPEND_HEADER = struct.Struct(">Bi")   # command type, leader epoch
MULTI_APPEND_COMMAND = 0x11            # several appends (produce requests) in one entry
MULTI_APPEND_HEADER = struct.Struct(">BiI")   # command type, leader epoch, part count
PART_SIZE = struct.Struct(">I")
MAX_MESSAGE_ENTRIES_BYTES = 8 * 1024 * 1024
MAX_COMMAND_BYTES = MAX_MESSAGE_ENTRIES_BYTES - 1  # pysyncobj pickles entries at or above the batch size
CATCH_UP_CHUNK_BYTES = 4 * 1024 * 1024
CATCH_UP_RETRY_S = 0.5

# pysyncobj's pipe notifier wakes its own tick thread; groups here are ticked
# by RaftNode, so it would only cost two file descriptors per group.
_syncobj.PIPE_NOTIFIER_ENABLED = False


def _settle(future: "asyncio.Future[Any]", result: Any, error: Exception | None) -> None:
    """Resolve `future` with a proposal's outcome, unless it was already (cancelled by its waiter)."""
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


class NotLeaderError(Exception):
    """Appends go through the partition's leader; this replica is not it."""

    def __init__(self, group_id: int, leader_id: int | None) -> None:
        super().__init__(f"group {group_id}: not the leader (leader is {leader_id})")
        self.group_id = group_id
        self.leader_id = leader_id


class ReplicationError(Exception):
    """A proposed append was not committed (leadership moved, queue full, ...)."""


class PeerNode(Node):
    """A pysyncobj node standing for a broker of the peer network."""

    def __init__(self, broker_id: int) -> None:
        # the id is the int itself: its hash, unlike a str's, is the same in
        # every process, so set iteration (send order) replays from a seed
        super().__init__(broker_id)
        self.broker_id = broker_id


class GroupTransport(Transport):
    """pysyncobj's Transport for one group, over the broker's network (anything
    with `send(peer_id, group_id, message) -> bool`: PeerNetwork, or the
    simulation's network)."""

    def __init__(self, network: Any, group_id: int, peers: dict[int, PeerNode]) -> None:
        super().__init__(None, None, list(peers.values()))
        self._network = network
        self._group_id = group_id
        self._peers = peers
        self.on_extension_message: Callable[[int, dict], None] | None = None
        self.on_raft_message: Callable[[PeerNode, dict], None] | None = None
        self.rewrite_outgoing: Callable[[PeerNode, dict], None] | None = None
        self.on_activity: Callable[[], None] | None = None

    def send(self, node: PeerNode, message: Any) -> bool:
        if self.rewrite_outgoing is not None:
            self.rewrite_outgoing(node, message)
        return self._network.send(node.broker_id, self._group_id, message)

    def peer(self, peer_id: int) -> PeerNode | None:
        return self._peers.get(peer_id)

    def send_to(self, peer_id: int, message: Any) -> bool:
        return self._network.send(peer_id, self._group_id, message)

    def deliver(self, peer_id: int, message: Any) -> None:
        node = self._peers.get(peer_id)
        if node is None or not isinstance(message, dict):
            return
        kind = message.get("type")
        if isinstance(kind, str) and kind.startswith("rk_"):
            if self.on_extension_message is not None:
                self.on_extension_message(peer_id, message)
        elif "transmission" in message:
            # pysyncobj unpickles chunked entries; we never send them (commands
            # stay under the batch size), so a peer that does is refused.
            log.warning("group %d: dropped a chunked-entry message from peer %d", self._group_id, peer_id)
            return
        elif self.on_raft_message is not None:
            self.on_raft_message(node, message)
        else:
            self._onMessageReceived(node, message)
        if self.on_activity is not None:
            self.on_activity()

    def peer_connected(self, peer_id: int) -> None:
        if peer_id in self._peers:
            self._onNodeConnected(self._peers[peer_id])

    def peer_disconnected(self, peer_id: int) -> None:
        if peer_id in self._peers:
            self._onNodeDisconnected(self._peers[peer_id])


class _NullPoller:
    """RaftNode does the waiting; a group's tick must never block or poll."""

    def subscribe(self, *args: Any) -> None:
        pass

    def unsubscribe(self, *args: Any) -> None:
        pass

    def poll(self, timeout: float) -> None:
        pass


def raft_conf(group_dir: Path, journal_fsync: bool = False, persist_vote: bool = True,
              vote_store: VoteStore | None = None, group_id: int = 0, **overrides: Any) -> dict[str, Any]:
    """pysyncobj settings for a group ticked by RaftNode (never its own thread).
    With `vote_store` (the node's), term and vote are made durable there."""
    settings: dict[str, Any] = dict(
        autoTick=False, pollerType="select",
        journalFile=JournalPath(group_dir / "journal", fsync=journal_fsync, persist_vote=persist_vote,
                                vote_store=vote_store, group_id=group_id),
        fullDumpFile=str(group_dir / "checkpoint"),
        appendEntriesUseBatch=False,          # send each command at once, pipelined
        appendEntriesBatchSizeBytes=MAX_MESSAGE_ENTRIES_BYTES,
        commandsWaitLeader=False, dynamicMembershipChange=False,
        raftMinTimeout=1.0, raftMaxTimeout=2.0, appendEntriesPeriod=0.25, leaderFallbackTimeout=2.0,
        logCompactionMinEntries=2000, logCompactionMinTime=60.0, logCompactionBatchSize=1024 * 1024)
    settings.update(overrides)
    return settings


class RaftGroup(SyncObj):
    """This broker's member of one Raft group, ticked by RaftNode over the shared
    PeerNetwork: what every group has in common (leadership, pipelining fixes,
    compaction to a checkpoint). Subclasses say what a command does."""

    def __init__(self, group_id: int, self_id: int, replica_ids: list[int], network: Any, group_dir: Path,
                 journal_max_bytes: int = 128 * 1024 * 1024, **raft_settings: Any) -> None:
        self.group_id = group_id
        self.self_id = self_id
        self.replica_ids = sorted(replica_ids)
        self.group_dir = Path(group_dir)
        self.group_dir.mkdir(parents=True, exist_ok=True)
        self.journal_max_bytes = journal_max_bytes
        peers = {rid: PeerNode(rid) for rid in replica_ids if rid != self_id}
        self.transport = GroupTransport(network, group_id, peers)
        self.transport.on_raft_message = self._on_raft_message
        self.transport.rewrite_outgoing = self._rewrite_outgoing
        self._verified_end: int | None = None   # last index an incoming message verified; see _rewrite_outgoing
        self._checkpoint_loaded = False
        self._caught_up_at: dict[int, float] = {}  # follower -> last time its log reached our commit index
        self._commit_sent: dict[int, int] = {}     # follower -> commit index in our last append_entries to it
        self._stale_peers: set[int] = set()        # followers that refused a coalesced heartbeat
        settings = raft_conf(self.group_dir, group_id=group_id, **raft_settings)
        settings.update(serializer=self._write_checkpoint, deserializer=self._read_checkpoint)
        super().__init__(PeerNode(self_id), list(peers.values()), SyncObjConf(**settings),
                         transport=self.transport)
        self._poller = _NullPoller()
        if not peers:
            # a group of one has no one to split the vote with: elect at once
            self._SyncObj__raftElectionDeadline = _syncobj.monotonicTime()

    # ---- leadership ----------------------------------------------------

    @property
    def is_leader(self) -> bool:
        return self._isLeader()

    @property
    def leader_id(self) -> int | None:
        leader = self._getLeader()
        return leader.broker_id if isinstance(leader, PeerNode) else None

    @property
    def leader_ready(self) -> bool:
        """Leader, and every entry committed before its term is applied here
        (its term's first entry, pysyncobj's no-op, is): state read from the
        applied log is then complete."""
        noop_index = self._SyncObj__noopIDx
        return self.is_leader and noop_index is not None and self._SyncObj__raftLastApplied >= noop_index

    @property
    def leader_epoch(self) -> int:
        """The Raft term: Kafka's leader epoch for this partition."""
        return self.raftCurrentTerm

    def follower_lag(self) -> dict[int, int]:
        """Raft entries each follower's log is behind the leader's (leader only; {} elsewhere)."""
        if not self._isLeader():
            return {}
        last = self._SyncObj__getCurrentLogIndex()
        return {node.broker_id: max(last - match, 0) for node, match in self._SyncObj__raftMatchIndex.items()}

    def in_sync_replicas(self, max_lag_s: float = 10.0) -> list[int]:
        """Kafka's ISR as the leader sees it: itself, and each follower whose log
        reached the leader's commit index within the last `max_lag_s` seconds
        (replica.lag.time.max.ms). Only the leader knows; others answer []."""
        if not self._isLeader():
            self._caught_up_at.clear()
            return []
        now = _syncobj.monotonicTime()
        commit = self._SyncObj__raftCommitIndex
        in_sync = [self.self_id]
        for node, match in self._SyncObj__raftMatchIndex.items():
            if match >= commit:
                self._caught_up_at[node.broker_id] = now
            if now - self._caught_up_at.setdefault(node.broker_id, now) <= max_lag_s:
                in_sync.append(node.broker_id)
        return sorted(in_sync)

    def next_tick_due(self) -> float:
        """When this group must tick again if nothing arrives (pysyncobj's clock)."""
        if self._isLeader():
            if not self._SyncObj__otherNodes and self._SyncObj__raftCommitIndex < self._SyncObj__getCurrentLogIndex() \
                    and self._SyncObj__getCurrentLogTerm() == self._SyncObj__raftCurrentTerm:
                # a group of one commits what it appended this tick at the next
                # one; nothing else would tick it before the heartbeat period
                return 0.0
            return self._SyncObj__newAppendEntriesTime
        return self._SyncObj__raftElectionDeadline

    # ---- coalesced heartbeats (RaftNode sends them, one message per peer) ----
    #
    # An idle group (everything committed, applied and known to every
    # connected follower) needs heartbeats only to keep its followers from
    # electing. pysyncobj would send one append_entries per group and peer
    # every appendEntriesPeriod, and tick the group for it; with a thousand
    # groups that dominates the CPU. Instead RaftNode gathers every idle
    # group's (id, term, last index, commit index) into one message per peer;
    # a follower whose own state matches exactly resets its election timer
    # and nothing else, and acknowledges. Anything that does not match is
    # refused, and the leader falls back to pysyncobj's own append_entries
    # for that group. Heartbeats carry no entries and commit nothing, so
    # Raft's safety does not depend on them.

    def coalesced_heartbeat(self, now: float, hold_s: float) -> list[int] | None:
        """[group, term, last index, commit index] if this group leads and is
        idle; pysyncobj's own heartbeat is then held off for `hold_s`."""
        if not self._isLeader():
            return None
        last = self._SyncObj__getCurrentLogIndex()
        commit = self._SyncObj__raftCommitIndex
        if commit != last or self._SyncObj__raftLastApplied != commit:
            return None
        match, next_index = self._SyncObj__raftMatchIndex, self._SyncObj__raftNextIndex
        for node in self._SyncObj__connectedNodes:
            if (match.get(node) != last or next_index.get(node) != last + 1
                    or self._commit_sent.get(node.broker_id) != commit or node.broker_id in self._stale_peers):
                return None
        self._SyncObj__newAppendEntriesTime = now + hold_s
        return [self.group_id, self.raftCurrentTerm, last, commit]

    def accept_coalesced_heartbeat(self, leader_id: int, term: int, last: int, commit: int, now: float) -> bool:
        """As a follower: True (and the election timer restarted) when this
        heartbeat's leader, term, log end and commit index are exactly ours."""
        if (self._isLeader() or term != self.raftCurrentTerm or self.leader_id != leader_id
                or self._SyncObj__getCurrentLogIndex() != last or self._SyncObj__raftCommitIndex != commit
                or self._SyncObj__raftLastApplied != commit or not self._may_compact()):
            return False
        self._SyncObj__raftElectionDeadline = now + self._SyncObj__generateRaftTimeout()
        return True

    def coalesced_heartbeat_answered(self, peer_id: int, accepted: bool, now: float) -> None:
        node = self.transport.peer(peer_id)
        if node is None or not self._isLeader():
            return
        if accepted:
            self._SyncObj__lastResponseTime[node] = now
        else:
            self._stale_peers.add(peer_id)
            self._SyncObj__newAppendEntriesTime = 0.0   # pysyncobj's own append_entries at the next tick

    def _propose(self, command: bytes, callback: Callable[[Any, Exception | None], None],
                 wake: bool = True) -> None:
        """Replicate `command`; `callback(result of applying it here, None)` once
        committed and applied, or `callback(None, error)`. Leader only.
        `wake` False: the caller is this group's tick, which takes it up itself."""
        if not self.is_leader:
            raise NotLeaderError(self.group_id, self.leader_id)

        def done(result: Any, reason: int) -> None:
            if reason != FAIL_REASON.SUCCESS:
                callback(None, ReplicationError(f"group {self.group_id}: command failed, reason {reason}"))
            elif isinstance(result, Exception):
                callback(None, result)
            else:
                callback(result, None)
        self._applyCommand(command, done)
        if wake and self.transport.on_activity is not None:
            self.transport.on_activity()

    def _propose_future(self, command: bytes) -> "asyncio.Future[Any]":
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._propose(command, lambda result, error: _settle(future, result, error))
        return future

    # ---- pipelining fixes to pysyncobj's replication --------------------
    #
    # The leader sends every command at once (appendEntriesUseBatch off) and
    # advances a follower's next index optimistically, so several messages are
    # in flight. Stock pysyncobj then (a) moves the next index back to each
    # acknowledged index, resending everything in flight, and (b) on the
    # follower, deletes every entry after prevLogIdx before adding the ones
    # received, even identical ones, which can shrink a follower's log below
    # what it already acknowledged (a committed entry could then live on
    # fewer than a majority). Raft deletes only on a term conflict. Both are
    # fixed here, around pysyncobj's own handler.

    def _on_raft_message(self, node: PeerNode, message: dict) -> None:
        kind = message.get("type")
        if kind == "append_entries" and "prevLogIdx" in message:
            self._on_append_entries(node, message)
        elif kind == "append_entries" and message.get("serialized") is not None:
            self._on_snapshot_chunk(node, message)
        elif kind == "next_node_idx" and self._isLeader():
            self._stale_peers.discard(node.broker_id)
            next_index = self._SyncObj__raftNextIndex
            before = next_index.get(node)
            self.transport._onMessageReceived(node, message)
            if message.get("success") and not message.get("reset") and before is not None:
                next_index[node] = max(before, next_index.get(node, 0))
        else:
            self.transport._onMessageReceived(node, message)

    def _on_append_entries(self, node: PeerNode, message: dict) -> None:
        journal = self._SyncObj__raftLog
        last = journal.last_index()
        entries = message.get("entries") or []
        prev_index, prev_term = message.get("prevLogIdx"), message.get("prevLogTerm")
        if not isinstance(prev_index, int) or journal.term_at(prev_index) != prev_term or prev_index >= last:
            self.transport._onMessageReceived(node, message)  # nothing held past prev: stock path
            return
        matched = 0
        for _command, index, term in entries:
            if journal.term_at(index) != term:
                break
            matched += 1
        if matched:
            prev_index, prev_term = entries[matched - 1][1], entries[matched - 1][2]
            entries = entries[matched:]
        if entries or prev_index >= last:
            message = dict(message, prevLogIdx=prev_index, prevLogTerm=prev_term, entries=list(entries))
            self.transport._onMessageReceived(node, message)
            return
        # everything received is already held and we hold more: acknowledge
        # only what the message verified, and keep the rest
        commit_before = self._SyncObj__raftCommitIndex
        self._verified_end = prev_index
        try:
            self.transport._onMessageReceived(
                node, dict(message, prevLogIdx=last, prevLogTerm=journal.term_at(last), entries=[]))
        finally:
            self._verified_end = None
        self._commit_no_further_than(prev_index, commit_before, message.get("commit_index"))

    def _on_snapshot_chunk(self, node: PeerNode, message: dict) -> None:
        """A checkpoint that is not ahead of what this follower already holds
        (a stale reset made the leader send it) must not wipe the journal:
        pysyncobj would clear it, dropping entries we acknowledged."""
        commit_before = self._SyncObj__raftCommitIndex
        self._checkpoint_loaded = False
        try:
            self.transport._onMessageReceived(node, message)
        finally:
            kept_at, self._verified_end = self._verified_end, None  # set by _SyncObj__loadDumpFile
        if not self._checkpoint_loaded:
            # pysyncobj raises the commit index to the leader's on every chunk,
            # even one that installs nothing
            self._commit_no_further_than(kept_at, commit_before, message.get("commit_index"))

    def _commit_no_further_than(self, verified_end: int | None, commit_before: int, leader_commit: Any) -> None:
        """pysyncobj raised the commit index to min(leader's, our last index);
        only entries this message verified, up to `verified_end`, may count."""
        if self._SyncObj__raftCommitIndex <= commit_before:
            return
        clamped = commit_before
        if verified_end is not None and isinstance(leader_commit, int):
            clamped = max(commit_before, min(leader_commit, verified_end))
        self._SyncObj__raftCommitIndex = clamped
        self._SyncObj__raftLog.setRaftCommitIndex(clamped)

    def _SyncObj__loadDumpFile(self, clearJournal: bool) -> None:
        if clearJournal:
            try:
                point = checkpoint.read(Path(self._SyncObj__conf.fullDumpFile))
            except (OSError, checkpoint.CheckpointError):
                log.exception("group %d: unreadable checkpoint received", self.group_id)
                return
            _command, index, term = point.entries[1]
            if self._SyncObj__raftLog.term_at(index) == term or index <= self._SyncObj__raftLastApplied:
                # we hold that entry already: keep our log, acknowledge only up to it
                self._verified_end = index
                return
        else:
            self._trim_journal_to_checkpoint()
        SyncObj._SyncObj__loadDumpFile(self, clearJournal)
        self._checkpoint_loaded = True

    def _trim_journal_to_checkpoint(self) -> None:
        """At start, a journal that still holds entries below the checkpoint
        (killed between writing it and compacting) is compacted now; pysyncobj
        would see its first entries differ from the checkpoint's and clear it,
        losing everything after the checkpoint."""
        path = Path(self._SyncObj__conf.fullDumpFile)
        if not path.exists():
            return
        point = checkpoint.read(path)
        journal = self._SyncObj__raftLog
        (_c, prev_index, prev_term), (_c2, index, term) = point.entries
        if journal.term_at(prev_index) == prev_term and journal.term_at(index) == term:
            journal.deleteEntriesTo(prev_index - journal.first_index())

    def _rewrite_outgoing(self, node: PeerNode, message: Any) -> None:
        if not isinstance(message, dict):
            return
        if message.get("type") == "append_entries" and "commit_index" in message:
            self._commit_sent[node.broker_id] = message["commit_index"]
        if self._verified_end is not None and isinstance(message, dict) \
                and message.get("type") == "next_node_idx" and message.get("success"):
            message["next_node_idx"] = self._verified_end + 1

    # ---- compaction ------------------------------------------------------

    def _SyncObj__tryLogCompaction(self) -> None:
        if not self._may_compact():
            return
        journal = self._SyncObj__raftLog
        if journal.size_bytes > self.journal_max_bytes:
            self._SyncObj__forceLogCompaction = True
        SyncObj._SyncObj__tryLogCompaction(self)
        # Our serializer runs synchronously, but pysyncobj only notices it
        # finished on its next call; until then it offers followers no
        # checkpoint and its send loop spins on one that needs it. Finish now.
        SyncObj._SyncObj__tryLogCompaction(self)

    def _may_compact(self) -> bool:
        return True

    def _write_checkpoint(self, path: str, raft_data: tuple) -> None:
        raise NotImplementedError

    def _read_checkpoint(self, path: str) -> tuple:
        raise NotImplementedError


class PartitionReplica(RaftGroup):
    """This broker's replica of one partition's Raft group."""

    def __init__(self, group_id: int, partition_log: PartitionLog, self_id: int, replica_ids: list[int],
                 network: Any, group_dir: Path, journal_max_bytes: int = 128 * 1024 * 1024,
                 **raft_settings: Any) -> None:
        self._log = partition_log
        self._recorded_applied_index = partition_log.applied_index
        partition_log.truncate(partition_log.high_watermark)
        self._catch_up: checkpoint.CatchUp | None = None
        self._deferred: list[tuple[int, bytes]] = []    # (raft index, command) held during catch-up
        self._pending_appends: list[tuple[Any, asyncio.Future[Any]]] = []   # proposed at the next tick
        self.on_high_watermark: Callable[[], None] | None = None   # the broker wakes waiting fetches
        self.producers = ProducerState()
        self._rebuild_producer_state()
        super().__init__(group_id, self_id, replica_ids, network, group_dir, journal_max_bytes, **raft_settings)
        self.transport.on_extension_message = self._on_extension_message

    @property
    def log(self) -> PartitionLog:
        return self._log

    def _rebuild_producer_state(self) -> None:
        self.producers.rebuild([segment.view() for segment in self._log.segments[-REBUILD_SEGMENTS:]])

    @property
    def catching_up(self) -> bool:
        return self._catch_up is not None

    def next_tick_due(self) -> float:
        due = super().next_tick_due()
        if self._catch_up is not None:
            due = min(due, self._catch_up.retry_at)
        return due

    # ---- appends -------------------------------------------------------

    def propose_append(self, batches: bytes | bytearray | memoryview, callback: AppendCallback) -> None:
        """Replicate an append; `callback(base_offset, None)` once committed and
        applied here, or `callback(None, error)`. Leader only."""
        self._propose(self._append_command(batches), callback)

    def append(self, batches: bytes | bytearray | memoryview) -> "asyncio.Future[int]":
        """Replicate an append; the future resolves to its base offset once
        committed and applied here (or fails with ReplicationError or the
        storage error every replica hit). Leader only.

        Appends made before this group's next tick share one Raft entry."""
        self._check_append(batches)
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending_appends.append((batches, future))
        if len(self._pending_appends) == 1:
            if self.transport.on_activity is None:   # not ticked by a RaftNode: propose now
                self._flush_appends()
            else:
                self.transport.on_activity()   # ticks this group at the next loop iteration
        return future

    def _flush_appends(self) -> None:
        """Propose every pending append, as few entries as the size limit allows."""
        pending, self._pending_appends = self._pending_appends, []
        if not pending:
            return
        if not self.is_leader:
            error = NotLeaderError(self.group_id, self.leader_id)
            for _batches, future in pending:
                if not future.done():
                    future.set_exception(error)
            return
        chunk: list[tuple[Any, asyncio.Future[Any]]] = []
        size = MULTI_APPEND_HEADER.size
        for batches, future in pending:
            part_size = PART_SIZE.size + len(batches)
            if chunk and size + part_size > MAX_COMMAND_BYTES:
                self._propose_parts(chunk)
                chunk, size = [], MULTI_APPEND_HEADER.size
            chunk.append((batches, future))
            size += part_size
        self._propose_parts(chunk)

    def _propose_parts(self, chunk: list[tuple[Any, "asyncio.Future[Any]"]]) -> None:
        if len(chunk) == 1:
            batches, future = chunk[0]
            self._propose(APPEND_HEADER.pack(APPEND_COMMAND, self.leader_epoch) + batches,
                          lambda result, error: _settle(future, result, error), wake=False)
            return
        head = MULTI_APPEND_HEADER.pack(MULTI_APPEND_COMMAND, self.leader_epoch, len(chunk))
        sizes = struct.pack(f">{len(chunk)}I", *(len(batches) for batches, _ in chunk))
        command = b"".join([head, sizes, *(batches for batches, _ in chunk)])

        def done(results: Any, error: Exception | None) -> None:
            for position, (_batches, future) in enumerate(chunk):
                result = results[position] if isinstance(results, list) else results
                if error is None and isinstance(result, Exception):
                    _settle(future, None, result)
                else:
                    _settle(future, result, error)
        self._propose(command, done, wake=False)

    def _append_command(self, batches: bytes | bytearray | memoryview) -> bytes:
        self._check_append(batches)
        return APPEND_HEADER.pack(APPEND_COMMAND, self.leader_epoch) + batches

    def _check_append(self, batches: bytes | bytearray | memoryview) -> None:
        if not self.is_leader:
            raise NotLeaderError(self.group_id, self.leader_id)
        if len(batches) + APPEND_HEADER.size > MAX_COMMAND_BYTES:
            raise RecordTooLargeError(f"append of {len(batches)} bytes exceeds the replicated "
                                      f"command limit of {MAX_COMMAND_BYTES - APPEND_HEADER.size}")

    def _SyncObj__doApplyCommand(self, command: bytes) -> Any:
        if command[:1] not in (b"\x10", b"\x11"):
            return SyncObj._SyncObj__doApplyCommand(self, command)
        index = self._SyncObj__raftLastApplied + 1  # pysyncobj bumps it after the apply returns
        if index <= self._recorded_applied_index:
            return None  # applied before a restart; the journal replays it
        if self._catch_up is not None:
            self._deferred.append((index, command))
            return None
        return self._apply_command(index, command)

    def _apply_command(self, index: int, command: bytes) -> int | Exception | list[int | Exception]:
        """Apply an append command (0x10: one outcome; 0x11: one per part)
        at Raft `index`, then move the high watermark once."""
        if command[:1] == b"\x10":
            _, leader_epoch = APPEND_HEADER.unpack_from(command)
            outcome: Any = self._apply_append(memoryview(command)[APPEND_HEADER.size:], leader_epoch)
        else:
            outcome = self._apply_parts(command)
        self._log.set_high_watermark(self._log.log_end_offset, applied_index=index)
        if self.on_high_watermark is not None:
            self.on_high_watermark()
        return outcome

    def _apply_parts(self, command: bytes) -> list[int | Exception] | Exception:
        """Each part of a 0x11 command appended in order, as separate commands would be."""
        _, leader_epoch, count = MULTI_APPEND_HEADER.unpack_from(command)
        position = MULTI_APPEND_HEADER.size + PART_SIZE.size * count
        if count == 0 or position > len(command):
            return CorruptRecordError(f"append command of {len(command)} bytes claims {count} parts", 0)
        sizes = struct.unpack_from(f">{count}I", command, MULTI_APPEND_HEADER.size)
        if position + sum(sizes) != len(command):
            return CorruptRecordError(f"append command parts sum to {sum(sizes)} of "
                                      f"{len(command) - position} bytes", position)
        view = memoryview(command)
        outcomes: list[int | Exception] = []
        for size in sizes:
            outcomes.append(self._apply_append(view[position:position + size], leader_epoch))
            position += size
        return outcomes

    def _apply_append(self, batches: memoryview, leader_epoch: int) -> int | Exception:
        """Append (or, for an idempotent producer's retry, answer the offset it
        already has); every replica decides alike from the same log."""
        outcome: int | Exception
        try:
            header = read_header(batches) if len(batches) >= layout.HEADER_SIZE else None
            duplicate = self.producers.check(header) if header is not None else None
            if duplicate is not None:
                outcome = duplicate
            else:
                outcome = self._log.append(batches, leader_epoch=leader_epoch).base_offset
                if header is not None:
                    self.producers.record(header, outcome)
        except (CorruptRecordError, RecordTooLargeError, OutOfOrderSequenceError, InvalidProducerEpochError) as error:
            outcome = error  # every replica rejects it alike; the index is applied all the same
        return outcome

    # ---- checkpoint and catch-up -------------------------------------------
    def _may_compact(self) -> bool:
        return self._catch_up is None  # the checkpoint must describe a log we hold


    def _write_checkpoint(self, path: str, raft_data: tuple) -> None:
        last_applied, previous, _cluster = raft_data
        assert last_applied[1] == self._SyncObj__raftLastApplied, (last_applied[1], self._SyncObj__raftLastApplied)
        # the stored state (high watermark at applied index) must not lag the
        # checkpoint, or a restart would refetch what it already has
        self._log.commit_index()
        checkpoint.write(Path(path), checkpoint.Checkpoint(
            applied_index=last_applied[1], log_end_offset=self._log.log_end_offset,
            entries=(tuple(previous), tuple(last_applied))))

    def _read_checkpoint(self, path: str) -> tuple:
        point = checkpoint.read(Path(path))
        if self._log.high_watermark < point.log_end_offset and point.applied_index > self._recorded_applied_index:
            self._start_catch_up(point)
        previous, last_applied = point.entries
        cluster = {PeerNode(rid) for rid in self.replica_ids}
        return last_applied, previous, cluster

    def _start_catch_up(self, point: checkpoint.Checkpoint) -> None:
        log.info("group %d on %d: checkpoint at offset %d is past our high watermark %d; catching up",
                 self.group_id, self.self_id, point.log_end_offset, self._log.high_watermark)
        self._log.truncate(self._log.high_watermark)
        self._deferred.clear()
        self._catch_up = checkpoint.CatchUp(target_offset=point.log_end_offset, applied_index=point.applied_index)
        self._request_catch_up()

    def _request_catch_up(self) -> None:
        catch_up = self._catch_up
        assert catch_up is not None
        catch_up.retry_at = _syncobj.monotonicTime() + CATCH_UP_RETRY_S
        source = self.leader_id
        if source is None or source == self.self_id:
            return  # retried on a later tick, when a leader is known
        self.transport.send_to(source, {"type": "rk_fetch", "offset": self._log.log_end_offset,
                                        "end_offset": catch_up.target_offset, "max_bytes": CATCH_UP_CHUNK_BYTES})

    def _onTick(self, timeToWait: float = 0.0) -> None:
        self._flush_appends()
        if self._catch_up is not None:
            # a replica missing committed data must not lead: push its election out
            now = _syncobj.monotonicTime()
            deadline = self._SyncObj__raftElectionDeadline
            self._SyncObj__raftElectionDeadline = max(deadline, now + self._SyncObj__conf.raftMinTimeout)
        super()._onTick(timeToWait)
        if self._catch_up is not None and _syncobj.monotonicTime() >= self._catch_up.retry_at:
            self._request_catch_up()

    def _on_extension_message(self, peer_id: int, message: dict) -> None:
        kind = message.get("type")
        if kind == "rk_fetch":
            self._serve_fetch(peer_id, message)
        elif kind == "rk_fetch_data" and self._catch_up is not None:
            self._receive_fetch(message)

    def _serve_fetch(self, peer_id: int, message: dict) -> None:
        offset, end, max_bytes = message.get("offset"), message.get("end_offset"), message.get("max_bytes")
        if not all(isinstance(v, int) for v in (offset, end, max_bytes)) or max_bytes <= 0:
            return
        log_ = self._log
        if not log_.log_start_offset <= offset < min(end, log_.high_watermark):
            reply = {"type": "rk_fetch_data", "offset": offset, "data": b"", "high_watermark": log_.high_watermark}
        else:
            piece = log_.read(offset, min(max_bytes, CATCH_UP_CHUNK_BYTES), end_offset=end)
            reply = {"type": "rk_fetch_data", "offset": offset, "data": bytes(piece.buffer),
                     "high_watermark": log_.high_watermark}
        self.transport.send_to(peer_id, reply)

    def _receive_fetch(self, message: dict) -> None:
        catch_up = self._catch_up
        assert catch_up is not None
        data, offset = message.get("data"), message.get("offset")
        if not isinstance(data, bytes) or offset != self._log.log_end_offset:
            return  # stale or foreign answer; the retry timer asks again
        if data:
            self._log.append(data, leader_epoch=-1)  # offsets and epochs exactly as the leader has them
            self._log.set_high_watermark(self._log.log_end_offset)
        if self._log.log_end_offset >= catch_up.target_offset:
            self._finish_catch_up()
        elif data:
            self._request_catch_up()

    def _finish_catch_up(self) -> None:
        catch_up = self._catch_up
        assert catch_up is not None
        if self._log.log_end_offset != catch_up.target_offset:
            raise AssertionError(f"group {self.group_id}: caught up to {self._log.log_end_offset}, "
                                 f"checkpoint says {catch_up.target_offset}")
        self._log.set_high_watermark(self._log.log_end_offset, applied_index=catch_up.applied_index)
        self._recorded_applied_index = catch_up.applied_index
        self._catch_up = None
        self._rebuild_producer_state()
        log.info("group %d on %d: caught up to offset %d", self.group_id, self.self_id, self._log.log_end_offset)
        deferred, self._deferred = self._deferred, []
        for index, command in deferred:
            if index > self._recorded_applied_index:
                self._apply_command(index, command)
