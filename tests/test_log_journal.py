"""The one log: a partition's Raft log is its segment files plus the entries
file that maps Raft indexes to offsets (engine/replication/log_journal.py).
Entries reach the segments when added, no-ops take no offset, truncation cuts
the segments, and a crash that cuts the entries file or the segment at any
byte reopens to a consistent prefix: every entry left points at data that
is there, and no segment byte is left past the last entry."""
from __future__ import annotations

import os
import struct

import pytest

from raftka.config import Config
from raftka.raft.pysyncobj_adapter import NO_OP_ENTRY
from raftka.records.batch import parse_records
from raftka.replication.log_journal import (APPEND_HEADER, ENTRIES_FILE, FILE_HEAD, MULTI_APPEND_HEADER, RECORD,
                                            JournalFormatError, LogJournal, marker)
from raftka.storage.index import IndexStore
from raftka.storage.partition_log import PartitionLog
from tests.conftest import make_batch


class Replica:
    def __init__(self, root, **settings):
        self.root = root
        self.config = Config(data_dir=root, fsync="always", **settings)
        self.index = IndexStore(root / "index.lmdb", self.config.lmdb_map_size_bytes)
        self.open()

    def open(self) -> None:
        self.log = PartitionLog("t-0", self.root / "t-0", 0, self.index, self.config)
        self.journal = LogJournal(self.root / "raft", self.log, fsync=True)

    def crash(self) -> None:
        self.journal.abandon()
        self.log.abandon()

    def close(self) -> None:
        self.crash()
        self.index.close()


def append(batch: bytes, term: int) -> bytes:
    return APPEND_HEADER.pack(0x10, term) + batch


def multi(parts: list[bytes], term: int) -> bytes:
    return (MULTI_APPEND_HEADER.pack(0x11, term, len(parts)) + struct.pack(f">{len(parts)}I", *map(len, parts))
            + b"".join(parts))


@pytest.fixture
def replica(tmp_path):
    r = Replica(tmp_path)
    yield r
    r.close()


def test_entries_write_their_batches_once_and_no_ops_take_no_offset(replica):
    journal, log = replica.journal, replica.log
    journal.add(NO_OP_ENTRY, 1, 1)
    journal.add(append(make_batch(3, seed=1), 1), 2, 1)
    journal.add(multi([make_batch(2, seed=2), make_batch(1, seed=3)], 1), 3, 1)
    journal.add(NO_OP_ENTRY, 4, 2)
    assert log.log_end_offset == 6
    assert [journal.slot(i) for i in (1, 2, 3, 4)] == [(1, 1, 0, 0, -1), (2, 1, 0, 3, -1), (3, 1, 3, 6, -1), (4, 2, 6, 6, -1)]
    assert journal.pop_outcome(2) == 0 and journal.pop_outcome(3) == [3, 5]
    size = sum(segment.size_bytes for segment in log.segments)
    assert size == len(make_batch(3, seed=1)) + len(make_batch(2, seed=2)) + len(make_batch(1, seed=3))
    # read back from the segments (cache dropped): the same batches, with their offsets and term written in
    journal._cache.forget_below(None)
    command, index, term = journal[2]
    assert (index, term) == (3, 1) and command[:1] == b"\x10"
    assert [r.offset for r in parse_records(command[APPEND_HEADER.size:])] == [3, 4, 5]
    assert journal[0] == (NO_OP_ENTRY, 1, 1)


def test_truncating_an_uncommitted_suffix_truncates_the_segments(replica):
    journal, log = replica.journal, replica.log
    for index in range(1, 5):
        journal.add(append(make_batch(2, seed=index), 1), index, 1)
    journal.deleteEntriesFrom(2)        # entries 3 and 4 go, with their data
    assert len(journal) == 2 and log.log_end_offset == 4
    journal.add(append(make_batch(1, seed=9), 2), 3, 2)
    assert journal.slot(3) == (3, 2, 4, 5, -1)
    replica.crash()
    replica.open()                     # the entries file says the same after a restart
    assert [replica.journal.slot(i) for i in (1, 2, 3)] == [(1, 1, 0, 2, -1), (2, 1, 2, 4, -1), (3, 2, 4, 5, -1)]


def test_a_crash_cutting_the_entries_file_or_the_segment_at_any_byte_reopens_consistent(tmp_path):
    batches = [make_batch(2, value_size=30, seed=seed) for seed in range(4)]
    r = Replica(tmp_path / "build")
    r.journal.add(NO_OP_ENTRY, 1, 1)
    for index, batch in enumerate(batches, start=2):
        r.journal.add(append(batch, 1), index, 1)
    r.close()
    entries = (tmp_path / "build" / "t-0" / ENTRIES_FILE).read_bytes()
    segment_path = next((tmp_path / "build" / "t-0").glob("*.log"))
    segment = segment_path.read_bytes()
    assert len(entries) == FILE_HEAD.size + 5 * RECORD.size
    cuts = [("entries", cut) for cut in range(FILE_HEAD.size, len(entries) + 1, 3)]
    cuts += [("segment", cut) for cut in range(0, len(segment) + 1, 11)]
    for which, cut in cuts:
        root = tmp_path / f"{which}-{cut}"
        os.system(f"cp -r {tmp_path / 'build'} {root}")
        target = root / "t-0" / (ENTRIES_FILE if which == "entries" else segment_path.name)
        os.truncate(target, cut)
        r = Replica(root)
        try:
            slots = [r.journal.slot(i) for i in range(1, 6) if r.journal.slot(i) is not None]
            kept = (cut - FILE_HEAD.size) // RECORD.size if which == "entries" else \
                1 + max(k for k in range(5) if sum(map(len, batches[:k])) <= cut)
            assert len(slots) == kept, (which, cut)
            end = slots[-1][3] if slots else 0
            assert r.log.log_end_offset == end, (which, cut)          # nothing past the last entry
            assert [rec.offset for rec in parse_records(b"".join(
                bytes(s.view()) for s in r.log.segments))] == list(range(end)), (which, cut)
            r.journal.add(append(make_batch(1), 2), len(slots) + 1, 2)   # and the log goes on from there
            assert r.journal.slot(len(slots) + 1)[2] == end
        finally:
            r.close()


def test_a_follower_installing_a_checkpoint_records_where_the_data_lies_without_writing_it(replica):
    journal, log = replica.journal, replica.log
    journal.clear()
    journal.add(marker(0, 10), 7, 3)
    journal.add(marker(10, 12), 8, 3)
    assert log.log_end_offset == 0 and journal.slot(8) == (8, 3, 10, 12, -1)
    assert len(journal) == 2 and journal.first_index() == 7


def test_an_older_raft_journal_or_entries_format_is_refused(tmp_path):
    (tmp_path / "raft").mkdir()
    (tmp_path / "raft" / "00000000000000000001.log").write_bytes(b"old journal")
    with pytest.raises(JournalFormatError, match="older Raftka"):
        Replica(tmp_path)
    (tmp_path / "raft" / "00000000000000000001.log").unlink()
    (tmp_path / "t-0").mkdir(exist_ok=True)
    (tmp_path / "t-0" / ENTRIES_FILE).write_bytes(FILE_HEAD.pack(b"RKRE", 99, 0))
    with pytest.raises(JournalFormatError, match="format 99"):
        Replica(tmp_path)


def test_a_clean_plan_entry_is_recorded_resent_after_a_restart_and_a_format_1_file_is_migrated(replica):
    from raftka.replication.log_journal import (FORMAT_VERSION, MAGIC, RECORD_BODY_V1, RECORD_V1, clean_command)
    from raftka.native import crc32c
    replica.journal.add(append(make_batch(3), 1), 1, 1)
    replica.journal.add(clean_command(3, 1_700_000_000_000), 2, 1)
    assert replica.journal.clean_at(2) == (3, 1_700_000_000_000) and replica.journal.clean_at(1) is None
    assert replica.journal.slot(2) == (2, 1, 3, 3, -1)
    replica.journal.sync()
    replica.crash()
    replica.open()
    assert replica.journal[1][0] == clean_command(3, 1_700_000_000_000)   # rebuilt from the entries file
    replica.crash()
    path = replica.log.directory / ENTRIES_FILE                          # as an older Raftka wrote it
    old = bytearray(FILE_HEAD.pack(MAGIC, 1, 0))
    for slot in ((1, 1, 0, 3, -1), (2, 1, 3, 3, 3)):
        body = RECORD_BODY_V1.pack(*slot)
        old += body + struct.pack("<I", crc32c(body))
    path.write_bytes(bytes(old))
    assert len(old) == FILE_HEAD.size + 2 * RECORD_V1.size
    replica.open()
    assert [replica.journal.slot(i) for i in (1, 2)] == [(1, 1, 0, 3, -1), (2, 1, 3, 3, 3)]
    assert FILE_HEAD.unpack_from(path.read_bytes())[1] == FORMAT_VERSION
    assert path.stat().st_size == FILE_HEAD.size + 2 * RECORD.size
