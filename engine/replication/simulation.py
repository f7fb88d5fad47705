"""Deterministic simulation of partition Raft groups (`raftka simulate`).

The real RaftNode, PartitionReplica, LogJournal (the segment files as the
Raft log), PartitionLog, LMDB index and VoteStore of every node, driven by a
fake clock (pysyncobj's time source patched, and each node's event loop a
FakeTimeLoop on it: sim_runtime.py) over an in-memory network that drops,
delays, duplicates and reorders messages, cuts links both ways, cuts one
node's inbound links alone (a one-way partition), delivers peers'
append_entries holding foreign commands, and crashes and restarts nodes
(restart = reopen everything from disk, as after a SIGKILL). A power loss
keeps only what was fdatasync'd. A full disk makes a node's segment writes
fail with ENOSPC; its RaftNode then fails it (every group out of service,
off the network), and it stays down until the disk is freed and it
restarts. A wall clock jump moves a node's clock up to a day either way: its
retention decisions and its clients' batch timestamps follow it. A node
hosts one replica of each of `partitions` independent groups, over one LMDB
index and one vote file, as a broker does, and its member of the cluster
metadata group (the real StateMachineReplica and ClusterState: brokers
register, take producer id blocks, topics are created).

The workload: plain appends, and idempotent producers (a busy one and a rare
one per group) through the leader's decision path (`append`), retrying any
of their last five batches, skipping sequence numbers, and starting new
epochs; logs of 1 KiB segments that roll by size and by the batches' own
timestamps, with retention by bytes and age decided by the leader; now and
then a group's clients go quiet for a while, and it idles.

Everything random comes from one seed, so a run replays exactly, and its
trace hash (a digest of every fault, leader, acknowledgement and the final
logs) is the same on every replay: `run_seed(seed, steps)`.

After every step the invariants are checked (Simulation.check_invariants),
for every group:
- election safety: at most one leader per term, ever;
- agreement: the readable (below high watermark) logs of all nodes are
  prefixes of one another, byte for byte;
- every acknowledged append (a retry's acknowledgement included) sits at its
  acknowledged offset in the agreed log;
- exactly once: an idempotent producer's (id, epoch, sequence) is in the
  agreed log once, unless retention deleted the first copy (the producer is
  then forgotten, as in Kafka);
- per node: offsets dense from 0, high watermark <= log end offset, nothing
  readable at or past the high watermark;
- foreign commands: every injected append_entries holding a command of a type
  the group does not declare is refused (counted in `refused_messages`) by
  the node it reaches, and no such command ever enters a journal;
- leader stickiness: while one node's inbound links are cut (a one-way
  episode, which runs with no kills or link cuts besides), a leader that
  every other node follows keeps leading in its term: the cut node, hearing
  no one, must not depose it (PreVote's job). A group elects then only if the
  cut node itself led (it steps down, hearing no majority); that election may
  take several terms (candidates race) until every other node follows one
  leader, which from then on must stay. So leader changes in an episode are
  bounded: none when the cut node did not lead, one election's worth when it did.
For the metadata group: at most one leader per term, and every node that
has applied up to an index holds the same state there (snapshot digests).
`heal_and_converge` then ends all faults and requires every node to hold
every acknowledged append, nothing but what was proposed, and byte-identical
segment files (retention deleted the same segments everywhere), and one
metadata state everywhere holding every acknowledged topic and producer id
block.

Each node runs as a broker does: one RaftNode on its own event loop (a new
one per restart) ticks its groups (message arrivals, proposals, heartbeat
and election deadlines), sends coalesced heartbeats of idle groups, syncs
the VoteStore before every flush, runs journal syncs (here: jobs that finish
after a simulated disk delay, through RaftNode's `run_sync`) and fails the
node on a storage error (RaftNode.fail; a full disk's ENOSPC). Its peer
network is a SimPeerNetwork: every message goes through the real codec and
then the faulty network above, coalesced heartbeats included; a link is
connected while both its nodes run. Each step runs, in order: finished
syncs, due messages, then every node's loop until nothing is due at the
step's time; then faults and the workload (clients go quiet for a while
now and then, so groups idle on coalesced heartbeats alone).
"""
from __future__ import annotations

import asyncio
import hashlib
import heapq
import logging
import random
import tempfile
import time
from contextlib import contextmanager
from collections import deque
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from raftka.cluster.metadata import (METADATA_GROUP_ID, ClusterState, allocate_producer_ids, create_topic,
                                     register_broker)
from raftka.config import Config
from raftka.errors import OutOfOrderSequenceError, StorageError
from raftka.records.batch import Record, build_batch, iter_batches, parse_records, read_header
from raftka.storage.index import IndexStore
from raftka.storage.partition_log import PartitionLog
from raftka.storage.producer_state import NO_PRODUCER_ID
from raftka.raft import codec
from raftka.raft.group import NotLeaderError
from raftka.raft.node import GROUP_IDS, NODE_CHANNEL, RaftNode
from raftka.raft.pysyncobj_adapter import patched_clock
from raftka.raft.state_machine import StateMachineReplica
from raftka.raft.transport import ErrorTally
from raftka.raft.votes import VoteStore
from raftka.replication.log_journal import LogJournal, is_marker
from raftka.replication.partition import PartitionReplica
from raftka.replication.sim_runtime import FakeTimeLoop, SimPeerNetwork, run_to_end, running_on

__all__ = ["DEFAULT_STEPS", "FAULT_NAMES", "PLANTS", "Faults", "InvariantViolation", "Plant",
           "SeedResult", "Simulation", "SweepResult", "replay_command", "run_seed",
           "shortest_failing", "sweep"]

DEFAULT_STEPS = 400
STEP_S = 0.01                     # fake time per step
MIN_DELAY_S = 0.001               # every message takes at least this long
# Every partition log: small segments, so runs roll many and retention deletes some
# Every partition log: small segments, so runs roll many (by size, and by the
# batches' own timestamps) and retention (by bytes, and by age on the leader's
# clock) deletes some; producer ids expire after more log time than any clock jump
SIM_LOG = dict(segment_bytes=1024, segment_ms=3_000, retention_bytes=16 * 1024, retention_ms=60_000,
               producer_id_expiration_ms=3 * 24 * 3600 * 1000)
CLOCK_JUMP_MS_MAX = 24 * 3600 * 1000
BASE_TIME_MS = 1_700_000_000_000   # the wall clock at the start of every run
# Idempotent producers per group, by how often each sends: a busy one, and one
# so rare that the batches it retries lie many segments back in the log
PRODUCER_WEIGHTS = (6, 1)
PRODUCER_IN_FLIGHT = 5            # batches a producer may retry (Kafka's max in flight with idempotence)
PRODUCER_ID_BLOCK = 1000          # ids per allocate_producer_ids command of the metadata workload
SIM_RAFT = dict(raftMinTimeout=0.3, raftMaxTimeout=0.6, appendEntriesPeriod=0.05, leaderFallbackTimeout=0.6,
                logCompactionMinEntries=25, logCompactionMinTime=5.0)
MAX_HEAL_STEPS = 3000
INDEX_COMMIT_P = 0.05             # per replica and step: its index and state are committed (LogManager's job)

# Fault names, as `raftka simulate --faults` takes them, each with the Faults
# field that turns it off and that field's value when off.
_FAULT_OFF: dict[str, tuple[str, float]] = {
    "kill": ("crash", 0.0), "partition": ("cut", 0.0), "oneway": ("oneway", 0.0),
    "reorder": ("max_delay_s", MIN_DELAY_S), "duplicate": ("duplicate", 0.0), "drop": ("drop", 0.0),
    "foreign": ("foreign", 0.0), "power": ("power", 0.0), "disk-full": ("disk_full", 0.0), "clock": ("clock", 0.0),
}
FAULT_NAMES = tuple(_FAULT_OFF)

# Commands a hostile or broken peer sends: pysyncobj's REGULAR (pickled),
# MEMBERSHIP and VERSION types, a no-op with a payload, and unknown types.
FOREIGN_COMMANDS = (b"\x00not a pickle", b"\x01no-op with a payload", b"\x02membership", b"\x03version",
                    b"\x12unknown type", b"\xffjunk")

_OWN_COMMAND = PartitionReplica.accepts_command   # as shipped, whatever a plant patches


class InvariantViolation(AssertionError):
    """An invariant failed: `seed`, `step` (the step it failed at) and `what`."""

    def __init__(self, seed: int, step: int, what: str, healing: bool = False) -> None:
        super().__init__(f"seed {seed}, step {step}{' (healing)' if healing else ''}: {what}")
        self.seed, self.step, self.what, self.healing = seed, step, what, healing


@dataclass(frozen=True)
class Faults:
    """Per-step probabilities of the simulation's faults."""

    drop: float = 0.05               # a message is lost
    duplicate: float = 0.03          # a message arrives twice
    max_delay_s: float = 0.04        # delays are uniform in [MIN_DELAY_S, max]: messages reorder
    crash: float = 0.01              # a live node is killed
    restart: float = 0.05            # per crashed node per step
    cut: float = 0.01                # a link is cut both ways
    heal: float = 0.05               # a cut link is healed
    oneway: float = 0.005            # a one-way episode starts (only when every node is up, no link
                                     # cut and every group led by a leader all nodes follow)
    oneway_steps: tuple[int, int] = (150, 300)   # its length, uniform in this range
    foreign: float = 0.02            # a peer's append_entries holding a foreign command is injected
    propose: float = 0.3             # per group: its leader is asked to append
    quiet: float = 0.002             # per group: its clients go quiet (the group idles: coalesced heartbeats only)
    quiet_steps: tuple[int, int] = (50, 150)     # for this long, uniform in this range
    idempotent: float = 0.5          # ... by an idempotent producer, through the leader's decision path
    retry: float = 0.25              # an idempotent producer resends one of its last batches instead
    gap: float = 0.02                # ... sends its next batch past a sequence it skips, instead
    epoch_bump: float = 0.01         # ... starts a new epoch (sequence 0) instead
    retention: float = 0.02          # per replica and step: retention runs (its leader replicates the decision)
    metadata: float = 0.1            # the metadata group's leader is asked to apply a command
    power: float = 0.01              # a power loss: one node, a minority or every node at once loses
                                     # every byte it had not fdatasync'd, then restarts
    max_sync_delay_s: float = 0.03   # a journal sync job takes uniform [MIN_DELAY_S, this]
    disk_full: float = 0.005         # a live node's disk fills: its writes fail with ENOSPC, the node
                                     # takes itself out of service, and restarts once the disk is freed
    disk_freed: float = 0.02         # per step and node out of service: its disk is freed, it restarts
    clock: float = 0.01              # a node's wall clock jumps by up to CLOCK_JUMP_MS_MAX either way
    clock_fixed: float = 0.02        # per step and skewed node: its clock is right again

    @classmethod
    def of(cls, names: Iterable[str], **overrides: Any) -> "Faults":
        """The default probabilities with only the faults `names` on (see FAULT_NAMES)."""
        names = set(names)
        unknown = sorted(names - set(FAULT_NAMES))
        if unknown:
            raise ValueError(f"unknown fault {unknown[0]!r} (known: {', '.join(FAULT_NAMES)})")
        off = {field: value for name, (field, value) in _FAULT_OFF.items() if name not in names}
        return replace(cls(**overrides), **off)


# ---- plants: known bugs, to show the checker catches them ---------------------

def _refuse_nothing(self: Any, message: dict) -> None:
    return None


def _stock_snapshot_chunk(self: Any, node: Any, message: dict) -> None:
    """pysyncobj's own handling of a snapshot chunk: one that installs nothing
    still raises the commit index to the leader's."""
    self.transport.handle_raft_message(node, message)
    self._verified_end = None


def _rebuild_from_partial_window(self: Any) -> None:
    """Producer state from the log's last two segments only, as the first
    version rebuilt it: a producer idle for longer is forgotten by a replica
    that restarts or truncates, and its retry is written again."""
    self._producer_state_stale = False
    self.producers.rebuild([segment.view() for segment in self.log.segments[-2:]])


def _retention_by_own_clock(self: Any, offset: int) -> None:
    """Each replica deletes what its own clock finds expired, as the first
    version did: a replica whose clock jumped ahead drops segments the others keep."""
    self.log.delete_below(offset)


def _count_every_vote_message(self: Any, node: Any, message: dict) -> bool:
    """pysyncobj's own count: every response_vote message is a vote."""
    return False


_HEARTBEAT_ANSWERS = RaftNode._on_heartbeat_answers   # as shipped, whatever a plant patches


def _refusals_taken_for_acceptance(self: Any, peer_id: int, accepted: Any, stale: Any) -> None:
    """RaftNode reads a follower's refusal of a coalesced heartbeat as an
    acceptance: the leader keeps holding its own append_entries off, and a
    follower that refused (it restarted, or is behind) never hears from it."""
    if isinstance(accepted, bytes) and isinstance(stale, bytes):
        accepted, stale = accepted + stale, b""
    _HEARTBEAT_ANSWERS(self, peer_id, accepted, stale)


def _racing_elections(faults: Faults) -> Faults:
    """Frequent kills with instant restarts and slow links (the enabled ones),
    no one-way episodes or power losses: a restarted node is asked for its vote again."""
    return replace(faults, crash=0.1 if faults.crash else 0.0, restart=1.0,
                   max_delay_s=0.2 if faults.max_delay_s > MIN_DELAY_S else faults.max_delay_s, oneway=0.0, power=0.0)


@dataclass(frozen=True)
class Plant:
    """A known bug put into the code for one run (`applied()` restores it)."""

    name: str
    summary: str
    patches: tuple[tuple[type, str, Any], ...] = ()       # (class, attribute, value) set during the run
    options: dict[str, Any] = field(default_factory=dict)  # Simulation keyword arguments
    adjust_faults: Callable[[Faults], Faults] | None = None

    @contextmanager
    def applied(self) -> Iterator[None]:
        missing = object()
        saved = [(owner, name, owner.__dict__.get(name, missing)) for owner, name, _ in self.patches]
        try:
            for owner, name, value in self.patches:
                setattr(owner, name, value)
            yield
        finally:
            for owner, name, value in reversed(saved):
                if value is missing:
                    delattr(owner, name)
                else:
                    setattr(owner, name, value)


PLANTS: dict[str, Plant] = {plant.name: plant for plant in (
    Plant("forget-vote", "a node forgets its vote on restart (and PreVote off, elections racing): "
                         "two leaders in one term",
          patches=((PartitionReplica, "PRE_VOTE", False),),
          options=dict(persist_vote=False, raft_overrides=dict(raftMinTimeout=0.3, raftMaxTimeout=0.31)),
          adjust_faults=_racing_elections),
    Plant("no-prevote", "PreVote and leader stickiness off: a node cut off one way deposes leaders over and over",
          patches=((PartitionReplica, "PRE_VOTE", False),)),
    Plant("drop-foreign-silently", "a peer's entries of foreign command types are accepted, not refused",
          patches=((PartitionReplica, "_refusal", _refuse_nothing),),
          options=dict(journal_accepts_all=True)),
    Plant("no-fsync", "a replica acknowledges journal entries before they are fdatasync'd: "
                      "a power loss of a majority loses committed appends",
          patches=((LogJournal, "durable_index", property(lambda journal: journal.last_index()
                                                          if len(journal) else 0)),)),
    Plant("dedupe-from-partial-window", "idempotent producers' state rebuilt from the last two segments only: "
                                        "a retry of a batch further back is written twice",
          patches=((PartitionReplica, "_rebuild_producer_state", _rebuild_from_partial_window),)),
    Plant("retention-by-own-clock", "every replica applies retention by its own wall clock, not the leader's "
                                    "replicated decision: log starts differ",
          patches=((PartitionReplica, "_propose_log_start", _retention_by_own_clock),)),
    Plant("count-vote-messages", "votes counted per response_vote message, not per voter, as stock pysyncobj "
                                 "does (and elections racing, messages often duplicated): a duplicated vote "
                                 "elects a second leader (needs --nodes 5)",
          patches=((PartitionReplica, "_repeated_vote", _count_every_vote_message),
                   (StateMachineReplica, "_repeated_vote", _count_every_vote_message)),
          adjust_faults=lambda faults: replace(_racing_elections(faults),
                                               duplicate=0.3 if faults.duplicate else 0.0)),
    Plant("stock-snapshot", "stock pysyncobj commits unverified entries on a snapshot chunk that installs nothing",
          patches=((PartitionReplica, "_on_snapshot_chunk", _stock_snapshot_chunk),)),
    Plant("heartbeat-refusals-accepted", "RaftNode takes a follower's refusal of a coalesced heartbeat for an "
                                         "acceptance: an idle group's leader never falls back to append_entries, "
                                         "and a follower that refused never catches up",
          patches=((RaftNode, "_on_heartbeat_answers", _refusals_taken_for_acceptance),)),
)}


# ---- the simulated cluster ---------------------------------------------------

class FakeClock:
    """Advances by the step, and by a microsecond per reading: pysyncobj bounds
    some loops by elapsed time, and real time always passes."""

    START_S = 1000.0

    def __init__(self) -> None:
        self.now = self.START_S

    def __call__(self) -> float:
        self.now += 1e-6
        return self.now


class _FailingTally(ErrorTally):
    """RaftNode's group_errors in the simulation: a group's tick (or heartbeat
    part) that raised is a bug here, not something to count and carry on from."""

    def __init__(self, sim: "Simulation", node_id: int) -> None:
        super().__init__(logging.getLogger(__name__))
        self._sim, self._node_id = sim, node_id

    def record(self, key: int, exc: BaseException, what: str, *args: Any) -> None:
        raise self._sim._raised(self._node_id, exc) from exc


@dataclass
class SimNode:
    node_id: int
    root: Path
    index: IndexStore | None = None
    votes: VoteStore | None = None   # the node's durable terms and votes, one file for all its groups
    replicas: dict[int, PartitionReplica] = field(default_factory=dict)   # group id -> replica
    metadata: StateMachineReplica | None = None   # its member of the metadata group (group 0)
    incarnation: int = 0             # bumped at every (re)start: sync jobs and messages of an older one are void
    loop: FakeTimeLoop | None = None          # its broker's event loop (one per incarnation)
    network: SimPeerNetwork | None = None
    raft: RaftNode | None = None              # the broker's RaftNode, ticking every group above
    failure: str | None = None                # why its RaftNode failed (RaftNode.fail), until handled

    @property
    def alive(self) -> bool:
        return self.index is not None

    def group(self, group_id: int) -> Any:
        """Its member of the group: the metadata group or a partition's."""
        if group_id == METADATA_GROUP_ID:
            return self.metadata
        return self.replicas[group_id]


@dataclass
class Ack:
    base_offset: int
    payload: bytes       # the unique record value of the acknowledged batch
    term: int


@dataclass
class SentBatch:
    """A batch an idempotent producer sent: a retry resends exactly these bytes."""

    payload: bytes       # its one record's value, unique to it
    batch: bytes


@dataclass
class SimProducer:
    """An idempotent producer: its id, epoch, next sequence and the batches it may still retry."""

    producer_id: int
    epoch: int = 0
    next_sequence: int = 0
    sent: deque[SentBatch] = field(default_factory=lambda: deque(maxlen=PRODUCER_IN_FLIGHT))

    def new_epoch(self) -> None:
        """As after InitProducerId: the next epoch, from sequence 0, nothing left to retry."""
        self.epoch += 1
        self.next_sequence = 0
        self.sent.clear()


@dataclass
class InFlight:
    """An idempotent producer's append the leader was handed, not answered yet."""

    group_id: int
    producer: SimProducer
    sent: SentBatch
    future: "asyncio.Future[int]"
    epoch: int           # the producer's epoch when it sent it


@dataclass
class GroupState:
    """What the checker knows of one partition group."""

    group_id: int
    producers: list[SimProducer] = field(default_factory=list)
    quiet_until: int = 0             # no client appends before this step
    # (producer id, epoch, first sequence) -> base offset, for the agreed log's idempotent batches
    written: dict[tuple[int, int, int], int] = field(default_factory=dict)
    leaders_by_term: dict[int, int] = field(default_factory=dict)
    acks: list[Ack] = field(default_factory=list)
    agreed: bytes = b""              # longest readable log seen; all others must be prefixes
    proposed: set[bytes] = field(default_factory=set)
    proposals: int = 0
    agreed_values: dict[int, bytes] = field(default_factory=dict)   # base offset -> record value, agreed log
    agreed_parsed: int = 0           # bytes of `agreed` in agreed_values
    acked_values: dict[int, bytes] = field(default_factory=dict)    # base offset -> acknowledged value
    acks_checked: int = 0            # acks compared with agreed_values so far
    agreed_end: int = 0              # offset after the last batch in agreed_values
    agreed_by: int = 0               # the node whose log the agreed log last was
    agreed_positions: dict[int, int] = field(default_factory=dict)  # batch base offset -> byte position in agreed


@dataclass
class MetadataState:
    """What the checker knows of the metadata group."""

    leaders_by_term: dict[int, int] = field(default_factory=dict)
    states: dict[int, tuple[str, int]] = field(default_factory=dict)   # applied index -> (state digest, node)
    checked_index: dict[int, int] = field(default_factory=dict)   # node -> applied index last checked
    in_flight: list[tuple["asyncio.Future[int]", str, str]] = field(default_factory=list)   # (future, kind, topic)
    topics_proposed: int = 0
    acked_topics: set[str] = field(default_factory=set)
    acked_allocations: int = 0


@dataclass
class OneWay:
    """An episode in which `node_id` receives nothing and sends as usual."""

    node_id: int
    start_step: int
    end_step: int
    terms_led: dict[int, set[int]] = field(default_factory=dict)   # group -> terms with a leader seen so far
    # group -> (term, leader) that every node but the cut one follows, at the last check; None: none such
    followed: dict[int, tuple[int, int] | None] = field(default_factory=dict)
    leader_changes: int = 0


@dataclass
class Simulation:
    root: Path
    seed: int
    nodes: int = 3
    faults: Faults = field(default_factory=Faults)
    persist_vote: bool = True        # False: a planted bug (forget-vote)
    raft_overrides: dict[str, Any] = field(default_factory=dict)
    partitions: int = 1
    journal_accepts_all: bool = False   # True: a planted bug (drop-foreign-silently)
    log_settings: dict[str, Any] = field(default_factory=lambda: dict(SIM_LOG))   # every partition log's Config
    metadata: bool = True            # run the cluster metadata group (group 0) too

    def __post_init__(self) -> None:
        self.root = Path(self.root)
        self.rng = random.Random(self.seed)
        self.clock = FakeClock()
        # (due, seq, (source, its incarnation, target, its incarnation), group, frame, foreign command type)
        self.queue: list[tuple[float, int, tuple[int, int, int, int], int, bytes, int | None]] = []
        self.syncs: list[tuple[float, int, int, int, Any, Any]] = []   # (due, seq, node, incarnation, job, done)
        self.power_losses = 0
        self.lossy_power_losses = 0
        self.sequence = 0
        self.cut_links: set[frozenset[int]] = set()
        self.members = {i: SimNode(i, self.root / f"n{i}") for i in range(1, self.nodes + 1)}
        self.groups = {g: GroupState(g, [SimProducer(1000 * g + i) for i in range(len(PRODUCER_WEIGHTS))])
                       for g in range(1, self.partitions + 1)}
        self.in_flight: list[InFlight] = []
        self.meta = MetadataState()
        self.clock_skew_ms: dict[int, int] = {}     # node -> how far its wall clock is off
        self.clock_jumps = 0
        self.disk_full: set[int] = set()            # nodes whose disk is full
        self.out_of_service: set[int] = set()       # nodes that took themselves out (disk full), down
        self.disk_full_failures = 0
        self.retries = 0
        self.heartbeats_accepted = 0                # coalesced heartbeats (one per group) followers accepted
        self.one_way: OneWay | None = None
        self.one_way_episodes = 0
        self.foreign_injected = 0
        self.foreign_refused = 0
        self.step_number = 0
        self.healing = False
        self._foreign_in_journal: list[str] = []
        self._trace = hashlib.sha256()

    # ---- what a run tells --------------------------------------------------

    @property
    def trace_hash(self) -> str:
        """Digest of the faults, leaders and acknowledgements so far, in order."""
        return self._trace.hexdigest()[:16]

    def _record(self, *event: Any) -> None:
        self._trace.update(repr(event).encode() + b"\n")

    @property
    def leader_changes(self) -> int:
        return sum(len(group.leaders_by_term) for group in self.groups.values())

    @property
    def acks(self) -> int:
        return sum(len(group.acks) for group in self.groups.values())

    # ---- nodes -------------------------------------------------------------

    def start_node(self, node_id: int) -> None:
        """Start node_id as a broker does: its RaftNode on a fresh event loop,
        every group's replica added to it, then connected to every live peer."""
        member = self.members[node_id]
        member.incarnation += 1
        member.failure = None
        member.loop = FakeTimeLoop(self.clock, lambda: self.clock.now)
        member.index = IndexStore(member.root / "index.lmdb", 1 << 28)
        member.votes = VoteStore(member.root / "votes")
        member.network = SimPeerNetwork(node_id, lambda peer, group_id, frame, n=node_id:
                                        self.enqueue(n, peer, group_id, frame))
        incarnation = member.incarnation
        member.raft = RaftNode(member.network, member.votes,
                               run_sync=lambda job, done: self._schedule_sync(node_id, incarnation, job, done))
        member.raft.storage_errors = (*member.raft.storage_errors, StorageError)   # as the broker sets them
        member.raft.group_errors = _FailingTally(self, node_id)
        member.raft.on_failure(lambda reason, m=member: setattr(m, "failure", reason))
        self._guard(node_id, lambda: run_to_end(member.raft.start()))
        for group_id in self.groups:
            storage_id = group_id - 1
            log = PartitionLog(f"p-{storage_id}", member.root / f"p-{storage_id}", storage_id, member.index,
                               Config(data_dir=member.root, **self.log_settings))
            replica = self._guard(node_id, PartitionReplica, group_id, log, node_id, list(self.members),
                                  member.network, member.root / f"raft-{storage_id}",
                                  persist_vote=self.persist_vote, vote_store=member.votes, journal_fsync=True,
                                  **{**SIM_RAFT, **self.raft_overrides})
            member.replicas[group_id] = replica
            self._watch_journal(node_id, group_id, replica)
            self._guard(node_id, member.raft.add_group, replica)
        if self.metadata:
            self._start_metadata(member)
        for peer in self.members.values():
            if peer.node_id != node_id and peer.alive:
                self._guard(peer.node_id, peer.network.connect, node_id)
                self._guard(node_id, member.network.connect, peer.node_id)

    def _start_metadata(self, member: SimNode) -> None:
        """Its member of the metadata group: the real ClusterState, journal and checkpoints."""
        node_id = member.node_id
        meta = self._guard(node_id, StateMachineReplica, METADATA_GROUP_ID, ClusterState(), node_id,
                           list(self.members), member.network, member.root / "raft-meta",
                           persist_vote=self.persist_vote, vote_store=member.votes, journal_fsync=True,
                           **{**SIM_RAFT, **self.raft_overrides})
        member.metadata = meta
        self._guard(node_id, member.raft.add_group, meta)

    def _watch_journal(self, node_id: int, group_id: int, replica: PartitionReplica) -> None:
        """Note any foreign command added to this replica's journal."""
        journal = replica.journal
        if self.journal_accepts_all:
            journal.accepts = None
        add = journal.add

        def watched_add(command: bytes, idx: int, term: int) -> None:
            add(command, idx, term)
            if not _OWN_COMMAND(command) and not is_marker(command):
                kind = command[0] if command else None
                self._foreign_in_journal.append(f"node {node_id}, group {group_id}: a foreign command "
                                                f"(type {kind}) entered the journal at index {idx}")
        journal.add = watched_add

    def _schedule_sync(self, node_id: int, incarnation: int, job: Any,
                       done: Callable[[BaseException | None], None]) -> None:
        """RaftNode's run_sync: a journal group commit, finishing after a simulated disk delay."""
        delay = self.rng.uniform(MIN_DELAY_S, max(MIN_DELAY_S, self.faults.max_sync_delay_s))
        self.sequence += 1
        heapq.heappush(self.syncs, (self.clock.now + delay, self.sequence, node_id, incarnation, job, done))

    def _finish_syncs(self) -> None:
        while self.syncs and self.syncs[0][0] <= self.clock.now:
            _, _, node_id, incarnation, job, done = heapq.heappop(self.syncs)
            job.run(fdatasync=False)
            member = self.members[node_id]
            if member.alive and member.incarnation == incarnation:
                self._guard(node_id, done, None)

    def power_loss(self, node_ids: list[int]) -> None:
        """As a power cut of these nodes: every byte not fdatasync'd is gone
        (journal tails, segment bytes past the recovery point); LMDB keeps what
        it committed, the vote files what they synced."""
        for node_id in node_ids:
            member = self.members[node_id]
            if not member.alive:
                continue
            for replica in member.replicas.values():
                if replica.journal.unsynced_bytes or replica.log.log_end_offset > replica.log.on_disk_offset:
                    self.lossy_power_losses += 1
                replica.journal.power_loss()
                replica.log.power_loss()
            if member.metadata is not None:
                member.metadata.journal.power_loss()
            assert member.index is not None and member.votes is not None
            member.index.close()
            member.votes.abandon()   # every vote it synced is on disk; the rest was never acted on
            self._end_incarnation(member)

    def crash_node(self, node_id: int) -> None:
        """As SIGKILL: files keep what was written, nothing in memory is saved,
        and the peers see their connections to it close."""
        member = self.members[node_id]
        assert member.index is not None
        for replica in member.replicas.values():
            replica.journal.abandon()
            replica.log.abandon()
        if member.metadata is not None:
            member.metadata.journal.abandon()
        member.index.close()
        assert member.votes is not None
        member.votes.abandon()
        self._end_incarnation(member)

    def _end_incarnation(self, member: SimNode) -> None:
        """The node's process is gone: its loop and RaftNode with it; its peers lose their links to it."""
        assert member.loop is not None
        member.loop.close()
        member.replicas, member.metadata, member.index, member.votes = {}, None, None, None
        member.loop = member.network = member.raft = None
        member.failure = None
        for peer in self.members.values():
            if peer.alive and peer.network is not None:
                self._guard(peer.node_id, peer.network.lose, member.node_id)

    def stop_all(self) -> None:
        for member in self.members.values():
            if member.alive:
                self.crash_node(member.node_id)
        futures = [append.future for append in self.in_flight] + [f for f, _, _ in self.meta.in_flight]
        for future in futures:
            if future.done() and not future.cancelled():
                future.exception()   # looked at: no "never retrieved" warning
        self.in_flight.clear()
        self.meta.in_flight.clear()

    def _guard(self, node_id: int, call: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run the product's code for `node_id`, on its event loop (the running
        loop meanwhile); anything it raises fails the run, except a storage
        error on a full disk, which takes the node out of service (None)."""
        loop = self.members[node_id].loop
        try:
            with running_on(loop) if loop is not None else _nothing():
                return call(*args, **kwargs)
        except InvariantViolation:
            raise
        except (StorageError, OSError) as error:
            if node_id not in self.disk_full:
                raise self._raised(node_id, error) from error
            self._take_out_of_service(node_id, error)
            return None
        except Exception as error:
            raise self._raised(node_id, error) from error

    def _raised(self, node_id: int, error: BaseException) -> InvariantViolation:
        """The violation an exception out of node_id's code is (a foreign command in a journal explains it first)."""
        if isinstance(error, InvariantViolation):
            return error
        if self._foreign_in_journal:
            return self._violation(self._foreign_in_journal[0])
        return self._violation(f"node {node_id} raised {type(error).__name__}: {error}")

    def _run_loops(self) -> None:
        """Every live node's event loop runs what is due now: its RaftNode's
        ticks, heartbeat rounds, released syncs and flushes."""
        for member in self.members.values():
            if member.alive and member.loop is not None:
                self._guard(member.node_id, member.loop.run_due)
        self._handle_failures()

    def _handle_failures(self) -> None:
        """Nodes whose RaftNode failed: a full disk takes the node out of
        service until it is freed (down meanwhile); any other reason is a bug."""
        for member in self.members.values():
            if not member.alive or member.failure is None:
                continue
            if member.node_id not in self.disk_full:
                raise self._violation(f"node {member.node_id} went out of service: {member.failure}")
            self._record("out-of-service", self.step_number, member.node_id)
            self.disk_full_failures += 1
            self.crash_node(member.node_id)
            self.disk_full.discard(member.node_id)
            self.out_of_service.add(member.node_id)

    # ---- network -----------------------------------------------------------

    def enqueue(self, source: int, target: int, group_id: int, payload: bytes,
                foreign_type: int | None = None) -> None:
        """A frame from `source` onto the faulty network: lost, duplicated or delayed."""
        if self.rng.random() < self.faults.drop:
            return
        copies = 2 if self.rng.random() < self.faults.duplicate else 1
        link = (source, self.members[source].incarnation, target, self.members[target].incarnation)
        for _ in range(copies):
            delay = self.rng.uniform(MIN_DELAY_S, self.faults.max_delay_s) \
                if self.faults.max_delay_s > MIN_DELAY_S else MIN_DELAY_S
            self.sequence += 1
            heapq.heappush(self.queue, (self.clock.now + delay, self.sequence, link, group_id, payload, foreign_type))

    def _deliver_due(self) -> None:
        while self.queue and self.queue[0][0] <= self.clock.now:
            _, _, (source, source_run, target, target_run), group_id, payload, foreign_type = heapq.heappop(self.queue)
            member, sender = self.members[target], self.members[source]
            if not (member.alive and sender.alive and member.incarnation == target_run
                    and sender.incarnation == source_run):
                continue  # the connection it was written to died with one of its ends
            if frozenset((source, target)) in self.cut_links:
                continue
            if self.one_way is not None and self.one_way.node_id == target:
                continue
            if group_id == NODE_CHANNEL:
                self._count_heartbeat_answers(payload)
            if foreign_type is None:
                self._guard(target, member.network.deliver, source, group_id, payload)
                continue
            replica = member.group(group_id)
            refused_before = replica.refused_messages
            taken = self._guard(target, member.network.deliver, source, group_id, payload)
            if taken and member.failure is None:
                if replica.refused_messages != refused_before + 1:
                    raise self._violation(f"node {target}, group {group_id}: an append_entries from peer {source} "
                                          f"holding a foreign command (type {foreign_type}) was not refused")
                self.foreign_refused += 1

    def _count_heartbeat_answers(self, payload: bytes) -> None:
        """Coalesced heartbeats a follower accepted (one per group in an rk_hb_ack's `ok`)."""
        message = codec.decode(payload)
        if isinstance(message, dict) and message.get("type") == "rk_hb_ack" and isinstance(message.get("ok"), bytes):
            self.heartbeats_accepted += len(message["ok"]) // GROUP_IDS.size

    # ---- the schedule ------------------------------------------------------

    def run(self, steps: int) -> None:
        state = random.getstate()
        try:
            with patched_clock(self.clock):
                random.seed(self.seed)       # pysyncobj draws election timeouts from `random`
                for node_id in self.members:
                    self.start_node(node_id)
                for _ in range(steps):
                    self.step()
                self.heal_and_converge()
        finally:
            random.setstate(state)

    def step(self) -> None:
        self.step_number += 1
        self.clock.now += STEP_S
        self._finish_syncs()
        self._deliver_due()
        self._run_loops()
        for member in self.members.values():
            for replica in list(member.replicas.values()):
                if self.rng.random() < INDEX_COMMIT_P and member.alive:   # the broker's periodic index commit
                    self._guard(member.node_id, replica.log.flush_index)
        self._handle_failures()
        if self.one_way is not None and self.step_number >= self.one_way.end_step:
            self._record("oneway-end", self.step_number, self.one_way.node_id)
            self.one_way = None
        self._random_fault()
        self._run_retention()
        for group_id, group in self.groups.items():
            if self.step_number < group.quiet_until:
                continue
            if self.rng.random() < self.faults.quiet:
                group.quiet_until = self.step_number + self.rng.randint(*self.faults.quiet_steps)
                self._record("quiet", self.step_number, group_id, group.quiet_until)
            elif self.rng.random() < self.faults.propose:
                self._propose(group_id)
        if self.metadata and self.rng.random() < self.faults.metadata:
            self._propose_metadata()
        self._settle_metadata()
        self._settle_in_flight()
        self._handle_failures()
        self.check_invariants()

    def _run_retention(self) -> None:
        """Each replica's retention check, now and then; a leader replicates what it decides."""
        for member in self.members.values():
            for replica in list(member.replicas.values()):
                if self.rng.random() < self.faults.retention and member.alive:
                    self._guard(member.node_id, replica.log.enforce_retention,
                                now_ms=self._wall_clock_ms(member.node_id))

    def _wall_clock_ms(self, node_id: int) -> int:
        """What node_id's wall clock reads (its retention decisions use it, and
        its clients stamp their batches with it): fake time plus its skew."""
        return self._log_time_ms() + self.clock_skew_ms.get(node_id, 0)

    def _log_time_ms(self) -> int:
        """The right wall clock time, in step with the fake clock."""
        return BASE_TIME_MS + int((self.clock.now - FakeClock.START_S) * 1000)

    def _random_fault(self) -> None:
        rng, f = self.rng, self.faults
        alive = [m.node_id for m in self.members.values() if m.alive]
        dead = [m.node_id for m in self.members.values() if not m.alive]
        quiet = self.one_way is not None     # a one-way episode runs without kills or cuts
        if not quiet and alive and rng.random() < f.crash:
            victim = rng.choice(alive)
            self._record("crash", self.step_number, victim)
            self.crash_node(victim)
        for node_id in dead:
            if rng.random() < (f.disk_freed if node_id in self.out_of_service else f.restart):
                self._record("restart", self.step_number, node_id)
                self.out_of_service.discard(node_id)
                self.start_node(node_id)
        if not quiet and alive and rng.random() < f.disk_full:
            self._fill_disk(rng.choice(alive))
        self._jump_clocks()
        if not quiet and rng.random() < f.cut:
            a, b = rng.sample(sorted(self.members), 2)
            self._record("cut", self.step_number, min(a, b), max(a, b))
            self.cut_links.add(frozenset((a, b)))
        if not quiet and rng.random() < f.power:
            kind = rng.choice(("one", "minority", "all"))
            everyone = sorted(self.members)
            victims = everyone if kind == "all" else rng.sample(everyone, 1 if kind == "one" else (len(everyone) - 1) // 2)
            self._record("power", self.step_number, kind, tuple(victims))
            self.power_losses += 1
            self.power_loss(victims)
        if self.cut_links and rng.random() < f.heal:
            link = rng.choice(sorted(self.cut_links, key=sorted))
            self._record("heal", self.step_number, *sorted(link))
            self.cut_links.discard(link)
        if self.one_way is None and rng.random() < f.oneway and self._settled():
            self._start_one_way()
        if rng.random() < f.foreign:
            self._inject_foreign()

    def _fill_disk(self, node_id: int) -> None:
        """node_id's disk is full: every segment write fails with ENOSPC (and writes nothing)."""
        self._record("disk-full", self.step_number, node_id)
        self.disk_full.add(node_id)

        def full(*_args: Any, **_kwargs: Any) -> None:
            raise StorageError(f"node {node_id}: segment write failed: No space left on device")
        for replica in self.members[node_id].replicas.values():
            replica.log.append = full

    def _take_out_of_service(self, node_id: int, error: Exception) -> None:
        """A storage error outside RaftNode's own handlers (a proposal, a
        retention run): fail the node as the broker does (RaftNode.fail: every
        group stops leading and fails what is in flight, the node leaves the
        network); _handle_failures then takes it down until its disk is freed."""
        raft = self.members[node_id].raft
        assert raft is not None
        raft.fail(f"{type(error).__name__}: {error}")

    def _jump_clocks(self) -> None:
        """A node's wall clock jumps, or a skewed one is set right."""
        rng, f = self.rng, self.faults
        for node_id in sorted(self.clock_skew_ms):
            if rng.random() < f.clock_fixed:
                self._record("clock-fixed", self.step_number, node_id)
                del self.clock_skew_ms[node_id]
        if rng.random() < f.clock:
            node_id = rng.choice(sorted(self.members))
            skew = rng.randint(-CLOCK_JUMP_MS_MAX, CLOCK_JUMP_MS_MAX)
            self._record("clock", self.step_number, node_id, skew)
            self.clock_skew_ms[node_id] = skew
            self.clock_jumps += 1

    def _settled(self) -> bool:
        """Every node up, no disk full, no link cut, and each group led by one leader every node follows."""
        if self.cut_links or self.disk_full or not all(m.alive for m in self.members.values()):
            return False
        return all(_followed_by_all([m.replicas[group_id] for m in self.members.values()]) is not None
                   for group_id in self.groups)

    def _followed_leader(self, group_id: int, cut_node: int) -> tuple[int, int] | None:
        """(term, leader) when every live node but `cut_node` follows one leader
        (itself among them) at its term; else None."""
        replicas = [m.replicas[group_id] for m in self.members.values() if m.alive and m.node_id != cut_node]
        leader = _followed_by_all(replicas)
        return None if leader is None else (leader.leader_epoch, leader.self_id)

    def _start_one_way(self) -> None:
        node_id = self.rng.choice(sorted(self.members))
        length = self.rng.randint(*self.faults.oneway_steps)
        self.one_way = OneWay(node_id, self.step_number, self.step_number + length)
        for group_id, group in self.groups.items():
            self.one_way.terms_led[group_id] = set(group.leaders_by_term)
            self.one_way.followed[group_id] = self._followed_leader(group_id, node_id)
        self.one_way_episodes += 1
        self._record("oneway", self.step_number, node_id, length)

    def _inject_foreign(self) -> None:
        """A peer's append_entries, fitting the target's log, holding a foreign command."""
        alive = [m.node_id for m in self.members.values() if m.alive]
        group_id = self.rng.choice(sorted(self.groups))
        command = self.rng.choice(FOREIGN_COMMANDS)
        if len(alive) < 2:
            return
        target = self.rng.choice(alive)
        source = self.rng.choice([n for n in sorted(self.members) if n != target])
        replica = self.members[target].replicas[group_id]
        view = replica.view()
        message = {"type": "append_entries", "term": view.term, "commit_index": view.commit_index,
                   "prevLogIdx": view.last_index, "prevLogTerm": replica.journal.term_at(view.last_index),
                   "entries": [(command, view.last_index + 1, view.term)]}
        self.foreign_injected += 1
        self._record("foreign", self.step_number, group_id, source, target, command[0])
        self.enqueue(source, target, group_id, codec.encode(message), foreign_type=command[0])

    def _propose(self, group_id: int) -> None:
        leaders = [m.replicas[group_id] for m in self.members.values()
                   if m.alive and m.replicas[group_id].is_leader]
        if not leaders:
            return
        replica = self.rng.choice(leaders)
        group = self.groups[group_id]
        if self.rng.random() < self.faults.idempotent:
            self._produce_idempotent(group, replica)
            return
        group.proposals += 1
        payload = f"seed {self.seed} group {group_id} proposal {group.proposals}".encode()
        group.proposed.add(payload)
        batch = build_batch([Record(payload, b"k", (), self._wall_clock_ms(replica.self_id))])
        term = replica.leader_epoch

        def acknowledged(base_offset: int | None, error: Exception | None) -> None:
            if error is None:
                group.acks.append(Ack(base_offset, payload, term))
                self._record("ack", self.step_number, group_id, base_offset, payload)
        try:
            self._guard(replica.self_id, replica.propose_append, batch, acknowledged)
        except NotLeaderError:
            pass

    def _produce_idempotent(self, group: GroupState, replica: PartitionReplica) -> None:
        """An idempotent producer's next batch, a retry of one it sent, a batch past
        a sequence gap, or a new epoch; handed to the leader as a Produce request is."""
        rng, f = self.rng, self.faults
        producer = rng.choices(group.producers, PRODUCER_WEIGHTS)[0]
        roll = rng.random()
        if roll < f.epoch_bump:
            producer.new_epoch()
            self._record("epoch", self.step_number, group.group_id, producer.producer_id, producer.epoch)
            return
        if producer.sent and roll < f.epoch_bump + f.retry:
            sent = rng.choice(list(producer.sent))
            self.retries += 1
        else:
            gap = roll >= 1.0 - f.gap
            sequence = producer.next_sequence + (1 if gap else 0)
            group.proposals += 1
            payload = (f"seed {self.seed} group {group.group_id} proposal {group.proposals} producer "
                       f"{producer.producer_id} epoch {producer.epoch} sequence {sequence}").encode()
            group.proposed.add(payload)
            batch = build_batch([Record(payload, b"k", (), self._wall_clock_ms(replica.self_id))],
                                producer_id=producer.producer_id,
                                producer_epoch=producer.epoch, base_sequence=sequence)
            sent = SentBatch(payload, bytes(batch))
            producer.next_sequence = sequence + 1   # a skipped sequence is never sent: one batch per sequence
            producer.sent.append(sent)
        try:
            future = self._guard(replica.self_id, replica.append, bytearray(sent.batch))
        except NotLeaderError:
            return
        if future is not None:
            self.in_flight.append(InFlight(group.group_id, producer, sent, future, producer.epoch))

    def _propose_metadata(self) -> None:
        """A command to the metadata leader, as brokers and admin clients send:
        a broker registers, takes a producer id block, or a topic is created."""
        leaders = [m.metadata for m in self.members.values()
                   if m.alive and m.metadata is not None and m.metadata.is_leader]
        if not leaders:
            return
        replica = self.rng.choice(leaders)
        kind = self.rng.choice(("register", "allocate", "topic"))
        node_id = self.rng.choice(sorted(self.members))
        topic = ""
        if kind == "register":
            payload = register_broker(node_id, "127.0.0.1", 9091 + node_id)
        elif kind == "allocate":
            payload = allocate_producer_ids(node_id, PRODUCER_ID_BLOCK)
        else:
            topic = f"topic-{self.meta.topics_proposed}"
            self.meta.topics_proposed += 1
            payload = create_topic(topic, self.rng.randbytes(16), [[node_id]], {})
        try:
            future = self._guard(replica.self_id, replica.propose, payload)
        except NotLeaderError:
            return
        if future is not None:
            self.meta.in_flight.append((future, kind, topic))

    def _settle_metadata(self) -> None:
        """Metadata commands applied with success: what must survive."""
        waiting = []
        for future, kind, topic in self.meta.in_flight:
            if not future.done():
                waiting.append((future, kind, topic))
            elif future.exception() is None and future.result() == 0:
                self._record("meta-ack", self.step_number, kind, topic)
                if kind == "topic":
                    self.meta.acked_topics.add(topic)
                elif kind == "allocate":
                    self.meta.acked_allocations += 1
        self.meta.in_flight = waiting

    def _settle_in_flight(self) -> None:
        """Answered appends: acknowledgements to check; a producer told its
        sequence is out of order starts a new epoch (as librdkafka does)."""
        waiting = []
        for append in self.in_flight:
            if not append.future.done():
                waiting.append(append)
                continue
            error = append.future.exception()
            if error is None:
                group = self.groups[append.group_id]
                base_offset = append.future.result()
                group.acks.append(Ack(base_offset, append.sent.payload, -1))
                self._record("ack", self.step_number, append.group_id, base_offset, append.sent.payload)
            elif isinstance(error, OutOfOrderSequenceError) and append.producer.epoch == append.epoch:
                append.producer.new_epoch()
                self._record("epoch", self.step_number, append.group_id, append.producer.producer_id,
                             append.producer.epoch)
        self.in_flight = waiting

    def heal_and_converge(self, max_steps: int = MAX_HEAL_STEPS) -> None:
        self.healing = True
        self.faults = replace(self.faults, drop=0, duplicate=0, crash=0, restart=1.0, cut=0, heal=1.0, oneway=0,
                              foreign=0, propose=0, power=0, max_delay_s=0.005, disk_full=0, disk_freed=1.0,
                              clock=0, clock_fixed=1.0, metadata=0)
        self.cut_links.clear()
        if self.one_way is not None:
            self._record("oneway-end", self.step_number, self.one_way.node_id)
            self.one_way = None
        for _ in range(max_steps):
            self.step()
            if self._converged():
                break
        else:
            raise self._violation(f"no convergence within {max_steps} steps after healing: {self.describe()}")
        for group_id, group in self.groups.items():
            views = {m.node_id: readable_bytes(m.replicas[group_id].log) for m in self.members.values()}
            starts = {m.node_id: m.replicas[group_id].log.log_start_offset for m in self.members.values()}
            for ack in group.acks:
                for node_id, view in views.items():
                    if ack.base_offset >= starts[node_id] and payload_at(view, ack.base_offset) != ack.payload:
                        raise self._violation(f"group {group_id}: acknowledged append at offset {ack.base_offset} "
                                              f"({ack.payload!r}) missing on node {node_id} after healing")
            for node_id, view in views.items():
                for record in parse_records(view):
                    if record.value not in group.proposed:
                        raise self._violation(f"group {group_id}: node {node_id} holds a record nobody proposed "
                                              f"at offset {record.offset}: {record.value!r}")
            files = {m.node_id: _segment_bytes(m, group_id) for m in self.members.values()}
            if len(set(files.values())) != 1:
                raise self._violation(f"group {group_id}: segment files differ after convergence: "
                                      f"{ {k: len(v) for k, v in files.items()} }")
            self._record("final", group_id, hashlib.sha256(next(iter(files.values()))).hexdigest())
        if self.metadata:
            self._check_metadata_healed()

    def _converged(self) -> bool:
        members = list(self.members.values())
        if not all(m.alive for m in members):
            return False
        for group_id in self.groups:
            replicas = [m.replicas[group_id] for m in members]
            if _committed_leader(replicas) is None:
                return False
            if len({(r.log.high_watermark, r.log.log_end_offset, r.view().applied_index) for r in replicas}) != 1 \
                    or any(r.catching_up for r in replicas):
                return False
        return not self.metadata or _group_settled([m.metadata for m in members])

    # ---- invariants ----------------------------------------------------------

    def check_invariants(self) -> None:
        if self._foreign_in_journal:
            raise self._violation(self._foreign_in_journal[0])
        for group_id, group in self.groups.items():
            for member in self.members.values():
                if member.alive:
                    self._check_replica(group, member.node_id, member.replicas[group_id])
            self._check_acks(group)
        self._check_metadata()
        if self.one_way is not None:
            self._check_stickiness(self.one_way)

    def _check_leader(self, leaders_by_term: dict[int, int], group: str, term: int, node_id: int,
                      event: tuple[Any, ...]) -> None:
        """Election safety: node_id leads `group` in `term`, and no other node
        ever did; the first leader seen in a term is traced as `event`."""
        other = leaders_by_term.get(term)
        if other is None:
            leaders_by_term[term] = node_id
            self._record(*event)
        elif other != node_id:
            raise self._violation(f"{group}: two leaders in term {term}: nodes {other} and {node_id}")

    def _check_metadata(self) -> None:
        """The metadata group: one leader per term, and every node that has
        applied up to one index holds the same state there."""
        for member in self.members.values():
            meta = member.metadata
            if not member.alive or meta is None:
                continue
            if meta.is_leader:
                term = meta.leader_epoch
                self._check_leader(self.meta.leaders_by_term, "metadata group", term, member.node_id,
                                   ("meta-leader", self.step_number, term, member.node_id))
            applied = meta.view().applied_index
            if self.meta.checked_index.get(member.node_id) == applied:
                continue
            self.meta.checked_index[member.node_id] = applied
            digest = hashlib.sha256(meta.machine.snapshot()).hexdigest()
            seen = self.meta.states.setdefault(applied, (digest, member.node_id))
            if seen[0] != digest:
                raise self._violation(f"metadata group: node {member.node_id}'s state at applied index {applied} "
                                      f"differs from node {seen[1]}'s")

    def _check_metadata_healed(self) -> None:
        """After healing: one state everywhere, holding every acknowledged command."""
        states = {m.node_id: m.metadata.machine for m in self.members.values() if m.metadata is not None}
        if len({hashlib.sha256(state.snapshot()).hexdigest() for state in states.values()}) > 1:
            raise self._violation("metadata group: states differ after convergence")
        for node_id, state in states.items():
            missing = sorted(self.meta.acked_topics - set(state.topics))
            if missing:
                raise self._violation(f"metadata group: acknowledged topic {missing[0]} missing on node {node_id}")
            if state.next_producer_id < self.meta.acked_allocations * PRODUCER_ID_BLOCK:
                raise self._violation(f"metadata group: node {node_id} hands out producer ids from "
                                      f"{state.next_producer_id}, below {self.meta.acked_allocations} "
                                      f"acknowledged blocks of {PRODUCER_ID_BLOCK}")
        if states:
            self._record("meta-final", hashlib.sha256(next(iter(states.values())).snapshot()).hexdigest())

    def _check_stickiness(self, episode: OneWay) -> None:
        """During a one-way episode, a leader that every node but the cut one
        followed at the previous step still leads, in the same term."""
        for group_id, group in self.groups.items():
            followed = episode.followed[group_id]
            if followed is not None:
                term, leader = followed
                replica = self.members[leader].replicas[group_id]
                if not (replica.is_leader and replica.leader_epoch == term):
                    raise self._violation(
                        f"group {group_id}: node {leader}, leader of term {term} followed by every node but "
                        f"{episode.node_id}, lost its leadership (now term {replica.leader_epoch}) while node "
                        f"{episode.node_id} receives nothing (one-way partition since step {episode.start_step})")
            new_terms = set(group.leaders_by_term) - episode.terms_led[group_id]
            episode.leader_changes += len(new_terms)
            episode.terms_led[group_id] |= new_terms
            episode.followed[group_id] = self._followed_leader(group_id, episode.node_id)

    def _check_agreed(self, group: GroupState) -> None:
        """The agreed log's batches not seen before: offsets dense from 0, and
        acknowledged offsets holding their appends. Every node's readable log is
        a prefix of the agreed one, so this holds for each of them too."""
        position = group.agreed_parsed
        for header, batch in iter_batches(memoryview(group.agreed)[group.agreed_parsed:]):
            group.agreed_positions[header.base_offset] = position
            position += len(batch)
            if header.base_offset != group.agreed_end:
                raise self._violation(f"group {group.group_id}, node {group.agreed_by}: batch at offset "
                                      f"{header.base_offset}, expected {group.agreed_end}")
            group.agreed_end = header.last_offset + 1
            if header.producer_id != NO_PRODUCER_ID:
                self._check_written_once(group, header)
            value = next(iter(parse_records(batch))).value
            group.agreed_values[header.base_offset] = value
            acked = group.acked_values.get(header.base_offset)
            if acked is not None and acked != value:
                raise self._violation(f"group {group.group_id}: acknowledged offset {header.base_offset} "
                                      f"holds another append")
        group.agreed_parsed = len(group.agreed)

    def _check_written_once(self, group: GroupState, header: Any) -> None:
        """An idempotent producer's batch is in the agreed log once, unless its
        first copy was deleted by retention (its producer is then forgotten, as
        in Kafka, and a retry is new)."""
        key = (header.producer_id, header.producer_epoch, header.base_sequence)
        earlier = group.written.get(key)
        group.written[key] = header.base_offset
        if earlier is None:
            return
        log_start = max((m.replicas[group.group_id].log.log_start_offset for m in self.members.values()
                         if m.alive), default=0)
        if earlier >= log_start:
            raise self._violation(f"group {group.group_id}: producer {key[0]} epoch {key[1]} sequence {key[2]} "
                                  f"written twice, at offsets {earlier} and {header.base_offset}")

    def _check_acks(self, group: GroupState) -> None:
        """Acknowledgements since the last step: each offset acknowledged once,
        and holding its append if the agreed log reaches it."""
        for ack in group.acks[group.acks_checked:]:
            earlier = group.acked_values.setdefault(ack.base_offset, ack.payload)
            if earlier != ack.payload:
                raise self._violation(f"group {group.group_id}: offset {ack.base_offset} acknowledged twice, "
                                      f"for {earlier!r} and {ack.payload!r}")
            if group.agreed_values.get(ack.base_offset, ack.payload) != ack.payload:
                raise self._violation(f"group {group.group_id}: acknowledged offset {ack.base_offset} "
                                      f"holds another append")
        group.acks_checked = len(group.acks)

    def _check_replica(self, group: GroupState, node_id: int, replica: PartitionReplica) -> None:
        if replica.is_leader:
            term = replica.leader_epoch
            self._check_leader(group.leaders_by_term, f"group {group.group_id}", term, node_id,
                               ("leader", self.step_number, group.group_id, term, node_id))
        log = replica.log
        if not log.high_watermark <= log.log_end_offset:
            raise self._violation(f"group {group.group_id}, node {node_id}: high watermark {log.high_watermark} "
                                  f"> log end offset {log.log_end_offset}")
        if len(log.read(log.high_watermark, 1 << 20).buffer):
            raise self._violation(f"group {group.group_id}, node {node_id}: readable past the high watermark "
                                  f"{log.high_watermark}")
        view = readable_bytes(log)
        # retention moved the log start: compare from where this log starts
        start = group.agreed_positions.get(log.log_start_offset, 0 if log.log_start_offset == 0 else None)
        if start is None:
            if log.log_start_offset != group.agreed_end:
                return   # starts past everything agreed so far: nothing to compare with yet
            start = len(group.agreed)
        agreed = group.agreed[start:]
        shorter, longer = sorted((view, agreed), key=len)
        if longer[:len(shorter)] != shorter:
            raise self._violation(f"group {group.group_id}: node {node_id}'s committed log diverges "
                                  f"from the agreed log")
        if len(view) > len(agreed):
            group.agreed, group.agreed_by = group.agreed[:start] + view, node_id
            self._check_agreed(group)   # dense, acknowledged appends in place: each new batch once

    def describe(self) -> str:
        parts = []
        for m in self.members.values():
            if not m.alive:
                parts.append(f"n{m.node_id}: down")
                continue
            for group_id, r in m.replicas.items():
                raft = r.view()
                parts.append(f"n{m.node_id}/g{group_id}: leader={r.is_leader} term={r.leader_epoch} "
                             f"hw={r.log.high_watermark} leo={r.log.log_end_offset} applied={raft.applied_index} "
                             f"commit={raft.commit_index} last={raft.last_index} catching_up={r.catching_up}")
            if m.metadata is not None:
                raft = m.metadata.view()
                parts.append(f"n{m.node_id}/metadata: leader={raft.is_leader} term={raft.term} "
                             f"applied={raft.applied_index} commit={raft.commit_index} last={raft.last_index}")
        return "; ".join(parts)

    def _violation(self, what: str) -> InvariantViolation:
        return InvariantViolation(self.seed, self.step_number, what, self.healing)


def _committed_leader(replicas: list[Any]) -> Any:
    """The view of the group's one leader if it has committed all it holds, else None."""
    leaders = [r for r in replicas if r.is_leader]
    if len(leaders) != 1:
        return None
    leader = leaders[0].view()
    return leader if leader.commit_index == leader.last_index else None


def _group_settled(replicas: list[Any]) -> bool:
    """One leader, everything it holds committed and applied by every member."""
    leader = _committed_leader(replicas)
    return leader is not None and all(r.view().applied_index == leader.last_index for r in replicas)


def _followed_by_all(replicas: list[PartitionReplica]) -> PartitionReplica | None:
    """The one leader among `replicas` that every one of them follows at its term, or None."""
    leaders = [r for r in replicas if r.is_leader]
    if len(leaders) != 1:
        return None
    leader = leaders[0]
    if any(r.leader_id != leader.self_id or r.leader_epoch != leader.leader_epoch for r in replicas):
        return None
    return leader


def readable_bytes(log: PartitionLog) -> bytes:
    """Every byte a reader of `log` can see: start to high watermark."""
    out, offset = bytearray(), log.log_start_offset
    while offset < log.high_watermark:
        piece = log.read(offset, 1 << 20)
        out += piece.buffer
        offset = piece.next_offset
    return bytes(out)


def payload_at(view: bytes, offset: int) -> bytes | None:
    for header, batch in iter_batches(view):
        if header.base_offset == offset:
            return next(iter(parse_records(batch))).value
        if header.base_offset > offset:
            return None
    return None


def _segment_bytes(member: SimNode, group_id: int) -> bytes:
    return b"".join(p.read_bytes() for p in sorted((member.root / f"p-{group_id - 1}").glob("*.log")))


# ---- the public entry points ---------------------------------------------------

@dataclass
class SeedResult:
    """One seed's run."""

    seed: int
    steps: int
    ok: bool
    trace_hash: str
    elapsed_s: float
    failure: str | None = None       # the violation, with seed and step
    failed_step: int | None = None   # the step it failed at (past `steps`: while healing)
    acks: int = 0
    leader_changes: int = 0          # leaders seen, summed over groups (one per term led)
    one_way_episodes: int = 0
    foreign_injected: int = 0
    foreign_refused: int = 0         # injected ones delivered (not lost) and refused
    power_losses: int = 0            # power cuts (of one node, a minority or all)
    lossy_power_losses: int = 0      # replicas that lost written but unsynced bytes to a power cut
    retries: int = 0                 # idempotent producers' retries of batches they had sent
    disk_full_failures: int = 0      # nodes that took themselves out of service on a full disk
    clock_jumps: int = 0             # wall clocks set wrong
    heartbeats_accepted: int = 0     # coalesced heartbeats (one per group) RaftNode's followers accepted

    def as_dict(self) -> dict[str, Any]:
        return dict(vars(self))


def _faults_for(faults: Faults | Iterable[str] | None) -> Faults:
    if faults is None:
        return Faults()
    if isinstance(faults, Faults):
        return faults
    return Faults.of(faults)


def run_seed(seed: int, steps: int = DEFAULT_STEPS, nodes: int = 3, faults: Faults | Iterable[str] | None = None,
             plant: str | None = None, partitions: int = 1, root: Path | None = None,
             metadata: bool = True) -> SeedResult:
    """Run one seed's schedule of `steps` steps, then heal; invariants checked
    throughout. `faults`: fault names (FAULT_NAMES; None: all) or a Faults.
    `plant`: a PLANTS name, in force for this run only. `metadata` False
    leaves the metadata group out (the schedules seeds had before it ran).
    Scratch files go to a temporary directory (under `root` if given), removed after."""
    if nodes not in (3, 5):
        raise ValueError(f"nodes must be 3 or 5, not {nodes}")
    if partitions < 1:
        raise ValueError(f"partitions must be at least 1, not {partitions}")
    chosen = _faults_for(faults)
    planted = PLANTS[plant] if plant is not None else None
    options: dict[str, Any] = {}
    if planted is not None:
        options = dict(planted.options)
        if planted.adjust_faults is not None:
            chosen = planted.adjust_faults(chosen)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix=f"raftka-sim-{seed}-", dir=root) as directory:
        sim = Simulation(Path(directory), seed, nodes=nodes, faults=chosen, partitions=partitions, metadata=metadata,
                         **options)
        failure: InvariantViolation | None = None
        with planted.applied() if planted is not None else _nothing():
            try:
                sim.run(steps)
            except InvariantViolation as violation:
                failure = violation
            finally:
                sim.stop_all()
    return SeedResult(seed=seed, steps=steps, ok=failure is None, trace_hash=sim.trace_hash,
                      elapsed_s=round(time.monotonic() - started, 3),
                      failure=str(failure) if failure is not None else None,
                      failed_step=failure.step if failure is not None else None,
                      acks=sim.acks, leader_changes=sim.leader_changes, one_way_episodes=sim.one_way_episodes,
                      foreign_injected=sim.foreign_injected, foreign_refused=sim.foreign_refused,
                      power_losses=sim.power_losses, lossy_power_losses=sim.lossy_power_losses,
                      retries=sim.retries, disk_full_failures=sim.disk_full_failures, clock_jumps=sim.clock_jumps,
                      heartbeats_accepted=sim.heartbeats_accepted)


@contextmanager
def _nothing() -> Iterator[None]:
    yield


def shortest_failing(failed: SeedResult, run: Callable[[int], SeedResult]) -> tuple[SeedResult, int]:
    """A shorter run of the failing seed that still fails: a bisection over the
    step count, between 0 (taken to pass) and the step it failed at (the same
    schedule's prefix, so it fails there too). `run(steps)` reruns the seed.
    Failure need not be monotonic in steps; the result fails, and no count
    the bisection tried below it did. Returns (that run, reruns made)."""
    assert not failed.ok and failed.failed_step is not None
    best = failed
    low, high = 0, min(failed.failed_step, failed.steps)
    reruns = 0
    if high < failed.steps:
        best = run(high)
        reruns += 1
        if best.ok:             # not a prefix after all (it should be): keep the original
            return failed, reruns
    while high - low > 1:
        middle = (low + high) // 2
        attempt = run(middle)
        reruns += 1
        if attempt.ok:
            low = middle
        else:
            high, best = middle, attempt
    return best, reruns


@dataclass
class SweepResult:
    results: list[SeedResult]
    failure: SeedResult | None = None     # the first failing seed's run
    shortest: SeedResult | None = None    # its shortest failing run found
    reruns: int = 0
    elapsed_s: float = 0.0

    @property
    def ok(self) -> bool:
        return self.failure is None


def sweep(seeds: Iterable[int], steps: int = DEFAULT_STEPS, nodes: int = 3,
          faults: Faults | Iterable[str] | None = None, plant: str | None = None, partitions: int = 1,
          root: Path | None = None, shrink: bool = True,
          on_result: Callable[[SeedResult], None] | None = None) -> SweepResult:
    """Run each seed until one fails; shrink that one's step count (`shrink`)."""
    faults = _faults_for(faults)
    started = time.monotonic()
    outcome = SweepResult([])
    for seed in seeds:
        result = run_seed(seed, steps, nodes, faults, plant, partitions, root)
        outcome.results.append(result)
        if on_result is not None:
            on_result(result)
        if not result.ok:
            outcome.failure = result
            if shrink:
                outcome.shortest, outcome.reruns = shortest_failing(
                    result, lambda n: run_seed(seed, n, nodes, faults, plant, partitions, root))
            break
    outcome.elapsed_s = round(time.monotonic() - started, 3)
    return outcome


def replay_command(seed: int, steps: int, nodes: int = 3, partitions: int = 1,
                   faults: Iterable[str] | None = None, plant: str | None = None) -> str:
    """The `raftka simulate` command line that reruns exactly this run."""
    words = ["raftka", "simulate", "--seed", str(seed), "--steps", str(steps)]
    if nodes != 3:
        words += ["--nodes", str(nodes)]
    if partitions != 1:
        words += ["--partitions", str(partitions)]
    if faults is not None and set(faults) != set(FAULT_NAMES):
        words += ["--faults", ",".join(name for name in FAULT_NAMES if name in set(faults))]
    if plant is not None:
        words += ["--plant", plant]
    return " ".join(words)
