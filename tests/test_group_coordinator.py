"""The classic group protocol of GroupCoordinator, driven with a fake clock:
generations, the leader relaying assignments, rebalances on join, leave and
session expiry, Kafka's errors, and taking a group over from its record."""
from __future__ import annotations

import asyncio

import pytest

from raftka.errors import ErrorCode, GroupError
from raftka.groups.coordinator import GroupCoordinator, GroupSettings, GroupState
from raftka.groups.offsets_topic import GroupRecord

SESSION_MS = 10_000
REBALANCE_MS = 20_000
DELAY_MS = 3_000
PROTOCOLS = (("range", b"sub-range"), ("roundrobin", b"sub-rr"))


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Harness:
    def __init__(self, persist_error: Exception | None = None) -> None:
        self.clock = Clock()
        self.persisted: list[tuple[str, GroupRecord]] = []
        self.persist_error = persist_error
        self.coordinator = GroupCoordinator(GroupSettings(initial_rebalance_delay_ms=DELAY_MS),
                                            self._persist, self.clock)

    async def _persist(self, group_id: str, record: GroupRecord) -> None:
        await asyncio.sleep(0)
        if self.persist_error is not None:
            raise self.persist_error
        self.persisted.append((group_id, record))

    def join(self, member_id: str = "", protocols=PROTOCOLS, protocol_type: str = "consumer",
             session_ms: int = SESSION_MS, instance_id: str | None = None) -> asyncio.Task:
        return asyncio.get_running_loop().create_task(self.coordinator.join(
            "g", member_id, "client", "/127.0.0.1", session_ms, REBALANCE_MS, protocol_type, protocols, instance_id))

    async def advance(self, seconds: float) -> None:
        self.clock.now += seconds
        self.coordinator.tick()
        for _ in range(5):
            await asyncio.sleep(0)

    @property
    def group(self):
        return self.coordinator.groups["g"]


async def form_group(h: Harness, members: int = 3, instance_ids: tuple[str | None, ...] = ()):
    """Join `members` new members (static ones with `instance_ids`) and sync
    them; returns their join results."""
    joins = [h.join(instance_id=instance_ids[i] if i < len(instance_ids) else None) for i in range(members)]
    await h.advance(0)
    assert not any(j.done() for j in joins), "a new group waits the initial delay"
    await h.advance(DELAY_MS / 1000)
    results = [await j for j in joins]
    leader = next(r for r in results if r.member_id == r.leader)
    assignments = {r.member_id: f"assigned-{r.member_id}".encode() for r in results}
    syncs = [asyncio.get_running_loop().create_task(h.coordinator.sync(
        "g", r.generation, r.member_id, assignments if r is leader else {})) for r in results]
    got = [await s for s in syncs]
    assert got == [assignments[r.member_id] for r in results]
    return results


def run(coroutine_function):
    def test(*args, **kwargs):
        asyncio.run(coroutine_function(*args, **kwargs))
    test.__name__ = coroutine_function.__name__
    return test


@run
async def test_first_members_land_in_one_generation_and_the_leader_relays_every_assignment():
    h = Harness()
    results = await form_group(h)
    assert {r.generation for r in results} == {1}
    leader = results[0].leader
    assert leader == results[0].member_id                       # the first to join leads
    leader_result = next(r for r in results if r.member_id == leader)
    assert [m[0] for m in leader_result.members] == [r.member_id for r in results]
    assert {m[2] for m in leader_result.members} == {b"sub-range"}
    assert all(not r.members for r in results if r.member_id != leader)
    assert h.group.state is GroupState.STABLE
    assert h.persisted[-1][1].generation == 1
    assert {m.assignment for m in h.persisted[-1][1].members} == {f"assigned-{r.member_id}".encode() for r in results}


@run
async def test_a_member_leaving_starts_a_rebalance_that_the_others_learn_from_heartbeats():
    h = Harness()
    a, b, c = await form_group(h)
    h.coordinator.leave("g", c.member_id)
    with pytest.raises(GroupError) as error:
        h.coordinator.heartbeat("g", a.generation, a.member_id)
    assert error.value.error_code == ErrorCode.REBALANCE_IN_PROGRESS
    rejoins = [h.join(a.member_id), h.join(b.member_id)]
    await h.advance(0)
    results = [await j for j in rejoins]
    assert {r.generation for r in results} == {2}
    assert {r.member_id for r in results} == {a.member_id, b.member_id}
    with pytest.raises(GroupError) as error:
        h.coordinator.heartbeat("g", a.generation, c.member_id)
    assert error.value.error_code == ErrorCode.UNKNOWN_MEMBER_ID


@run
async def test_a_silent_member_is_removed_when_its_session_expires():
    h = Harness()
    a, b, c = await form_group(h)
    for _ in range(3):
        await h.advance(SESSION_MS / 1000 / 2)
        for member in (a, b):
            try:
                h.coordinator.heartbeat("g", a.generation, member.member_id)
            except GroupError as error:
                assert error.error_code == ErrorCode.REBALANCE_IN_PROGRESS
    assert c.member_id not in h.group.members
    assert h.group.state is GroupState.PREPARING_REBALANCE


@run
async def test_members_that_do_not_rejoin_within_the_rebalance_timeout_are_dropped():
    h = Harness()
    a, b, c = await form_group(h)
    newcomer = h.join()
    await h.advance(0)
    assert not newcomer.done()
    await h.advance(REBALANCE_MS / 1000)
    result = await newcomer
    assert result.generation == 2
    assert set(h.group.members) == {result.member_id}


@run
async def test_wrong_generation_unknown_member_and_foreign_protocols_get_kafkas_errors():
    h = Harness()
    a, _b, _c = await form_group(h)
    cases = [
        (lambda: h.coordinator.heartbeat("g", a.generation + 1, a.member_id), ErrorCode.ILLEGAL_GENERATION),
        (lambda: h.coordinator.heartbeat("g", a.generation, "nobody"), ErrorCode.UNKNOWN_MEMBER_ID),
        (lambda: h.coordinator.heartbeat("other", 1, a.member_id), ErrorCode.UNKNOWN_MEMBER_ID),
        (lambda: h.coordinator.leave("g", "nobody"), ErrorCode.UNKNOWN_MEMBER_ID),
        (lambda: h.coordinator.validate_commit("g", a.generation + 1, a.member_id), ErrorCode.ILLEGAL_GENERATION),
        (lambda: h.coordinator.validate_commit("g", -1, ""), ErrorCode.UNKNOWN_MEMBER_ID),
    ]
    for call, code in cases:
        with pytest.raises(GroupError) as error:
            call()
        assert error.value.error_code == code
    for join, code in [(h.join(protocol_type="connect"), ErrorCode.INCONSISTENT_GROUP_PROTOCOL),
                       (h.join(protocols=(("sticky", b""),)), ErrorCode.INCONSISTENT_GROUP_PROTOCOL),
                       (h.join(session_ms=10), ErrorCode.INVALID_SESSION_TIMEOUT),
                       (h.join(member_id="stranger"), ErrorCode.UNKNOWN_MEMBER_ID)]:
        with pytest.raises(GroupError) as error:
            await join
        assert error.value.error_code == code
    assert h.group.state is GroupState.STABLE and h.group.generation == a.generation   # the group is untouched
    h.coordinator.validate_commit("g", a.generation, a.member_id)


@run
async def test_a_group_without_members_accepts_commits_from_consumers_that_assign_themselves():
    h = Harness()
    h.coordinator.validate_commit("solo", -1, "")
    with pytest.raises(GroupError) as error:
        h.coordinator.validate_commit("solo", 3, "someone")
    assert error.value.error_code == ErrorCode.ILLEGAL_GENERATION


@run
async def test_commits_during_a_pending_assignment_are_refused_with_rebalance_in_progress():
    h = Harness()
    joins = [h.join(), h.join()]
    await h.advance(0)
    await h.advance(DELAY_MS / 1000)
    a, _b = [await j for j in joins]
    with pytest.raises(GroupError) as error:
        h.coordinator.validate_commit("g", a.generation, a.member_id)
    assert error.value.error_code == ErrorCode.REBALANCE_IN_PROGRESS


@run
async def test_a_new_coordinator_resumes_the_stored_generation_without_a_rebalance():
    h = Harness()
    results = await form_group(h)
    record = h.persisted[-1][1]
    successor = Harness()
    successor.coordinator.load("g", record)
    group = successor.group
    assert group.state is GroupState.STABLE and group.generation == record.generation
    for r in results:
        successor.coordinator.heartbeat("g", r.generation, r.member_id)
        assigned = await successor.coordinator.sync("g", r.generation, r.member_id, {})
        assert assigned == f"assigned-{r.member_id}".encode()


@run
async def test_a_failed_assignment_write_tells_the_members_to_find_the_coordinator_again():
    h = Harness(persist_error=RuntimeError("not leader any more"))
    joins = [h.join(), h.join()]
    await h.advance(0)
    await h.advance(DELAY_MS / 1000)
    a, b = [await j for j in joins]
    follower = asyncio.get_running_loop().create_task(h.coordinator.sync("g", b.generation, b.member_id, {}))
    await h.advance(0)
    with pytest.raises(GroupError) as error:
        await h.coordinator.sync("g", a.generation, a.member_id, {a.member_id: b"x", b.member_id: b"y"})
    assert error.value.error_code == ErrorCode.NOT_COORDINATOR
    with pytest.raises(GroupError) as error:
        await follower
    assert error.value.error_code == ErrorCode.NOT_COORDINATOR


@run
async def test_the_last_member_leaving_empties_the_group_and_stores_that():
    h = Harness()
    results = await form_group(h, members=1)
    h.coordinator.leave("g", results[0].member_id)
    await h.advance(0)
    assert h.group.state is GroupState.EMPTY and h.group.generation == 2
    assert h.persisted[-1][1].members == () and h.persisted[-1][1].generation == 2
    h.coordinator.check_deletable("g")


# ---- static membership (group.instance.id) ---------------------------------------

@run
async def test_a_restarted_static_member_resumes_its_assignment_without_a_rebalance():
    h = Harness()
    a, b = await form_group(h, 2, instance_ids=("instance-a", "instance-b"))
    generation = h.group.generation
    restarted = await h.join(instance_id="instance-b")     # no member id: a new process
    assert (restarted.generation, restarted.member_id != b.member_id) == (generation, True)
    assert h.group.state is GroupState.STABLE and h.group.generation == generation
    assert await h.coordinator.sync("g", generation, restarted.member_id, {}) == f"assigned-{b.member_id}".encode()
    h.coordinator.heartbeat("g", generation, a.member_id, "instance-a")        # the other member saw nothing
    assert [m.member_id for m in h.persisted[-1][1].members] == [a.member_id, restarted.member_id]


@run
async def test_the_replaced_static_member_id_is_fenced():
    h = Harness()
    _a, b = await form_group(h, 2, instance_ids=("instance-a", "instance-b"))
    await h.join(instance_id="instance-b")
    for call in (lambda: h.coordinator.heartbeat("g", b.generation, b.member_id, "instance-b"),
                 lambda: h.coordinator.validate_commit("g", b.generation, b.member_id, "instance-b")):
        with pytest.raises(GroupError) as error:
            call()
        assert error.value.error_code == ErrorCode.FENCED_INSTANCE_ID


@run
async def test_a_static_member_rejoining_with_new_subscription_metadata_resumes_as_in_kafka():
    h = Harness()
    _a, b = await form_group(h, 2, instance_ids=("instance-a", "instance-b"))
    restarted = await h.join(protocols=(("range", b"owned-partitions-differ"), ("roundrobin", b"")),
                             instance_id="instance-b")
    assert restarted.generation == b.generation and h.group.state is GroupState.STABLE


@run
async def test_a_static_member_rejoining_with_a_protocol_change_rebalances():
    h = Harness()
    a, _b = await form_group(h, 2, instance_ids=("instance-a", "instance-b"))
    changed = h.join(protocols=(("roundrobin", b"sub-rr"),), instance_id="instance-b")   # range no longer shared
    await h.advance(0)
    assert h.group.state is GroupState.PREPARING_REBALANCE
    rejoin_a = h.join(a.member_id, instance_id="instance-a")
    await h.advance(0)
    assert (await changed).generation == (await rejoin_a).generation == a.generation + 1


@run
async def test_a_silent_static_member_is_removed_after_its_session_timeout_and_leave_names_it_by_instance():
    h = Harness()
    a, _b = await form_group(h, 2, instance_ids=("instance-a", "instance-b"))
    h.coordinator.heartbeat("g", a.generation, a.member_id)
    await h.advance(SESSION_MS / 1000 - 1)
    h.coordinator.heartbeat("g", a.generation, a.member_id)
    await h.advance(2)                                       # b's session is over
    assert h.group.state is GroupState.PREPARING_REBALANCE and "instance-b" not in h.group.static_members
    h.coordinator.leave("g", "", "instance-a")
    assert h.group.members == {} and h.group.static_members == {}


@run
async def test_a_new_coordinator_knows_the_static_members_from_the_record():
    h = Harness()
    _a, b = await form_group(h, 2, instance_ids=("instance-a", "instance-b"))
    successor = Harness()
    successor.coordinator.load("g", h.persisted[-1][1])
    assert successor.group.static_members == {"instance-a": _a.member_id, "instance-b": b.member_id}
    restarted = await successor.join(instance_id="instance-b")
    assert restarted.generation == b.generation
