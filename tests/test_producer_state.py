"""Idempotent producer state: a retried batch answers its original offset, a
sequence gap or an older epoch is refused, and the state rebuilds from the
stored batches alone."""
from __future__ import annotations

import pytest

from raftka.errors import InvalidProducerEpochError, OutOfOrderSequenceError
from raftka.records.batch import Record, build_batch, read_header
from raftka.storage.producer_state import CACHED_BATCHES, ProducerState


def header(pid: int, epoch: int, sequence: int, count: int = 2, base_offset: int = 0):
    batch = build_batch([Record(b"v", b"k")] * count, producer_id=pid, producer_epoch=epoch,
                        base_sequence=sequence, base_offset=base_offset)
    return read_header(batch), batch


def test_a_retry_of_any_of_the_last_five_batches_answers_its_offset():
    state = ProducerState()
    for i in range(7):
        h, _ = header(9, 0, 2 * i)
        assert state.check(h) is None
        state.record(h, 100 + 2 * i)
    for i in range(7 - CACHED_BATCHES, 7):
        assert state.check(header(9, 0, 2 * i)[0]) == 100 + 2 * i
    with pytest.raises(OutOfOrderSequenceError):
        state.check(header(9, 0, 0)[0])       # too old to be recognised: not a valid next batch either


def test_a_gap_or_an_older_epoch_is_refused_and_a_new_epoch_restarts_at_zero():
    state = ProducerState()
    h, _ = header(9, 1, 0)
    state.record(h, 0)
    with pytest.raises(OutOfOrderSequenceError):
        state.check(header(9, 1, 5)[0])
    with pytest.raises(InvalidProducerEpochError):
        state.check(header(9, 0, 2)[0])
    with pytest.raises(OutOfOrderSequenceError):
        state.check(header(9, 2, 7)[0])
    assert state.check(header(9, 2, 0)[0]) is None
    assert state.check(header(-1, -1, -1)[0]) is None     # not idempotent: always appended


def test_state_rebuilds_from_stored_batches():
    stored = b"".join(header(4, 0, 2 * i, base_offset=2 * i)[1] for i in range(3))
    state = ProducerState()
    state.rebuild([memoryview(stored)])
    assert state.check(header(4, 0, 4)[0]) == 4
    assert state.check(header(4, 0, 6)[0]) is None


def test_an_idle_producer_id_expires_by_the_logs_own_clock_and_its_retry_then_starts_afresh():
    state = ProducerState(expiration_ms=60_000)
    old, _ = header(1, 0, 0)                   # timestamp: build_batch's default
    state.record(old, 0)
    assert state.check(old) == 0               # a retry: its offset
    young = read_header(build_batch([Record(b"v", b"k", (), old.max_timestamp + 60_001)], producer_id=2,
                                    producer_epoch=0, base_sequence=0))
    state.record(young, 2)
    assert state.expire() == 1 and len(state) == 1   # producer 1 idle for more than 60 s of log time
    assert state.check(old) is None            # forgotten: its batch is new again
    with pytest.raises(OutOfOrderSequenceError):
        state.check(header(2, 0, 5)[0])        # the live one is still checked


def test_expiry_is_the_same_for_every_replica_rebuilding_from_the_same_batches():
    batches = [build_batch([Record(b"v", b"k", (), 1_000 + 40_000 * i)], producer_id=i, producer_epoch=0,
                           base_sequence=0, base_offset=i) for i in range(5)]
    one, other = ProducerState(expiration_ms=100_000), ProducerState(expiration_ms=100_000)
    for batch in batches:
        one.record(read_header(batch), read_header(batch).base_offset)
    one.expire()
    other.rebuild([memoryview(b"".join(batches))])
    assert len(one) == len(other) == 3           # ids 0 and 1 are older than 100 s before the newest batch


def test_an_expired_producer_is_unknown_whether_or_not_its_memory_was_reclaimed():
    state = ProducerState(expiration_ms=60_000)
    old, _ = header(1, 0, 0)
    state.record(old, 0)
    young = read_header(build_batch([Record(b"v", b"k", (), old.max_timestamp + 60_001)], producer_id=2,
                                    producer_epoch=0, base_sequence=0))
    state.record(young, 2)                     # no expire() pass has run
    assert len(state) == 2
    assert state.check(old) is None            # as if forgotten: a replica that reclaimed it decides alike
    assert state.check(header(1, 0, 7)[0]) is None


def test_a_producer_whose_batches_retention_deleted_is_unknown():
    log_start = 0
    state = ProducerState(log_start_offset=lambda: log_start)
    h, _ = header(3, 0, 0)
    state.record(h, 10)
    assert state.check(h) == 10
    log_start = 12                             # the segment holding offset 10 is gone
    assert state.check(h) is None              # as on a replica that rebuilt from the retained log
    with_state = ProducerState(log_start_offset=lambda: log_start)
    with_state.rebuild([])
    assert with_state.check(h) is None


def test_rebuild_finds_every_producer_batch_among_other_traffic_in_every_segment(monkeypatch):
    import raftka.storage.producer_state as producer_state
    monkeypatch.setattr(producer_state, "REBUILD_POSITIONS_MAX", 3)   # the native walk resumes where it stopped
    segments, offset = [], 0
    for s in range(3):
        parts = []
        for i in range(10):
            plain = build_batch([Record(b"x" * 50, b"k")], base_offset=offset)
            idempotent = build_batch([Record(b"v", b"k")], producer_id=100 + i, producer_epoch=0,
                                     base_sequence=s, base_offset=offset + 1)
            parts += [plain, idempotent]
            offset += 2
        segments.append(memoryview(b"".join(parts)))
    state = ProducerState()
    state.rebuild(segments)
    assert len(state) == 10
    for i in range(10):
        retry = read_header(build_batch([Record(b"v", b"k")], producer_id=100 + i, producer_epoch=0, base_sequence=2))
        assert state.check(retry) == 2 * 10 * 2 + 2 * i + 1   # the last segment's batch of producer 100 + i
