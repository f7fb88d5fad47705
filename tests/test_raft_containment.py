"""One group's failure stays that group's, and a broken disk takes its node
out of service, not the link. Three RaftNodes in one process over real
loopback sockets, each with two partition groups (real PartitionReplica on
PartitionLog and IndexStore, votes in a real VoteStore):

- a decodable but malformed message that makes one group's handler raise is
  dropped (counted, logged once), and the one connection every group between
  the two brokers shares stays up, the other group committing throughout;
- an OSError (EIO) while a leader handles a message or writes its journal
  fails that node: it stops leading, answering and voting, tells its
  on_failure callback once, refuses proposals, and the other two elect
  leaders among themselves over their untouched connection;
- a group whose tick or coalesced heartbeat raises stops neither the round
  for the other groups nor their heartbeats, and a leader that cannot tick
  stops heartbeating, so a replica that can takes over;
- a broker whose storage failed says so at CRITICAL, answers Produce with
  KAFKA_STORAGE_ERROR, and the other brokers take over its partition.
"""
from __future__ import annotations

import asyncio
import errno
import logging
import struct
from pathlib import Path

import pytest

from raftka.broker.broker import Broker
from raftka.config import Config
from raftka.errors import ErrorCode, StorageError
from raftka.ports import free_ports
from raftka.raft.group import NotLeaderError
from raftka.raft.node import NodeFailedError, RaftNode
from raftka.raft.transport import LOG_INTERVAL_S, PeerNetwork, PeerNetworkConfig
from raftka.raft.votes import VoteStore
from raftka.replication import PartitionReplica
from raftka.storage.index import IndexStore
from raftka.storage.partition_log import PartitionLog
from tests.conftest import make_batch, wait_for
from tests.test_broker_clients import produce_frame

SECRET = b"raftka-test-secret-16+"
A, B = 1, 2          # the two groups every node runs
IDS = (1, 2, 3)
FAST = dict(raftMinTimeout=0.3, raftMaxTimeout=0.6, appendEntriesPeriod=0.05, leaderFallbackTimeout=0.6)


class Member:
    """One broker's replication: a RaftNode with groups A and B."""

    def __init__(self, root: Path, node_id: int, ports: dict[int, int]) -> None:
        self.root, self.node_id = root / f"n{node_id}", node_id
        self.root.mkdir(parents=True, exist_ok=True)
        self.index = IndexStore(self.root / "index.lmdb", 1 << 30)
        peers = {i: ("127.0.0.1", p) for i, p in ports.items() if i != node_id}
        self.node = RaftNode(PeerNetwork(PeerNetworkConfig(node_id=node_id, secret=SECRET, peers=peers,
                                                           listen_port=ports[node_id])),
                             VoteStore(self.root / "votes"))
        self.lost_peers: list[int] = []
        self.failures: list[str] = []
        self.node.network.on_peer_disconnected(self.lost_peers.append)
        self.node.on_failure(self.failures.append)

    async def start(self) -> None:
        await self.node.start()
        for gid in (A, B):
            log = PartitionLog(f"t-{gid}", self.root / f"t-{gid}", gid, self.index, Config(data_dir=self.root))
            self.node.add_group(PartitionReplica(gid, log, self.node_id, list(IDS), self.node.network,
                                                 self.root / f"g{gid}", vote_store=self.node.votes, **FAST))

    async def stop(self) -> None:
        logs = [self.group(gid).log for gid in (A, B)]
        await self.node.stop()
        for log in logs:
            log.close()
        self.index.close()

    def group(self, gid: int) -> PartitionReplica:
        return self.node.group(gid)

    @property
    def network(self) -> PeerNetwork:
        return self.node.network

    def link(self, peer_id: int):
        """The protocol object of the connection to `peer_id` (a new one after any reconnect)."""
        return self.network._links.get(peer_id)


def leader_of(members: list[Member], gid: int) -> Member | None:
    leaders = [m for m in members if m.group(gid).is_leader]
    return leaders[0] if len(leaders) == 1 else None


async def commit(members: list[Member], gid: int, seed: int) -> None:
    """Append one batch through the group's leader among `members`; wait until
    every one of them has applied it."""
    await wait_for(lambda: leader_of(members, gid) is not None)
    leader = leader_of(members, gid)
    offset = await asyncio.wait_for(leader.group(gid).append(make_batch(2, seed=seed)), 10)
    await wait_for(lambda: all(m.group(gid).log.high_watermark >= offset + 2 for m in members))


def with_members(scenario, root: Path) -> None:
    async def run() -> None:
        ports = dict(zip(IDS, free_ports(3)))
        members = [Member(root, i, ports) for i in IDS]
        try:
            for m in members:
                await m.start()
            await wait_for(lambda: all(len(m.network.connected_peers) == 2 for m in members))
            for gid in (A, B):
                await commit(members, gid, seed=gid)
            await scenario(members)
        finally:
            for m in members:
                await m.stop()
    asyncio.run(run())


def reports_since(started: float) -> int:
    """The most times one group's errors since `started` may be logged: once per LOG_INTERVAL_S."""
    return 1 + int((asyncio.get_running_loop().time() - started) // LOG_INTERVAL_S)


def connections(members: list[Member]) -> dict[tuple[int, int], object]:
    return {(m.node_id, p): m.link(p) for m in members for p in IDS if p != m.node_id}


# ---- (a) a bad message is dropped, not the connection ---------------------------

MALFORMED = [
    {"type": "append_entries"},                    # no term: KeyError in pysyncobj's handler
    {"type": "append_entries", "term": "three"},   # a term of the wrong type: TypeError
]


def test_a_malformed_message_for_one_group_is_dropped_and_the_shared_connection_stays_up(tmp_path, caplog):
    async def scenario(members: list[Member]) -> None:
        sender, receiver = members[0], members[1]
        before = connections(members)
        started = asyncio.get_running_loop().time()
        with caplog.at_level(logging.ERROR, logger="raftka.raft.transport"):
            for i in range(20):
                assert sender.network.send(receiver.node_id, A, MALFORMED[i % 2])
                await asyncio.sleep(0.01)
            await wait_for(lambda: receiver.network.dropped_messages.counts.get(A) == 20)
            for seed in range(10, 13):          # both groups keep committing over the same connections
                await commit(members, A, seed)
                await commit(members, B, seed)
        assert connections(members) == before
        assert all(m.lost_peers == [] for m in members)
        assert receiver.network.dropped_messages.counts == {A: 20}
        dropped = [r for r in caplog.records if "dropped a message" in r.getMessage()]
        assert 1 <= len(dropped) <= reports_since(started)   # once per LOG_INTERVAL_S, not 20 times
        text = dropped[0].getMessage()
        assert f"group {A} from peer {sender.node_id}" in text and "KeyError" in text
        assert not any(m.node.failed for m in members)
    with_members(scenario, tmp_path)


# ---- (b) broken storage takes the node out of service -----------------------------

def eio(*_args, **_kwargs):
    raise OSError(errno.EIO, "Input/output error")


@pytest.mark.parametrize("where", ["handling a message", "writing its journal"])
def test_an_io_error_takes_the_node_out_of_service_and_the_others_elect_around_it(tmp_path, where):
    async def scenario(members: list[Member]) -> None:
        broken = leader_of(members, A)
        others = [m for m in members if m is not broken]
        term_before = broken.group(A).leader_epoch
        between_others = {k: v for k, v in connections(others).items() if k[1] != broken.node_id}
        replica = broken.group(A)
        if where == "handling a message":   # the followers' answer to the next append raises
            replica.transport.on_raft_message = eio
        else:                               # the leader's own journal write of the next append
            replica.journal.add = eio
        never_acked = replica.append(make_batch(1, seed=99))   # its leader fails first
        await wait_for(lambda: broken.node.failed)
        with pytest.raises(NodeFailedError):
            await asyncio.wait_for(never_acked, 5)

        assert broken.failures == [broken.node.failure] and "Input/output error" in broken.node.failure
        assert f"group {A}" in broken.node.failure
        broken.node.fail("again")
        assert len(broken.failures) == 1         # the callback fires once
        assert broken.network.connected_peers == set()   # it left: no heartbeats, no votes from it
        assert not broken.network.send(others[0].node_id, B, {"type": "ping"})
        with pytest.raises(NodeFailedError):    # out of service: refuses at once, naming why
            replica.propose_append(make_batch(1), lambda *_: None)
        for gid in (A, B):
            with pytest.raises(NotLeaderError):
                broken.group(gid).propose_append(make_batch(1), lambda *_: None)

        for gid in (A, B):                        # the other two elect leaders among themselves
            await wait_for(lambda: leader_of(others, gid) is not None)
            await commit(others, gid, seed=100 + gid)
        assert others[0].group(A).leader_epoch > term_before
        assert {k: v for k, v in connections(others).items() if k[1] != broken.node_id} == between_others
        assert all(m.lost_peers == [broken.node_id] for m in others)
        assert not any(m.node.failed for m in others)
    with_members(scenario, tmp_path)


# ---- (c) one group's tick raising stays with that group -------------------------

def broken(*_args, **_kwargs):
    raise RuntimeError("group A is broken")


def counting(calls: list, method):
    return lambda *args: (calls.append(1), method(*args))[1]


def test_a_group_whose_tick_raises_does_not_stop_the_other_groups_ticking(tmp_path, caplog):
    async def scenario(members: list[Member]) -> None:
        node = members[0]
        bad, good = node.group(A), node.group(B)
        bad.doTick = bad.next_tick_due = broken   # it raises whenever the node ticks it
        good_ticks = []
        good.doTick = counting(good_ticks, good.doTick)

        started = asyncio.get_running_loop().time()
        with caplog.at_level(logging.ERROR, logger="raftka.raft.node"):
            node.node.mark_active(A)
            node.node.mark_active(B)
            node.node.tick()                  # A first: its exception must not end the round
            assert good_ticks
            for seed in range(20, 25):        # group B keeps committing through node 1
                await commit(members, B, seed)
            await wait_for(lambda: node.node.group_errors.counts[A] >= 3)   # A is retried, calmly
        failed = [r for r in caplog.records if f"group {A} failed" in r.getMessage()]
        assert 1 <= len(failed) <= reports_since(started)   # once per LOG_INTERVAL_S, not per tick
        assert "RuntimeError: group A is broken" in failed[0].getMessage()
        assert not node.node.failed
    with_members(scenario, tmp_path)


def test_a_group_whose_coalesced_heartbeat_raises_does_not_keep_the_others_out_of_the_round(tmp_path):
    async def scenario(members: list[Member]) -> None:
        node = members[0]
        node.group(A).coalesced_heartbeat = broken   # A comes first in every round
        offers = []
        node.group(B).coalesced_heartbeat = counting(offers, node.group(B).coalesced_heartbeat)
        await wait_for(lambda: len(offers) >= 3)
        assert node.node.group_errors.counts[A] >= 3
        await commit(members, B, seed=30)
    with_members(scenario, tmp_path)


def test_a_leader_whose_tick_keeps_raising_is_replaced_by_a_replica_that_can_tick(tmp_path):
    async def scenario(members: list[Member]) -> None:
        stuck = leader_of(members, A)
        others = [m for m in members if m is not stuck]
        term = stuck.group(A).leader_epoch
        stuck.group(A).doTick = broken   # idle, it would still pass coalesced heartbeats...
        stuck.group(A).append(make_batch(1, seed=39))   # ...but an append wakes it, and its tick raises
        await wait_for(lambda: leader_of(others, A) is not None and not stuck.group(A).is_leader)
        assert others[0].group(A).leader_epoch > term
        await commit(others, A, seed=40)
        await commit(members, B, seed=41)
        assert not stuck.node.failed
    with_members(scenario, tmp_path)


# ---- the broker: KAFKA_STORAGE_ERROR, and the others take over ----------------------

async def produce(port: int, topic: str, correlation_id: int) -> int:
    """The error code of a one-partition acks=all Produce to the broker at `port`."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(produce_frame(topic, make_batch(1, seed=correlation_id), correlation_id))
        size = struct.unpack(">i", await reader.readexactly(4))[0]
        body = await reader.readexactly(size)
    finally:
        writer.close()
    # v3 response: correlation id, [topic: name, [partition: index, error code, ...]]
    name_length = struct.unpack_from(">h", body, 8)[0]
    return struct.unpack_from(">h", body, 10 + name_length + 4 + 4)[0]


def test_a_broker_whose_log_write_fails_refuses_produce_and_its_partition_moves(tmp_path, caplog):
    async def run() -> None:
        ports = dict(zip(IDS, free_ports(3)))
        # the leader is picked once below: no preferred-leader transfer may move it meanwhile
        brokers = {i: Broker(Config(data_dir=tmp_path / f"b{i}", node_id=i, port=0, peer_port=ports[i],
                                    cluster_secret="0123456789abcdef0123456789abcdef", peers=tuple((j, "127.0.0.1", p)
                                                                         for j, p in ports.items() if j != i),
                                    auto_leader_rebalance_enable=False),
                             **FAST) for i in IDS}
        try:
            await asyncio.gather(*(b.start() for b in brokers.values()))
            await brokers[1].controller.create_topic("t", 1, 3)
            await wait_for(lambda: any((r := b.controller.replica("t", 0)) is not None and r.is_leader
                                       for b in brokers.values()))
            leader = next(b for b in brokers.values() if b.controller.replica("t", 0).is_leader)
            assert await produce(leader.port, "t", 1) == ErrorCode.NONE
            replica = leader.controller.replica("t", 0)

            def full(*_args, **_kwargs):
                raise StorageError(f"append to {replica.log.directory} failed: No space left on device")
            replica.log.append = full
            with caplog.at_level(logging.CRITICAL, logger="raftka.broker.broker"):
                unapplied = replica.append(make_batch(1, seed=2))   # committed by all, not applied here
                await wait_for(lambda: leader.failure is not None)
            assert "No space left on device" in leader.failure
            with pytest.raises(NodeFailedError):   # the node failed under it: never resolved as applied
                await asyncio.wait_for(unapplied, 5)
            assert [r.levelno for r in caplog.records if r.name == "raftka.broker.broker"
                    and "out of service" in r.getMessage()] == [logging.CRITICAL]
            assert await produce(leader.port, "t", 3) == ErrorCode.KAFKA_STORAGE_ERROR

            others = [b for b in brokers.values() if b is not leader]
            await wait_for(lambda: any(b.controller.replica("t", 0).is_leader for b in others))
            successor = next(b for b in others if b.controller.replica("t", 0).is_leader)
            assert await produce(successor.port, "t", 4) == ErrorCode.NONE
            await wait_for(lambda: all(b.controller.state.partition("t", 0).leader == successor.config.node_id
                                       for b in others))
        finally:
            for b in brokers.values():
                await b.stop()
    asyncio.run(run())
