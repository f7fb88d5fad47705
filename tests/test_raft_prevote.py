"""PreVote and leader stickiness, on three brokers over real loopback sockets:
a member that can send but not receive (a one-way partition) never deposes
the leader, however often its election timer runs out, and rejoins without
an election when the partition heals; a leader that dies is still replaced."""
from __future__ import annotations

import asyncio

from raftka.raft.node import NODE_CHANNEL
from tests.conftest import make_batch, wait_for
from tests.test_raft_group import GROUP, append, leader_of, start_cluster

ELECTION_TIMEOUTS_S = 3.0   # FAST's election timeout is 0.3-0.6 s: five or more run out


def cut_inbound(broker) -> None:
    """Everything sent to `broker` is dropped on arrival; what it sends still flows."""
    broker.node.network.register_group(GROUP, lambda peer_id, message: None)
    broker.node.network.register_group(NODE_CHANNEL, lambda peer_id, message: None)


def heal_inbound(broker) -> None:
    broker.node.network.register_group(GROUP, broker.replica.transport.deliver)
    broker.node.network.register_group(NODE_CHANNEL, broker.node._on_node_message)


def test_a_member_cut_off_one_way_never_deposes_the_leader_and_rejoins_without_an_election(tmp_path):
    async def scenario() -> None:
        _ports, brokers, leader = await start_cluster(tmp_path)
        try:
            await append(leader, make_batch(2))
            await wait_for(lambda: all(b.replica.log.high_watermark == 2 for b in brokers))
            term = leader.replica.leader_epoch
            cut = next(b for b in brokers if b is not leader)
            cut_inbound(cut)
            terms_seen, offsets = set(), []
            deadline = asyncio.get_running_loop().time() + ELECTION_TIMEOUTS_S
            while asyncio.get_running_loop().time() < deadline:
                offsets.append(await append(leader, make_batch(1)))   # the majority keeps committing
                terms_seen |= {b.replica.leader_epoch for b in brokers if b is not cut}
                assert leader_of([b for b in brokers if b is not cut]) is leader
                await asyncio.sleep(0.05)
            assert terms_seen == {term}, f"the leader was deposed: terms {sorted(terms_seen)}"
            assert cut.replica.leader_epoch == term, "the cut member raised its term without a pre-vote majority"
            heal_inbound(cut)
            end = 2 + len(offsets)
            await wait_for(lambda: cut.replica.log.high_watermark == end)
            assert {b.replica.leader_epoch for b in brokers} == {term} and leader.replica.is_leader
            assert len({b.readable_bytes() for b in brokers}) == 1
        finally:
            for b in brokers:
                await b.stop()
    asyncio.run(scenario())


def test_a_dead_leader_is_still_replaced_with_pre_vote(tmp_path):
    async def scenario() -> None:
        _ports, brokers, leader = await start_cluster(tmp_path)
        survivors = [b for b in brokers if b is not leader]
        try:
            await append(leader, make_batch(2))
            term = leader.replica.leader_epoch
            await leader.stop()
            await wait_for(lambda: leader_of(survivors) is not None)
            new_leader = leader_of(survivors)
            assert new_leader.replica.leader_epoch == term + 1   # one real election: no wasted terms
            assert await append(new_leader, make_batch(1)) == 2
        finally:
            for b in survivors:
                await b.stop()
    asyncio.run(scenario())
