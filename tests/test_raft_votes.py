"""VoteStore: every group's term and vote in one file, durable after sync(),
surviving reopen, a torn tail and compaction; stopping the node (votes still
pending, nothing sent, no retry) when a write or fdatasync fails; refusing to
open with a damaged record before valid ones; and DiskJournal keeping its
term and vote there when given one."""
from __future__ import annotations

import asyncio
import errno
import logging
import os
import subprocess
import sys

import pytest

from raftka.raft import votes
from raftka.raft.journal import DiskJournal
from raftka.raft.node import RaftNode
from raftka.raft.transport import PeerNetwork, PeerNetworkConfig
from raftka.raft.votes import VoteStore
from tests.conftest import wait_for


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


# ---- I/O errors: pending votes stay pending, the node stops, a damaged middle is refused ----

class Stopped(Exception):
    """What the tests' fail-stop callback raises instead of ending the process."""


def recording_fail_stop(calls: list):
    def on_fatal(error: BaseException):
        calls.append(error)
        raise Stopped(error)
    return on_fatal


def failing(code: int, calls: list | None = None):
    def fail(*args):
        if calls is not None:
            calls.append(args)
        raise OSError(code, os.strerror(code))
    return fail


def test_a_failed_fdatasync_keeps_the_vote_pending_and_stops_the_node(tmp_path, monkeypatch, caplog):
    calls: list = []
    store = VoteStore(tmp_path / "votes", on_fatal=recording_fail_stop(calls))
    store.put(1, 3, 2)
    monkeypatch.setattr(os, "fdatasync", failing(errno.EIO))
    with pytest.raises(Stopped):
        store.sync()
    assert [error.errno for error in calls] == [errno.EIO]
    assert store.pending and store.get(1) == (3, 2) and store.syncs == 0
    critical = [r.getMessage() for r in caplog.records if r.levelno == logging.CRITICAL]
    assert len(critical) == 1 and str(tmp_path / "votes") in critical[0]
    assert os.strerror(errno.EIO) in critical[0] and "fdatasync" in critical[0]


def test_a_failed_write_keeps_the_vote_pending_and_a_reopen_cuts_the_torn_part(tmp_path, monkeypatch):
    calls: list = []
    store = VoteStore(tmp_path / "votes", on_fatal=recording_fail_stop(calls))
    store.put(1, 5, 1)
    store.sync()
    store.put(2, 6, 2)
    store.put(3, 7, 3)
    real_pwrite, written = os.pwrite, []

    def disk_full_after_ten_bytes(fd, data, offset):
        if written:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        written.append(real_pwrite(fd, bytes(data[:10]), offset))
        return written[0]

    monkeypatch.setattr(os, "pwrite", disk_full_after_ten_bytes)
    with pytest.raises(Stopped):
        store.sync()
    monkeypatch.undo()
    assert [error.errno for error in calls] == [errno.ENOSPC]
    assert store.pending and store.syncs == 1
    os.close(store._fd)                       # the process is gone
    again = VoteStore(tmp_path / "votes")     # 10 torn bytes at the tail: cut, the synced vote kept
    assert (again.get(1), again.get(2), again.get(3)) == ((5, 1), None, None)
    assert (tmp_path / "votes").stat().st_size == votes.RECORD.size
    again.close()


def test_sync_after_a_failure_raises_and_never_retries_the_fdatasync(tmp_path, monkeypatch):
    calls: list = []
    fdatasyncs: list = []
    store = VoteStore(tmp_path / "votes", on_fatal=recording_fail_stop(calls))
    store.put(1, 3, 2)
    monkeypatch.setattr(os, "fdatasync", failing(errno.EIO, fdatasyncs))
    with pytest.raises(Stopped):
        store.sync()
    monkeypatch.undo()                        # even with a working fdatasync again
    store.put(2, 4, 1)
    with pytest.raises(votes.VoteStoreFailedError, match="votes"):
        store.sync()
    assert len(fdatasyncs) == 1 and len(calls) == 1 and store.pending


def test_sync_raises_even_when_the_fail_stop_callback_returns(tmp_path, monkeypatch):
    calls: list = []
    store = VoteStore(tmp_path / "votes", on_fatal=calls.append)
    store.put(1, 3, 2)
    monkeypatch.setattr(os, "fdatasync", failing(errno.EIO))
    with pytest.raises(votes.VoteStoreFailedError) as raised:
        store.sync()
    assert raised.value.path == tmp_path / "votes" and raised.value.__cause__ is calls[0]
    assert store.pending


def test_a_failed_compaction_stops_the_node_and_the_old_file_keeps_every_vote(tmp_path, monkeypatch):
    monkeypatch.setattr(votes, "COMPACT_MIN_BYTES", 10 * votes.RECORD.size)
    calls: list = []
    store = VoteStore(tmp_path / "votes", on_fatal=recording_fail_stop(calls))
    for term in range(5):
        store.put(1, term, 1)
        store.sync()
    monkeypatch.setattr(os, "fsync", failing(errno.EIO))   # compaction fsyncs; appends fdatasync
    for term in range(5, 50):
        store.put(1, term, 2)
        try:
            store.sync()
        except Stopped:
            break
    monkeypatch.undo()
    assert [error.errno for error in calls] == [errno.EIO]
    assert not store.pending                  # the batch itself was durable before compaction
    with pytest.raises(votes.VoteStoreFailedError):
        store.sync()
    os.close(store._fd)
    assert VoteStore(tmp_path / "votes").get(1) == (term, 2)


def test_a_node_sends_no_frame_after_a_failed_vote_sync(tmp_path, monkeypatch):
    """Real sockets: RaftNode makes votes.sync the network's before_flush, so a
    response_vote queued after a vote whose fdatasync failed never reaches the peer."""
    async def scenario():
        calls: list = []
        store = VoteStore(tmp_path / "votes", on_fatal=recording_fail_stop(calls))
        acceptor = PeerNetwork(PeerNetworkConfig(node_id=2, secret=b"raftka-test-secret-16+", peers={1: ("127.0.0.1", 0)}))
        await acceptor.start()
        dialer = PeerNetwork(PeerNetworkConfig(node_id=1, secret=b"raftka-test-secret-16+", peers={2: acceptor.address}))
        RaftNode(dialer, store)
        received: list = []
        acceptor.register_group(7, lambda peer, message: received.append(message))
        await dialer.start()
        await wait_for(lambda: dialer.connected_peers == {2} and acceptor.connected_peers == {1})
        assert dialer.send(2, 7, {"type": "ping"})
        await wait_for(lambda: received == [{"type": "ping"}])
        store.put(7, 3, 2)
        monkeypatch.setattr(os, "fdatasync", failing(errno.EIO))
        assert dialer.send(2, 7, {"type": "response_vote", "term": 3})
        await wait_for(lambda: calls)
        monkeypatch.undo()
        assert dialer.send(2, 7, {"type": "ping"})    # a later flush: still nothing leaves
        await asyncio.sleep(0.3)
        assert received == [{"type": "ping"}] and len(calls) == 1 and store.pending
        os.close(store._fd)
        await dialer.close()
        await acceptor.close()
    asyncio.run(scenario())


def test_a_damaged_record_before_valid_ones_refuses_to_load(tmp_path):
    store = VoteStore(tmp_path / "votes")
    for group in range(4):
        store.put(group, 5, 1)
        store.sync()
    store.close()
    path = tmp_path / "votes"
    data = bytearray(path.read_bytes())
    data[votes.RECORD.size + 7] ^= 0x40       # bit rot in the second record; two valid ones follow
    path.write_bytes(bytes(data))
    with pytest.raises(votes.VoteStoreCorruptError) as raised:
        VoteStore(path)
    assert raised.value.path == path and raised.value.offset == votes.RECORD.size
    assert str(path) in str(raised.value) and f"offset {votes.RECORD.size}" in str(raised.value)
    assert path.read_bytes() == bytes(data)   # nothing cut: the later votes are still there


def test_a_zeroed_record_before_valid_ones_refuses_to_load(tmp_path):
    store = VoteStore(tmp_path / "votes")
    for group in range(3):
        store.put(group, 5, 1)
    store.close()
    path = tmp_path / "votes"
    data = bytearray(path.read_bytes())
    data[0:votes.RECORD.size] = bytes(votes.RECORD.size)
    path.write_bytes(bytes(data))
    with pytest.raises(votes.VoteStoreCorruptError) as raised:
        VoteStore(path)
    assert raised.value.offset == 0


def test_several_damaged_records_at_the_tail_are_cut(tmp_path):
    store = VoteStore(tmp_path / "votes")
    for group in range(4):
        store.put(group, 5, 1)
    store.close()
    path = tmp_path / "votes"
    data = bytearray(path.read_bytes())
    data[2 * votes.RECORD.size:] = bytes(len(data) - 2 * votes.RECORD.size)   # unwritten pages: zeros
    path.write_bytes(bytes(data) + b"\x07" * 5)
    again = VoteStore(path)
    assert [again.get(g) for g in range(4)] == [(5, 1), (5, 1), None, None]
    assert path.stat().st_size == 2 * votes.RECORD.size
    again.close()


FAIL_FDATASYNC = """
import errno, logging, os, sys
logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
from raftka.raft.votes import VoteStore
store = VoteStore(sys.argv[1])
store.put(1, 5, 2)
def broken(fd):
    raise OSError(errno.EIO, os.strerror(errno.EIO))
os.fdatasync = broken
try:
    store.sync()
finally:
    print("response_vote sent", flush=True)
"""


def test_a_failed_fdatasync_ends_the_process_by_default(tmp_path):
    path = tmp_path / "votes"
    done = subprocess.run([sys.executable, "-c", FAIL_FDATASYNC, str(path)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == votes.FATAL_EXIT_CODE != 0, done.stderr
    assert "response_vote sent" not in done.stdout      # no finally block, no frame
    assert f"CRITICAL raftka.raft.votes: {path}" in done.stderr
    assert os.strerror(errno.EIO) in done.stderr


FILL_TMPFS = """
import logging, os, sys
logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
from raftka.raft.votes import VoteStore
store = VoteStore(os.path.join(sys.argv[1], "votes"))
filler = os.open(os.path.join(sys.argv[1], "filler"), os.O_WRONLY | os.O_CREAT)
try:
    while True:
        os.write(filler, b"x" * 4096)
except OSError:
    pass
for group in range(1000):
    store.put(group, 1, 2)
store.sync()
print("response_vote sent", flush=True)
"""


def test_a_full_disk_ends_the_process_with_the_votes_unsent(tmp_path):
    """A real ENOSPC: a 64 KiB tmpfs in a private mount namespace (unshare), filled up."""
    mount = tmp_path / "tmpfs"
    mount.mkdir()
    shell = 'mount -t tmpfs -o size=64k tmpfs "$1" || exit 99; shift; exec "$@"'
    try:
        done = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", shell, "sh",
                               str(mount), sys.executable, "-c", FILL_TMPFS, str(mount)],
                              capture_output=True, text=True, timeout=60)
    except FileNotFoundError:
        pytest.skip("no unshare(1) to mount a private tmpfs")
    if done.returncode == 99 or "unshare failed" in done.stderr or "unshare:" in done.stderr:
        pytest.skip(f"cannot mount a private tmpfs here: {done.stderr.strip()[:200]}")
    assert done.returncode == votes.FATAL_EXIT_CODE, done.stderr
    assert "response_vote sent" not in done.stdout
    assert "CRITICAL raftka.raft.votes:" in done.stderr and os.strerror(errno.ENOSPC) in done.stderr
