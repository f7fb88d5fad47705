"""Raft leadership transfer (the Raft thesis, 3.10; etcd's TimeoutNow), on
three brokers over real loopback sockets: the leader hands its leadership to
a chosen follower in one election despite PreVote and leader stickiness,
refuses proposals (retriably) while it does, loses no committed entry, and
takes proposals again if the target never takes over."""
from __future__ import annotations

import asyncio

import pytest

from raftka.raft.group import LeadershipTransferError, NotLeaderError
from tests.conftest import make_batch, wait_for
from tests.test_raft_group import FAST, GROUP, append, leader_of, start_cluster
from tests.test_raft_prevote import cut_inbound


def test_the_leader_hands_leadership_to_the_chosen_follower_in_one_election(tmp_path):
    async def scenario() -> None:
        _ports, brokers, leader = await start_cluster(tmp_path)
        try:
            for _ in range(5):
                await append(leader, make_batch(1))
            term = leader.replica.leader_epoch
            target = next(b for b in brokers if b is not leader and b.node_id != min(x.node_id for x in brokers))
            loop = asyncio.get_running_loop()
            started = loop.time()
            leader.replica.transfer_leadership(target.node_id)
            assert leader.replica.transferring_to == target.node_id
            with pytest.raises(LeadershipTransferError):   # no new proposals while handing over
                leader.replica.propose_append(make_batch(1), lambda offset, error: None)
            await wait_for(lambda: leader_of(brokers) is target and target.replica.leader_ready, timeout_s=5)
            took_s = loop.time() - started
            assert took_s < FAST["raftMaxTimeout"], f"the transfer took {took_s:.3f} s: a timer ran out, not TimeoutNow"
            assert {b.replica.leader_epoch for b in brokers} == {term + 1}   # one election, no wasted terms
            assert leader.replica.transferring_to is None and not leader.replica.is_leader
            assert await append(target, make_batch(2)) == 5
            await wait_for(lambda: all(b.replica.log.high_watermark == 7 for b in brokers))
            assert len({b.readable_bytes() for b in brokers}) == 1
        finally:
            for b in brokers:
                await b.stop()
    asyncio.run(scenario())


def test_a_transfer_to_a_target_that_never_takes_over_is_abandoned_and_the_leader_resumes(tmp_path):
    async def scenario() -> None:
        _ports, brokers, leader = await start_cluster(tmp_path)
        try:
            await append(leader, make_batch(1))
            term = leader.replica.leader_epoch
            target = next(b for b in brokers if b is not leader)
            cut_inbound(target)   # it never hears timeout_now (nor anything else)
            leader.replica.transfer_leadership(target.node_id)
            with pytest.raises(NotLeaderError):
                leader.replica.propose_append(make_batch(1), lambda offset, error: None)
            await wait_for(lambda: leader.replica.transferring_to is None, timeout_s=3 * FAST["raftMaxTimeout"])
            assert leader.replica.is_leader and leader.replica.leader_epoch == term
            assert await append(leader, make_batch(1)) == 1   # it takes proposals again
        finally:
            for b in brokers:
                await b.stop()
    asyncio.run(scenario())


def test_timeout_now_from_a_member_that_is_not_the_leader_starts_no_election(tmp_path):
    async def scenario() -> None:
        _ports, brokers, leader = await start_cluster(tmp_path)
        try:
            await append(leader, make_batch(1))
            term = leader.replica.leader_epoch
            sender, receiver = [b for b in brokers if b is not leader]
            sender.replica.transport.send_to(receiver.node_id, {"type": "timeout_now", "term": term})
            sender.replica.transport.send_to(receiver.node_id, {"type": "timeout_now", "term": "x"})   # malformed
            sender.node.mark_active(GROUP)
            await wait_for(lambda: receiver.replica.refused_messages == 1)
            await asyncio.sleep(2 * FAST["raftMaxTimeout"])   # what would have happened, has
            assert leader_of(brokers) is leader and {b.replica.leader_epoch for b in brokers} == {term}
        finally:
            for b in brokers:
                await b.stop()
    asyncio.run(scenario())
