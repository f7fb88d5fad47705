"""Log compaction (cleanup.policy=compact) against a model: after a clean
below E with tombstone end T, a reader sees, of the records below E, the
latest of each key (a tombstone only from T on), and every record from E
on; offsets never move. On one log (a property test
over random workloads) and on three replicas of a Raft group (the real
PartitionReplica under the simulation's clock and network), whose segment
files must come out byte for byte the same."""
from __future__ import annotations

import random
import tempfile
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

from raftka.config import Config
from raftka.errors import InvalidRecordError
from raftka.raft.pysyncobj_adapter import patched_clock
from raftka.records.batch import Record, build_batch, parse_records
from raftka.replication.simulation import Faults, Simulation
from raftka.storage import cleaner
from raftka.storage.cleaner import CleanPlan
from raftka.storage.index import IndexStore
from raftka.storage.partition_log import PartitionLog
from raftka.storage.producer_state import ProducerState

BASE_MS = 1_700_000_000_000
KEYS = [b"k%d" % i for i in range(6)]
COMPACTED = dict(segment_bytes=600, index_interval_bytes=128, cleanup_policy="compact", fsync="never",
                 min_cleanable_dirty_ratio=0.0, delete_retention_ms=50, log_cleaner_io_max_bytes_per_second=0)

# a batch: its records as (key index, value or None for a tombstone)
batch_strategy = st.lists(st.tuples(st.integers(0, len(KEYS) - 1),
                                   st.one_of(st.none(), st.binary(min_size=1, max_size=24))), min_size=1, max_size=4)
batches_strategy = st.lists(batch_strategy, min_size=1, max_size=40)
# enough batches to fill a few 600-byte segments: a round always has something to clean
round_strategy = st.tuples(st.lists(batch_strategy, min_size=25, max_size=40), st.integers(0, 400))


CODECS = ["none", "gzip", "snappy", "lz4", "zstd"]


def batch_bytes(records: list[tuple[int, bytes | None]], first_ms: int, compression: str = "none",
                **producer: int) -> bytes:
    return build_batch([Record(value, KEYS[key], (), first_ms + i) for i, (key, value) in enumerate(records)],
                       compression=compression, **producer)


def visible(log: PartitionLog) -> list[tuple[int, bytes, bytes | None]]:
    """(offset, key, value) of every record a reader sees, start to high watermark."""
    out, offset = [], log.log_start_offset
    while offset < log.high_watermark:
        piece = log.read(offset, 1 << 20)
        out += [(r.offset, r.key, r.value) for r in parse_records(piece.buffer, min_offset=offset)]
        assert piece.next_offset > offset
        offset = piece.next_offset
    return out


def model_clean(records: list[tuple[int, bytes, bytes | None, int]], end: int, tombstone_end: int) -> list:
    """The model: of the records below `end`, the latest per key, a tombstone only from `tombstone_end` on."""
    latest = {key: offset for offset, key, _value, _ts in records if offset < end}
    return [(offset, key, value, ts) for offset, key, value, ts in records
            if offset >= end or (latest[key] == offset and not (value is None and offset < tombstone_end))]


@pytest.fixture
def open_log(tmp_path):
    opened = []

    def make(name: str = "", **settings) -> PartitionLog:
        name = name or f"c{len(opened)}"
        config = Config(data_dir=tmp_path, **{**COMPACTED, **settings})
        index = IndexStore(tmp_path / f"{name}.lmdb", 1 << 26)
        log = PartitionLog(name, tmp_path / name, 0, index, config)
        opened.append((log, index))
        return log
    yield make
    for log, index in opened:
        log.abandon()
        index.close()


def append_all(log: PartitionLog, batches: list, start_ms: int,
               codecs: list[str] = ["none"]) -> list[tuple[int, bytes, bytes | None, int]]:
    appended = []
    for n, records in enumerate(batches):
        first_ms = start_ms + 10 * n
        result = log.append(batch_bytes(records, first_ms, codecs[n % len(codecs)]))
        appended += [(result.base_offset + i, KEYS[key], value, first_ms + i) for i, (key, value) in enumerate(records)]
    log.set_high_watermark(log.log_end_offset)
    return appended


@seed(1717)
@settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(first=batches_strategy, second=batches_strategy, tombstones_go=st.booleans(),
       codecs=st.lists(st.sampled_from(CODECS), min_size=1, max_size=3))
def test_a_clean_leaves_the_latest_record_per_key_and_tombstones_until_a_later_clean_with_offsets_unchanged(
        open_log, first, second, tombstones_go, codecs):
    log = open_log()
    records = append_all(log, first, BASE_MS, codecs)
    previous_end = 0
    for more in (second, []):
        records += append_all(log, more, records[-1][3] + 10 if records else BASE_MS, codecs)
        end = log.segments[-1].base_offset           # every sealed segment (the active one is never cleaned)
        plan = CleanPlan(end, previous_end if tombstones_go else 0)   # tombstones the last clean kept may go
        log.clean_now(plan)
        records = model_clean(records, end, plan.tombstone_end_offset)
        previous_end = end
        assert visible(log) == [(offset, key, value) for offset, key, value, _ts in records]
    assert log.log_end_offset == sum(len(b) for b in first + second)   # offsets never move
    reopened_view = visible(log)
    log.close()
    again = PartitionLog(log.name, log.directory, 0, log._index, log.config)   # recovery takes cleaned segments
    assert (visible(again), again.log_end_offset) == (reopened_view, log.log_end_offset)
    again.abandon()


def test_a_fetch_at_a_removed_offset_returns_the_next_record_and_cleaning_twice_changes_nothing(open_log):
    log = open_log()
    append_all(log, [[(0, b"old")], [(1, b"one")], [(0, b"new")]] * 20, BASE_MS)
    plan = log.compact(now_ms=BASE_MS + 10_000)
    assert plan is not None and log.finish_clean(wait=True)
    assert log.last_clean.records_out < log.last_clean.records_in
    assert visible(log)[0][0] > 0                     # offsets 0.. were removed: reads go on to the next record
    assert [offset for offset, _k, _v in visible(log)][-3:] == [57, 58, 59]
    files = {p.name: p.read_bytes() for p in log.directory.glob("*.log")}
    log.clean_now(plan)
    assert {p.name: p.read_bytes() for p in log.directory.glob("*.log")} == files
    assert log.compact(now_ms=BASE_MS + 10_000) is None   # nothing dirty since


def test_closing_a_log_stops_its_throttled_clean_and_leaves_its_segments_as_they_were(open_log):
    log = open_log(log_cleaner_io_max_bytes_per_second=100)      # a clean that would take minutes
    append_all(log, [[(0, b"x" * 50)]] * 40, BASE_MS)
    files = {p.name: p.read_bytes() for p in log.directory.glob("*.log")}
    log.start_clean(CleanPlan(log.segments[-1].base_offset, 0))
    job = log._clean_job
    started = time.monotonic()
    log.close()
    with pytest.raises(cleaner.CleanCancelled):
        job.result.result(timeout=5)
    assert time.monotonic() - started < 5
    assert {p.name: p.read_bytes() for p in log.directory.glob("*.log")} == files


def test_compressed_batches_are_compacted_and_recompressed_with_their_codec(open_log):
    log = open_log(segment_bytes=1 << 20)
    for n in range(10):
        log.append(batch_bytes([(k, b"v%d-%d" % (n, k) * 8) for k in range(4)], BASE_MS + 10 * n, "gzip"))
    log.roll()
    log.set_high_watermark(log.log_end_offset)
    log.clean_now(CleanPlan(log.log_end_offset, 0))
    assert log.last_clean.batches_kept_whole == 0
    assert [(o, k, v) for o, k, v in visible(log)] == [(36 + k, KEYS[k], b"v9-%d" % k * 8) for k in range(4)]
    from raftka.records.batch import iter_batches
    codecs = [header.attributes & 0x07 for header, _ in iter_batches(log.segments[0].view())]
    assert codecs == [1]     # the emptied batches went; the last one, whole, is still gzip


def test_the_plan_leaves_records_younger_than_the_compaction_lag_and_waits_for_the_dirty_ratio(open_log):
    log = open_log(min_cleanable_dirty_ratio=0.99, min_compaction_lag_ms=1000)
    append_all(log, [[(n % 3, b"x" * 40)] for n in range(60)], BASE_MS)    # 10 ms apart: BASE_MS .. +590
    assert len(log.segments) > 4
    assert log.compact(now_ms=BASE_MS + 999) is None     # every segment is younger than the lag
    plan = log.compact(now_ms=BASE_MS + 1300)            # the segments whose newest batch is <= +300
    assert plan is not None and log.finish_clean(wait=True)
    assert plan.tombstone_end_offset == 0                # no clean kept a tombstone yet
    assert all(segment.max_timestamp() <= BASE_MS + 300 for segment in log.segments
               if segment.base_offset < plan.end_offset)
    assert [o for o, _k, _v in visible(log) if o >= plan.end_offset] == list(range(plan.end_offset, 60))
    # the rest is old enough now, but it is less than 99% of the cleanable log: it waits
    assert log.compact(now_ms=BASE_MS + 10**6) is None
    log.reconfigure(log.config.replace(min_cleanable_dirty_ratio=0.5))
    later = log.compact(now_ms=BASE_MS + 10**6)
    assert later is not None and later.tombstone_end_offset == plan.end_offset   # the first clean is old enough


def test_the_last_batch_of_each_idempotent_producer_survives_so_its_sequence_is_known(open_log):
    log = open_log()
    for sequence in range(12):                    # producer 7 overwrites one key; others fill the segments
        log.append(batch_bytes([(0, b"v%d" % sequence)], BASE_MS + sequence, producer_id=7, producer_epoch=0,
                               base_sequence=sequence))
        log.append(batch_bytes([(1, b"x" * 40)], BASE_MS + sequence))
    log.set_high_watermark(log.log_end_offset)
    last_producer_batch = 22
    log.clean_now(CleanPlan(log.segments[-1].base_offset, 0))
    state = ProducerState(log.config.producer_id_expiration_ms, lambda: log.log_start_offset)
    state.rebuild([segment.view() for segment in log.segments])
    retry = build_batch([Record(b"v11", KEYS[0], (), BASE_MS + 11)], producer_id=7, producer_epoch=0,
                        base_sequence=11)
    from raftka.records.batch import read_header
    assert state.check(read_header(retry)) == last_producer_batch   # a retry of its last batch: answered


def test_a_compacted_topic_refuses_records_without_a_key_with_invalid_record(open_log):
    log = open_log()
    with pytest.raises(InvalidRecordError, match="without key"):
        log.validate(build_batch([Record(b"keyless", None, (), BASE_MS)]))
    log.validate(build_batch([Record(b"keyed", b"k", (), BASE_MS)], compression="gzip"))
    with pytest.raises(InvalidRecordError):
        log.validate(build_batch([Record(b"keyless", None, (), BASE_MS)], compression="gzip"))


def test_compact_alone_never_deletes_by_retention_but_compact_delete_does(open_log):
    kept = open_log("kept", retention_ms=1)
    append_all(kept, [[(0, b"x" * 100)]] * 20, BASE_MS)
    assert kept.enforce_retention(now_ms=BASE_MS + 10**9) == 0
    both = open_log("both", retention_ms=1, cleanup_policy="compact,delete")
    append_all(both, [[(0, b"x" * 100)]] * 20, BASE_MS)
    assert both.enforce_retention(now_ms=BASE_MS + 10**9) > 0


def test_group_offsets_materialised_from_a_cleaned_offsets_log_are_the_latest_and_expired_ones_stay_gone(
        open_log, tmp_path):
    from raftka.groups.offsets_topic import CommittedOffset
    from raftka.groups.store import GroupStore, offset_records
    log = open_log(segment_bytes=1 << 20)
    for commit in range(60):                        # many commits of the same partitions, some expired (tombstones)
        offsets = {("t", p): CommittedOffset(commit * 10 + p, -1, "", BASE_MS + commit) for p in range(3)}
        if commit == 59:
            offsets[("t", 2)] = None
        log.append(build_batch([r._replace(timestamp_ms=BASE_MS + commit) for r in offset_records("g", offsets)]))
    log.roll()
    log.set_high_watermark(log.log_end_offset)
    before = log.size_bytes
    log.clean_now(CleanPlan(log.log_end_offset, log.log_end_offset))   # an earlier clean kept the tombstone long enough
    assert log.size_bytes < before / 10
    fresh = IndexStore(tmp_path / "fresh.lmdb", 1 << 26)
    try:
        store = GroupStore(fresh)
        store.materialise(log)
        committed = store.committed("g")
        assert {tp: value.offset for tp, value in committed.items()} == {("t", 0): 590, ("t", 1): 591}
    finally:
        fresh.close()


# ---- three replicas ---------------------------------------------------------------------------------------------

QUIET = Faults.of([], propose=0.0, heal=0.0, retention=0.0)


class CompactingSimulation(Simulation):
    """The simulation's network, clock and replicas, without its checker:
    that one holds every replica's log to an append-only agreed log, which
    a clean rewrites; these tests check against the compaction model instead."""

    def check_invariants(self) -> None:
        pass


def run_steps(sim: Simulation, count: int) -> None:
    with patched_clock(sim.clock):
        for _ in range(count):
            sim.step()


def leader_of(sim: Simulation):
    return next(m.replicas[1] for m in sim.members.values() if m.alive and m.replicas[1].is_leader)


def settle_cleans(sim: Simulation) -> None:
    """Step until every replica swapped its clean in (each waits for its journal to let go of the range)."""
    for _ in range(50):
        run_steps(sim, 10)
        pending = False
        for member in sim.members.values():
            log = member.replicas[1].log
            if log.cleaning and not log.finish_clean(wait=True) and not member.replicas[1].catching_up:
                pending = True
        if not pending and not any(m.replicas[1]._clean_due for m in sim.members.values()):
            return
    raise AssertionError("cleans never installed")


def segment_files(member) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(member.replicas[1].log.directory.glob("*.log"))}


def started_simulation(root: Path, sim_seed: int) -> CompactingSimulation:
    sim = CompactingSimulation(root, sim_seed, faults=QUIET, metadata=False,
                               log_settings=dict(COMPACTED, retention_ms=-1, segment_ms=10**9))
    random.seed(sim_seed)   # pysyncobj draws its election timeouts from `random`
    with patched_clock(sim.clock):
        for node_id in sim.members:
            sim.start_node(node_id)
    run_steps(sim, 100)
    return sim


def replicate(sim: Simulation, records: list[tuple[int, bytes | None]], first_ms: int, codec: str = "none") -> int:
    """Append one batch through the leader; its base offset once committed."""
    done: list = []
    leader_of(sim).propose_append(batch_bytes(records, first_ms, codec),
                                  lambda offset, error: done.append((offset, error)))
    for _ in range(10):
        run_steps(sim, 4)
        if done:
            break
    offset, error = done[0]
    assert error is None
    return offset


@seed(2024)
@settings(max_examples=10, deadline=None, derandomize=True)
@given(rounds=st.lists(round_strategy, min_size=1, max_size=3), codecs=st.lists(st.sampled_from(CODECS), min_size=1,
                                                                               max_size=2))
def test_three_replicas_clean_to_byte_identical_segments_matching_the_model(rounds, codecs):
    with tempfile.TemporaryDirectory() as root:
        sim = started_simulation(Path(root), 7)
        try:
            records, now_ms = [], BASE_MS
            for number, (batches, clean_after_ms) in enumerate(rounds):
                for n, batch in enumerate(batches):
                    now_ms += 20
                    offset = replicate(sim, batch, now_ms, codecs[n % len(codecs)])
                    records += [(offset + i, KEYS[k], v, now_ms + i) for i, (k, v) in enumerate(batch)]
                run_steps(sim, 30)
                plan = leader_of(sim).log.compact(now_ms=now_ms + clean_after_ms)   # the leader decides
                assert plan is not None
                settle_cleans(sim)
                records = model_clean(records, plan.end_offset, plan.tombstone_end_offset)
                files = [segment_files(member) for member in sim.members.values()]
                assert files[0] == files[1] == files[2], f"replicas differ after clean round {number}"
                for member in sim.members.values():
                    assert visible(member.replicas[1].log) == [(o, k, v) for o, k, v, _ts in records]
        finally:
            sim.stop_all()


def test_a_follower_cut_off_during_cleans_catches_up_from_the_cleaned_leader_with_offsets_kept(tmp_path):
    rng = random.Random(5)
    sim = started_simulation(Path(tmp_path), 5)
    try:
        away = next(m.node_id for m in sim.members.values() if not m.replicas[1].is_leader)
        for other in sim.members:                     # cut off: it misses the appends and the clean plans
            if other != away:
                sim.cut_links.add(frozenset((away, other)))
        now_ms = BASE_MS
        for round_number in range(2):
            for n in range(60):
                now_ms += 20
                batch = [(rng.randrange(len(KEYS)), b"v%d-%d" % (round_number, n))]
                leader_of(sim).propose_append(batch_bytes(batch, now_ms), lambda o, e: None)
                run_steps(sim, 3)
            run_steps(sim, 30)
            assert leader_of(sim).log.compact(now_ms=now_ms) is not None
            settle_cleans(sim)
        sim.cut_links.clear()
        run_steps(sim, 400)
        leader = leader_of(sim)
        follower = sim.members[away].replicas[1]
        assert not follower.catching_up
        assert follower.log.last_clean is None        # it never cleaned: it fetched the leader's cleaned batches
        assert follower.log.log_end_offset == leader.log.log_end_offset
        assert visible(follower.log) == visible(leader.log)
    finally:
        sim.stop_all()

