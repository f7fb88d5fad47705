"""GroupCoordinator: Kafka's classic consumer-group protocol, as a state machine.

A group moves through Kafka's states:

  Empty --join--> PreparingRebalance --all joined / rebalance timeout--> CompletingRebalance
  CompletingRebalance --leader's SyncGroup persisted--> Stable
  Stable / CompletingRebalance --join, leave, session expiry--> PreparingRebalance
  PreparingRebalance --no member left--> Empty;   delete --> Dead

Static membership (KIP-345): a member that joins with a `group.instance.id`
keeps its place across restarts. A restarted instance (empty member id,
known instance id) takes over its old member's place under a new member
id: in a Stable group with unchanged protocols it gets the current
generation and assignment back with no rebalance; its old member id is
fenced (FENCED_INSTANCE_ID). Static members do not leave on close; only
their session timeout (or an explicit LeaveGroup) removes them.

Every completed rebalance bumps the generation. The broker only relays
assignments: the leader member (the first to join, kept while it stays)
receives every member's subscription metadata and sends back everyone's
assignment, so any client-side assignor (range, roundrobin, sticky,
cooperative-sticky) works. A new group waits `initial_rebalance_delay_ms`
(extended as members arrive) so its first members land in one generation.

Nothing here touches sockets, Raft or disk: time comes from `clock` and
`tick(now)` (the broker calls it every GROUP_TICK_S), and a group's metadata
is made durable through the `persist` callback, which the broker implements
as a Raft append to `__consumer_offsets`. That keeps the whole protocol
testable with a fake clock.
"""
from __future__ import annotations

import asyncio
import enum
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Awaitable, Callable

from raftka.errors import ErrorCode, GroupError
from raftka.groups.offsets_topic import GroupRecord, MemberRecord

log = logging.getLogger(__name__)

GROUP_TICK_S = 0.1


class GroupState(enum.Enum):
    EMPTY = "Empty"
    PREPARING_REBALANCE = "PreparingRebalance"
    COMPLETING_REBALANCE = "CompletingRebalance"
    STABLE = "Stable"
    DEAD = "Dead"           # what DescribeGroups says of a group that does not exist (deleted, or never was)


@dataclass(frozen=True)
class GroupSettings:
    """The coordinator's limits (Config holds them under Kafka's names)."""

    min_session_timeout_ms: int = 6000
    max_session_timeout_ms: int = 1_800_000
    initial_rebalance_delay_ms: int = 3000
    max_size: int = 1000


@dataclass(frozen=True)
class JoinResult:
    generation: int
    protocol: str | None
    leader: str
    member_id: str
    # (member id, group instance id, metadata): for the leader only
    members: tuple[tuple[str, str | None, bytes], ...] = ()


@dataclass
class Member:
    member_id: str
    group_instance_id: str | None          # static membership (JoinGroup v5+); None: a dynamic member
    client_id: str
    client_host: str
    session_timeout_ms: int
    rebalance_timeout_ms: int
    protocol_type: str
    protocols: tuple[tuple[str, bytes], ...]
    deadline_s: float                      # session expiry
    assignment: bytes = b""
    join_future: asyncio.Future[JoinResult] | None = None
    sync_future: asyncio.Future[bytes] | None = None

    def metadata(self, protocol: str) -> bytes:
        return next(data for name, data in self.protocols if name == protocol)

    def fail(self, error: GroupError) -> None:
        for future in (self.join_future, self.sync_future):
            if future is not None and not future.done():
                future.set_exception(error)
        self.join_future = self.sync_future = None


@dataclass
class Group:
    group_id: str
    state: GroupState = GroupState.EMPTY
    generation: int = 0
    protocol_type: str | None = None
    protocol: str | None = None
    leader: str | None = None
    members: dict[str, Member] = field(default_factory=dict)    # in join order
    static_members: dict[str, str] = field(default_factory=dict)  # group instance id -> its member id
    rebalance_deadline_s: float = 0.0
    initial_delay_until_s: float = 0.0     # a new group's join window (0: none)
    initial_delay_limit_s: float = 0.0

    def record(self, now_ms: int) -> GroupRecord:
        """What is persisted: enough to resume the generation after a failover."""
        return GroupRecord(
            protocol_type=self.protocol_type or "", generation=self.generation, protocol=self.protocol,
            leader=self.leader, state_timestamp_ms=now_ms,
            members=tuple(MemberRecord(m.member_id, m.group_instance_id, m.client_id, m.client_host,
                                       m.rebalance_timeout_ms, m.session_timeout_ms,
                                       m.metadata(self.protocol) if self.protocol else b"", m.assignment)
                          for m in self.members.values()))


Persist = Callable[[str, GroupRecord], Awaitable[None]]


class GroupCoordinator:
    """The groups one broker coordinates; see the module docstring."""

    def __init__(self, settings: GroupSettings, persist: Persist,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings
        self._persist = persist
        self._clock = clock
        self.groups: dict[str, Group] = {}
        self._background: set[asyncio.Task[None]] = set()

    # ---- JoinGroup ---------------------------------------------------------

    async def join(self, group_id: str, member_id: str, client_id: str, client_host: str,
                   session_timeout_ms: int, rebalance_timeout_ms: int, protocol_type: str,
                   protocols: tuple[tuple[str, bytes], ...], group_instance_id: str | None = None) -> JoinResult:
        """Join (or rejoin, with its member id) the group; resolves when the
        rebalance completes. A new member (empty member id) gets its id here;
        a known static instance rejoining with an empty member id takes over
        its old member (see the module docstring)."""
        if not group_id:
            raise GroupError(ErrorCode.INVALID_GROUP_ID, group_id, "empty group id")
        s = self.settings
        if not s.min_session_timeout_ms <= session_timeout_ms <= s.max_session_timeout_ms:
            raise GroupError(ErrorCode.INVALID_SESSION_TIMEOUT, group_id,
                             f"{session_timeout_ms} ms outside [{s.min_session_timeout_ms}, {s.max_session_timeout_ms}]")
        group = self.groups.get(group_id)
        if group is None:
            if member_id:
                raise GroupError(ErrorCode.UNKNOWN_MEMBER_ID, group_id, f"no member {member_id!r}")
            group = self.groups[group_id] = Group(group_id)
        self._check_protocols(group, protocol_type, protocols)
        now = self._clock()
        if not member_id and group_instance_id in group.static_members:
            return await self._rejoin_static(group, group_instance_id, client_id, client_host, session_timeout_ms,
                                             rebalance_timeout_ms, protocol_type, protocols, now)
        if not member_id:
            if len(group.members) >= s.max_size:
                raise GroupError(ErrorCode.GROUP_MAX_SIZE_REACHED, group_id, f"{s.max_size} members")
            member_id = f"{group_instance_id or client_id or 'member'}-{uuid.uuid4()}"
            member = Member(member_id, group_instance_id, client_id, client_host, session_timeout_ms,
                            rebalance_timeout_ms, protocol_type, protocols, now + session_timeout_ms / 1000)
            group.members[member_id] = member
            if group_instance_id is not None:
                group.static_members[group_instance_id] = member_id
            if group.initial_delay_until_s:
                group.initial_delay_until_s = min(now + s.initial_rebalance_delay_ms / 1000, group.initial_delay_limit_s)
        else:
            _group, member = self._member(group_id, member_id, group_instance_id)
            member.fail(GroupError(ErrorCode.REBALANCE_IN_PROGRESS, group_id, "the member rejoined"))
            self._update_member(member, protocol_type, protocols, session_timeout_ms, rebalance_timeout_ms, now)
        return await self._join_rebalance(group, member, now, f"member {member_id} joined")

    async def _join_rebalance(self, group: Group, member: Member, now: float, why: str) -> JoinResult:
        """Wait for the member's place in the next generation (starting a rebalance unless one is under way)."""
        member.join_future = asyncio.get_running_loop().create_future()
        future = member.join_future
        if group.state is GroupState.PREPARING_REBALANCE:
            self._maybe_complete_join(group, now)
        else:
            self._prepare_rebalance(group, now, why)
        return await future

    @staticmethod
    def _update_member(member: Member, protocol_type: str, protocols: tuple[tuple[str, bytes], ...],
                       session_timeout_ms: int, rebalance_timeout_ms: int, now: float) -> None:
        member.protocols, member.protocol_type = protocols, protocol_type
        member.session_timeout_ms, member.rebalance_timeout_ms = session_timeout_ms, rebalance_timeout_ms
        member.deadline_s = now + session_timeout_ms / 1000

    async def _rejoin_static(self, group: Group, instance_id: str, client_id: str, client_host: str,
                             session_timeout_ms: int, rebalance_timeout_ms: int, protocol_type: str,
                             protocols: tuple[tuple[str, bytes], ...], now: float) -> JoinResult:
        """A known static instance came back under no member id (it restarted):
        it replaces its old member, fenced from now on. In a Stable group whose
        protocol stays the one selected it resumes the current generation at
        once (Kafka's rule: its subscription is not compared; the leader
        notices changes from metadata); otherwise the group rebalances."""
        old = group.members[group.static_members[instance_id]]
        old.fail(GroupError(ErrorCode.FENCED_INSTANCE_ID, group.group_id, f"instance {instance_id!r} rejoined"))
        member_id = f"{instance_id}-{uuid.uuid4()}"
        member = Member(member_id, instance_id, client_id, client_host, session_timeout_ms, rebalance_timeout_ms,
                        protocol_type, protocols, now + session_timeout_ms / 1000, assignment=old.assignment)
        group.members = {member_id if mid == old.member_id else mid: member if mid == old.member_id else m
                         for mid, m in group.members.items()}   # its place in join order kept
        group.static_members[instance_id] = member_id
        if group.leader == old.member_id:
            group.leader = member_id
        unchanged = group.protocol is not None and self._select_protocol(group) == group.protocol
        log.info("group %r: static instance %r rejoined as %s (was %s)", group.group_id, instance_id, member_id,
                 old.member_id)
        if group.state is GroupState.STABLE and unchanged:
            await self._persist(group.group_id, group.record(self._now_ms()))
            everyone = tuple((m.member_id, m.group_instance_id, m.metadata(group.protocol))
                             for m in group.members.values()) if member_id == group.leader else ()
            return JoinResult(group.generation, group.protocol, group.leader or "", member_id, everyone)
        return await self._join_rebalance(group, member, now, f"static instance {instance_id!r} rejoined")

    def _check_protocols(self, group: Group, protocol_type: str, protocols: tuple[tuple[str, bytes], ...]) -> None:
        if not protocol_type or not protocols:
            raise GroupError(ErrorCode.INCONSISTENT_GROUP_PROTOCOL, group.group_id, "no protocol type or protocols")
        if not group.members:
            group.protocol_type = protocol_type   # the first member sets it for the rest
            return
        if protocol_type != group.protocol_type:
            raise GroupError(ErrorCode.INCONSISTENT_GROUP_PROTOCOL, group.group_id,
                             f"protocol type {protocol_type!r}, the group's is {group.protocol_type!r}")
        if not self._candidate_protocols(group) & {name for name, _ in protocols}:
            raise GroupError(ErrorCode.INCONSISTENT_GROUP_PROTOCOL, group.group_id,
                             "no protocol in common with the members")

    @staticmethod
    def _candidate_protocols(group: Group) -> set[str]:
        sets = [{name for name, _ in m.protocols} for m in group.members.values()]
        return set.intersection(*sets) if sets else set()

    def _prepare_rebalance(self, group: Group, now: float, why: str) -> None:
        log.info("group %r: rebalancing generation %d (%s)", group.group_id, group.generation, why)
        if group.state is GroupState.COMPLETING_REBALANCE:
            for member in group.members.values():
                if member.sync_future is not None and not member.sync_future.done():
                    member.sync_future.set_exception(GroupError(ErrorCode.REBALANCE_IN_PROGRESS, group.group_id))
                member.sync_future = None
        was_empty = group.state is GroupState.EMPTY
        group.state = GroupState.PREPARING_REBALANCE
        timeout_s = max((m.rebalance_timeout_ms for m in group.members.values()), default=0) / 1000
        group.rebalance_deadline_s = now + timeout_s
        if was_empty and self.settings.initial_rebalance_delay_ms:
            group.initial_delay_until_s = now + self.settings.initial_rebalance_delay_ms / 1000
            group.initial_delay_limit_s = group.rebalance_deadline_s
        self._maybe_complete_join(group, now)

    def _maybe_complete_join(self, group: Group, now: float) -> None:
        if group.state is not GroupState.PREPARING_REBALANCE:
            return
        if group.initial_delay_until_s:
            if now < group.initial_delay_until_s:
                return
            group.initial_delay_until_s = 0.0
        if all(m.join_future is not None for m in group.members.values()) or now >= group.rebalance_deadline_s:
            self._complete_join(group, now)

    def _complete_join(self, group: Group, now: float) -> None:
        for member in [m for m in group.members.values() if m.join_future is None]:
            log.info("group %r: member %s did not rejoin in time", group.group_id, member.member_id)
            self._remove(group, member, ErrorCode.UNKNOWN_MEMBER_ID)
        group.generation += 1
        if not group.members:
            group.state, group.protocol, group.leader, group.protocol_type = GroupState.EMPTY, None, None, None
            self._persist_in_background(group)
            return
        group.protocol = self._select_protocol(group)
        if group.leader not in group.members:
            group.leader = next(iter(group.members))
        group.state = GroupState.COMPLETING_REBALANCE
        everyone = tuple((m.member_id, m.group_instance_id, m.metadata(group.protocol)) for m in group.members.values())
        log.info("group %r: generation %d with %d members, protocol %s, leader %s", group.group_id,
                 group.generation, len(group.members), group.protocol, group.leader)
        for member in group.members.values():
            member.deadline_s = now + member.session_timeout_ms / 1000
            future, member.join_future = member.join_future, None
            if future is not None and not future.done():
                future.set_result(JoinResult(group.generation, group.protocol, group.leader, member.member_id,
                                             everyone if member.member_id == group.leader else ()))

    def _select_protocol(self, group: Group) -> str:
        """Kafka's vote: each member votes for its most preferred protocol
        that every member supports; the most votes win (ties: the first)."""
        candidates = self._candidate_protocols(group)
        votes: dict[str, int] = {}
        for member in group.members.values():
            choice = next(name for name, _ in member.protocols if name in candidates)
            votes[choice] = votes.get(choice, 0) + 1
        return max(votes, key=lambda name: votes[name])

    # ---- SyncGroup, Heartbeat, LeaveGroup --------------------------------

    async def sync(self, group_id: str, generation: int, member_id: str,
                   assignments: dict[str, bytes], group_instance_id: str | None = None) -> bytes:
        """This member's assignment for the generation; the leader brings everyone's."""
        group, member = self._member(group_id, member_id, group_instance_id)
        if generation != group.generation:
            raise GroupError(ErrorCode.ILLEGAL_GENERATION, group_id, f"generation {generation}, the group is at {group.generation}")
        now = self._clock()
        member.deadline_s = now + member.session_timeout_ms / 1000
        if group.state is GroupState.PREPARING_REBALANCE:
            raise GroupError(ErrorCode.REBALANCE_IN_PROGRESS, group_id)
        if group.state is GroupState.STABLE:
            return member.assignment
        member.sync_future = asyncio.get_running_loop().create_future()
        future = member.sync_future
        if member_id == group.leader:
            for m in group.members.values():
                m.assignment = assignments.get(m.member_id, b"")
            await self._persist_assignment(group)
        return await future

    async def _persist_assignment(self, group: Group) -> None:
        generation = group.generation
        try:
            await self._persist(group.group_id, group.record(self._now_ms()))
        except Exception as error:   # the append failed (leadership moved): the members retry
            log.warning("group %r: storing generation %d failed: %s", group.group_id, generation, error)
            code = error.error_code if isinstance(error, GroupError) else ErrorCode.NOT_COORDINATOR
            if group.generation == generation and group.state is GroupState.COMPLETING_REBALANCE:
                for member in group.members.values():
                    member.fail(GroupError(code, group.group_id, "storing the assignment failed"))
                self._prepare_rebalance(group, self._clock(), "storing the assignment failed")
            return
        if group.generation != generation or group.state is not GroupState.COMPLETING_REBALANCE:
            return   # a rebalance started meanwhile; its members were told
        group.state = GroupState.STABLE
        for member in group.members.values():
            future, member.sync_future = member.sync_future, None
            if future is not None and not future.done():
                future.set_result(member.assignment)

    def heartbeat(self, group_id: str, generation: int, member_id: str, group_instance_id: str | None = None) -> None:
        """Keep the member's session; REBALANCE_IN_PROGRESS tells it to rejoin."""
        group, member = self._member(group_id, member_id, group_instance_id)
        if generation != group.generation:
            raise GroupError(ErrorCode.ILLEGAL_GENERATION, group_id, f"generation {generation}, the group is at {group.generation}")
        member.deadline_s = self._clock() + member.session_timeout_ms / 1000
        if group.state is GroupState.PREPARING_REBALANCE:
            raise GroupError(ErrorCode.REBALANCE_IN_PROGRESS, group_id)

    def leave(self, group_id: str, member_id: str, group_instance_id: str | None = None) -> None:
        """The member leaves; a static one may be named by its instance id alone (empty member id)."""
        if not member_id and group_instance_id is not None:
            group = self.groups.get(group_id)
            member_id = group.static_members.get(group_instance_id, "") if group is not None else ""
        group, member = self._member(group_id, member_id, group_instance_id)
        log.info("group %r: member %s left", group_id, member_id)
        self._remove(group, member, ErrorCode.UNKNOWN_MEMBER_ID)
        self._member_gone(group)

    def _member(self, group_id: str, member_id: str, group_instance_id: str | None = None) -> tuple[Group, Member]:
        """The group and member a request names; FENCED_INSTANCE_ID when its
        instance id belongs to another member now (it was replaced)."""
        group = self.groups.get(group_id)
        if group is None:
            raise GroupError(ErrorCode.UNKNOWN_MEMBER_ID, group_id, "no such group here")
        if group_instance_id is not None and group_instance_id in group.static_members \
                and group.static_members[group_instance_id] != member_id:
            raise GroupError(ErrorCode.FENCED_INSTANCE_ID, group_id,
                             f"instance {group_instance_id!r} is member {group.static_members[group_instance_id]}")
        member = group.members.get(member_id)
        if member is None:
            raise GroupError(ErrorCode.UNKNOWN_MEMBER_ID, group_id, f"no member {member_id!r}")
        return group, member

    def _remove(self, group: Group, member: Member, code: ErrorCode) -> None:
        member.fail(GroupError(code, group.group_id, f"member {member.member_id} removed"))
        del group.members[member.member_id]
        if member.group_instance_id is not None and group.static_members.get(member.group_instance_id) == member.member_id:
            del group.static_members[member.group_instance_id]

    def _member_gone(self, group: Group) -> None:
        now = self._clock()
        if group.state in (GroupState.STABLE, GroupState.COMPLETING_REBALANCE):
            self._prepare_rebalance(group, now, "a member left")
        else:
            self._maybe_complete_join(group, now)

    # ---- offsets ---------------------------------------------------------------

    def validate_commit(self, group_id: str, generation: int, member_id: str,
                        group_instance_id: str | None = None) -> None:
        """Raise GroupError unless this member may commit offsets now. A
        generation of -1 with no member is a consumer managing its own
        partitions, allowed while the group has no members."""
        if not group_id:
            raise GroupError(ErrorCode.INVALID_GROUP_ID, group_id, "empty group id")
        group = self.groups.get(group_id)
        if group is None:
            if generation < 0:
                return
            raise GroupError(ErrorCode.ILLEGAL_GENERATION, group_id, "the group has no generation")
        if generation < 0 and group.state is GroupState.EMPTY:
            return
        if group.state is GroupState.COMPLETING_REBALANCE:
            raise GroupError(ErrorCode.REBALANCE_IN_PROGRESS, group_id)
        _group, member = self._member(group_id, member_id, group_instance_id)
        if generation != group.generation:
            raise GroupError(ErrorCode.ILLEGAL_GENERATION, group_id, f"generation {generation}, the group is at {group.generation}")
        member.deadline_s = self._clock() + member.session_timeout_ms / 1000

    # ---- time ------------------------------------------------------------------

    def tick(self, now: float | None = None) -> None:
        """Expire sessions and finish rebalances whose time is up."""
        now = self._clock() if now is None else now
        for group in list(self.groups.values()):
            expired = [m for m in group.members.values() if m.join_future is None and m.deadline_s <= now]
            for member in expired:
                log.info("group %r: member %s's session expired", group.group_id, member.member_id)
                self._remove(group, member, ErrorCode.UNKNOWN_MEMBER_ID)
            if expired:
                self._member_gone(group)
            else:
                self._maybe_complete_join(group, now)

    # ---- loading, unloading, deleting ---------------------------------------------

    def load(self, group_id: str, record: GroupRecord | None) -> None:
        """Take over a group from its persisted record (a new coordinator after
        failover): members keep their generation and assignments, and have one
        session timeout from now to heartbeat here."""
        if record is None:
            self.groups.pop(group_id, None)
            return
        now = self._clock()
        group = Group(group_id, generation=record.generation, protocol_type=record.protocol_type or None,
                      protocol=record.protocol, leader=record.leader)
        for m in record.members:
            group.members[m.member_id] = Member(
                m.member_id, m.group_instance_id, m.client_id, m.client_host, m.session_timeout_ms,
                m.rebalance_timeout_ms, record.protocol_type, ((record.protocol or "", m.subscription),),
                now + m.session_timeout_ms / 1000, assignment=m.assignment)
            if m.group_instance_id is not None:
                group.static_members[m.group_instance_id] = m.member_id
        group.state = GroupState.STABLE if group.members else GroupState.EMPTY
        self.groups[group_id] = group

    def unload(self, group_id: str) -> None:
        """Forget a group whose coordination moved elsewhere, or that was deleted; waiting members
        are told NOT_COORDINATOR and look the coordinator up again."""
        group = self.groups.pop(group_id, None)
        if group is None:
            return
        for member in group.members.values():
            member.fail(GroupError(ErrorCode.NOT_COORDINATOR, group_id, "coordination moved"))

    def check_deletable(self, group_id: str) -> None:
        group = self.groups.get(group_id)
        if group is not None and group.state is not GroupState.EMPTY:
            raise GroupError(ErrorCode.NON_EMPTY_GROUP, group_id, f"{len(group.members)} members, state {group.state.value}")

    # ---- helpers -----------------------------------------------------------------

    def close(self) -> None:
        """Stop background writes (the broker is stopping) and forget every group."""
        for task in self._background:
            task.cancel()
        for group_id in list(self.groups):
            self.unload(group_id)

    def _persist_in_background(self, group: Group) -> None:
        record = group.record(self._now_ms())

        async def store() -> None:
            try:
                await self._persist(group.group_id, record)
            except Exception as error:
                log.warning("group %r: storing the empty generation %d failed: %s",
                            group.group_id, record.generation, error)
        task = asyncio.get_running_loop().create_task(store())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    @staticmethod
    def _now_ms() -> int:
        return int(time.time() * 1000)
