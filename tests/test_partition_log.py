"""PartitionLog behaviour: appends, reads, rolls, retention, truncation, recovery, bad input."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from raftka.config import Config
from raftka.errors import CorruptRecordError, OffsetOutOfRangeError, RecordTooLargeError, StorageError
from raftka.records import layout
from raftka.records.batch import Record, build_batch, iter_batches, parse_records, read_header
from raftka.storage.index import UNKNOWN_APPLIED_INDEX, IndexStore
from raftka.storage.partition_log import PartitionLog
from tests.conftest import make_batch, readable_bytes


class Harness:
    """A PartitionLog on a fresh directory that can be reopened or crashed."""

    def __init__(self, root: Path, **settings):
        self.root = root
        self.config = Config(data_dir=root, **settings)
        self.index = IndexStore(root / "index.lmdb", self.config.lmdb_map_size_bytes)
        self.log = self._open()

    def _open(self) -> PartitionLog:
        return PartitionLog("t-0", self.root / "t-0", 0, self.index, self.config)

    def reopen(self) -> PartitionLog:
        self.log.close()
        self.log = self._open()
        return self.log

    def crash(self, cut_active_at: int | None = None) -> PartitionLog:
        """Lose everything uncommitted, optionally cut the active segment, reopen."""
        self.log.abandon()
        if cut_active_at is not None:
            os.truncate(self.log.segments[-1].path, cut_active_at)
        self.log = self._open()
        return self.log

    def all_bytes(self) -> bytes:
        return readable_bytes(self.log)


@pytest.fixture
def harness(tmp_path):
    h = Harness(tmp_path, segment_bytes=4096, index_interval_bytes=256)
    yield h
    h.log.abandon()
    h.index.close()


def commit_all(log: PartitionLog) -> None:
    log.set_high_watermark(log.log_end_offset)


def test_append_assigns_dense_offsets_and_read_returns_the_batch_containing_the_offset(harness):
    log = harness.log
    first = log.append(make_batch(3))
    second = log.append(make_batch(2, seed=1) + make_batch(4, seed=2))
    assert (first.base_offset, first.last_offset) == (0, 2)
    assert (second.base_offset, second.last_offset, second.batch_count) == (3, 8, 2)
    commit_all(log)
    records = list(parse_records(log.read(4, 1 << 20).buffer))
    assert [r.offset for r in records] == [3, 4, 5, 6, 7, 8]


def test_appended_batches_carry_their_offsets_and_leader_epoch_and_a_still_valid_crc(harness):
    log = harness.log
    log.append(make_batch(2))
    log.append(make_batch(2, seed=5), leader_epoch=7)
    commit_all(log)
    headers = [h for h, _ in iter_batches(log.read(0, 1 << 20).buffer)]
    assert [(h.base_offset, h.partition_leader_epoch) for h in headers] == [(0, -1), (2, 7)]
    assert len(list(parse_records(log.read(0, 1 << 20).buffer))) == 4  # CRC still checks


def test_a_writable_buffer_gets_its_headers_rewritten_in_place_and_stores_the_same_bytes(harness):
    log = harness.log
    log.append(make_batch(2))
    readonly = make_batch(3, seed=4)
    writable = bytearray(readonly)
    log.append(writable, leader_epoch=3)
    log.append(readonly, leader_epoch=3)
    assert (read_header(writable).base_offset, read_header(writable).partition_leader_epoch) == (2, 3)
    assert read_header(readonly).base_offset == 0  # read-only input is never modified
    commit_all(log)
    stored = [bytes(b) for _, b in iter_batches(log.read(2, 1 << 20).buffer)]
    assert stored[0] == bytes(writable)
    assert read_header(stored[1]).base_offset == 5
    assert stored[1][8:] == stored[0][8:]  # same batch, same epoch, only the base offset differs


def test_read_respects_max_bytes_but_always_returns_one_whole_batch(harness):
    log = harness.log
    for seed in range(4):
        log.append(make_batch(2, value_size=100, seed=seed))
    commit_all(log)
    size = len(make_batch(2, value_size=100))
    assert log.read(0, 1).size_bytes == size
    assert log.read(0, 2 * size + 5).size_bytes == 2 * size


def test_nothing_at_or_above_the_high_watermark_is_readable(harness):
    log = harness.log
    log.append(make_batch(2))
    log.append(make_batch(2, seed=1))
    log.set_high_watermark(2)
    assert [r.offset for r in parse_records(log.read(0, 1 << 20).buffer)] == [0, 1]
    assert log.read(2, 1 << 20).size_bytes == 0
    with pytest.raises(OffsetOutOfRangeError, match=r"valid offsets are \[0, 2\]"):
        log.read(3, 100)


def test_corrupt_input_raises_and_leaves_the_log_unchanged(harness):
    log = harness.log
    log.append(make_batch(2))
    commit_all(log)
    before = harness.all_bytes()
    bad_crc = bytearray(make_batch(2, seed=9))
    bad_crc[-1] ^= 1
    bad_magic = bytearray(make_batch(2))
    bad_magic[layout.MAGIC_OFF] = 1
    for bad, match in [(make_batch(1) + bytes(bad_crc), "CRC32C"), (bytes(bad_magic), "magic"),
                       (make_batch(1)[:-3], "truncated"), (b"", "no record batches")]:
        with pytest.raises(CorruptRecordError, match=match):
            log.append(bad)
    assert log.log_end_offset == 2
    assert harness.all_bytes() == before
    assert harness.reopen().log_end_offset == 2


def test_batch_over_max_batch_bytes_is_refused_as_too_large(tmp_path):
    h = Harness(tmp_path, max_batch_bytes=500)
    with pytest.raises(RecordTooLargeError, match="500-byte limit"):
        h.log.append(make_batch(1, value_size=1000))
    assert h.log.log_end_offset == 0


def test_segments_roll_by_size_and_reads_cross_them(harness):
    log = harness.log
    for seed in range(20):
        log.append(make_batch(3, value_size=200, seed=seed))
    commit_all(log)
    assert len(log.segments) > 3
    assert [s.base_offset for s in log.segments] == sorted({s.base_offset for s in log.segments})
    offsets = [r.offset for r in parse_records(harness.all_bytes())]
    assert offsets == list(range(60))


def test_retention_by_bytes_deletes_whole_oldest_segments_only(tmp_path):
    h = Harness(tmp_path, segment_bytes=4096, retention_bytes=8192)
    for seed in range(40):
        h.log.append(make_batch(3, value_size=200, seed=seed))
    commit_all(h.log)
    before = len(h.log.segments)
    deleted = h.log.enforce_retention()
    assert deleted == before - len(h.log.segments) > 0
    assert h.log.size_bytes - h.log.segments[0].size_bytes < 8192
    start = h.log.log_start_offset
    assert start == h.log.segments[0].base_offset > 0
    with pytest.raises(OffsetOutOfRangeError):
        h.log.read(start - 1, 100)
    assert [r.offset for r in parse_records(h.all_bytes())] == list(range(start, 120))
    assert h.reopen().log_start_offset == start


def test_retention_by_time_uses_the_newest_timestamp_of_each_segment(tmp_path):
    h = Harness(tmp_path, segment_bytes=2048, retention_ms=1000)
    for i in range(12):
        h.log.append(make_batch(2, value_size=300, timestamp_ms=10_000 + i * 1000, seed=i))
    commit_all(h.log)
    h.log.enforce_retention(now_ms=10_000 + 6_500)
    assert all(s.max_timestamp() >= 10_000 + 6_500 - 1000 for s in h.log.segments[:-1][:1])
    assert h.log.log_start_offset > 0
    remaining = list(parse_records(h.all_bytes()))
    assert remaining[0].offset == h.log.log_start_offset


def test_retention_never_deletes_data_above_the_high_watermark(tmp_path):
    h = Harness(tmp_path, segment_bytes=1024, retention_bytes=0)
    for seed in range(10):
        h.log.append(make_batch(2, value_size=300, seed=seed))
    h.log.set_high_watermark(0)
    assert h.log.enforce_retention() == 0


def test_the_log_start_moves_inside_a_segment_whole_segments_below_it_go_and_reads_below_it_are_out_of_range(harness):
    log = harness.log
    for seed in range(30):
        log.append(make_batch(3, value_size=150, seed=seed))   # 3 records a batch, several segments
    commit_all(log)
    second_base = log.segments[1].base_offset
    start = second_base + 4      # inside a batch of the second segment
    assert log.delete_below(start) == 1
    assert (log.log_start_offset, log.segments[0].base_offset) == (start, second_base)
    with pytest.raises(OffsetOutOfRangeError):
        log.read(start - 1, 100)
    first = read_header(log.read(start, 1).buffer)
    assert first.base_offset <= start <= first.last_offset   # the batch holding it, whole (as Kafka serves it)
    assert log.offset_for_timestamp(0) == start
    assert log.delete_below(start - 2) == 0 and log.log_start_offset == start          # never down
    assert log.delete_below(10**6) > 0 and log.log_start_offset == log.high_watermark   # never past the HW
    assert log.read(log.high_watermark, 100).buffer == b""


@pytest.mark.parametrize("reopen", ["close", "crash"])
def test_a_log_start_inside_a_segment_survives_a_restart(harness, reopen):
    log = harness.log
    for seed in range(30):
        log.append(make_batch(3, value_size=150, seed=seed))
    commit_all(log)
    log.flush_index()
    start = log.segments[2].base_offset + 1
    log.delete_below(start)
    reopened = harness.reopen() if reopen == "close" else harness.crash()
    assert (reopened.log_start_offset, reopened.segments[0].base_offset) == (start, start - 1)
    with pytest.raises(OffsetOutOfRangeError):
        reopened.read(start - 1, 100)


def test_the_end_offset_of_an_epoch_is_where_the_next_larger_epoch_starts_as_kafka_answers(harness):
    log = harness.log
    for epoch in (1, 1, 3, 3, 3, 5):             # 4 records a batch, offsets 0-23, several segments
        log.append(make_batch(4, value_size=300, seed=epoch), leader_epoch=epoch)
    commit_all(log)
    assert len(log.segments) > 1
    assert [log.end_offset_for_epoch(e) for e in (1, 2, 3, 4, 5, 7)] == \
        [(1, 8), (1, 8), (3, 20), (3, 20), (5, 24), (5, 24)]
    assert log.end_offset_for_epoch(0) == (0, 0)        # older than every batch: where the log starts
    log.delete_below(10)
    assert log.end_offset_for_epoch(1) == (1, 10)       # its batches are gone: the log start
    assert log.end_offset_for_epoch(3) == (3, 20)


def test_truncate_removes_whole_batches_from_the_one_containing_the_offset(harness):
    log = harness.log
    for seed in range(30):
        log.append(make_batch(3, value_size=150, seed=seed))
    commit_all(log)
    assert log.truncate(40) == 39  # batch [39, 41] goes whole
    assert (log.log_end_offset, log.high_watermark) == (39, 39)
    appended = log.append(make_batch(2, seed=99))
    assert appended.base_offset == 39
    commit_all(log)
    assert [r.offset for r in parse_records(harness.all_bytes())] == list(range(41))
    assert harness.reopen().log_end_offset == 41


def test_truncating_to_where_a_segment_rolled_undoes_the_roll(tmp_path):
    # found by raftka simulate (seed 1718): a follower rolled a segment for an
    # uncommitted batch, lost it to a truncation and kept the empty segment;
    # the leader's batch at that offset then went into it, where every other
    # replica (which never rolled there) kept appending to the segment before,
    # so the segment files differed for good
    def filled(root: Path) -> Harness:
        h = Harness(root, segment_bytes=1024, index_interval_bytes=256)
        for seed in range(7):
            h.log.append(make_batch(1, value_size=150, seed=seed))
        return h
    diverged, kept = filled(tmp_path / "diverged"), filled(tmp_path / "kept")
    bases = [s.base_offset for s in kept.log.segments]
    assert len(bases) == 2 and [s.base_offset for s in diverged.log.segments] == bases
    diverged.log.append(make_batch(1, value_size=900, seed=50))   # too big for the active segment: rolls at 7
    assert [s.base_offset for s in diverged.log.segments] == [*bases, 7]
    assert diverged.log.truncate(7) == 7
    for h in (diverged, kept):
        h.log.append(make_batch(1, value_size=100, seed=60))
        commit_all(h.log)
    assert [s.base_offset for s in diverged.log.segments] == [s.base_offset for s in kept.log.segments] == bases
    assert [s.path.read_bytes() for s in diverged.log.segments] == [s.path.read_bytes() for s in kept.log.segments]
    assert [s.base_offset for s in diverged.reopen().segments] == bases
    for h in (diverged, kept):
        h.log.abandon()
        h.index.close()


def test_a_segment_whose_first_batch_a_crash_lost_is_not_reopened(tmp_path):
    # raftka simulate seed 321 (--partitions 3): a replica rolled a segment for
    # a batch that a power loss then took, reopened with the empty segment and
    # deleted all below it on the leader's retention decision, where the
    # others, which never rolled there, kept the segment before as their active one
    h = Harness(tmp_path, segment_bytes=1024, index_interval_bytes=256)
    for seed in range(7):
        h.log.append(make_batch(1, value_size=150, seed=seed))
    bases = [s.base_offset for s in h.log.segments]
    h.log.append(make_batch(1, value_size=900, seed=50))       # rolls at 7
    assert [s.base_offset for s in h.log.segments] == [*bases, 7]
    log = h.crash(cut_active_at=0)                               # the rolled segment's batch never reached the disk
    assert [s.base_offset for s in log.segments] == bases and log.log_end_offset == 7
    log.append(make_batch(1, value_size=100, seed=60))          # fits the segment before, as elsewhere
    assert [s.base_offset for s in log.segments] == bases
    log.abandon()
    h.index.close()


def test_offset_for_timestamp_finds_the_first_record_at_or_after_it(harness):
    log = harness.log
    for i in range(50):
        log.append(make_batch(3, value_size=100, timestamp_ms=1000 + 10 * i, seed=i))
    commit_all(log)
    # batch i holds timestamps 1000+10i .. 1000+10i+2 at offsets 3i .. 3i+2
    assert log.offset_for_timestamp(1000 + 10 * 17 + 1) == 3 * 17 + 1
    assert log.offset_for_timestamp(1000 + 10 * 17 + 5) == 3 * 18
    assert log.offset_for_timestamp(0) == 0
    assert log.offset_for_timestamp(10**9) is None
    log.flush_index()
    assert harness.reopen().offset_for_timestamp(1000 + 10 * 30) == 90


def test_reopen_after_close_keeps_offsets_and_high_watermark(harness):
    for seed in range(10):
        harness.log.append(make_batch(3, value_size=120, seed=seed))
    harness.log.set_high_watermark(15)
    before = harness.log.read(0, 1 << 20).buffer.tobytes()
    log = harness.reopen()
    assert (log.log_end_offset, log.high_watermark) == (30, 15)
    assert log.read(0, 1 << 20).buffer.tobytes() == before


def test_a_log_cut_at_any_byte_reopens_to_the_valid_prefix(tmp_path):
    batches = [make_batch(2, value_size=40, seed=seed) for seed in range(6)]
    h = Harness(tmp_path, index_interval_bytes=128)
    for batch in batches:
        h.log.append(batch)
    h.log.flush_index()
    full_size = h.log.segments[-1].size_bytes
    ends = [sum(len(b) for b in batches[:i]) for i in range(len(batches) + 1)]
    for cut in range(full_size, -1, -1):
        log = h.crash(cut_active_at=cut)
        survivors = max(i for i, end in enumerate(ends) if end <= cut)
        assert log.log_end_offset == 2 * survivors, cut
        assert log.segments[-1].size_bytes == ends[survivors], cut
        log.set_high_watermark(log.log_end_offset)
        assert [r.offset for r in parse_records(h.all_bytes())] == list(range(2 * survivors))
        # appends continue densely after recovery
        assert log.append(make_batch(1)).base_offset == 2 * survivors
        log.truncate(2 * survivors)
        log.flush_index()


def test_recovery_ignores_index_entries_that_point_past_the_cut(tmp_path):
    h = Harness(tmp_path, index_interval_bytes=64)
    for seed in range(20):
        h.log.append(make_batch(2, value_size=50, seed=seed))
    h.log.flush_index()  # the index now reaches the end of the segment
    log = h.crash(cut_active_at=h.log.segments[-1].size_bytes // 2)
    log.set_high_watermark(log.log_end_offset)
    assert 0 < log.log_end_offset < 40
    assert [r.offset for r in parse_records(h.all_bytes())] == list(range(log.log_end_offset))


def test_recovery_rejects_garbage_with_a_valid_crc_but_wrong_offset(tmp_path):
    h = Harness(tmp_path)
    h.log.append(make_batch(2))
    path = h.log.segments[-1].path
    h.log.abandon()
    with open(path, "ab") as f:
        f.write(make_batch(2))  # stored base offset 0 again: not contiguous
    log = h.crash()
    assert log.log_end_offset == 2


DISK_FULL_CHILD = textwrap.dedent("""
    import json, resource, sys
    from raftka.client.embedded import Raftka
    from raftka.errors import StorageError
    rk = Raftka(sys.argv[1], segment_bytes=64 << 20)
    rk.create_topic("t")
    resource.setrlimit(resource.RLIMIT_FSIZE, (256 * 1024, 256 * 1024))
    acked, error = [], None
    for i in range(10_000):
        try:
            acked.append(rk.produce("t", b"x" * 1000, key=b"%d" % i).offset)
        except StorageError as exc:
            error = str(exc)
            break
    # the log keeps serving reads and refuses further writes cleanly
    readable = sum(1 for _ in rk.read("t", 0))
    rk.close()
    print(json.dumps({"acked": acked, "error": error, "readable": readable}))
""")


def test_disk_full_fails_the_append_cleanly_and_the_log_reopens_intact(tmp_path):
    import json
    import raftka
    result = subprocess.run([sys.executable, "-c", DISK_FULL_CHILD, str(tmp_path)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    outcome = json.loads(result.stdout)
    assert outcome["error"] and "File too large" in outcome["error"]
    acked = outcome["acked"]
    assert acked == list(range(len(acked))) and outcome["readable"] == len(acked)
    with raftka.open(tmp_path) as rk:
        assert [r.offset for r in rk.read("t", 0)] == acked
        assert rk.produce("t", b"after").offset == len(acked)


@pytest.fixture
def tiny_tmpfs(tmp_path):
    mount_point = tmp_path / "tmpfs"
    mount_point.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount_point)],
                             capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    yield mount_point
    subprocess.run(["umount", "-l", str(mount_point)], check=False)


def test_no_space_left_fails_cleanly_on_a_full_tmpfs(tiny_tmpfs):
    import raftka
    acked = []
    with raftka.open(tiny_tmpfs / "data", segment_bytes=64 << 20, lmdb_map_size_bytes=1 << 20) as rk:
        rk.create_topic("t")
        with pytest.raises(StorageError, match="No space left"):
            for i in range(10_000):
                acked.append(rk.produce("t", os.urandom(1000)).offset)
        assert sum(1 for _ in rk.read("t", 0)) == len(acked)
    with raftka.open(tiny_tmpfs / "data", lmdb_map_size_bytes=1 << 20) as rk:
        assert [r.offset for r in rk.read("t", 0)] == acked


def test_unusable_data_directory_is_a_clear_storage_error(tmp_path):
    import raftka
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    with pytest.raises(StorageError, match="unusable"):
        raftka.open(not_a_dir / "data")


def test_segments_roll_by_age_measured_by_the_batches_timestamps_not_the_wall_clock(tmp_path):
    h = Harness(tmp_path, segment_ms=1000)
    h.log.append(make_batch(1, timestamp_ms=1_000_000))
    h.log.append(make_batch(1, timestamp_ms=1_000_999))   # younger than segment_ms: same segment
    log = h.reopen()                                      # a restart does not reset the age
    log.append(make_batch(1, timestamp_ms=1_001_000))     # segment_ms after the first batch: a new one
    assert [s.base_offset for s in log.segments] == [0, 2]


@pytest.mark.parametrize("policy", ["never", "interval", "always"])
def test_every_fsync_policy_keeps_appends_across_reopen(tmp_path, policy):
    import raftka
    with raftka.open(tmp_path, fsync=policy, fsync_interval_ms=1, segment_bytes=2048) as rk:
        rk.create_topic("t")
        sent = rk.produce_batch("t", [Record(b"%d" % i * 50) for i in range(100)])
        rk.flush()
    with raftka.open(tmp_path, fsync=policy) as rk:
        assert [r.offset for r in rk.read("t", 0)] == [m.offset for m in sent]


def test_an_unknown_fsync_policy_is_refused():
    with pytest.raises(ValueError, match="fsync must be one of"):
        Config(fsync="sometimes")


def test_a_sealed_segment_cut_at_any_byte_past_the_recovery_point_reopens_to_the_valid_prefix(tmp_path):
    # fsync=never: nothing was ever synced, so the recovery point stays at 0 and
    # a torn sealed segment (a power loss) must be found, not trusted
    batches = [make_batch(2, value_size=40, seed=seed) for seed in range(6)]
    size = len(batches[0])
    ends = [size * i for i in range(4)]
    for cut in [*range(0, 3 * size, 5), 3 * size]:
        h = Harness(tmp_path / str(cut), fsync="never", segment_bytes=3 * size, index_interval_bytes=128)
        for batch in batches:
            h.log.append(batch)
        h.log.flush_index()
        assert len(h.log.segments) == 2 and h.log.recovery_point == 0
        h.log.abandon()
        os.truncate(h.log.segments[0].path, cut)
        log = h.log = h._open()
        survivors = max(i for i, end in enumerate(ends) if end <= cut)
        expected_end = 2 * survivors if cut < 3 * size else 12
        assert log.log_end_offset == expected_end, cut
        assert len(log.segments) == (1 if cut < 3 * size else 2), cut
        log.set_high_watermark(log.log_end_offset)
        assert [r.offset for r in parse_records(h.all_bytes())] == list(range(expected_end))
        assert log.append(make_batch(1)).base_offset == expected_end   # appends continue densely
        h.log.abandon()
        h.index.close()


def test_a_synced_log_records_its_recovery_point_and_a_cut_below_the_high_watermark_is_reported(tmp_path):
    h = Harness(tmp_path, fsync="always", segment_bytes=4096)
    for seed in range(3):
        h.log.append(make_batch(2, seed=seed))
    commit_all(h.log)
    h.log.flush_index()
    assert h.log.recovery_point == 6                  # fsync=always: synced at every append
    log = h.crash(cut_active_at=len(make_batch(2, seed=0)))   # bytes below the recorded high watermark lost
    assert log.log_end_offset == 2 and log.recovered_short
    assert log.applied_index == UNKNOWN_APPLIED_INDEX   # the replica must repair, never trust it
    log.abandon()
    assert h._open().recovered_short                  # still unrepaired after another restart


def vm_size_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmSize:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmSize in /proc/self/status")


def test_an_active_segments_mapping_follows_its_data_not_segment_bytes(tmp_path):
    config = Config(data_dir=tmp_path)                 # segment.bytes 1 GiB, Kafka's default
    index = IndexStore(tmp_path / "index.lmdb", config.lmdb_map_size_bytes)
    before = vm_size_bytes()
    logs = [PartitionLog(f"t-{p}", tmp_path / f"t-{p}", p, index, config) for p in range(40)]
    try:
        for log in logs:
            log.append(make_batch(3))
            commit_all(log)
            assert len(log.read(0, 1 << 20).buffer) > 0    # maps the active segment
        grown = vm_size_bytes() - before
        assert grown < 40 * 64 * 1024 * 1024, f"40 small partitions mapped {grown >> 20} MiB"
        big = logs[0]
        payload = build_batch([Record(b"x" * 100_000, b"k")] * 10)
        for _ in range(10):                                # past the first mapping: remapped, still readable
            big.append(payload)
        commit_all(big)
        assert readable_bytes(big).count(b"x" * 100_000) == 100
    finally:
        for log in logs:
            log.abandon()
        index.close()
