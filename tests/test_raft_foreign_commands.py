"""Only a group's own command types are ever applied. Three brokers over real
authenticated loopback connections: an append_entries carrying pysyncobj's
pickled REGULAR command, sent by the real leader's network, runs nothing on
the follower and does not wedge the group; an apply_command from a follower
does not make the leader append; a journal holding a foreign entry refuses to
open."""
from __future__ import annotations

import asyncio
import os
import pickle

import pytest

from raftka.raft.journal import DiskJournal
from raftka.raft.pysyncobj_adapter import ForeignCommandError
from raftka.replication import PartitionReplica
from raftka.replication.partition import APPEND_COMMAND
from tests.conftest import make_batch, wait_for
from tests.test_raft_group import GROUP, append, start_cluster


class _MakesADirectory:
    """Unpickling this creates `path`: proof that a peer's bytes ran as code."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return os.mkdir, (self.path,)


def test_a_pickled_command_from_the_leaders_connection_runs_nothing_and_the_group_keeps_committing(tmp_path):
    marker = tmp_path / "the-peer-ran-code"

    async def scenario() -> None:
        _ports, brokers, leader = await start_cluster(tmp_path)
        try:
            await append(leader, make_batch(2))
            follower = next(b for b in brokers if b is not leader)
            await wait_for(lambda: follower.replica.view().applied_index == leader.replica.view().commit_index)
            view = follower.replica.view()
            term = leader.replica.leader_epoch
            evil = b"\x00" + pickle.dumps((_MakesADirectory(str(marker)),))   # pysyncobj's REGULAR type
            leader.node.network.send(follower.node_id, GROUP, {
                "type": "append_entries", "term": term, "commit_index": view.last_index + 1,
                "prevLogIdx": view.last_index, "prevLogTerm": term, "entries": [(evil, view.last_index + 1, term)]})
            leader.node.network.flush()
            await wait_for(lambda: follower.replica.refused_messages == 1)
            assert follower.replica.view().last_index == view.last_index   # not in its log either
            assert await append(leader, make_batch(3)) == 2                # the group is not wedged
            await wait_for(lambda: all(b.replica.log.high_watermark == 5 for b in brokers))
            assert len({b.readable_bytes() for b in brokers}) == 1
        finally:
            for b in brokers:
                await b.stop()
        assert not marker.exists(), "a peer frame ran code on the follower"
    asyncio.run(scenario())


def test_an_apply_command_message_from_a_peer_does_not_make_the_leader_append(tmp_path):
    async def scenario() -> None:
        _ports, brokers, leader = await start_cluster(tmp_path)
        try:
            await append(leader, make_batch(1))
            follower = next(b for b in brokers if b is not leader)
            before = leader.replica.view().last_index
            command = bytes([APPEND_COMMAND]) + b"\0" * 8 + make_batch(1)
            follower.node.network.send(leader.node_id, GROUP, {"type": "apply_command", "command": command})
            follower.node.network.send(leader.node_id, GROUP, {"type": "apply_command", "command": command,
                                                               "request_id": 7})
            follower.node.network.flush()
            await wait_for(lambda: leader.replica.refused_messages == 2)
            await asyncio.sleep(0.2)
            assert leader.replica.view().last_index == before
            assert leader.replica.log.log_end_offset == 1
        finally:
            for b in brokers:
                await b.stop()
    asyncio.run(scenario())


def test_a_journal_holding_a_foreign_entry_refuses_to_open_and_a_foreign_add_is_refused(tmp_path):
    directory = tmp_path / "journal"
    journal = DiskJournal(directory)                  # a journal that checks nothing writes the bad entry
    journal.add(bytes([APPEND_COMMAND]) + b"ok", 1, 1)
    journal.add(b"\x00" + pickle.dumps("pickled"), 2, 1)
    journal.add(bytes([APPEND_COMMAND]) + b"after", 3, 1)
    journal.close()
    with pytest.raises(ForeignCommandError, match=r"command type 0 .*refused"):
        DiskJournal(directory, accepts=PartitionReplica.accepts_command)

    clean = DiskJournal(tmp_path / "clean", accepts=PartitionReplica.accepts_command)
    clean.add(b"\x01", 1, 1)                          # pysyncobj's no-op, a new leader's first entry
    with pytest.raises(ForeignCommandError):
        clean.add(b"\x02membership", 2, 1)
    assert clean.last_index() == 1
    clean.close()
