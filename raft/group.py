"""RaftGroup: this broker's member of one Raft group (pysyncobj), ticked by
RaftNode over the broker's shared PeerNetwork. What every group has in
common lives here; subclasses say what a command does (StateMachineReplica
in state_machine.py, the partition replica in engine/replication/).

- Messages travel over the shared PeerNetwork through GroupTransport, never
  pysyncobj's pickling TCP transport. A command is raw bytes whose first
  byte (after pysyncobj's own types 0..3) names its type; a command stays
  under MAX_COMMAND_BYTES, so pysyncobj never chunks (or pickles) entries.
- The Raft log is a DiskJournal (journal.py): on disk, durable term and vote.
- Compaction writes a small checkpoint (checkpoint.py) through the
  subclass's `_write_checkpoint` instead of pickling the object; a subclass
  may hold compaction off (`_may_compact`) while its state is incomplete.
- Leadership transfer (transfer_leadership): the leader stops taking
  proposals, brings the target up to date and sends it timeout_now; the
  target elects itself at once, past PreVote and its voters' leases.
- pysyncobj's replication is fixed for pipelining (a follower never drops
  entries it acknowledged), and idle groups' heartbeats are coalesced per
  peer by RaftNode.
"""
from __future__ import annotations

import asyncio
import enum
import itertools
import logging
from pathlib import Path
from typing import Any, Callable

from dataclasses import dataclass

from pysyncobj import FAIL_REASON, SyncObjConf
from pysyncobj.node import Node

from raftka.raft import checkpoint
from raftka.raft.journal import JournalPath
from raftka.raft.pysyncobj_adapter import (AdaptedSyncObj, AdaptedTransport, ForeignCommandError, command_type,
                                           monotonic_time)
from raftka.raft.transport import LOG_INTERVAL_S
from raftka.raft.votes import VoteStore

log = logging.getLogger(__name__)

__all__ = ["FailReason", "ForeignCommandError", "GroupRemovedError", "LeadershipTransferError", "NotLeaderError",
           "PeerNode", "RaftGroup", "RaftView", "ReplicationError"]

MAX_MESSAGE_ENTRIES_BYTES = 8 * 1024 * 1024
# The Raft messages a peer may send a group. pysyncobj's apply_command and
# apply_command_response (a follower forwarding a proposal to its leader) are
# not among them: here only a group's leader proposes, and a peer must never
# make a leader append what it likes. Chunked entries ('transmission') are
# dropped by GroupTransport: pysyncobj would unpickle them.
RAFT_EXTENSIONS = frozenset({"rk_prevote", "rk_prevote_response", "rk_higher_term"})   # RaftGroup's own messages
# timeout_now (a leadership transfer) is RaftGroup's own, never pysyncobj's:
# see transfer_leadership.
PEER_MESSAGE_TYPES = frozenset({"request_vote", "response_vote", "append_entries", "next_node_idx", "timeout_now"})
MAX_COMMAND_BYTES = MAX_MESSAGE_ENTRIES_BYTES - 1  # pysyncobj pickles entries at or above the batch size


def settle_future(future: "asyncio.Future[Any]", result: Any, error: Exception | None) -> None:
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


class LeadershipTransferError(NotLeaderError):
    """This member is handing its leadership to `leader_id` (a leadership
    transfer): it takes no new proposals meanwhile. Retriable: the new leader
    takes them within an election timeout, or this one again if the transfer
    is abandoned."""

    def __init__(self, group_id: int, target_id: int) -> None:
        super().__init__(group_id, target_id)
        self.args = (f"group {group_id}: transferring its leadership to {target_id}",)


@dataclass
class _Transfer:
    """A leadership transfer this leader is running (see transfer_leadership)."""
    target_id: int
    term: int            # our term when it began: it ends when the term moves
    deadline: float      # abandoned at this time (pysyncobj's clock) if still leader
    sent: bool = False   # timeout_now sent (the target was caught up)


class FailReason(enum.IntEnum):
    """Why a proposed command was not committed: pysyncobj's FAIL_REASON, named."""
    QUEUE_FULL = FAIL_REASON.QUEUE_FULL
    MISSING_LEADER = FAIL_REASON.MISSING_LEADER
    DISCARDED = FAIL_REASON.DISCARDED
    NOT_LEADER = FAIL_REASON.NOT_LEADER
    LEADER_CHANGED = FAIL_REASON.LEADER_CHANGED
    REQUEST_DENIED = FAIL_REASON.REQUEST_DENIED
    UNKNOWN_OUTCOME = FAIL_REASON.UNKNOWN_OUTCOME


def _fail_reason(code: int) -> FailReason:
    try:
        return FailReason(code)
    except ValueError:
        return FailReason.UNKNOWN_OUTCOME


class ReplicationError(Exception):
    """A proposed command was not committed; `reason` says why (leadership
    moved, queue full, ...)."""

    def __init__(self, group_id: int, reason: FailReason) -> None:
        super().__init__(f"group {group_id}: command not committed ({reason.name})")
        self.group_id = group_id
        self.reason = reason


class GroupRemovedError(ReplicationError):
    """The group was removed from this node (its topic deleted, or the node
    stopping) before the command's outcome was known."""

    def __init__(self, group_id: int) -> None:
        super().__init__(group_id, FailReason.DISCARDED)
        self.args = (f"group {group_id}: removed before the command's outcome was known",)


class PeerNode(Node):
    """A pysyncobj node standing for a broker of the peer network."""

    def __init__(self, broker_id: int) -> None:
        # the id is the int itself: its hash, unlike a str's, is the same in
        # every process, so set iteration (send order) replays from a seed
        super().__init__(broker_id)
        self.broker_id = broker_id


class GroupTransport(AdaptedTransport):
    """pysyncobj's Transport for one group, over the broker's network (anything
    with `send(peer_id, group_id, message) -> bool`: PeerNetwork, or the
    simulation's network)."""

    def __init__(self, network: Any, group_id: int, peers: dict[int, PeerNode]) -> None:
        super().__init__(None, None, list(peers.values()))
        self._network = network
        self._group_id = group_id
        self._peers = peers
        self.on_extension_message: Callable[[int, dict], None] | None = None   # the subclass's or owner's rk_ messages
        self.on_raft_extension: Callable[[int, dict], None] | None = None     # RaftGroup's own (RAFT_EXTENSIONS)
        self.on_raft_message: Callable[[PeerNode, dict], None] | None = None
        self.rewrite_outgoing: Callable[[PeerNode, dict], None] | None = None
        self.hold_outgoing: Callable[[PeerNode, Any], bool] | None = None   # True: not sent now (held)
        self.on_activity: Callable[[], None] | None = None

    def send(self, node: PeerNode, message: Any) -> bool:
        if self.rewrite_outgoing is not None:
            self.rewrite_outgoing(node, message)
        if self.hold_outgoing is not None and self.hold_outgoing(node, message):
            return True
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
        if kind in RAFT_EXTENSIONS:
            if self.on_raft_extension is not None:
                self.on_raft_extension(peer_id, message)
        elif isinstance(kind, str) and kind.startswith("rk_"):
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
            self.handle_raft_message(node, message)
        if self.on_activity is not None:
            self.on_activity()

    def peer_connected(self, peer_id: int) -> None:
        if peer_id in self._peers:
            self.handle_node_connected(self._peers[peer_id])

    def peer_disconnected(self, peer_id: int) -> None:
        if peer_id in self._peers:
            self.handle_node_disconnected(self._peers[peer_id])


def raft_conf(group_dir: Path, journal_fsync: bool = False, persist_vote: bool = True,
              vote_store: VoteStore | None = None, group_id: int = 0,
              accepts: Callable[[bytes], bool] | None = None,
              journal_path: Callable[..., str] = JournalPath, **overrides: Any) -> dict[str, Any]:
    """pysyncobj settings for a group ticked by RaftNode (never its own thread).
    With `vote_store` (the node's), term and vote are made durable there;
    `accepts` says which commands the group's journal may hold; `journal_path`
    makes the journalFile value (JournalPath: a DiskJournal)."""
    settings: dict[str, Any] = dict(
        autoTick=False, pollerType="select",
        journalFile=journal_path(group_dir / "journal", fsync=journal_fsync, persist_vote=persist_vote,
                                 vote_store=vote_store, group_id=group_id, accepts=accepts),
        fullDumpFile=str(group_dir / "checkpoint"),
        appendEntriesUseBatch=False,          # send each command at once, pipelined
        appendEntriesBatchSizeBytes=MAX_MESSAGE_ENTRIES_BYTES,
        commandsWaitLeader=False, dynamicMembershipChange=False,
        raftMinTimeout=1.0, raftMaxTimeout=2.0, appendEntriesPeriod=0.25, leaderFallbackTimeout=2.0,
        logCompactionMinEntries=2000, logCompactionMinTime=60.0, logCompactionBatchSize=1024 * 1024)
    settings.update(overrides)
    return settings


@dataclass(frozen=True)
class FollowerProgress:
    """What the leader knows of one follower's log."""
    next_index: int    # the next Raft index the leader sends it
    match_index: int   # its highest Raft index known to match the leader's


@dataclass(frozen=True)
class RaftView:
    """A read-only snapshot of one member's Raft state, for metrics, the
    controller and tests."""
    group_id: int
    term: int
    leader_id: int | None
    is_leader: bool
    commit_index: int
    applied_index: int
    last_index: int                                # last Raft index in this member's log
    follower_progress: dict[int, FollowerProgress]  # leader only: peer -> progress; {} elsewhere


class RaftGroup(AdaptedSyncObj):
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
        self.transport.on_raft_extension = self._on_raft_extension
        self.transport.rewrite_outgoing = self._rewrite_outgoing
        self.transport.hold_outgoing = self._hold_outgoing
        # who runs this group's journal syncs (RaftNode: a thread pool; None: inline, at once)
        self.sync_scheduler: Callable[[RaftGroup], None] | None = None
        self._held_acks: dict[int, tuple[PeerNode, dict, int, int | None]] = {}   # peer -> ack awaiting fsync
        self._commit_at_tick = 0                   # commit index when the current tick began
        self._verified_end: int | None = None   # last index an incoming message verified; see _rewrite_outgoing
        self._checkpoint_loaded = False
        self._caught_up_at: dict[int, float] = {}  # follower -> last time its log reached our commit index
        self._commit_sent: dict[int, int] = {}     # follower -> commit index in our last append_entries to it
        self._stale_peers: set[int] = set()        # followers that refused a coalesced heartbeat
        self.refused_messages = 0                  # peer messages refused (foreign type or command); see _refusal
        self._outstanding: dict[int, Callable[[Any, Exception | None], None]] = {}  # proposals in flight
        self._out_of_service: Exception | None = None   # see take_out_of_service
        self._proposal_ids = itertools.count()
        self._leader_heard_at = -float("inf")      # when a leader last proved itself to us (lease; see _in_lease)
        self._prevote_round = 0                    # our latest pre-vote round, and who granted it
        self._prevote_grants: set[int] = set()
        self._prevote_won = False
        self._prevote_term = -1                    # our term when the latest pre-vote round began
        self._votes_term: Any = None               # the term whose votes _voters holds
        self._voters: set[int] = set()             # peers whose vote for us in that term was counted
        self._refusal_logged_at = -float("inf")
        self._transfer: _Transfer | None = None    # leader: the transfer of our leadership under way
        self._transfer_campaign_term = -1          # the term we campaign at because a leader told us to
        self._campaign_now = False                 # that campaign starts at the next tick
        settings = raft_conf(self.group_dir, group_id=group_id, accepts=type(self).accepts_command,
                             journal_path=self._journal_path, **raft_settings)
        settings.update(serializer=self._write_checkpoint, deserializer=self._read_checkpoint)
        super().__init__(PeerNode(self_id), list(peers.values()), SyncObjConf(**settings), self.transport)
        if not peers:
            # a group of one has no one to split the vote with: elect at once
            self._set_election_deadline(monotonic_time())

    def _journal_path(self, directory: Path, **options: Any) -> str:
        """The journalFile value for pysyncobj: a DiskJournal by default."""
        return JournalPath(directory, **options)

    # ---- leadership ----------------------------------------------------

    @property
    def is_leader(self) -> bool:
        return self._out_of_service is None and self._raft_is_leader()

    @property
    def accepts_proposals(self) -> bool:
        """Leader, and not handing its leadership over (see transfer_leadership)."""
        return self.is_leader and self._transfer is None

    def proposal_refusal(self) -> Exception | None:
        """Why a proposal made now would be refused (None: it would not be)."""
        if self._out_of_service is not None:
            return self._out_of_service
        if not self.is_leader:
            return NotLeaderError(self.group_id, self.leader_id)
        if self._transfer is not None:
            return LeadershipTransferError(self.group_id, self._transfer.target_id)
        return None

    def take_out_of_service(self, error: Exception) -> None:
        """This member stops serving for good (its node's storage is broken):
        it no longer counts as leader, new proposals raise `error`, and those in
        flight fail with it at once."""
        if self._out_of_service is not None:
            return
        self._out_of_service = error
        self._fail_outstanding(error)

    def _fail_outstanding(self, error: Exception) -> None:
        """Answer every proposal still in flight with `error`, now."""
        outstanding, self._outstanding = self._outstanding, {}
        for callback in outstanding.values():
            callback(None, error)

    @property
    def leader_id(self) -> int | None:
        leader = self._raft_leader()
        return leader.broker_id if isinstance(leader, PeerNode) else None

    @property
    def leader_ready(self) -> bool:
        """Leader, and every entry committed before its term is applied here
        (its term's first entry, pysyncobj's no-op, is): state read from the
        applied log is then complete."""
        noop_index = self._noop_index()
        return self.is_leader and noop_index is not None and self._raft_last_applied() >= noop_index

    def view(self) -> RaftView:
        """This member's Raft state now (a copy: later changes do not show)."""
        progress: dict[int, FollowerProgress] = {}
        if self.is_leader:
            match_index = self._match_index()
            for node, next_index in self._next_index().items():
                progress[node.broker_id] = FollowerProgress(next_index, match_index.get(node, 0))
        return RaftView(self.group_id, self._raft_term(), self.leader_id, self.is_leader, self._raft_commit_index(),
                        self._raft_last_applied(), self._last_log_index(), progress)

    @property
    def journal(self) -> Any:
        """This member's Raft log (a DiskJournal)."""
        return self._raft_log()

    @property
    def leader_epoch(self) -> int:
        """The Raft term: Kafka's leader epoch for this partition."""
        return self.raftCurrentTerm

    def follower_lag(self) -> dict[int, int]:
        """Raft entries each follower's log is behind the leader's (leader only; {} elsewhere)."""
        if not self.is_leader:
            return {}
        last = self._last_log_index()
        return {node.broker_id: max(last - match, 0) for node, match in self._match_index().items()}

    def peer_caught_up(self, peer_id: int) -> bool:
        """Leader only: member `peer_id` is connected and its log matches ours
        up to our commit index (a leadership transfer to it needs no catch-up
        beyond what is in flight)."""
        node = self.transport.peer(peer_id)
        return (self.is_leader and node is not None and node in self._connected_nodes()
                and self._match_index().get(node, 0) >= self._raft_commit_index())

    def in_sync_replicas(self, max_lag_s: float = 10.0) -> list[int]:
        """Kafka's ISR as the leader sees it: itself, and each follower whose log
        reached the leader's commit index within the last `max_lag_s` seconds
        (replica.lag.time.max.ms). Only the leader knows; others answer []."""
        if not self.is_leader:
            self._caught_up_at.clear()
            return []
        now = monotonic_time()
        commit = self._raft_commit_index()
        in_sync = [self.self_id]
        for node, match in self._match_index().items():
            if match >= commit:
                self._caught_up_at[node.broker_id] = now
            if now - self._caught_up_at.setdefault(node.broker_id, now) <= max_lag_s:
                in_sync.append(node.broker_id)
        return sorted(in_sync)

    def next_tick_due(self) -> float:
        """When this group must tick again if nothing arrives (pysyncobj's clock)."""
        if self.is_leader and self._transfer is not None:
            return min(self._append_entries_due(), self._transfer.deadline)
        if self.is_leader:
            if not self._other_nodes() and self._raft_commit_index() < self._raft_log().durable_index \
                    and self._last_log_term() == self._raft_term():
                # a group of one commits what it appended this tick at the next
                # one; nothing else would tick it before the heartbeat period
                return 0.0
            return self._append_entries_due()
        deadline = self._election_deadline()
        if self._other_nodes() and not self._connected_nodes():
            # pysyncobj starts no election while no peer is connected, and
            # leaves a passed deadline where it is: ticking at it would spin
            return max(deadline, monotonic_time() + self.conf.raftMinTimeout)
        return deadline

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
        if not self.is_leader:
            return None
        last = self._last_log_index()
        commit = self._raft_commit_index()
        if commit != last or self._raft_last_applied() != commit:
            return None
        match, next_index = self._match_index(), self._next_index()
        for node in self._connected_nodes():
            if (match.get(node) != last or next_index.get(node) != last + 1
                    or self._commit_sent.get(node.broker_id) != commit or node.broker_id in self._stale_peers):
                return None
        self._set_append_entries_due(now + hold_s)
        return [self.group_id, self.raftCurrentTerm, last, commit]

    def accept_coalesced_heartbeat(self, leader_id: int, term: int, last: int, commit: int, now: float) -> bool:
        """As a follower: True (and the election timer restarted) when this
        heartbeat's leader, term, log end and commit index are exactly ours."""
        if (self.is_leader or term != self.raftCurrentTerm or self.leader_id != leader_id
                or self._last_log_index() != last or self._raft_commit_index() != commit
                or self._raft_last_applied() != commit or not self._may_compact()):
            return False
        self._set_election_deadline(now + self._new_election_timeout())
        self._leader_heard_at = now
        return True

    def coalesced_heartbeat_answered(self, peer_id: int, accepted: bool, now: float) -> None:
        node = self.transport.peer(peer_id)
        if node is None or not self.is_leader:
            return
        if accepted:
            self._record_response(node, now)
        else:
            self._stale_peers.add(peer_id)
            self._set_append_entries_due(0.0)   # pysyncobj's own append_entries at the next tick

    def _propose(self, command: bytes, callback: Callable[[Any, Exception | None], None],
                 wake: bool = True) -> None:
        """Replicate `command`; `callback(result of applying it here, None)` once
        committed and applied, or `callback(None, error)`. Leader only.
        `wake` False: the caller is this group's tick, which takes it up itself."""
        refusal = self.proposal_refusal()
        if refusal is not None:
            raise refusal
        token = next(self._proposal_ids)
        self._outstanding[token] = callback

        def done(result: Any, reason: int) -> None:
            if self._outstanding.pop(token, None) is None:
                return   # already answered: the group was removed
            if reason != FAIL_REASON.SUCCESS:
                callback(None, ReplicationError(self.group_id, _fail_reason(reason)))
            elif isinstance(result, Exception):
                callback(None, result)
            else:
                callback(result, None)
        self._submit_command(command, done)
        if wake and self.transport.on_activity is not None:
            self.transport.on_activity()

    def destroy(self) -> None:
        """Stop this member; every proposal still in flight fails at once with
        GroupRemovedError instead of waiting for an outcome that will never come."""
        super().destroy()
        self._fail_outstanding(GroupRemovedError(self.group_id))

    def _propose_future(self, command: bytes) -> "asyncio.Future[Any]":
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._propose(command, lambda result, error: settle_future(future, result, error))
        return future

    # ---- PreVote and leader stickiness (etcd's PreVote + CheckQuorum) ----
    #
    # pysyncobj starts an election whenever its timer runs out: it raises its
    # term and sends request_vote, and any node hearing a higher term steps
    # down. A node that can send but not receive (a one-way partition) would
    # then depose every leader it shares a group with, over and over. Here a
    # node whose timer runs out first asks its peers whether they would vote
    # for it (rk_prevote, at term + 1, without raising its own term); only
    # with a majority of yeses does pysyncobj's own election run. A peer says
    # no while it has heard from a live leader within raftMinTimeout (its
    # lease), and it ignores real request_votes then too. The leader's side of
    # CheckQuorum is pysyncobj's own: it steps down when it has not heard from
    # a majority within leaderFallbackTimeout. A member whose term rose while it
    # was cut off answers the old leader's append_entries with rk_higher_term
    # (etcd answers MsgApp of a lower term the same way), so the group moves
    # past its term instead of leaving it out for good.

    PRE_VOTE = True   # the simulation's planted bug turns it off

    def _in_lease(self, now: float) -> bool:
        """A live leader holds this group: we lead it, or heard from the leader within raftMinTimeout."""
        return self.is_leader or (self.leader_id is not None
                                  and now - self._leader_heard_at < self.conf.raftMinTimeout)

    def _before_tick_hook(self) -> None:
        """Turn an election pysyncobj would start in this tick into a pre-vote round."""
        super()._before_tick_hook()
        self._commit_at_tick = self._raft_commit_index()
        if self._campaign_now:
            self._start_transfer_campaign()
        if not self.PRE_VOTE or self.is_leader or not self._other_nodes():
            return
        now = monotonic_time()
        if self._election_deadline() >= now:
            return
        if self._prevote_won:
            self._prevote_won = False
            if self.raftCurrentTerm == self._prevote_term:
                return   # pysyncobj elects in this tick, at term + 1
            # our term moved since the round (another candidate asked for our
            # vote): that majority was for a term now gone; ask again
        self._set_election_deadline(now + self._new_election_timeout())
        if not self._connected_nodes():
            return
        self._prevote_round += 1
        self._prevote_grants = {self.self_id}
        self._prevote_term = self.raftCurrentTerm
        message = {"type": "rk_prevote", "term": self.raftCurrentTerm + 1, "round": self._prevote_round,
                   "last_log_index": self._last_log_index(), "last_log_term": self._last_log_term()}
        for node in self._other_nodes():
            self.transport.send(node, dict(message))

    def _on_raft_extension(self, peer_id: int, message: dict) -> None:
        """RaftGroup's own rk_ messages (RAFT_EXTENSIONS), whoever handles the others."""
        kind = message.get("type")
        if kind == "rk_prevote":
            self._on_prevote(peer_id, message)
        elif kind == "rk_prevote_response":
            self._on_prevote_response(peer_id, message)
        elif kind == "rk_higher_term":
            self._on_higher_term(peer_id, message)

    def _on_prevote(self, peer_id: int, message: dict) -> None:
        term, last_index, last_term = message.get("term"), message.get("last_log_index"), message.get("last_log_term")
        if not all(isinstance(v, int) for v in (term, last_index, last_term)):
            return
        up_to_date = (last_term, last_index) >= (self._last_log_term(), self._last_log_index())
        granted = term > self.raftCurrentTerm and up_to_date and not self._in_lease(monotonic_time())
        self.transport.send_to(peer_id, {"type": "rk_prevote_response", "round": message.get("round"),
                                         "term": self.raftCurrentTerm, "granted": granted})

    def _on_higher_term(self, peer_id: int, message: dict) -> None:
        """A member answered our append_entries with a higher term: step down to
        it (pysyncobj does on a request_vote of a higher term; this one asks for
        no vote: its log position is below any real one)."""
        term, node = message.get("term"), self.transport.peer(peer_id)
        if isinstance(term, int) and node is not None and term > self.raftCurrentTerm:
            self.transport.handle_raft_message(node, {"type": "request_vote", "term": term,
                                                      "last_log_index": -1, "last_log_term": -1})

    def _on_prevote_response(self, peer_id: int, message: dict) -> None:
        if (message.get("round") != self._prevote_round or not message.get("granted") or self.is_leader
                or self.raftCurrentTerm != self._prevote_term):
            return
        self._prevote_grants.add(peer_id)
        if len(self._prevote_grants) > len(self.replica_ids) / 2 and not self._prevote_won:
            self._prevote_won = True
            self._set_election_deadline(0.0)   # pysyncobj's election at the next tick
            if self.transport.on_activity is not None:
                self.transport.on_activity()

    # ---- leadership transfer (the Raft thesis, 3.10; etcd's MsgTimeoutNow) ----
    #
    # The leader, asked to hand its leadership to a follower, stops taking
    # proposals (LeadershipTransferError, a NotLeaderError: retriable), keeps
    # replicating until the target's match index reaches its last index, then
    # sends it timeout_now {term}. The target, if that is its leader and term
    # and its state is complete (_may_compact: not catching up), campaigns at
    # once: no pre-vote round, no waiting for its timer. Its request_votes
    # carry "transfer": True (etcd's campaignTransfer), which voters honour
    # inside their leader lease: the leader itself asked for this election, so
    # stickiness must not refuse it. The old leader steps down on that
    # request_vote's higher term and votes like any member (the log check
    # still holds, so safety is Raft's). If the target has not taken over an
    # election timeout (raftMaxTimeout) later, the transfer is abandoned and
    # the leader takes proposals again.

    def transfer_leadership(self, target_id: int) -> None:
        """Hand this group's leadership to member `target_id` (see above).
        NotLeaderError unless this member leads; ValueError for a target not in
        the group. Transferring to ourselves does nothing; a transfer to
        another target replaces the one under way. Watch `leader_id` (or
        `transferring_to`) for the outcome."""
        if not self.is_leader:
            raise NotLeaderError(self.group_id, self.leader_id)
        if target_id == self.self_id:
            return
        if self.transport.peer(target_id) is None:
            raise ValueError(f"group {self.group_id}: {target_id} is not a member (members: {self.replica_ids})")
        if self._transfer is not None and self._transfer.target_id == target_id:
            return
        now = monotonic_time()
        self._transfer = _Transfer(target_id, self.raftCurrentTerm, now + self.conf.raftMaxTimeout)
        log.info("group %d: transferring leadership from %d to %d (term %d)", self.group_id, self.self_id,
                 target_id, self.raftCurrentTerm)
        self._set_append_entries_due(0.0)   # bring the target up to date at the next tick
        if self.transport.on_activity is not None:
            self.transport.on_activity()

    def stand_first(self) -> None:
        """Let this member's first election timer run out at half of
        raftMinTimeout, before any other member's (theirs are drawn from
        [raftMinTimeout, raftMaxTimeout]), so a new group's first election
        usually elects it: a group's preferred leader calls it as the group
        starts, sparing a leadership transfer right after. It changes only
        when this member asks for (pre-)votes; who wins is still Raft's."""
        if self.leader_id is None and not self.is_leader and self._other_nodes():
            first = monotonic_time() + self.conf.raftMinTimeout / 2
            self._set_election_deadline(min(self._election_deadline(), first))

    @property
    def transferring_to(self) -> int | None:
        """The member this leader is handing its leadership to, None when none."""
        return self._transfer.target_id if self._transfer is not None else None

    def _advance_transfer(self) -> None:
        """Leader, each tick: send timeout_now once the target is caught up;
        end the transfer when our term moved or its time ran out."""
        transfer = self._transfer
        if transfer is None:
            return
        if not self._raft_is_leader() or self.raftCurrentTerm != transfer.term:
            self._transfer = None
            log.info("group %d: leadership transfer to %d ended: leader now %s (term %d)", self.group_id,
                     transfer.target_id, self.leader_id, self.raftCurrentTerm)
            return
        now = monotonic_time()
        if now >= transfer.deadline:
            self._transfer = None
            log.info("group %d: leadership transfer to %d abandoned after %.3g s; %d leads on", self.group_id,
                     transfer.target_id, self.conf.raftMaxTimeout, self.self_id)
            return
        node = self.transport.peer(transfer.target_id)
        assert node is not None, f"group {self.group_id}: transfer target {transfer.target_id} is no peer"
        if not transfer.sent and self._match_index().get(node, 0) >= self._last_log_index():
            transfer.sent = True
            self.transport.send(node, {"type": "timeout_now", "term": transfer.term})

    def _on_timeout_now(self, node: PeerNode, message: dict) -> None:
        """Our leader asks us to take over: campaign now, skipping the pre-vote."""
        if (message.get("term") != self.raftCurrentTerm or self.is_leader or self.leader_id != node.broker_id
                or not self._may_compact()):
            log.info("group %d: ignored timeout_now from %d (term %s; ours %d, leader %s)", self.group_id,
                     node.broker_id, message.get("term"), self.raftCurrentTerm, self.leader_id)
            return
        self._transfer_campaign_term = self.raftCurrentTerm + 1
        self._campaign_now = True
        if self.transport.on_activity is not None:
            self.transport.on_activity()

    def _start_transfer_campaign(self) -> None:
        """At the start of the tick after timeout_now: have pysyncobj elect in
        this tick (a heartbeat that arrived meanwhile may have pushed its timer
        out), with no pre-vote round."""
        self._campaign_now = False
        if self.is_leader or self._transfer_campaign_term != self.raftCurrentTerm + 1:
            return   # our term moved since: that election is someone else's now
        self._prevote_won, self._prevote_term = True, self.raftCurrentTerm
        self._set_election_deadline(0.0)

    # ---- durability: acknowledge only what is on disk --------------------
    #
    # With a journal that syncs (fsync=always), an entry counts for this
    # member only once it is fdatasync'd (DiskJournal.durable_index). A
    # follower's acknowledgement (pysyncobj's next_node_idx) of entries past
    # that point is held and sent when the sync returns; the leader counts
    # itself in the commit only up to it (_before_apply_hook), so the commit
    # index, and with it every acknowledgement to a client, means "on disk on
    # a majority". Syncs are group commits: the sync_scheduler (RaftNode's
    # thread pool) runs one job per journal at a time, covering everything
    # written before it started, and calls journal_synced when it returns.

    def _after_tick_hook(self) -> None:
        super()._after_tick_hook()
        self._advance_transfer()
        self.schedule_sync()
        self._raft_log().release_applied(self._raft_last_applied())

    def schedule_sync(self) -> None:
        """Have the journal's unsynced writes synced (at once, with no scheduler)."""
        journal = self._raft_log()
        if not journal.needs_sync:
            return
        if self.sync_scheduler is not None:
            self.sync_scheduler(self)
        else:
            self.sync_now()

    def sync_now(self) -> None:
        """Run the journal's group commit on this thread and release what it made durable."""
        job = self._raft_log().sync_job()
        if job is not None:
            job.run()
            self.journal_synced(job)

    def journal_synced(self, job: Any) -> None:
        """A sync job of this group's journal returned: release what it made durable."""
        journal = self._raft_log()
        journal.complete(job)
        durable = journal.durable_index
        for peer_id, (node, message, index, term) in list(self._held_acks.items()):
            if journal.term_at(index) != term:
                del self._held_acks[peer_id]      # the entry it acknowledged was replaced: nothing to say
            elif index <= durable:
                del self._held_acks[peer_id]
                self.transport.send(node, message)
        if self.is_leader and self._raft_commit_index() < durable and self.transport.on_activity is not None:
            self.transport.on_activity()          # the commit may move: tick
        if journal.needs_sync:
            self.schedule_sync()

    def _hold_outgoing(self, node: PeerNode, message: Any) -> bool:
        """Hold a follower's acknowledgement of entries not yet durable here."""
        if not (isinstance(message, dict) and message.get("type") == "next_node_idx" and message.get("success")):
            return False
        index = message.get("next_node_idx")
        if not isinstance(index, int):
            return False
        journal = self._raft_log()
        if index - 1 <= journal.durable_index:
            self._held_acks.pop(node.broker_id, None)
            return False
        self._held_acks[node.broker_id] = (node, message, index - 1, journal.term_at(index - 1))
        return True

    # ---- the commit notice ------------------------------------------------
    #
    # After the leader commits and applies, stock pysyncobj sends every
    # follower an append_entries at once, only to tell it the new commit
    # index; each follower acknowledges it. That was half of all peer
    # messages and ticks under load: per entry, 2 append_entries with it, 2
    # without, and 4 acknowledgements. Nothing waits on a follower's commit
    # index (clients are answered by the leader once it applied; a new leader
    # commits anew in its own term), so the notice waits
    # COMMIT_NOTICE_DELAY_S: the next entries' append_entries carry the
    # commit index anyway, and under load they go first. An idle group sends
    # it when the delay ends, so followers' high watermarks trail by at most
    # that much. Only groups whose class sets COMMIT_NOTICE_DELAY_S wait
    # (PartitionReplica, 10 ms): the metadata group's followers serve what it
    # commits (a topic just created) and learn it at once.
    COMMIT_NOTICE_DELAY_S = 0.0   # seconds; 0: at once, as stock pysyncobj

    def _after_apply_hook(self, send_now: bool) -> bool:
        if send_now and self.COMMIT_NOTICE_DELAY_S > 0 and self._raft_is_leader() and self._other_nodes():
            due = monotonic_time() + self.COMMIT_NOTICE_DELAY_S
            if due < self._append_entries_due():
                self._set_append_entries_due(due)
            return False
        return send_now

    def _before_apply_hook(self) -> None:
        """As leader, count this member in the commit only up to its durable index."""
        if not self._raft_is_leader():
            return
        commit = self._raft_commit_index()
        journal = self._raft_log()
        durable = journal.durable_index
        if commit <= self._commit_at_tick or durable >= commit:
            return
        positions = sorted([durable, *self._match_index().values()], reverse=True)
        allowed = min(commit, positions[len(self.replica_ids) // 2])
        if allowed <= self._commit_at_tick or journal.term_at(allowed) != self._raft_term():
            allowed = self._commit_at_tick   # Raft counts only entries of its own term
        self._set_commit_index(allowed)

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

    def _refusal(self, message: dict) -> str | None:
        """Why a peer's `message` is refused, or None: a type not in
        PEER_MESSAGE_TYPES, or an entry that is not (command of one of this
        group's types, index, term)."""
        kind = message.get("type")
        if kind not in PEER_MESSAGE_TYPES:
            return f"message type {kind!r}"
        if kind == "timeout_now" and not (isinstance(message.get("term"), int) and len(message) == 2):
            return "a malformed timeout_now"
        if kind == "request_vote" and not isinstance(message.get("transfer", False), bool):
            return "a request_vote with a malformed transfer flag"
        entries = message.get("entries")
        if kind != "append_entries" or entries is None:
            return None
        if not isinstance(entries, (list, tuple)):
            return "entries that are not a list"
        for entry in entries:
            if not (isinstance(entry, (list, tuple)) and len(entry) == 3
                    and isinstance(entry[1], int) and isinstance(entry[2], int)):
                return "a malformed entry"
            if not self.accepts_command(entry[0]):
                return f"an entry of command type {command_type(entry[0])} at index {entry[1]}"
        return None

    def _on_raft_message(self, node: PeerNode, message: dict) -> None:
        refusal = self._refusal(message)
        if refusal is not None:
            self.refused_messages += 1
            now = monotonic_time()
            if now - self._refusal_logged_at >= LOG_INTERVAL_S:
                self._refusal_logged_at = now
                log.warning("group %d: refused a message from peer %d: %s (%d refused so far)",
                            self.group_id, node.broker_id, refusal, self.refused_messages)
            return
        kind = message.get("type")
        if kind == "append_entries" and isinstance(message.get("term"), int):
            if message["term"] >= self.raftCurrentTerm:
                self._leader_heard_at = monotonic_time()
            elif self.PRE_VOTE:
                # a leader of an older term: our term rose while we were cut off,
                # and with stickiness our request_votes no longer depose it; tell
                # it, so it steps down and the group elects at a term past ours
                self.transport.send(node, {"type": "rk_higher_term", "term": self.raftCurrentTerm})
        elif kind == "request_vote" and self.PRE_VOTE and message.get("transfer") is not True \
                and self._in_lease(monotonic_time()):
            return   # leader stickiness: a live leader is not deposed by one node's timer
        elif kind == "timeout_now":
            self._on_timeout_now(node, message)
            return
        elif kind == "response_vote" and self._repeated_vote(node, message):
            return
        if kind == "append_entries" and "prevLogIdx" in message:
            self._on_append_entries(node, message)
        elif kind == "append_entries" and message.get("serialized") is not None:
            self._on_snapshot_chunk(node, message)
        elif kind == "next_node_idx" and self.is_leader:
            self._stale_peers.discard(node.broker_id)
            next_index = self._next_index()
            before = next_index.get(node)
            self.transport.handle_raft_message(node, message)
            if message.get("success") and not message.get("reset") and before is not None:
                next_index[node] = max(before, next_index.get(node, 0))
        else:
            self.transport.handle_raft_message(node, message)

    def _repeated_vote(self, node: PeerNode, message: dict) -> bool:
        """A vote of this peer for us already counted in this term. pysyncobj
        counts vote messages, not voters: a vote delivered twice would count
        twice (two leaders in one term with five members)."""
        term = message.get("term")
        if term != self._votes_term:
            self._votes_term, self._voters = term, set()
        if node.broker_id in self._voters:
            return True
        self._voters.add(node.broker_id)
        return False

    def _on_append_entries(self, node: PeerNode, message: dict) -> None:
        journal = self._raft_log()
        last = journal.last_index()
        entries = message.get("entries") or []
        prev_index, prev_term = message.get("prevLogIdx"), message.get("prevLogTerm")
        if not isinstance(prev_index, int) or journal.term_at(prev_index) != prev_term or prev_index >= last:
            self.transport.handle_raft_message(node, message)  # nothing held past prev: stock path
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
            self.transport.handle_raft_message(node, message)
            return
        # everything received is already held and we hold more: acknowledge
        # only what the message verified, and keep the rest
        commit_before = self._raft_commit_index()
        self._verified_end = prev_index
        try:
            self.transport.handle_raft_message(
                node, dict(message, prevLogIdx=last, prevLogTerm=journal.term_at(last), entries=[]))
        finally:
            self._verified_end = None
        self._commit_no_further_than(prev_index, commit_before, message.get("commit_index"))

    def _on_snapshot_chunk(self, node: PeerNode, message: dict) -> None:
        """A checkpoint that is not ahead of what this follower already holds
        (a stale reset made the leader send it) must not wipe the journal:
        pysyncobj would clear it, dropping entries we acknowledged."""
        commit_before = self._raft_commit_index()
        self._checkpoint_loaded = False
        try:
            self.transport.handle_raft_message(node, message)
        finally:
            kept_at, self._verified_end = self._verified_end, None  # set by _load_dump_hook
        if not self._checkpoint_loaded:
            # pysyncobj raises the commit index to the leader's on every chunk,
            # even one that installs nothing
            self._commit_no_further_than(kept_at, commit_before, message.get("commit_index"))

    def _commit_no_further_than(self, verified_end: int | None, commit_before: int, leader_commit: Any) -> None:
        """pysyncobj raised the commit index to min(leader's, our last index);
        only entries this message verified, up to `verified_end`, may count."""
        if self._raft_commit_index() <= commit_before:
            return
        clamped = commit_before
        if verified_end is not None and isinstance(leader_commit, int):
            clamped = max(commit_before, min(leader_commit, verified_end))
        self._set_commit_index(clamped)

    def _load_dump_hook(self, clear_journal: bool) -> None:
        if clear_journal:
            try:
                point = checkpoint.read(Path(self.conf.fullDumpFile))
            except (OSError, checkpoint.CheckpointError):
                log.exception("group %d: unreadable checkpoint received", self.group_id)
                return
            _command, index, term = point.entries[1]
            if self._raft_log().term_at(index) == term or index <= self._raft_last_applied():
                # we hold that entry already: keep our log, acknowledge only up to it
                self._verified_end = index
                return
        else:
            self._trim_journal_to_checkpoint()
        super()._load_dump_hook(clear_journal)
        self._checkpoint_loaded = True

    def _trim_journal_to_checkpoint(self) -> None:
        """At start, a journal that still holds entries below the checkpoint
        (killed between writing it and compacting) is compacted now; pysyncobj
        would see its first entries differ from the checkpoint's and clear it,
        losing everything after the checkpoint."""
        path = Path(self.conf.fullDumpFile)
        if not path.exists():
            return
        point = checkpoint.read(path)
        journal = self._raft_log()
        (_c, prev_index, prev_term), (_c2, index, term) = point.entries
        if journal.term_at(prev_index) == prev_term and journal.term_at(index) == term:
            journal.deleteEntriesTo(prev_index - journal.first_index())

    def _rewrite_outgoing(self, node: PeerNode, message: Any) -> None:
        if not isinstance(message, dict):
            return
        if message.get("type") == "append_entries" and "commit_index" in message:
            self._commit_sent[node.broker_id] = message["commit_index"]
        if message.get("type") == "request_vote" and message.get("term") == self._transfer_campaign_term:
            message["transfer"] = True   # our leader asked for this election (see transfer_leadership)
        if self._verified_end is not None and isinstance(message, dict) \
                and message.get("type") == "next_node_idx" and message.get("success"):
            message["next_node_idx"] = self._verified_end + 1

    # ---- compaction ------------------------------------------------------

    def _try_compaction_hook(self) -> None:
        if not self._may_compact():
            return
        journal = self._raft_log()
        if journal.size_bytes > self.journal_max_bytes:
            self._force_compaction()
        super()._try_compaction_hook()
        # Our serializer runs synchronously, but pysyncobj only notices it
        # finished on its next call; until then it offers followers no
        # checkpoint and its send loop spins on one that needs it. Finish now.
        super()._try_compaction_hook()

    def _may_compact(self) -> bool:
        return True

    def _write_checkpoint(self, path: str, raft_data: tuple) -> None:
        raise NotImplementedError

    def _read_checkpoint(self, path: str) -> tuple:
        raise NotImplementedError
