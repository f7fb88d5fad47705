"""PartitionLog against a plain in-memory model, driven by hypothesis.

Every rule changes both; after every step the log's offsets and every
readable byte must equal the model's. "crash" abandons the log (nothing
uncommitted survives), cuts the active segment at a random byte and drops
the newest LMDB index entries; the log must reopen to the model's valid
prefix with nothing after the cut invented.
"""
from __future__ import annotations

import os
import random
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from hypothesis import settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from raftka.config import Config
from raftka.errors import CorruptRecordError, OffsetOutOfRangeError, RecordTooLargeError
from raftka.records.batch import Record, build_batch, iter_batches
from raftka.storage.index import IndexStore
from raftka.storage.partition_log import PartitionLog

SEGMENT_BYTES = 1500
RETENTION_BYTES = 3000
RETENTION_MS = 5000


@dataclass
class ModelBatch:
    base_offset: int
    stored: bytes              # as the log must hold it: base offset patched in
    timestamps: list[int]

    @property
    def last_offset(self) -> int:
        return self.base_offset + len(self.timestamps) - 1

    @property
    def size(self) -> int:
        return len(self.stored)


@dataclass
class ModelSegment:
    base_offset: int
    batches: list[ModelBatch] = field(default_factory=list)

    @property
    def size(self) -> int:
        return sum(b.size for b in self.batches)


class PartitionLogMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.root = Path(tempfile.mkdtemp(prefix="raftka-model-"))
        self.config = Config(data_dir=self.root, segment_bytes=SEGMENT_BYTES, index_interval_bytes=200,
                             retention_bytes=RETENTION_BYTES, retention_ms=RETENTION_MS)
        self.index = IndexStore(self.root / "index.lmdb", self.config.lmdb_map_size_bytes)
        self.log = self._open()
        self.segments = [ModelSegment(0)]
        self.high_watermark = 0
        self.committed_high_watermark = 0

    def _open(self) -> PartitionLog:
        return PartitionLog("t-0", self.root / "t-0", 0, self.index, self.config)

    def teardown(self) -> None:
        self.log.abandon()
        self.index.close()
        shutil.rmtree(self.root, ignore_errors=True)

    # ---- model helpers ----------------------------------------------

    @property
    def batches(self) -> list[ModelBatch]:
        return [b for s in self.segments for b in s.batches]

    @property
    def log_start(self) -> int:
        return self.segments[0].base_offset

    @property
    def log_end(self) -> int:
        batches = self.batches
        return batches[-1].last_offset + 1 if batches else self.segments[-1].base_offset

    def boundaries(self) -> list[int]:
        return [self.log_start] + [b.last_offset + 1 for b in self.batches]

    def undo_empty_roll(self) -> None:
        """As PartitionLog's truncate and open: an empty newest segment after
        another one past the log start goes (its roll is undone), so replicas
        that lost the batch it was rolled for keep the segments of those that
        never rolled there."""
        if len(self.segments) > 1 and not self.segments[-1].batches and self.segments[-1].base_offset > self.log_start:
            self.segments.pop()

    # ---- rules -------------------------------------------------------

    @rule(counts=st.lists(st.integers(1, 5), min_size=1, max_size=4),
          value_size=st.integers(0, 300), timestamp=st.integers(0, 20_000),
          seed=st.integers(0, 2**16), corrupt=st.booleans(), writable=st.booleans())
    def append(self, counts, value_size, timestamp, seed, corrupt, writable):
        rng = random.Random(seed)
        built = []
        for count in counts:
            stamps = [timestamp + rng.randint(-50, 500) for _ in range(count)]
            stamps = [max(0, t) for t in stamps]
            records = [Record(rng.randbytes(value_size), b"k", (), t) for t in stamps]
            built.append((build_batch(records), stamps))
        data = b"".join(b for b, _ in built)
        if corrupt:  # flip a bit the CRC covers (baseOffset and leader epoch are rewritten anyway)
            broken = bytearray(data)
            victim = rng.randrange(len(built))
            start = sum(len(b) for b, _ in built[:victim])
            broken[start + rng.randrange(21, len(built[victim][0]))] ^= 0x40
            with pytest.raises((CorruptRecordError, RecordTooLargeError)):
                self.log.append(bytes(broken))
            return
        result = self.log.append(bytearray(data) if writable else data)
        assert result.base_offset == self.log_end
        active = self.segments[-1]
        if active.batches and active.size + len(data) > SEGMENT_BYTES:
            active = ModelSegment(self.log_end)
            self.segments.append(active)
        offset = self.log_end
        for batch, stamps in built:
            stored = offset.to_bytes(8, "big") + batch[8:]
            active.batches.append(ModelBatch(offset, stored, stamps))
            offset += len(stamps)

    @rule(data=st.data())
    def set_high_watermark(self, data):
        offset = data.draw(st.sampled_from(self.boundaries()))
        self.log.set_high_watermark(offset)
        self.high_watermark = offset

    @rule(data=st.data(), max_bytes=st.integers(1, 4000))
    def read(self, data, max_bytes):
        offset = data.draw(st.integers(self.log_start, self.high_watermark))
        got = bytes(self.log.read(offset, max_bytes).buffer)
        expected = b""
        segment = [s for s in self.segments if s.base_offset <= offset][-1]  # reads stay in one segment
        for batch in segment.batches:
            if batch.last_offset < offset or batch.last_offset >= self.high_watermark:
                continue
            if expected and len(expected) + batch.size > max_bytes:
                break
            expected += batch.stored
        assert got == expected

    @rule(data=st.data())
    def read_out_of_range(self, data):
        offset = data.draw(st.sampled_from([self.log_start - 1, self.high_watermark + 1]))
        if offset < 0:
            return
        with pytest.raises(OffsetOutOfRangeError):
            self.log.read(offset, 100)

    @rule(data=st.data())
    def truncate(self, data):
        offset = data.draw(st.integers(self.log_start, self.log_end))
        new_end = self.log.truncate(offset)
        if offset >= self.log_end:
            assert new_end == self.log_end
            return
        for i, segment in enumerate(self.segments):
            if segment.base_offset <= offset and (i + 1 == len(self.segments)
                                                   or self.segments[i + 1].base_offset > offset):
                segment.batches = [b for b in segment.batches if b.last_offset < offset]
                del self.segments[i + 1:]
                break
        self.undo_empty_roll()
        assert new_end == self.log_end
        self.high_watermark = min(self.high_watermark, new_end)
        self.committed_high_watermark = self.high_watermark

    @rule()
    def roll(self):
        self.log.roll()
        if self.segments[-1].batches:
            self.segments.append(ModelSegment(self.log_end))

    @rule(now_ms=st.integers(0, 30_000))
    def enforce_retention(self, now_ms):
        deleted = self.log.enforce_retention(now_ms)
        total = sum(s.size for s in self.segments)
        expected = 0
        while len(self.segments) > 1 and self.segments[1].base_offset <= self.high_watermark:
            first = self.segments[0]
            newest = max(t for b in first.batches for t in b.timestamps)
            if not (RETENTION_BYTES <= total - first.size or newest < now_ms - RETENTION_MS):
                break
            total -= first.size
            self.segments.pop(0)
            expected += 1
        assert deleted == expected
        if deleted:
            self.committed_high_watermark = self.high_watermark

    @rule()
    def reopen(self):
        self.log.close()
        self.log = self._open()
        self.undo_empty_roll()
        self.committed_high_watermark = self.high_watermark

    @rule(cut_fraction=st.floats(0, 1), drop_index_from=st.none() | st.integers(0, 200))
    def crash(self, cut_fraction, drop_index_from):
        active = self.segments[-1]
        cut = int(active.size * cut_fraction)
        path = self.log.segments[-1].path
        self.log.abandon()
        os.truncate(path, cut)
        if drop_index_from is not None:  # LMDB lost its newest transactions
            self.index.delete_offsets(0, from_offset=drop_index_from)
            self.index.delete_times(0, from_offset=drop_index_from)
        end = 0
        kept = []
        for batch in active.batches:
            end += batch.size
            if end > cut:
                break
            kept.append(batch)
        active.batches = kept
        self.log = self._open()
        self.undo_empty_roll()
        self.high_watermark = max(self.log_start, min(self.committed_high_watermark, self.log_end))
        self.committed_high_watermark = self.high_watermark  # recovery stores what it found

    @rule(timestamp_ms=st.integers(0, 21_000))
    def offset_for_timestamp(self, timestamp_ms):
        expected = None
        for batch in self.batches:
            if batch.last_offset >= self.high_watermark:
                break
            hits = [batch.base_offset + i for i, t in enumerate(batch.timestamps) if t >= timestamp_ms]
            if hits:
                expected = hits[0]
                break
        assert self.log.offset_for_timestamp(timestamp_ms) == expected

    # ---- invariants --------------------------------------------------

    @invariant()
    def offsets_match_the_model(self):
        log = self.log
        assert (log.log_start_offset, log.log_end_offset, log.high_watermark) == (
            self.log_start, self.log_end, self.high_watermark)
        assert log.log_start_offset <= log.high_watermark <= log.log_end_offset

    @invariant()
    def every_readable_byte_matches_the_model(self):
        readable = b"".join(b.stored for b in self.batches if b.last_offset < self.high_watermark)
        got = bytearray()
        offset = self.log_start
        while offset < self.high_watermark:
            chunk = self.log.read(offset, 2000)
            assert chunk.size_bytes, f"empty read at {offset} below high watermark {self.high_watermark}"
            got += chunk.buffer
            assert chunk.next_offset == [h.last_offset for h, _ in iter_batches(chunk.buffer)][-1] + 1
            offset = chunk.next_offset
        assert bytes(got) == readable


PartitionLogMachine.TestCase.settings = settings(max_examples=int(os.environ.get("RAFTKA_MODEL_EXAMPLES", "300")), stateful_step_count=50, deadline=None)
test_partition_log_matches_model = PartitionLogMachine.TestCase
