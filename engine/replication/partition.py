"""PartitionReplica: one replica of a partition's Raft group, a raft.RaftGroup
whose replicated command is "append these record batches" to a PartitionLog.
The Kafka-specific half of replication (idempotent producers, catch-up by
fetching segment ranges); raft/ is the generic multi-Raft library under it.

- One log: the Raft log of the partition is its segment files (LogJournal,
  log_journal.py). An entry's batches are written to the segments when the
  entry is added to the Raft log, with base offset = log end offset and
  partitionLeaderEpoch = the entry's term, the same bytes on every replica;
  truncating an uncommitted suffix truncates the segments; committing moves
  the high watermark (= the end of the last applied entry), and applying
  writes nothing. pysyncobj's no-op entries take no offset.
- Commands travel over the broker's shared PeerNetwork through GroupTransport,
  never pysyncobj's pickling TCP transport. A command is raw bytes,
  `0x10 | leader epoch (i32) | record batches`, not a pickled method call.
  Appends proposed during one event-loop iteration (the produce requests
  read together) become one entry, `0x11 | leader epoch (i32) | part count
  (u32) | part sizes (u32 each) | parts`, each part its own append with its
  own outcome: the Raft cost is paid per iteration, not per request.
- The leader decides, and the log carries the decision: a produce is checked
  before it is proposed (batches validated; an idempotent producer's
  sequence checked for every batch against ProducerState, so a retry is
  answered with the offset it already has and never proposed again). Every
  replica only writes what the leader proposed, so replicas cannot diverge
  on a decision. ProducerState follows the log on every replica (as entries
  are added; rebuilt from the log's tail on a truncation or a restart), so a
  new leader decides from the same log.
- Compaction writes a small checkpoint (raft/checkpoint.py): the Raft index,
  the log end offset at that index, and the two boundary entries as markers
  of where their data lies. A follower that receives a checkpoint beyond its
  own log fetches the missing offset range from the leader (catch-up),
  refusing new entries until it has it; a follower whose log ends below the
  leader's log start (retention ran while it was away) restarts its log at
  the leader's log start.
"""
from __future__ import annotations

import asyncio
import logging
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from raftka.errors import (CorruptRecordError, InvalidProducerEpochError, NotLeaderOrFollowerError,
                           OffsetOutOfRangeError, OutOfOrderSequenceError, RecordTooLargeError,
                           ReplicationTimeoutError, UnknownTopicOrPartitionError)
from raftka.records.batch import iter_batches, read_header
from raftka.storage.producer_state import NO_PRODUCER_ID, PENDING_OFFSET, ProducerState
from raftka.storage.partition_log import PartitionLog
from raftka.raft import checkpoint
from raftka.raft.group import (MAX_COMMAND_BYTES, FailReason, GroupRemovedError, NotLeaderError, PeerNode, RaftGroup,
                               ReplicationError, settle_future)
from raftka.raft.pysyncobj_adapter import monotonic_time
from raftka.replication.log_journal import (APPEND_COMMAND, APPEND_HEADER, CLEAN_COMMAND, LOG_START_COMMAND,
                                            MULTI_APPEND_COMMAND, MULTI_APPEND_HEADER, NO_CONTROL, PART_SIZE,
                                            LogJournal, LogJournalPath, clean_command, log_start_command, marker)
from raftka.storage.cleaner import CleanPlan

log = logging.getLogger(__name__)

AppendCallback = Callable[[int | None, Exception | None], None]

CATCH_UP_CHUNK_BYTES = 4 * 1024 * 1024
CATCH_UP_RETRY_S = 0.5


@dataclass
class CatchUp:
    """A follower fetching [its log end offset, target_offset) from the leader."""

    target_offset: int
    retry_at: float = field(default=0.0)


@dataclass(frozen=True)
class ParkedRetry:
    """An idempotent producer's retry of a batch whose original sits in the log
    at `offset`, uncommitted: answered with that offset once it commits, if the
    batch there is still the original (a leader change may have truncated it
    and put another batch at that offset)."""

    offset: int
    producer_id: int
    producer_epoch: int
    base_sequence: int
    future: "asyncio.Future[Any]"


class PartitionReplica(RaftGroup):
    """This broker's replica of one partition's Raft group."""

    COMMAND_TYPES = frozenset({APPEND_COMMAND, MULTI_APPEND_COMMAND, LOG_START_COMMAND, CLEAN_COMMAND})
    COMMIT_NOTICE_DELAY_S = 0.01   # the leader answers produce requests; followers only trail (RaftGroup)

    def __init__(self, group_id: int, partition_log: PartitionLog, self_id: int, replica_ids: list[int],
                 network: Any, group_dir: Path, journal_max_bytes: int = 128 * 1024 * 1024,
                 **raft_settings: Any) -> None:
        self._log = partition_log
        partition_log.journaled = True       # the Raft log's group commits sync it
        partition_log.recovered_short = False  # the entries file, not the applied index, says what it holds
        partition_log.on_retention = self._propose_log_start   # retention is the leader's decision, replicated
        partition_log.on_compaction = self._propose_clean      # so is what the log cleaner removes
        partition_log.may_install_clean = self._may_install_clean
        self._log_start_proposed = -1
        self._clean_proposed = -1
        self._clean_due: CleanPlan | None = None   # a committed clean plan not started yet
        self._producer_state_stale = False   # rebuilt from the log before the leader decides again
        self._log_start_due: int | None = None   # a committed log start not carried out yet
        self._catch_up: CatchUp | None = None
        self._pending_appends: list[tuple[Any, asyncio.Future[Any]]] = []   # proposed at the next tick
        self._duplicates: list[ParkedRetry] = []   # retries whose original is in the log, not yet committed
        self.on_high_watermark: Callable[[], None] | None = None   # the broker wakes waiting fetches
        self.producers = ProducerState(partition_log.config.producer_id_expiration_ms,
                                       lambda: partition_log.log_start_offset)
        super().__init__(group_id, self_id, replica_ids, network, group_dir, journal_max_bytes, **raft_settings)
        journal = self.journal
        journal.on_added = self._record_producers
        journal.on_truncated = self._on_log_truncated
        self._rebuild_producer_state()
        self.transport.on_extension_message = self._on_extension_message

    def _journal_path(self, directory: Path, **options: Any) -> str:
        return LogJournalPath(directory, self._log, **options)

    @property
    def log(self) -> PartitionLog:
        return self._log

    def _propose_log_start(self, offset: int) -> None:
        """Retention found segments below `offset` to delete: as leader, replicate
        that (every replica deletes when it commits); a follower waits for it."""
        if not self.is_leader or offset <= self._log_start_proposed:
            return
        self._log_start_proposed = offset

        def done(_result: Any, error: Exception | None) -> None:
            if error is not None:
                self._log_start_proposed = -1   # proposed again at the next retention run
        self._propose(log_start_command(offset), done)

    def _propose_clean(self, plan: CleanPlan) -> bool:
        """The log cleaner's plan: as leader, replicate it (every replica
        cleans when it commits, with the leader's end offset and tombstone
        end) and return True; a follower waits for its leader's."""
        if not self.is_leader:
            return False
        if plan.end_offset <= self._clean_proposed:
            return True
        self._clean_proposed = plan.end_offset

        def done(_result: Any, error: Exception | None) -> None:
            if error is not None:
                self._clean_proposed = -1   # proposed again at the next cleaner run
        self._propose(clean_command(plan.end_offset, plan.tombstone_end_offset), done)
        return True

    def _may_install_clean(self, end_offset: int) -> bool:
        """Cleaned segments below `end_offset` may replace the originals once
        no entry the Raft log may still send holds data below it (pysyncobj
        sends entries after the journal's first, which is a boundary only):
        a follower must get the entry's batches as they were appended. Until
        then, compaction is forced so the journal lets go of them."""
        if self._catch_up is not None:
            return False
        journal: LogJournal = self.journal
        if len(journal) < 2 or journal.slot(journal.first_index() + 1)[2] >= end_offset:
            return True
        self._force_compaction()
        return False

    def _on_log_truncated(self) -> None:
        """An uncommitted suffix left the log: retries parked on its batches fail
        (another batch may take their offsets), and producer state follows the log."""
        self._fail_duplicates(ReplicationError(self.group_id, FailReason.DISCARDED), self._log.log_end_offset)
        self._rebuild_producer_state()

    def _rebuild_producer_state(self) -> None:
        """Producer state from the whole retained log (a walk of every segment)."""
        self._producer_state_stale = False
        self.producers.rebuild([segment.view() for segment in self._log.segments])

    def _record_producers(self, parts: list[memoryview], bases: list[int]) -> None:
        """An entry's batches were added to the log: remember their producers' sequences."""
        for part, offset in zip(parts, bases):
            for header, _batch in iter_batches(part):
                if header.producer_id != NO_PRODUCER_ID:
                    self.producers.record(header, offset)
                offset += header.last_offset_delta + 1

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
        applied here; Kafka's errors (see _committed)."""
        return await self._committed(lambda: self.append(batches), timeout_s, "append")

    async def delete_records(self, offset: int, timeout_s: float) -> int:
        """Kafka's DeleteRecords: move the log start offset up to `offset`
        through Raft (the command retention proposes; every replica carries it
        out at commit) and return the log start once applied here. Leader only;
        OffsetOutOfRangeError past the high watermark, else Kafka's errors (see
        _committed). An offset at or below the log start changes nothing."""
        log_ = self._log
        if not 0 <= offset <= log_.high_watermark:
            raise OffsetOutOfRangeError(log_.name, offset, log_.log_start_offset, log_.high_watermark)
        if offset > log_.log_start_offset:
            await self._committed(lambda: self._propose_future(log_start_command(offset)), timeout_s,
                                  "record deletion")
        return log_.log_start_offset

    async def _committed(self, propose: Callable[[], "asyncio.Future[Any]"], timeout_s: float, what: str) -> Any:
        """The outcome of `propose()` once committed and applied here. The one
        place Raft's errors become Kafka's: NotLeaderOrFollowerError (with the
        leader known), ReplicationTimeoutError (not committed in `timeout_s`, or
        not at all), or the storage error every replica hit (a RaftkaError
        with its own code)."""
        try:
            return await asyncio.wait_for(propose(), timeout_s)
        except NotLeaderError as error:
            raise NotLeaderOrFollowerError(str(error), error.leader_id) from None
        except GroupRemovedError as error:
            raise UnknownTopicOrPartitionError(f"{self._log.name}: deleted while the {what} was in flight "
                                               f"({error})") from None
        except ReplicationError as error:
            raise ReplicationTimeoutError(str(error)) from None
        except asyncio.TimeoutError:
            raise ReplicationTimeoutError(f"group {self.group_id}: {what} not committed in {timeout_s:g} s") from None

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
        self._fail_duplicates(error)
        super().take_out_of_service(error)

    def destroy(self) -> None:
        """Stop this replica (its topic was deleted, or the broker stops): appends
        not yet proposed and those in flight fail at once (GroupRemovedError)."""
        self._fail_pending_appends(GroupRemovedError(self.group_id))
        self._fail_duplicates(GroupRemovedError(self.group_id))
        super().destroy()

    def _fail_pending_appends(self, error: Exception) -> None:
        """Fail the appends waiting for this group's next tick to be proposed."""
        pending, self._pending_appends = self._pending_appends, []
        for _batches, future in pending:
            if not future.done():
                future.set_exception(error)

    def _flush_appends(self) -> None:
        """Check and propose every pending append, as few entries as the size limit allows."""
        if not self._pending_appends:
            return
        refusal = self.proposal_refusal()   # not the leader, handing leadership over, out of service
        if refusal is not None:
            self._fail_pending_appends(refusal)
            return
        if self._producer_state_stale:   # one rebuild for all the proposals that failed since
            self._rebuild_producer_state()
        pending, self._pending_appends = self._pending_appends, []
        chunk: list[tuple[Any, asyncio.Future[Any]]] = []
        size = MULTI_APPEND_HEADER.size
        for batches, future in pending:
            if not self._decide(batches, future):
                continue
            part_size = PART_SIZE.size + len(batches)
            if chunk and size + part_size > MAX_COMMAND_BYTES:
                self._propose_parts(chunk)
                chunk, size = [], MULTI_APPEND_HEADER.size
            chunk.append((batches, future))
            size += part_size
        if chunk:
            self._propose_parts(chunk)

    def _decide(self, batches: Any, future: "asyncio.Future[Any]") -> bool:
        """The leader's decision on one append, before it enters the log: True
        to propose it; else `future` is answered (an invalid batch, an
        idempotent producer's out-of-order or fenced batch, or a retry of a
        batch the log holds: its offset, once committed)."""
        try:
            self._log.validate(batches)
            duplicate = self._check_producers(batches)
        except (CorruptRecordError, RecordTooLargeError, OutOfOrderSequenceError, InvalidProducerEpochError) as error:
            settle_future(future, None, error)
            return False
        if duplicate is None:
            return True
        if duplicate < 0:   # the original is proposed but not yet in the log: the client retries later
            settle_future(future, None, ReplicationError(self.group_id, FailReason.QUEUE_FULL))
        elif duplicate < self._log.high_watermark:
            settle_future(future, duplicate, None)
        else:
            first = read_header(memoryview(batches))
            self._duplicates.append(ParkedRetry(duplicate, first.producer_id, first.producer_epoch,
                                                first.base_sequence, future))
        return False

    def _check_producers(self, batches: Any) -> int | None:
        """Every batch's sequence checked (and provisionally recorded, so the
        next append of the same iteration follows it); the first batch's
        original offset if it is a retry (-1 while that original is not in
        the log yet), else None."""
        first = True
        for header, _batch in iter_batches(memoryview(batches)):
            if header.producer_id == NO_PRODUCER_ID:
                first = False
                continue
            duplicate = self.producers.check(header)
            if duplicate is not None:
                if first:
                    return duplicate
                raise OutOfOrderSequenceError(f"producer {header.producer_id}: a retried batch "
                                              f"(sequence {header.base_sequence}) after a new one in one request")
            self.producers.record(header, PENDING_OFFSET)
            first = False
        return None

    def _answer_duplicates(self) -> None:
        """Retries whose original committed get its offset; a retry whose
        original was replaced by another batch fails (the client retries it)."""
        if not self._duplicates:
            return
        high_watermark = self._log.high_watermark
        waiting = []
        for retry in self._duplicates:
            if retry.offset >= high_watermark:
                waiting.append(retry)
            elif self._holds_original(retry):
                settle_future(retry.future, retry.offset, None)
            else:
                settle_future(retry.future, None, ReplicationError(self.group_id, FailReason.DISCARDED))
        self._duplicates = waiting

    def _holds_original(self, retry: ParkedRetry) -> bool:
        """The committed batch at the retry's offset is the batch it retries."""
        if retry.offset < self._log.log_start_offset:
            return False   # gone (retention, or our log restarted at the leader's start): unverifiable
        piece = self._log.read(retry.offset, 1)
        header = read_header(piece.buffer)
        return (header.base_offset, header.producer_id, header.producer_epoch, header.base_sequence) == \
            (retry.offset, retry.producer_id, retry.producer_epoch, retry.base_sequence)

    def _fail_duplicates(self, error: Exception, from_offset: int = 0) -> None:
        """Fail the parked retries whose original sits at or past `from_offset`."""
        if not self._duplicates:
            return
        failing = [retry for retry in self._duplicates if retry.offset >= from_offset]
        self._duplicates = [retry for retry in self._duplicates if retry.offset < from_offset]
        for retry in failing:
            settle_future(retry.future, None, error)

    def _propose_parts(self, chunk: list[tuple[Any, "asyncio.Future[Any]"]]) -> None:
        if len(chunk) == 1:
            batches, future = chunk[0]

            def settle(result: Any, error: Exception | None) -> None:
                if error is not None:
                    self._producer_state_stale = True
                settle_future(future, result, error)
            self._propose(bytearray(APPEND_HEADER.pack(APPEND_COMMAND, self.leader_epoch)) + batches, settle,
                          wake=False)
            return
        head = MULTI_APPEND_HEADER.pack(MULTI_APPEND_COMMAND, self.leader_epoch, len(chunk))
        sizes = struct.pack(f">{len(chunk)}I", *(len(batches) for batches, _ in chunk))
        command = bytearray().join([head, sizes, *(batches for batches, _ in chunk)])   # one copy, writable

        def done(results: Any, error: Exception | None) -> None:
            if error is not None:
                self._producer_state_stale = True   # it holds provisional sequences of what did not commit
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
        refusal = self.proposal_refusal()
        if refusal is not None:
            raise refusal
        if len(batches) + APPEND_HEADER.size > MAX_COMMAND_BYTES:
            raise RecordTooLargeError(f"append of {len(batches)} bytes exceeds the replicated "
                                      f"command limit of {MAX_COMMAND_BYTES - APPEND_HEADER.size}")

    def _apply_hook(self, command: bytes) -> Any:
        """A committed entry: its data is in the log already; the high
        watermark moves past it, and the proposer learns its offsets."""
        index = self._raft_last_applied() + 1  # pysyncobj bumps it after the apply returns
        journal: LogJournal = self.journal
        slot = journal.slot(index)
        if slot is not None and slot[4] != NO_CONTROL:
            # the leader's log start decision, carried out alike everywhere (at this tick's compaction)
            self._log_start_due = max(slot[4], self._log_start_due or 0)
            self._force_compaction()
        clean = journal.clean_at(index)
        if clean is not None:
            # the leader's clean plan: started at this tick's compaction, swapped in once the journal let go
            self._clean_due = CleanPlan(*clean)
            self._force_compaction()
        if slot is not None and slot[3] > self._log.high_watermark:
            self._log.set_high_watermark(slot[3], applied_index=index)
            self._answer_duplicates()
            if self.on_high_watermark is not None:
                self.on_high_watermark()
        return journal.pop_outcome(index)

    # ---- checkpoint and catch-up -------------------------------------------
    def _may_compact(self) -> bool:
        return self._catch_up is None  # the checkpoint must describe a log we hold

    def _try_compaction_hook(self) -> None:
        """A committed log start is carried out here, after this tick's sends
        (which may still read the data below it) and right before the
        compaction it forces: then no entry the journal keeps has its data
        below the log start, and a follower that needs an older entry gets
        the checkpoint and catches up from the leader's log start (sending it
        an entry whose data is gone would send an empty append)."""
        if self._log_start_due is not None and self._may_compact():
            offset, self._log_start_due = self._log_start_due, None
            self._log.delete_below(offset)
        super()._try_compaction_hook()
        if self._clean_due is not None and self._may_compact():
            plan, self._clean_due = self._clean_due, None
            self._log.start_clean(plan)


    def _write_checkpoint(self, path: str, raft_data: tuple) -> None:
        last_applied, previous, _cluster = raft_data
        assert last_applied[1] == self._raft_last_applied(), (last_applied[1], self._raft_last_applied())
        journal: LogJournal = self.journal
        entries = []
        for _command, index, term in (previous, last_applied):
            slot = journal.slot(index)
            assert slot is not None, index
            # a marker, even for an entry without data (a no-op, a log start): it says at which
            # offset the entry sits, so a follower installing the checkpoint records it there and
            # not at its own log end, which may be behind (it then catches up to that offset)
            entries.append((marker(slot[2], slot[3]), index, term))
        self._log.flush_index()
        checkpoint.write(Path(path), checkpoint.Checkpoint(
            applied_index=last_applied[1], log_end_offset=journal.slot(last_applied[1])[3],
            entries=(entries[0], entries[1])))

    def _read_checkpoint(self, path: str) -> tuple:
        point = checkpoint.read(Path(path))
        if self._log.high_watermark < point.log_end_offset:
            self._start_catch_up(point)
        previous, last_applied = point.entries
        cluster = {PeerNode(rid) for rid in self.replica_ids}
        return last_applied, previous, cluster

    def _load_dump_hook(self, clear_journal: bool) -> None:
        """At start, a checkpoint whose entries the log still holds changes
        nothing but where applying resumes (pysyncobj would compare commands,
        find markers, and clear the log)."""
        if not clear_journal:
            path = Path(self.conf.fullDumpFile)
            try:
                point = checkpoint.read(path)
            except FileNotFoundError:
                return
            (_c, prev_index, prev_term), (_c2, index, term) = point.entries
            journal: LogJournal = self.journal
            if journal.term_at(prev_index) == prev_term and journal.term_at(index) == term \
                    and journal.slot(index)[3] <= self._log.log_end_offset:
                journal.deleteEntriesTo(prev_index - journal.first_index())
                self._set_last_applied(index)
                return
        super()._load_dump_hook(clear_journal)

    def _start_catch_up(self, point: checkpoint.Checkpoint) -> None:
        log.info("group %d on %d: checkpoint at offset %d is past our high watermark %d; catching up",
                 self.group_id, self.self_id, point.log_end_offset, self._log.high_watermark)
        self._log.truncate(self._log.high_watermark)
        self._catch_up = CatchUp(target_offset=point.log_end_offset)
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
        super()._after_tick_hook()
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
        reply = {"type": "rk_fetch_data", "offset": offset, "data": b"", "high_watermark": log_.high_watermark,
                 "log_start_offset": log_.log_start_offset}
        if log_.log_start_offset <= offset < min(end, log_.high_watermark):
            piece = log_.read(offset, min(max_bytes, CATCH_UP_CHUNK_BYTES), end_offset=end)
            reply["data"] = bytes(piece.buffer)
        self.transport.send_to(peer_id, reply)

    def _receive_fetch(self, message: dict) -> None:
        catch_up = self._catch_up
        assert catch_up is not None
        data, offset, log_start = message.get("data"), message.get("offset"), message.get("log_start_offset")
        if not isinstance(data, bytes) or offset != self._log.log_end_offset:
            return  # stale or foreign answer; the retry timer asks again
        if not data and isinstance(log_start, int) and offset < log_start <= catch_up.target_offset:
            # retention on the leader deleted what we lack: our log restarts at its log start
            log.warning("group %d on %d: the leader's log starts at %d, past our end %d; restarting our log there",
                        self.group_id, self.self_id, log_start, offset)
            self._log.restart_at(log_start)
            self._fail_duplicates(ReplicationError(self.group_id, FailReason.DISCARDED))   # their log is gone
            self._request_catch_up()
            return
        if data:
            self._log.append(data, leader_epoch=-1, keep_offsets=True)  # offsets and epochs as the leader has them
            self._log.set_high_watermark(self._log.log_end_offset)
        if isinstance(log_start, int) and log_start > self._log.log_start_offset:
            # the log start commands the checkpoint skipped over, committed as the leader carried them out
            self._log.delete_below(log_start)
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
        self._log.set_high_watermark(self._log.log_end_offset, applied_index=self._raft_last_applied())
        self._catch_up = None
        self._rebuild_producer_state()
        log.info("group %d on %d: caught up to offset %d", self.group_id, self.self_id, self._log.log_end_offset)

    def _on_raft_message(self, node: PeerNode, message: dict) -> None:
        if self._catch_up is not None and message.get("type") == "append_entries" and message.get("entries") \
                and self._refusal(message) is None:
            return   # entries follow data we do not hold yet: the leader resends them once we caught up
        super()._on_raft_message(node, message)
