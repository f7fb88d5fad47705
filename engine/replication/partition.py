"""PartitionReplica: one replica of a partition's Raft group, a raft.RaftGroup
whose replicated command is "append these record batches" to a PartitionLog.
The Kafka-specific half of replication (idempotent producer state, catch-up
by fetching segment ranges); raft/ is the generic multi-Raft library under it.

- Commands travel over the broker's shared PeerNetwork through GroupTransport,
  never pysyncobj's pickling TCP transport. A command is raw bytes,
  `0x10 | leader epoch (i32) | record batches`, not a pickled method call, so
  applying it copies nothing and unpickles nothing.
- Appends proposed during one event-loop iteration (the produce requests read
  together) become one entry, `0x11 | leader epoch (i32) | part count (u32) |
  part sizes (u32 each) | parts`, each part applied as its own append with
  its own outcome: the Raft cost (journal write, one message per follower,
  acknowledgement, commit) is paid per iteration, not per request.
- Apply is deterministic: the batches get base offset = log end offset and the
  leader epoch the leader stamped into the command, so every replica writes
  the same bytes. Batches every replica rejects (corrupt) are rejected by all
  alike, and the proposer gets the error. High watermark = end of the last
  applied command.
- Apply is idempotent across restarts: the partition state stores the high
  watermark together with the Raft index it was reached at. On start the log
  is cut back to that high watermark (anything later was never recorded as
  applied), and entries the journal replays at or below that index are
  skipped; the rest are applied again.
- The Raft log is a DiskJournal (raft/journal.py): on disk, durable term and vote.
- Compaction writes a small checkpoint (raft/checkpoint.py) instead of pickling the
  object: the Raft index, the log end offset at that index, and the two
  boundary entries pysyncobj keeps. A follower that receives a checkpoint
  beyond its own log fetches the missing offset range from the leader
  (catch-up, below), applying later commands only once it has it.
"""
from __future__ import annotations

import asyncio
import logging
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from raftka.errors import (CorruptRecordError, InvalidProducerEpochError, NotLeaderOrFollowerError,
                           OutOfOrderSequenceError, RecordTooLargeError, ReplicationTimeoutError,
                           UnknownTopicOrPartitionError)
from raftka.records import layout
from raftka.records.batch import read_header
from raftka.storage.producer_state import REBUILD_SEGMENTS, ProducerState
from raftka.storage.partition_log import PartitionLog
from raftka.raft import checkpoint
from raftka.raft.group import (MAX_COMMAND_BYTES, GroupRemovedError, NotLeaderError, PeerNode, RaftGroup,
                               ReplicationError, settle_future)
from raftka.raft.pysyncobj_adapter import monotonic_time

log = logging.getLogger(__name__)

AppendCallback = Callable[[int | None, Exception | None], None]

APPEND_COMMAND = 0x10                  # after pysyncobj's own command types 0..3
APPEND_HEADER = struct.Struct(">Bi")   # command type, leader epoch
MULTI_APPEND_COMMAND = 0x11            # several appends (produce requests) in one entry
MULTI_APPEND_HEADER = struct.Struct(">BiI")   # command type, leader epoch, part count
PART_SIZE = struct.Struct(">I")
CATCH_UP_CHUNK_BYTES = 4 * 1024 * 1024
CATCH_UP_RETRY_S = 0.5


@dataclass
class CatchUp:
    """A follower fetching [its log end offset, target_offset) from the leader."""

    target_offset: int
    applied_index: int
    retry_at: float = field(default=0.0)


class PartitionReplica(RaftGroup):
    """This broker's replica of one partition's Raft group."""

    COMMAND_TYPES = frozenset({APPEND_COMMAND, MULTI_APPEND_COMMAND})

    def __init__(self, group_id: int, partition_log: PartitionLog, self_id: int, replica_ids: list[int],
                 network: Any, group_dir: Path, journal_max_bytes: int = 128 * 1024 * 1024,
                 **raft_settings: Any) -> None:
        self._log = partition_log
        self._recorded_applied_index = partition_log.applied_index
        partition_log.truncate(partition_log.high_watermark)
        self._catch_up: CatchUp | None = None
        self._deferred: list[tuple[int, bytes]] = []    # (raft index, command) held during catch-up
        self._pending_appends: list[tuple[Any, asyncio.Future[Any]]] = []   # proposed at the next tick
        self.on_high_watermark: Callable[[], None] | None = None   # the broker wakes waiting fetches
        self.producers = ProducerState()
        self._rebuild_producer_state()
        super().__init__(group_id, self_id, replica_ids, network, group_dir, journal_max_bytes, **raft_settings)
        self.transport.on_extension_message = self._on_extension_message

    @property
    def log(self) -> PartitionLog:
        return self._log

    def _rebuild_producer_state(self) -> None:
        self.producers.rebuild([segment.view() for segment in self._log.segments[-REBUILD_SEGMENTS:]])

    @property
    def catching_up(self) -> bool:
        return self._catch_up is not None

    def next_tick_due(self) -> float:
        due = super().next_tick_due()
        if self._catch_up is not None:
            due = min(due, self._catch_up.retry_at)
        return due

    # ---- appends -------------------------------------------------------

    def propose_append(self, batches: bytes | bytearray | memoryview, callback: AppendCallback) -> None:
        """Replicate an append; `callback(base_offset, None)` once committed and
        applied here, or `callback(None, error)`. Leader only."""
        self._propose(self._append_command(batches), callback)

    async def replicate(self, batches: bytes | bytearray | memoryview, timeout_s: float) -> int:
        """Append through Raft and return the base offset once committed and
        applied here. The one place Raft's errors become Kafka's:
        NotLeaderOrFollowerError (with the leader known), ReplicationTimeoutError
        (not committed in `timeout_s`, or not at all), or the storage error
        every replica hit (a RaftkaError with its own code)."""
        try:
            return await asyncio.wait_for(self.append(batches), timeout_s)
        except NotLeaderError as error:
            raise NotLeaderOrFollowerError(str(error), error.leader_id) from None
        except GroupRemovedError as error:
            raise UnknownTopicOrPartitionError(f"{self._log.name}: deleted while the append was in flight "
                                               f"({error})") from None
        except ReplicationError as error:
            raise ReplicationTimeoutError(str(error)) from None
        except asyncio.TimeoutError:
            raise ReplicationTimeoutError(f"group {self.group_id}: append not committed in {timeout_s:g} s") from None

    def append(self, batches: bytes | bytearray | memoryview) -> "asyncio.Future[int]":
        """Replicate an append; the future resolves to its base offset once
        committed and applied here (or fails with ReplicationError or the
        storage error every replica hit). Leader only.

        Appends made before this group's next tick share one Raft entry."""
        self._check_append(batches)
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending_appends.append((batches, future))
        if len(self._pending_appends) == 1:
            if self.transport.on_activity is None:   # not ticked by a RaftNode: propose now
                self._flush_appends()
            else:
                self.transport.on_activity()   # ticks this group at the next loop iteration
        return future

    def take_out_of_service(self, error: Exception) -> None:
        self._fail_pending_appends(error)
        super().take_out_of_service(error)

    def destroy(self) -> None:
        """Stop this replica (its topic was deleted, or the broker stops): appends
        not yet proposed and those in flight fail at once (GroupRemovedError)."""
        self._fail_pending_appends(GroupRemovedError(self.group_id))
        super().destroy()

    def _fail_pending_appends(self, error: Exception) -> None:
        """Fail the appends waiting for this group's next tick to be proposed."""
        pending, self._pending_appends = self._pending_appends, []
        for _batches, future in pending:
            if not future.done():
                future.set_exception(error)

    def _flush_appends(self) -> None:
        """Propose every pending append, as few entries as the size limit allows."""
        if not self._pending_appends:
            return
        if not self.is_leader:
            self._fail_pending_appends(NotLeaderError(self.group_id, self.leader_id))
            return
        pending, self._pending_appends = self._pending_appends, []
        chunk: list[tuple[Any, asyncio.Future[Any]]] = []
        size = MULTI_APPEND_HEADER.size
        for batches, future in pending:
            part_size = PART_SIZE.size + len(batches)
            if chunk and size + part_size > MAX_COMMAND_BYTES:
                self._propose_parts(chunk)
                chunk, size = [], MULTI_APPEND_HEADER.size
            chunk.append((batches, future))
            size += part_size
        self._propose_parts(chunk)

    def _propose_parts(self, chunk: list[tuple[Any, "asyncio.Future[Any]"]]) -> None:
        if len(chunk) == 1:
            batches, future = chunk[0]
            self._propose(APPEND_HEADER.pack(APPEND_COMMAND, self.leader_epoch) + batches,
                          lambda result, error: settle_future(future, result, error), wake=False)
            return
        head = MULTI_APPEND_HEADER.pack(MULTI_APPEND_COMMAND, self.leader_epoch, len(chunk))
        sizes = struct.pack(f">{len(chunk)}I", *(len(batches) for batches, _ in chunk))
        command = b"".join([head, sizes, *(batches for batches, _ in chunk)])

        def done(results: Any, error: Exception | None) -> None:
            for position, (_batches, future) in enumerate(chunk):
                result = results[position] if isinstance(results, list) else results
                if error is None and isinstance(result, Exception):
                    settle_future(future, None, result)
                else:
                    settle_future(future, result, error)
        self._propose(command, done, wake=False)

    def _append_command(self, batches: bytes | bytearray | memoryview) -> bytes:
        self._check_append(batches)
        return APPEND_HEADER.pack(APPEND_COMMAND, self.leader_epoch) + batches

    def _check_append(self, batches: bytes | bytearray | memoryview) -> None:
        if self._out_of_service is not None:
            raise self._out_of_service
        if not self.is_leader:
            raise NotLeaderError(self.group_id, self.leader_id)
        if len(batches) + APPEND_HEADER.size > MAX_COMMAND_BYTES:
            raise RecordTooLargeError(f"append of {len(batches)} bytes exceeds the replicated "
                                      f"command limit of {MAX_COMMAND_BYTES - APPEND_HEADER.size}")

    def _apply_hook(self, command: bytes) -> Any:
        index = self._raft_last_applied() + 1  # pysyncobj bumps it after the apply returns
        if index <= self._recorded_applied_index:
            return None  # applied before a restart; the journal replays it
        if self._catch_up is not None:
            self._deferred.append((index, command))
            return None
        return self._apply_command(index, command)

    def _apply_command(self, index: int, command: bytes) -> int | Exception | list[int | Exception]:
        """Apply an append command (0x10: one outcome; 0x11: one per part)
        at Raft `index`, then move the high watermark once."""
        if command[:1] == b"\x10":
            _, leader_epoch = APPEND_HEADER.unpack_from(command)
            outcome: Any = self._apply_append(memoryview(command)[APPEND_HEADER.size:], leader_epoch)
        else:
            outcome = self._apply_parts(command)
        self._log.set_high_watermark(self._log.log_end_offset, applied_index=index)
        if self.on_high_watermark is not None:
            self.on_high_watermark()
        return outcome

    def _apply_parts(self, command: bytes) -> list[int | Exception] | Exception:
        """Each part of a 0x11 command appended in order, as separate commands would be."""
        _, leader_epoch, count = MULTI_APPEND_HEADER.unpack_from(command)
        position = MULTI_APPEND_HEADER.size + PART_SIZE.size * count
        if count == 0 or position > len(command):
            return CorruptRecordError(f"append command of {len(command)} bytes claims {count} parts", 0)
        sizes = struct.unpack_from(f">{count}I", command, MULTI_APPEND_HEADER.size)
        if position + sum(sizes) != len(command):
            return CorruptRecordError(f"append command parts sum to {sum(sizes)} of "
                                      f"{len(command) - position} bytes", position)
        view = memoryview(command)
        outcomes: list[int | Exception] = []
        for size in sizes:
            outcomes.append(self._apply_append(view[position:position + size], leader_epoch))
            position += size
        return outcomes

    def _apply_append(self, batches: memoryview, leader_epoch: int) -> int | Exception:
        """Append (or, for an idempotent producer's retry, answer the offset it
        already has); every replica decides alike from the same log."""
        outcome: int | Exception
        try:
            header = read_header(batches) if len(batches) >= layout.HEADER_SIZE else None
            duplicate = self.producers.check(header) if header is not None else None
            if duplicate is not None:
                outcome = duplicate
            else:
                outcome = self._log.append(batches, leader_epoch=leader_epoch).base_offset
                if header is not None:
                    self.producers.record(header, outcome)
        except (CorruptRecordError, RecordTooLargeError, OutOfOrderSequenceError, InvalidProducerEpochError) as error:
            outcome = error  # every replica rejects it alike; the index is applied all the same
        return outcome

    # ---- checkpoint and catch-up -------------------------------------------
    def _may_compact(self) -> bool:
        return self._catch_up is None  # the checkpoint must describe a log we hold


    def _write_checkpoint(self, path: str, raft_data: tuple) -> None:
        last_applied, previous, _cluster = raft_data
        assert last_applied[1] == self._raft_last_applied(), (last_applied[1], self._raft_last_applied())
        # the stored state (high watermark at applied index) must not lag the
        # checkpoint, or a restart would refetch what it already has
        self._log.flush_index()
        checkpoint.write(Path(path), checkpoint.Checkpoint(
            applied_index=last_applied[1], log_end_offset=self._log.log_end_offset,
            entries=(tuple(previous), tuple(last_applied))))

    def _read_checkpoint(self, path: str) -> tuple:
        point = checkpoint.read(Path(path))
        if self._log.high_watermark < point.log_end_offset and point.applied_index > self._recorded_applied_index:
            self._start_catch_up(point)
        previous, last_applied = point.entries
        cluster = {PeerNode(rid) for rid in self.replica_ids}
        return last_applied, previous, cluster

    def _start_catch_up(self, point: checkpoint.Checkpoint) -> None:
        log.info("group %d on %d: checkpoint at offset %d is past our high watermark %d; catching up",
                 self.group_id, self.self_id, point.log_end_offset, self._log.high_watermark)
        self._log.truncate(self._log.high_watermark)
        self._deferred.clear()
        self._catch_up = CatchUp(target_offset=point.log_end_offset, applied_index=point.applied_index)
        self._request_catch_up()

    def _request_catch_up(self) -> None:
        catch_up = self._catch_up
        assert catch_up is not None
        catch_up.retry_at = monotonic_time() + CATCH_UP_RETRY_S
        source = self.leader_id
        if source is None or source == self.self_id:
            return  # retried on a later tick, when a leader is known
        self.transport.send_to(source, {"type": "rk_fetch", "offset": self._log.log_end_offset,
                                        "end_offset": catch_up.target_offset, "max_bytes": CATCH_UP_CHUNK_BYTES})

    def _before_tick_hook(self) -> None:
        self._flush_appends()
        if self._catch_up is not None:
            # a replica missing committed data must not lead: push its election out
            now = monotonic_time()
            self._set_election_deadline(max(self._election_deadline(), now + self.conf.raftMinTimeout))
        super()._before_tick_hook()

    def _after_tick_hook(self) -> None:
        if self._catch_up is not None and monotonic_time() >= self._catch_up.retry_at:
            self._request_catch_up()

    def _on_extension_message(self, peer_id: int, message: dict) -> None:
        kind = message.get("type")
        if kind == "rk_fetch":
            self._serve_fetch(peer_id, message)
        elif kind == "rk_fetch_data" and self._catch_up is not None:
            self._receive_fetch(message)

    def _serve_fetch(self, peer_id: int, message: dict) -> None:
        offset, end, max_bytes = message.get("offset"), message.get("end_offset"), message.get("max_bytes")
        if not all(isinstance(v, int) for v in (offset, end, max_bytes)) or max_bytes <= 0:
            return
        log_ = self._log
        if not log_.log_start_offset <= offset < min(end, log_.high_watermark):
            reply = {"type": "rk_fetch_data", "offset": offset, "data": b"", "high_watermark": log_.high_watermark}
        else:
            piece = log_.read(offset, min(max_bytes, CATCH_UP_CHUNK_BYTES), end_offset=end)
            reply = {"type": "rk_fetch_data", "offset": offset, "data": bytes(piece.buffer),
                     "high_watermark": log_.high_watermark}
        self.transport.send_to(peer_id, reply)

    def _receive_fetch(self, message: dict) -> None:
        catch_up = self._catch_up
        assert catch_up is not None
        data, offset = message.get("data"), message.get("offset")
        if not isinstance(data, bytes) or offset != self._log.log_end_offset:
            return  # stale or foreign answer; the retry timer asks again
        if data:
            self._log.append(data, leader_epoch=-1)  # offsets and epochs exactly as the leader has them
            self._log.set_high_watermark(self._log.log_end_offset)
        if self._log.log_end_offset >= catch_up.target_offset:
            self._finish_catch_up()
        elif data:
            self._request_catch_up()

    def _finish_catch_up(self) -> None:
        catch_up = self._catch_up
        assert catch_up is not None
        if self._log.log_end_offset != catch_up.target_offset:
            raise AssertionError(f"group {self.group_id}: caught up to {self._log.log_end_offset}, "
                                 f"checkpoint says {catch_up.target_offset}")
        self._log.set_high_watermark(self._log.log_end_offset, applied_index=catch_up.applied_index)
        self._recorded_applied_index = catch_up.applied_index
        self._catch_up = None
        self._rebuild_producer_state()
        log.info("group %d on %d: caught up to offset %d", self.group_id, self.self_id, self._log.log_end_offset)
        deferred, self._deferred = self._deferred, []
        for index, command in deferred:
            if index > self._recorded_applied_index:
                self._apply_command(index, command)
