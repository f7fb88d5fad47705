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

One group's failure stays that group's. An exception while a group handles
a message, ticks, or takes part in a coalesced heartbeat is caught for that
group alone: the message is dropped (PeerNetwork counts it in
`dropped_messages`); a tick or heartbeat part that raised is counted in
`group_errors`, and the group ticks again TICK_RETRY_S later at the
earliest, not in a busy loop. Both are logged at most once per group every
LOG_INTERVAL_S seconds. The connection, the round and every other group
carry on. A group whose last tick raised is left out of the coalesced
heartbeats: a leader that cannot tick then heartbeats no more, and its
followers elect one that can.

An error that means local storage is broken (`storage_errors`: OSError, such
as EIO or ENOSPC from a journal write or the vote store's fsync, plus what
the embedder adds) is no bad message: it takes the whole node out of service
(`fail`). A failed node ticks, answers and votes no more; it leaves the peer
network, dropping whatever it had queued (so no vote it could not make
durable goes out) and closing its connections (so its peers elect other
leaders); every group is taken out of service (RaftGroup.take_out_of_service:
no longer leader, new proposals raise NodeFailedError and those in flight
fail with it at once); and its `on_failure` callbacks run once with the
reason. Only a restart brings it back.
"""
from __future__ import annotations

import asyncio
import heapq
import logging
import math
import struct
from typing import Any, Callable

from raftka.raft.group import NotLeaderError, RaftGroup
from raftka.raft.pysyncobj_adapter import monotonic_time
from raftka.raft.syncer import FileSyncer
from raftka.raft.transport import ErrorTally, PeerNetwork
from raftka.raft.votes import VoteStore

log = logging.getLogger(__name__)

NODE_CHANNEL = 0xFFFFFFFF        # frames for the node itself, not a group
HEARTBEAT = struct.Struct(">IQQQ")   # group, term, last index, commit index
GROUP_IDS = struct.Struct(">I")
TICK_RETRY_S = 0.1               # a group whose tick raised ticks again no sooner than this
SYNC_THREADS = 4                 # journal group commits in flight at once (different groups' files)

FailureCallback = Callable[[str], None]
SyncRunner = Callable[[Any, Callable[[BaseException | None], None]], None]   # (job, done)


class NodeFailedError(NotLeaderError):
    """A proposal on a group of a node that is out of service (its storage
    failed): nothing it is asked to replicate will be. A NotLeaderError, so
    callers that retry elsewhere on one do here too."""

    def __init__(self, group_id: int, node_id: int, reason: str) -> None:
        super().__init__(group_id, None)
        self.args = (f"group {group_id}: node {node_id} is out of service ({reason})",)
        self.reason = reason


class RaftNode:
    """Every Raft group of one broker, ticked together on the event loop."""

    def __init__(self, network: PeerNetwork, votes: VoteStore | None = None,
                 run_sync: SyncRunner | None = None) -> None:
        """`votes`: the store this node's groups keep term and vote in (pass
        it to them as `vote_store`); synced before every network flush.
        `run_sync(job, done)` runs a journal sync job and calls `done(error
        or None)` on the event loop's thread once it returned: by default on
        a few native threads (raft/syncer.py); the simulation passes its
        simulated disk."""
        self.network = network
        self.votes = votes
        self._run_sync = run_sync if run_sync is not None else self._run_sync_natively
        if votes is not None:
            network.before_flush = self._sync_votes
        # exception types meaning local storage is broken: the node fails (see the module docstring)
        self.storage_errors: tuple[type[BaseException], ...] = (OSError,)
        self.failure: str | None = None
        self.group_errors = ErrorTally(log)   # group -> ticks (and heartbeat parts) that raised
        self._tick_failing: set[int] = set()  # groups whose last tick raised
        self._on_failure: list[FailureCallback] = []
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
        self._sync_wanted: dict[int, RaftGroup] = {}   # groups whose journal has writes to sync
        self.fdatasyncs = 0                            # calls made by completed group commits
        self._syncer: FileSyncer | None = None
        network.on_peer_connected(self._peer_connected)
        network.on_peer_disconnected(self._peer_disconnected)
        network.register_group(NODE_CHANNEL, self._on_node_message)

    @property
    def node_id(self) -> int:
        return self.network.config.node_id

    # ---- failure: out of service ------------------------------------------------

    @property
    def failed(self) -> bool:
        """Out of service since `fail`; `failure` says why."""
        return self.failure is not None

    def on_failure(self, callback: FailureCallback) -> None:
        """Call `callback(reason)` once when this node fails (at once if it already has)."""
        self._on_failure.append(callback)
        if self.failure is not None:
            self._call_failure_callback(callback, self.failure)

    def fail(self, reason: str) -> None:
        """Take this node out of service for good (its storage is broken): stop
        ticking and answering for every group, leave the peer network, refuse
        proposals that would tick a group (NodeFailedError), and tell the
        `on_failure` callbacks. Later calls do nothing."""
        if self.failure is not None:
            return
        self.failure = reason
        log.error("node %d: out of service: %s", self.node_id, reason)
        for timer in (self._timer, self._heartbeat_timer):
            if timer is not None:
                timer.cancel()
        self._timer = self._heartbeat_timer = None
        self._timer_at = math.inf
        self._dirty.clear()
        self._due.clear()
        self._heap.clear()
        self.network.leave(f"node {self.node_id} is out of service: {reason}")
        for group_id, group in self._groups.items():
            group.take_out_of_service(NodeFailedError(group_id, self.node_id, reason))
        for callback in list(self._on_failure):
            self._call_failure_callback(callback, reason)

    def _call_failure_callback(self, callback: FailureCallback, reason: str) -> None:
        try:
            callback(reason)
        except Exception:
            log.exception("node %d: an on_failure callback failed", self.node_id)

    def _is_storage_error(self, exc: BaseException) -> bool:
        return isinstance(exc, self.storage_errors)

    def _group_error(self, group_id: int, exc: Exception, what: str, *args: Any) -> None:
        """`exc` came out of one group while it `what`: a storage error fails
        the node; anything else is counted and logged for that group alone."""
        if self._is_storage_error(exc):
            self.fail(f"group {group_id} failed {what % args}: {type(exc).__name__}: {exc}")
        else:
            self.group_errors.record(group_id, exc, f"node %d: group %d failed {what}",
                                     self.node_id, group_id, *args)

    def _sync_votes(self) -> None:
        """Make every group's term and vote durable before the network flushes;
        a vote store that cannot fails the node, and nothing is sent."""
        assert self.votes is not None
        try:
            self.votes.sync()
        except Exception as exc:
            if not self._is_storage_error(exc):
                raise
            self.fail(f"the vote store could not sync: {type(exc).__name__}: {exc}")

    def _deliver(self, replica: RaftGroup, peer_id: int, message: Any) -> None:
        """A message for `replica`: dropped once the node failed; a storage error
        while handling it fails the node. Any other exception goes on to
        PeerNetwork, which drops the message (counted, logged) and carries on."""
        if self.failure is not None:
            return
        try:
            replica.transport.deliver(peer_id, message)
        except NodeFailedError:
            return   # the node failed while this message was handled
        except Exception as exc:
            if not self._is_storage_error(exc):
                raise
            self.fail(f"group {replica.group_id} failed to handle a message from peer {peer_id}: "
                      f"{type(exc).__name__}: {exc}")

    def _activity(self, group_id: int) -> None:
        """A group was proposed to (or handled a message): tick it, or refuse if failed."""
        if self.failure is not None:
            raise NodeFailedError(group_id, self.node_id, self.failure)
        self.mark_active(group_id)

    def group(self, group_id: int) -> RaftGroup:
        return self._groups[group_id]

    def groups(self) -> list[RaftGroup]:
        return list(self._groups.values())

    def add_group(self, replica: RaftGroup) -> None:
        """Start ticking `replica`; peers already connected are announced to it."""
        if replica.group_id in self._groups or replica.group_id == NODE_CHANNEL:
            raise ValueError(f"group {replica.group_id} already runs on node {self.node_id}")
        self._groups[replica.group_id] = replica
        replica.transport.on_activity = lambda gid=replica.group_id: self._activity(gid)
        replica.sync_scheduler = self._schedule_sync
        self.network.register_group(replica.group_id,
                                    lambda peer_id, message, r=replica: self._deliver(r, peer_id, message))
        for peer_id in self.network.connected_peers:
            try:
                replica.transport.peer_connected(peer_id)
            except Exception as exc:
                self._group_error(replica.group_id, exc, "to learn of peer %d", peer_id)
        period = replica.conf.appendEntriesPeriod
        if period < self._heartbeat_interval_s:
            self._heartbeat_interval_s = period
            self._arm_heartbeats()
        self.mark_active(replica.group_id)

    def remove_group(self, group_id: int) -> RaftGroup:
        replica = self._groups.pop(group_id)
        self._dirty.discard(group_id)
        self._tick_failing.discard(group_id)
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
            try:
                self.remove_group(group_id)
            except Exception:   # a broken disk must not keep the rest from closing
                log.exception("node %d: stopping group %d failed", self.node_id, group_id)
        self._loop = None
        if self._syncer is not None:
            self._syncer.close()
            self._syncer = None
        await self.network.close()
        if self.votes is not None:
            try:
                self.votes.close()
            except Exception:
                if self.failure is None:
                    raise
                log.exception("node %d: closing the vote store of a failed node failed", self.node_id)

    # ---- journal group commits (see RaftGroup, "durability") -------------------
    #
    # A group with journal writes to make durable asks here; once per loop
    # iteration every such group's sync job (one fdatasync per file written
    # since its last job) goes to `run_sync`: by default a few native threads
    # (raft/syncer.py), so the event loop never waits for a disk, syncs of
    # different groups overlap, and a finished sync reaches the loop without
    # waiting for the GIL; the simulation passes its simulated disk. When a
    # job returns, the group releases what it made durable and the network
    # flushes. A failed fdatasync fails the node: the page cache's state is
    # then unknown, and retrying could report lost data as durable.

    def _schedule_sync(self, replica: RaftGroup) -> None:
        if self._loop is None:   # not started: nothing to overlap with
            replica.sync_now()
            return
        if not self._sync_wanted:
            self._loop.call_soon(self._start_syncs)
        self._sync_wanted[replica.group_id] = replica

    def _start_syncs(self) -> None:
        wanted, self._sync_wanted = self._sync_wanted, {}
        if self._loop is None or self.failure is not None:
            return
        for replica in wanted.values():
            if self._groups.get(replica.group_id) is not replica:
                continue
            try:
                job = replica.journal.sync_job()
            except Exception as exc:
                self._group_error(replica.group_id, exc, "to start a journal sync")
                continue
            if job is None:
                continue
            try:
                self._run_sync(job, lambda error, r=replica, j=job: self._synced(r, j, error))
            except OSError as exc:
                job.release()
                replica.journal.abort(job)
                self.fail(f"group {replica.group_id}: cannot start a journal fdatasync: {exc}")
                return

    def _run_sync_natively(self, job: Any, done: Callable[[BaseException | None], None]) -> None:
        loop = self._loop
        assert loop is not None, "syncs start only on a started node"
        if self._syncer is None:
            self._syncer = FileSyncer(loop, SYNC_THREADS)
        self._syncer.submit(job, done)

    def _synced(self, replica: RaftGroup, job: Any, error: BaseException | None) -> None:
        if self.failure is not None or self._groups.get(replica.group_id) is not replica:
            return
        if error is not None:
            replica.journal.abort(job)
            self.fail(f"group {replica.group_id}: journal fdatasync failed: {type(error).__name__}: {error}")
            return
        self.fdatasyncs += job.sync_calls
        try:
            replica.journal_synced(job)
        except Exception as exc:
            self._group_error(replica.group_id, exc, "to release synced entries")
        self.network.flush()

    # ---- ticking -------------------------------------------------------------

    def mark_active(self, group_id: int) -> None:
        """Tick `group_id` at the next loop iteration (never, once the node failed)."""
        if self.failure is not None:
            return
        self._dirty.add(group_id)
        if not self._dirty_scheduled and self._loop is not None:
            self._dirty_scheduled = True
            self._loop.call_soon(self._tick_active)

    def _tick_active(self) -> None:
        self._dirty_scheduled = False
        active, self._dirty = self._dirty, set()
        for group_id in active:
            if self.failure is not None:
                return
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
        """Tick one group and schedule its next tick. Whatever it raises stays
        with it (see the module docstring): a group that raised ticks again
        TICK_RETRY_S later at the earliest, not in a busy loop."""
        try:
            replica.doTick(0.0)
            due = replica.next_tick_due()
            self._tick_failing.discard(replica.group_id)
        except Exception as exc:
            self._group_error(replica.group_id, exc, "to tick")
            if self.failure is not None:
                return
            self._tick_failing.add(replica.group_id)
            due = monotonic_time() + TICK_RETRY_S
            try:
                due = max(due, replica.next_tick_due())
            except Exception:
                pass   # counted above; retry at the earliest
        self._schedule(replica, due)

    def _schedule(self, replica: RaftGroup, due: float | None = None) -> None:
        """Tick `replica` at `due` (its own next_tick_due() when None) unless something comes first."""
        if due is None:
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
        if self.failure is not None:
            return
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
        if self.failure is not None:
            return
        self._arm_heartbeats()
        now = monotonic_time()
        hold_s = 2 * self._heartbeat_interval_s
        per_peer: dict[int, bytearray] = {}
        connected = self.network.connected_peers
        for replica in list(self._groups.values()):
            if replica.group_id in self._tick_failing:
                continue   # no heartbeats for a group that cannot tick: let its followers elect
            try:
                entry = replica.coalesced_heartbeat(now, hold_s)
                if entry is None:
                    continue
                self._schedule(replica)
            except Exception as exc:   # that group is left to pysyncobj's own heartbeats; the others carry on
                self._group_error(replica.group_id, exc, "to offer a coalesced heartbeat")
                if self.failure is not None:
                    return
                continue
            packed = HEARTBEAT.pack(*entry)
            for peer_id in replica.replica_ids:
                if peer_id != self.node_id and peer_id in connected:
                    per_peer.setdefault(peer_id, bytearray()).extend(packed)
        for peer_id, entries in per_peer.items():
            self.network.send(peer_id, NODE_CHANNEL, {"type": "rk_hb", "g": bytes(entries)})
        self.network.flush()

    def _on_node_message(self, peer_id: int, message: Any) -> None:
        if self.failure is not None or not isinstance(message, dict):
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
            ok = False
            if replica is not None:
                try:
                    ok = replica.accept_coalesced_heartbeat(peer_id, term, last, commit, now)
                    if ok:
                        self._schedule(replica)
                except Exception as exc:   # refused for that group; the others' still count
                    self._group_error(group_id, exc, "to take a coalesced heartbeat from peer %d", peer_id)
                    if self.failure is not None:
                        return
                    ok = False
            if ok:
                accepted += GROUP_IDS.pack(group_id)
            else:
                stale += GROUP_IDS.pack(group_id)
        self.network.send(peer_id, NODE_CHANNEL, {"type": "rk_hb_ack", "ok": bytes(accepted), "stale": bytes(stale)})
        self.network.flush()

    def _on_heartbeat_answers(self, peer_id: int, accepted: Any, stale: Any) -> None:
        if not all(isinstance(v, bytes) and len(v) % GROUP_IDS.size == 0 for v in (accepted, stale)):
            log.warning("node %d: malformed heartbeat answers from peer %d", self.node_id, peer_id)
            return
        now = monotonic_time()
        for answer, ids in ((True, accepted), (False, stale)):
            for (group_id,) in GROUP_IDS.iter_unpack(ids):
                replica = self._groups.get(group_id)
                if replica is None:
                    continue
                try:
                    replica.coalesced_heartbeat_answered(peer_id, answer, now)
                except Exception as exc:
                    self._group_error(group_id, exc, "to take a coalesced heartbeat answer from peer %d", peer_id)
                    if self.failure is not None:
                        return
                if not answer:
                    self.mark_active(group_id)

    # ---- peers ---------------------------------------------------------------

    def _peer_connected(self, peer_id: int) -> None:
        self._tell_groups(peer_id, True)

    def _peer_disconnected(self, peer_id: int) -> None:
        self._tell_groups(peer_id, False)

    def _tell_groups(self, peer_id: int, connected: bool) -> None:
        for replica in list(self._groups.values()):
            if self.failure is not None:
                return
            try:
                if connected:
                    replica.transport.peer_connected(peer_id)
                else:
                    replica.transport.peer_disconnected(peer_id)
            except Exception as exc:
                self._group_error(replica.group_id, exc, "to learn that peer %d %s", peer_id,
                                  "connected" if connected else "disconnected")

    def status(self) -> dict[str, Any]:
        return {gid: {"leader": r.leader_id, "term": r.leader_epoch} for gid, r in self._groups.items()}
