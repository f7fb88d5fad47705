"""Appends made in one event-loop iteration (pipelined produce requests) share
one Raft entry, yet each keeps its own outcome (its own base offset), decided
alike on every replica."""
from __future__ import annotations

import asyncio

from raftka.replication.partition import MULTI_APPEND_COMMAND
from tests.conftest import make_batch, wait_for
from tests.test_raft_group import start_cluster


def _entries_of_type(replica, command_type: int) -> int:
    journal = replica.journal
    return sum(1 for command, _index, _term in journal[:] if command[:1] == bytes([command_type]))


def test_appends_of_one_iteration_share_an_entry_and_get_consecutive_offsets(tmp_path):
    async def scenario() -> None:
        _ports, brokers, leader = await start_cluster(tmp_path)
        try:
            last_index = leader.replica.view().last_index
            batches = [make_batch(2 + i, seed=i) for i in range(5)]
            futures = [leader.replica.append(batch) for batch in batches]   # same iteration
            offsets = await asyncio.wait_for(asyncio.gather(*futures), 10)
            assert offsets == [0, 2, 5, 9, 14]
            assert leader.replica.view().last_index == last_index + 1
            assert _entries_of_type(leader.replica, MULTI_APPEND_COMMAND) == 1
            await wait_for(lambda: all(b.replica.log.high_watermark == 20 for b in brokers))
            contents = {b.readable_bytes() for b in brokers}
            assert len(contents) == 1
        finally:
            for b in brokers:
                await b.stop()
    asyncio.run(scenario())
