"""Index commits handed to the writer thread (IndexStore.commit(wait=False)) keep
their order with every later write, and what recovery reads waits for them."""
from __future__ import annotations

from raftka.storage.index import IndexStore, PartitionState


def test_a_background_commit_is_seen_by_the_reads_recovery_relies_on(tmp_path):
    index = IndexStore(tmp_path / "index.lmdb", 1 << 26)
    index.commit([(7, 100, 4096)], [(7, 1_700_000_000_000, 100)], [(7, PartitionState(120, 9))], wait=False)
    assert index.load_state(7) == PartitionState(120, 9)
    assert index.offset_entries_before(7, 2**63 - 1, 10) == [(100, 4096)]
    assert index.last_time_entry(7) == (1_700_000_000_000, 100)
    index.close()


def test_a_later_write_lands_after_the_background_commits_before_it(tmp_path):
    index = IndexStore(tmp_path / "index.lmdb", 1 << 26)
    for offset in range(0, 1000, 10):
        index.commit([(3, offset, offset * 100)], [], [(3, PartitionState(offset, offset))], wait=False)
    index.delete_offsets(3, from_offset=500)   # a truncation: must not be undone by a commit in flight
    assert index.offset_floor(3, 10**9) == (490, 49000)
    assert index.load_state(3) == PartitionState(990, 990)
    index.close()


def test_closing_waits_for_background_commits(tmp_path):
    path = tmp_path / "index.lmdb"
    index = IndexStore(path, 1 << 26)
    index.commit([], [], [(1, PartitionState(5, 6))], wait=False)
    index.close()
    reopened = IndexStore(path, 1 << 26)
    assert reopened.load_state(1) == PartitionState(5, 6)
    reopened.close()
