"""__consumer_offsets records in Kafka's format, and their materialisation
into LMDB from a real partition log: only below the high watermark, resumed
where it stopped after a reopen, tombstones deleting."""
from __future__ import annotations

import pytest
from hypothesis import given, strategies as st

from raftka.config import Config
from raftka.groups import offsets_topic
from raftka.groups.offsets_topic import (CommittedOffset, GroupKey, GroupRecord, MemberRecord, OffsetKey,
                                         RecordFormatError, partition_for_group)
from raftka.groups.store import GroupStore, group_record, offset_records
from raftka.records.batch import build_batch
from raftka.storage.index import IndexStore
from raftka.storage.partition_log import PartitionLog

names = st.text(min_size=1, max_size=40)
nullable_names = st.none() | names
member = st.builds(MemberRecord, names, nullable_names, st.text(max_size=20), st.text(max_size=20),
                   st.integers(0, 2**31 - 1), st.integers(0, 2**31 - 1), st.binary(max_size=64), st.binary(max_size=64))


@given(names, names, st.integers(0, 2**31 - 1), st.integers(-1, 2**62), st.text(max_size=100))
def test_offset_keys_and_values_round_trip(group, topic, partition, offset, metadata):
    key = OffsetKey(group, topic, partition)
    assert offsets_topic.decode_key(offsets_topic.encode_key(key)) == key
    value = CommittedOffset(offset, 7, metadata, 1_700_000_000_123)
    assert offsets_topic.decode_offset(offsets_topic.encode_offset(value)) == value


@given(names, st.builds(GroupRecord, st.text(max_size=20), st.integers(0, 2**31 - 1), nullable_names, nullable_names,
                        st.integers(0, 2**62), st.lists(member, max_size=4).map(tuple)))
def test_group_keys_and_values_round_trip(group, value):
    assert offsets_topic.decode_key(offsets_topic.encode_key(GroupKey(group))) == GroupKey(group)
    assert offsets_topic.decode_group(offsets_topic.encode_group(value)) == value


def test_kafkas_byte_layout_for_an_offset_commit():
    key = offsets_topic.encode_key(OffsetKey("g", "t", 3))
    assert key == b"\x00\x01" + b"\x00\x01g" + b"\x00\x01t" + b"\x00\x00\x00\x03"
    value = offsets_topic.encode_offset(CommittedOffset(42, -1, "", 5))
    assert value == b"\x00\x03" + (42).to_bytes(8, "big") + b"\xff\xff\xff\xff" + b"\x00\x00" + (5).to_bytes(8, "big")


@pytest.mark.parametrize("data", [b"", b"\x00", b"\x00\x09abc", b"\x00\x02\x00\x05ab", b"\x00\x02\x00\x01gX"])
def test_malformed_keys_are_refused(data):
    with pytest.raises(RecordFormatError):
        offsets_topic.decode_key(data)


def test_groups_map_to_partitions_by_their_java_hash_masked_to_31_bits():
    # Java: "hello".hashCode() == 99162322, "".hashCode() == 0, "polygenelubricants".hashCode() == Integer.MIN_VALUE
    assert offsets_topic.java_string_hash("hello") == 99162322
    assert offsets_topic.java_string_hash("") == 0
    assert offsets_topic.java_string_hash("polygenelubricants") == -2**31
    assert partition_for_group("hello", 50) == 99162322 % 50               # Kafka's partition too
    assert partition_for_group("polygenelubricants", 50) == 0
    # a negative hash: masked, not Kafka's abs (-109829509 -> 9); existing groups' records depend on it
    assert offsets_topic.java_string_hash("billing") == -109829509
    assert partition_for_group("billing", 50) == (-109829509 & 0x7FFFFFFF) % 50 == 39


@pytest.fixture
def offsets_log(tmp_path):
    config = Config(data_dir=tmp_path)
    index = IndexStore(tmp_path / "index.lmdb", config.lmdb_map_size_bytes)
    log = PartitionLog("__consumer_offsets-0", tmp_path / "p0", 0, index, config)
    yield log, index
    log.close()
    index.close()


def append_committed(log: PartitionLog, batch: bytes, commit: bool = True) -> None:
    log.append(batch)
    if commit:
        log.set_high_watermark(log.log_end_offset)


def test_materialising_applies_commits_below_the_high_watermark_only_and_resumes_after_reopen(tmp_path):
    config = Config(data_dir=tmp_path)
    index = IndexStore(tmp_path / "index.lmdb", config.lmdb_map_size_bytes)
    log = PartitionLog("__consumer_offsets-0", tmp_path / "p0", 0, index, config)
    store = GroupStore(index)
    append_committed(log, build_batch(offset_records("g", {("t", 0): CommittedOffset(10), ("t", 1): CommittedOffset(20)})))
    append_committed(log, build_batch(offset_records("g", {("t", 0): CommittedOffset(11)})))
    append_committed(log, build_batch(offset_records("g", {("t", 0): CommittedOffset(99)})), commit=False)
    assert store.materialise(log) == 3
    assert {tp: o.offset for tp, o in store.committed("g").items()} == {("t", 0): 11, ("t", 1): 20}
    assert store.materialise(log) == 0                 # nothing new below the high watermark

    log.set_high_watermark(log.log_end_offset)         # the pending commit (99) commits
    log.close()
    index.close()
    index = IndexStore(tmp_path / "index.lmdb", config.lmdb_map_size_bytes)
    log = PartitionLog("__consumer_offsets-0", tmp_path / "p0", 0, index, config)
    store = GroupStore(index)
    record = GroupRecord("consumer", 4, "range", "m1", 0, (MemberRecord("m1", None, "c", "/h", 1, 2, b"s", b"a"),))
    append_committed(log, build_batch([group_record("g", record)]))
    assert store.materialise(log) == 2                 # from where it stopped: the 99 and the group
    assert store.committed("g")[("t", 0)].offset == 99
    assert store.group("g") == record
    assert store.group_names() == {"g"}
    log.close()
    index.close()


def test_tombstones_delete_offsets_and_whole_groups(offsets_log):
    log, index = offsets_log
    store = GroupStore(index)
    offsets = {("t", p): CommittedOffset(p * 10) for p in range(3)}
    append_committed(log, build_batch([*offset_records("g", offsets), *offset_records("h", offsets),
                                       group_record("g", GroupRecord("consumer", 1, None, None, 0))]))
    append_committed(log, build_batch(offset_records("g", {("t", 1): None})))
    store.materialise(log)
    assert sorted(store.committed("g")) == [("t", 0), ("t", 2)]
    append_committed(log, build_batch([group_record("g", None)]))
    store.materialise(log)
    assert store.committed("g") == {} and store.group("g") is None
    assert len(store.committed("h")) == 3               # another group keeps its offsets
    assert store.group_names() == {"h"}


def test_a_record_whose_value_does_not_decode_is_skipped_and_breaks_no_group(offsets_log):
    from raftka.records.batch import Record
    log, index = offsets_log
    store = GroupStore(index)
    good = {("t", 0): CommittedOffset(5)}
    bad_offset = Record(b"\x00\x03garbage", key=offsets_topic.encode_key(OffsetKey("bad", "t", 0)))
    bad_group = Record(b"\x00\x03\xff", key=offsets_topic.encode_key(GroupKey("bad")))
    append_committed(log, build_batch([*offset_records("g", good), bad_offset, bad_group,
                                       group_record("h", GroupRecord("consumer", 1, None, None, 0))]))
    assert store.materialise(log) == 2
    assert store.committed("g")[("t", 0)].offset == 5
    assert store.committed("bad") == {} and store.group("bad") is None
    assert store.group_names() == {"g", "h"}
