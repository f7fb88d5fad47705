"""VoteStore: every group's term and vote in one file, durable after sync(),
surviving reopen, a torn tail and compaction; and DiskJournal keeping its
term and vote there when given one."""
from __future__ import annotations

import os

from raftka.raft import votes
from raftka.raft.journal import DiskJournal
from raftka.raft.votes import VoteStore


def test_votes_are_durable_after_sync_and_the_latest_per_group_wins(tmp_path):
    store = VoteStore(tmp_path / "votes")
    store.put(1, 3, 2)
    store.put(2, 1, None)
    store.put(1, 4, None)
    assert store.pending
    store.sync()
    assert not store.pending and store.syncs == 1
    store.put(3, 9, 9)   # never synced: as if the process died now
    os.close(store._fd)
    again = VoteStore(tmp_path / "votes")
    assert (again.get(1), again.get(2), again.get(3)) == ((4, None), (1, None), None)
    again.close()


def test_one_sync_makes_a_whole_round_of_votes_durable(tmp_path):
    store = VoteStore(tmp_path / "votes")
    for group in range(1000):
        store.put(group, 1, 2)
    store.sync()
    assert store.syncs == 1
    store.close()
    assert VoteStore(tmp_path / "votes").get(999) == (1, 2)


def test_a_torn_or_damaged_tail_is_cut_and_the_rest_kept(tmp_path):
    store = VoteStore(tmp_path / "votes")
    store.put(1, 5, 1)
    store.put(2, 6, 2)
    store.close()
    path = tmp_path / "votes"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF                      # damage the second record
    path.write_bytes(bytes(data) + b"\x00\x01")  # and a torn partial one
    again = VoteStore(path)
    assert again.get(1) == (5, 1) and again.get(2) is None
    assert path.stat().st_size == votes.RECORD.size
    again.put(2, 7, 3)
    again.close()
    assert VoteStore(path).get(2) == (7, 3)


def test_compaction_keeps_only_live_votes(tmp_path, monkeypatch):
    monkeypatch.setattr(votes, "COMPACT_MIN_BYTES", 10 * votes.RECORD.size)
    store = VoteStore(tmp_path / "votes")
    for term in range(50):
        store.put(1, term, 1)
        store.put(2, term, None)
        store.sync()
    store.forget(2)
    store.put(1, 50, 3)
    store.sync()
    assert (tmp_path / "votes").stat().st_size < 10 * votes.RECORD.size
    store.close()
    again = VoteStore(tmp_path / "votes")
    assert again.get(1) == (50, 3) and again.get(2) in (None, (49, None))


def test_a_journal_keeps_term_and_vote_in_the_store_not_its_own_fsync(tmp_path):
    store = VoteStore(tmp_path / "votes")
    journal = DiskJournal(tmp_path / "g7", vote_store=store, group_id=7)
    journal.setCurrentTerm(4, 2)
    assert store.pending and store.get(7) == (4, 2)
    store.sync()
    journal.abandon()          # a kill: the journal's own meta file is never written
    store.close()
    reopened = DiskJournal(tmp_path / "g7", vote_store=VoteStore(tmp_path / "votes"), group_id=7)
    assert (reopened.getCurrentTerm(), reopened.getVotedForNodeId()) == (4, 2)
