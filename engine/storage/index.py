"""The LMDB environment of a data directory: topics, sparse indexes, partition state.

One environment per data directory (`<data>/index.lmdb`), shared by every
partition log. Segment files are the source of truth for records; everything
here except the topic registry can be rebuilt from them, which is why index
writes may lag the log and are committed in groups (see PartitionLog).

Databases and their encodings (integers big-endian so keys sort numerically):
  meta        b"next_partition_id" -> u32
  topics      topic name (utf-8) -> JSON {"partitions": n, "ids": [storage_id...]}
  offsets     storage_id u32 | batch base offset i64 -> segment byte position i64
              sparse: one entry per index_interval_bytes of log
  times       storage_id u32 | max timestamp so far i64 -> batch base offset i64
              sparse, only where the running maximum grew
  state       storage_id u32 -> high watermark i64 | applied raft index i64 | recovery point i64
              | log start offset i64 (older records lack the last two or the last one: read as 0)
  group_offsets  group | topic (each u16 length + utf-8) | partition i32 -> a
              committed offset (Kafka's offset value bytes, engine/groups/offsets_topic.py)
  groups      group (utf-8) -> group metadata (Kafka's group value bytes)
  meta        b"groups_materialised/" storage_id u32 -> the next __consumer_offsets
              offset of that partition not yet applied to the two above
"""
from __future__ import annotations

import json
import logging
import struct
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, TypeVar

import lmdb

from raftka.errors import StorageError

log = logging.getLogger(__name__)

_STORAGE_ID = struct.Struct(">I")
_KEY = struct.Struct(">Iq")
_I64 = struct.Struct(">q")
_I32 = struct.Struct(">i")
_STATE = struct.Struct(">qqqq")
_STATE_V2 = struct.Struct(">qqq")  # before the log start offset (read as 0: the first segment's base)
_STATE_V1 = struct.Struct(">qq")   # before the recovery point (read as recovery point 0: rescan all)
_U16 = struct.Struct(">H")
_MATERIALISED = b"groups_materialised/"

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class TopicRecord:
    """A topic as the registry knows it: its partitions' storage ids in order."""

    name: str
    partition_ids: tuple[int, ...]
    topic_id: bytes = b""   # the cluster's id of this topic incarnation (empty when embedded)

    @property
    def partitions(self) -> int:
        return len(self.partition_ids)


UNKNOWN_APPLIED_INDEX = -1


@dataclass(frozen=True, slots=True)
class PartitionState:
    """What a partition checkpoints besides its segments.

    `recovery_point`: segment bytes below this offset were fsynced (or the
    log was closed cleanly); recovery rescans everything from it, sealed
    segments included. `applied_index` is the Raft index the high watermark
    was reached at, UNKNOWN_APPLIED_INDEX when recovery cut data below the
    recorded high watermark (the replica then falls back to its checkpoint).
    `log_start_offset`: the first offset readers may see, at or above the
    first segment's base (DeleteRecords moves it inside a segment)."""

    high_watermark: int = 0
    applied_index: int = 0
    recovery_point: int = 0
    log_start_offset: int = 0


class IndexStore:
    """Typed access to the data directory's LMDB environment.

    Group commits of index entries and partition state may run in the
    background (`commit(..., wait=False)`): each LMDB commit fdatasyncs, and
    on ext4 (data=ordered) that fdatasync also waits for the writeback of
    every file appended to since the last one, which on a busy broker takes
    tens to hundreds of milliseconds. Run on the event loop, that stalled
    every produce in flight once a second. One writer thread commits them in
    order; every other write, `sync`, `close` and the reads recovery relies
    on first wait for the commits handed to it (`_drain`), so writes keep
    their order. The hot-path reads (offset_floor, time_floor) do not wait:
    an entry still in flight is a hint not yet visible, and a read then
    starts from an older entry and walks further, as after a crash.
    """

    def __init__(self, path: Path, map_size_bytes: int) -> None:
        # sync without metasync: each commit fdatasyncs its data pages, so a
        # power loss can at worst undo the last commit, never corrupt the
        # environment (MDB_NOMETASYNC). Commits are grouped, so this is rare.
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._env = lmdb.open(str(path), map_size=map_size_bytes, max_dbs=8,
                                  subdir=True, metasync=False, sync=True,
                                  readahead=False, lock=True)
        except (lmdb.Error, OSError) as exc:
            raise StorageError(f"cannot open the LMDB index at {path}: {exc}") from exc
        self._meta = self._env.open_db(b"meta")
        self._topics = self._env.open_db(b"topics")
        self._offsets = self._env.open_db(b"offsets")
        self._times = self._env.open_db(b"times")
        self._state = self._env.open_db(b"state")
        self._group_offsets = self._env.open_db(b"group_offsets")
        self._groups = self._env.open_db(b"groups")
        self._committer: ThreadPoolExecutor | None = None   # started by the first background commit
        self._last_commit: Future | None = None              # the newest background commit
        self._deferred: list[Callable[[lmdb.Transaction], None]] = []   # bodies that found the map full
        self._deferred_lock = threading.Lock()

    # ---- transactions -------------------------------------------------

    def _write(self, body: Callable[[lmdb.Transaction], T]) -> T:
        """Run `body` in one write transaction, growing the map once if it is full,
        after every background commit handed over before it."""
        self._drain()
        for attempt in range(2):
            try:
                with self._env.begin(write=True) as txn:
                    return body(txn)
            except lmdb.MapFullError:
                if attempt:
                    raise
                self._env.set_mapsize(self._env.info()["map_size"] * 2)
            except lmdb.Error as exc:
                raise StorageError(f"LMDB write failed: {exc}") from exc
        raise AssertionError("unreachable")

    def _drain(self) -> None:
        """Wait for the background commits handed over so far; run on this
        thread any that found the map full (resizing needs no other
        transaction in flight, which only this thread can promise)."""
        last, self._last_commit = self._last_commit, None
        if last is not None:
            last.result()
        with self._deferred_lock:
            deferred, self._deferred = self._deferred, []
        for body in deferred:
            self._commit_now(body)

    def _commit_now(self, body: Callable[[lmdb.Transaction], None]) -> None:
        try:
            self._write(body)
        except StorageError as exc:
            log.warning("index commit skipped: %s", exc)

    def _commit_in_background(self, body: Callable[[lmdb.Transaction], None]) -> None:
        try:
            with self._env.begin(write=True) as txn:
                body(txn)
        except lmdb.MapFullError:
            with self._deferred_lock:
                self._deferred.append(body)
        except lmdb.Error as exc:
            log.warning("index commit skipped: LMDB write failed: %s", exc)

    def sync(self) -> None:
        """Force LMDB's data and meta pages to disk."""
        self._drain()
        self._env.sync(True)

    def close(self) -> None:
        self._drain()
        if self._committer is not None:
            self._committer.shutdown(wait=True)
            self._committer = None
        self._env.close()

    # ---- topic registry -----------------------------------------------

    def topics(self) -> list[TopicRecord]:
        with self._env.begin(db=self._topics) as txn:
            return [_decode_topic(k, v) for k, v in txn.cursor()]

    def create_topic(self, name: str, partitions: int, topic_id: bytes = b"") -> TopicRecord:
        return self._put_topic(TopicRecord(name, (), topic_id), partitions)

    def add_partitions(self, record: TopicRecord, count: int) -> TopicRecord:
        """The topic with `count` more partitions (new storage ids)."""
        return self._put_topic(record, count)

    def _put_topic(self, record: TopicRecord, new_partitions: int) -> TopicRecord:
        def body(txn: lmdb.Transaction) -> TopicRecord:
            raw = txn.get(b"next_partition_id", db=self._meta)
            first = _STORAGE_ID.unpack(raw)[0] if raw else 0
            txn.put(b"next_partition_id", _STORAGE_ID.pack(first + new_partitions), db=self._meta)
            updated = TopicRecord(record.name, record.partition_ids + tuple(range(first, first + new_partitions)),
                                  record.topic_id)
            txn.put(record.name.encode(), json.dumps({"ids": list(updated.partition_ids),
                                                      "topic_id": updated.topic_id.hex()}).encode(),
                    db=self._topics)
            return updated
        updated = self._write(body)
        self.sync()
        return updated

    def delete_topic(self, record: TopicRecord) -> None:
        def body(txn: lmdb.Transaction) -> None:
            txn.delete(record.name.encode(), db=self._topics)
            for storage_id in record.partition_ids:
                txn.delete(_STORAGE_ID.pack(storage_id), db=self._state)
                _delete_prefix(txn.cursor(self._offsets), storage_id)
                _delete_prefix(txn.cursor(self._times), storage_id)
        self._write(body)
        self.sync()

    # ---- sparse indexes -----------------------------------------------

    def commit(self, offsets: Iterable[tuple[int, int, int]], times: Iterable[tuple[int, int, int]],
               states: Iterable[tuple[int, PartitionState]], wait: bool = True) -> None:
        """Write (storage_id, offset, position), (storage_id, ts, offset) entries and states in one txn.

        Index entries are hints (segments are the truth, recovery rebuilds
        them), so a failed commit (disk full) is logged, not raised: lookups
        then start from an older entry and walk further. With `wait` False
        the commit runs on the writer thread (see the class docstring) and
        this returns at once; the state it carries may then lag a crash by
        that commit, which recovery handles like any uncommitted state.
        """
        offset_items = [(_KEY.pack(storage_id, off), _I64.pack(pos)) for storage_id, off, pos in offsets]
        time_items = [(_KEY.pack(storage_id, ts), _I64.pack(off)) for storage_id, ts, off in times]
        state_items = [(_STORAGE_ID.pack(storage_id), _STATE.pack(s.high_watermark, s.applied_index, s.recovery_point,
                                                                  s.log_start_offset))
                       for storage_id, s in states]
        if not (offset_items or time_items or state_items):
            return

        def body(txn: lmdb.Transaction) -> None:
            txn.cursor(self._offsets).putmulti(offset_items)
            txn.cursor(self._times).putmulti(time_items)
            txn.cursor(self._state).putmulti(state_items)
        if wait:
            self._commit_now(body)
            return
        if self._committer is None:
            self._committer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lmdb-commit")
        self._last_commit = self._committer.submit(self._commit_in_background, body)

    def offset_floor(self, storage_id: int, offset: int) -> tuple[int, int] | None:
        """(base offset, position) of the last entry with base offset <= `offset`."""
        with self._env.begin(db=self._offsets) as txn:
            return _floor(txn.cursor(), storage_id, offset)

    def offset_entries_before(self, storage_id: int, offset: int, limit: int) -> list[tuple[int, int]]:
        """Up to `limit` entries below `offset`, newest first: recovery's candidates."""
        self._drain()
        out: list[tuple[int, int]] = []
        with self._env.begin(db=self._offsets) as txn:
            cursor = txn.cursor()
            found = cursor.set_range(_KEY.pack(storage_id, offset))
            positioned = cursor.prev() if found else cursor.last()   # last() again would repeat it
            while positioned and len(out) < limit:
                entry_storage_id, entry_offset = _KEY.unpack(cursor.key())
                if entry_storage_id != storage_id:
                    break
                out.append((entry_offset, _I64.unpack(cursor.value())[0]))
                positioned = cursor.prev()
        return out

    def time_floor(self, storage_id: int, timestamp: int) -> tuple[int, int] | None:
        """(max timestamp so far, base offset) of the last entry with ts < `timestamp`."""
        with self._env.begin(db=self._times) as txn:
            return _floor(txn.cursor(), storage_id, timestamp - 1)

    def last_time_entry(self, storage_id: int) -> tuple[int, int] | None:
        self._drain()
        return self.time_floor(storage_id, 2**63 - 1)

    def delete_offsets(self, storage_id: int, *, below: int | None = None, from_offset: int | None = None) -> None:
        """Drop offset-index entries with base < below, or base >= from_offset."""
        self._delete(self._offsets, storage_id, below, from_offset, lambda k, v: _KEY.unpack(k)[1])

    def replace_offsets(self, storage_id: int, start: int, end: int, entries: Iterable[tuple[int, int]]) -> None:
        """Replace the offset-index entries with base in [start, end) by
        `entries` (offset, position), in one transaction: the cleaner
        rewrote the segment holding them."""
        items = [(_KEY.pack(storage_id, offset), _I64.pack(position)) for offset, position in entries]

        def body(txn: lmdb.Transaction) -> None:
            cursor = txn.cursor(self._offsets)
            if cursor.set_range(_KEY.pack(storage_id, start)):
                while cursor.key()[:4] == _STORAGE_ID.pack(storage_id) and _KEY.unpack(cursor.key())[1] < end:
                    if not cursor.delete():
                        break
            cursor.putmulti(items)
        self._write(body)

    def delete_times(self, storage_id: int, *, below: int | None = None, from_offset: int | None = None) -> None:
        """Drop time-index entries whose batch offset is < below, or >= from_offset."""
        self._delete(self._times, storage_id, below, from_offset, lambda k, v: _I64.unpack(v)[0])

    def _delete(self, db: object, storage_id: int, below: int | None, from_offset: int | None,
                offset_of: Callable[[bytes, bytes], int]) -> None:
        # Both indexes grow with the offset, so what goes is a prefix or a suffix.
        def body(txn: lmdb.Transaction) -> None:
            if below is not None:
                _delete_prefix(txn.cursor(db), storage_id, lambda k, v: offset_of(k, v) < below)
            if from_offset is not None:
                _delete_suffix(txn.cursor(db), storage_id, lambda k, v: offset_of(k, v) >= from_offset)
        self._write(body)

    # ---- partition state ----------------------------------------------

    def load_state(self, storage_id: int) -> PartitionState:
        self._drain()
        with self._env.begin(db=self._state) as txn:
            raw = txn.get(_STORAGE_ID.pack(storage_id))
        if not raw:
            return PartitionState()
        layout = next(layout for layout in (_STATE, _STATE_V2, _STATE_V1) if layout.size == len(raw))
        return PartitionState(*layout.unpack(raw))

    # ---- consumer groups (materialised from __consumer_offsets) ------------

    def group_materialised_offset(self, storage_id: int) -> int:
        """The next offset of __consumer_offsets partition `storage_id` to materialise."""
        with self._env.begin(db=self._meta) as txn:
            raw = txn.get(_MATERIALISED + _STORAGE_ID.pack(storage_id))
        return _I64.unpack(raw)[0] if raw else 0

    def apply_group_changes(self, storage_id: int, changes: Iterable[GroupChange], next_offset: int) -> None:
        """Apply upserts and deletions (value None) of committed offsets
        ((group, topic, partition) keys) and group metadata (group keys), and
        record `next_offset` as materialised, in one transaction."""
        def body(txn: lmdb.Transaction) -> None:
            for key, value in changes:
                if isinstance(key, tuple):
                    db, raw_key = self._group_offsets, _offset_key(*key)
                else:
                    db, raw_key = self._groups, key.encode()
                if value is None:
                    txn.delete(raw_key, db=db)
                    if not isinstance(key, tuple):   # a deleted group loses its offsets too
                        _delete_group_offsets(txn.cursor(self._group_offsets), key)
                else:
                    txn.put(raw_key, value, db=db)
            txn.put(_MATERIALISED + _STORAGE_ID.pack(storage_id), _I64.pack(next_offset), db=self._meta)
        self._write(body)

    def group_value(self, group: str) -> bytes | None:
        with self._env.begin(db=self._groups) as txn:
            return txn.get(group.encode())

    def group_offsets(self, group: str) -> list[tuple[str, int, bytes]]:
        """(topic, partition, offset value) of every offset the group committed."""
        prefix = _group_prefix(group)
        found = []
        with self._env.begin(db=self._group_offsets) as txn:
            cursor = txn.cursor()
            if cursor.set_range(prefix):
                for key, value in cursor:
                    if not key.startswith(prefix):
                        break
                    (size,) = _U16.unpack_from(key, len(prefix))
                    start = len(prefix) + 2
                    topic = key[start:start + size].decode()
                    (partition,) = _I32.unpack_from(key, start + size)
                    found.append((topic, partition, value))
        return found

    def group_names(self) -> set[str]:
        """Every group with metadata or committed offsets."""
        with self._env.begin() as txn:
            names = {key.decode() for key in txn.cursor(self._groups).iternext(values=False)}
            for key in txn.cursor(self._group_offsets).iternext(values=False):
                (size,) = _U16.unpack_from(key)
                names.add(key[2:2 + size].decode())
        return names


# a committed offset ((group, topic, partition) key) or group metadata (group key); None deletes it
GroupChange = tuple[tuple[str, str, int] | str, bytes | None]


def _group_prefix(group: str) -> bytes:
    raw = group.encode()
    return _U16.pack(len(raw)) + raw


def _offset_key(group: str, topic: str, partition: int) -> bytes:
    return _group_prefix(group) + _group_prefix(topic) + _I32.pack(partition)


def _delete_group_offsets(cursor: lmdb.Cursor, group: str) -> None:
    prefix = _group_prefix(group)
    if not cursor.set_range(prefix):
        return
    while cursor.key().startswith(prefix):
        if not cursor.delete():
            return


def _decode_topic(key: bytes, value: bytes) -> TopicRecord:
    fields = json.loads(value)
    return TopicRecord(key.decode(), tuple(fields["ids"]), bytes.fromhex(fields.get("topic_id", "")))


def _floor(cursor: lmdb.Cursor, storage_id: int, key: int) -> tuple[int, int] | None:
    """The last (key, value) of partition storage_id with key <= `key`.

    Keys are non-negative (offsets, timestamps >= 0), and a negative one
    would sort after them all as big-endian bytes, so it has no floor.
    """
    if key < 0:
        return None
    target = _KEY.pack(storage_id, key)
    if cursor.set_range(target):
        if cursor.key() == target:
            return key, _I64.unpack(cursor.value())[0]
        if not cursor.prev():
            return None
    elif not cursor.last():
        return None
    entry_storage_id, entry_key = _KEY.unpack(cursor.key())
    if entry_storage_id != storage_id:
        return None
    return entry_key, _I64.unpack(cursor.value())[0]


def _delete_prefix(cursor: lmdb.Cursor, storage_id: int,
                   doomed: Callable[[bytes, bytes], bool] = lambda k, v: True) -> None:
    """Delete storage_id's entries from the first one on, while `doomed` holds."""
    prefix = _STORAGE_ID.pack(storage_id)
    if not cursor.set_range(prefix):
        return
    while cursor.key()[:4] == prefix and doomed(cursor.key(), cursor.value()):
        if not cursor.delete():
            return


def _delete_suffix(cursor: lmdb.Cursor, storage_id: int, doomed: Callable[[bytes, bytes], bool]) -> None:
    """Delete storage_id's entries from the last one back, while `doomed` holds."""
    prefix = _STORAGE_ID.pack(storage_id)
    if cursor.set_range(_STORAGE_ID.pack(storage_id + 1)):
        positioned = cursor.prev()
    else:
        positioned = cursor.last()
    keys = []
    while positioned and cursor.key()[:4] == prefix and doomed(cursor.key(), cursor.value()):
        keys.append(cursor.key())
        positioned = cursor.prev()
    for key in keys:
        if cursor.set_key(key):
            cursor.delete()
