"""Deterministic simulation of a partition's Raft group: the real PartitionReplica,
DiskJournal, PartitionLog and LMDB index of every node, driven by a fake clock
(pysyncobj's time source patched) over an in-memory network that drops,
delays, duplicates and reorders messages, cuts links, and crashes and
restarts nodes (restart = reopen everything from disk, as after a SIGKILL).

Everything random comes from one seed, so a failing run replays exactly:
`Simulation(root, seed).run(steps)`; failures carry the seed in their message.

After every step the invariants are checked (check_invariants):
- election safety: at most one leader per term, ever;
- agreement: the readable (below high watermark) logs of all nodes are
  prefixes of one another, byte for byte;
- every acknowledged append sits at its acknowledged offset in the agreed log;
- per node: offsets dense from 0, high watermark <= log end offset, nothing
  readable at or past the high watermark.
`heal_and_converge` then ends all faults and requires every node to hold
every acknowledged append and byte-identical segment files.
"""
from __future__ import annotations

import heapq
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from raftka.config import Config
from raftka.records.batch import Record, build_batch, iter_batches, parse_records
from raftka.storage.index import IndexStore
from raftka.storage.partition_log import PartitionLog
from raftka.raft import codec
from raftka.raft.pysyncobj_adapter import patched_clock
from raftka.replication import NotLeaderError, PartitionReplica
from tests.conftest import readable_bytes

GROUP = 1
STEP_S = 0.01
SIM_RAFT = dict(raftMinTimeout=0.3, raftMaxTimeout=0.6, appendEntriesPeriod=0.05, leaderFallbackTimeout=0.6,
                logCompactionMinEntries=25, logCompactionMinTime=5.0)


class InvariantViolation(AssertionError):
    pass


@dataclass
class Faults:
    """Per-step probabilities of the simulation's faults."""

    drop: float = 0.05
    duplicate: float = 0.03
    max_delay_s: float = 0.04        # delays are uniform in [1 ms, max]: messages reorder
    crash: float = 0.01
    restart: float = 0.05            # per crashed node per step
    cut: float = 0.01
    heal: float = 0.05
    propose: float = 0.3


class FakeClock:
    """Advances by the step, and by a microsecond per reading: pysyncobj bounds
    some loops by elapsed time, and real time always passes."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        self.now += 1e-6
        return self.now


class _Endpoint:
    """What a node's GroupTransport sends through."""

    def __init__(self, sim: "Simulation", node_id: int) -> None:
        self._sim, self._node_id = sim, node_id

    def send(self, peer_id: int, group_id: int, message: Any) -> bool:
        self._sim.enqueue(self._node_id, peer_id, codec.encode(message))
        return True


@dataclass
class SimNode:
    node_id: int
    root: Path
    index: IndexStore | None = None
    replica: PartitionReplica | None = None

    @property
    def alive(self) -> bool:
        return self.replica is not None


@dataclass
class Ack:
    base_offset: int
    payload: bytes       # the unique record value of the acknowledged batch
    term: int


@dataclass
class Simulation:
    root: Path
    seed: int
    nodes: int = 3
    faults: Faults = field(default_factory=Faults)
    persist_vote: bool = True        # False: the deliberate bug the checker must catch
    raft_overrides: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)
        self.clock = FakeClock()
        self.queue: list[tuple[float, int, int, int, bytes]] = []
        self.sequence = 0
        self.cut_links: set[frozenset[int]] = set()
        self.members = {i: SimNode(i, self.root / f"n{i}") for i in range(1, self.nodes + 1)}
        self.leaders_by_term: dict[int, int] = {}
        self.acks: list[Ack] = []
        self.agreed = b""                # longest readable log seen; all others must be prefixes
        self.proposals = 0
        self.step_number = 0

    # ---- nodes -------------------------------------------------------------

    def start_node(self, node_id: int) -> None:
        member = self.members[node_id]
        member.index = IndexStore(member.root / "index.lmdb", 1 << 28)
        log = PartitionLog("p-0", member.root / "p-0", 0, member.index, Config(data_dir=member.root))
        member.replica = PartitionReplica(GROUP, log, node_id, list(self.members), _Endpoint(self, node_id),
                                          member.root / "raft", persist_vote=self.persist_vote,
                                          **{**SIM_RAFT, **self.raft_overrides})
        for peer in self.members:
            if peer != node_id:
                member.replica.transport.peer_connected(peer)

    def crash_node(self, node_id: int) -> None:
        """As SIGKILL: files keep what was written, nothing in memory is saved."""
        member = self.members[node_id]
        replica = member.replica
        assert replica is not None
        replica.journal.abandon()
        replica.log.abandon()
        member.index.close()
        member.replica = member.index = None

    def stop_all(self) -> None:
        for member in self.members.values():
            if member.alive:
                self.crash_node(member.node_id)

    # ---- network -----------------------------------------------------------

    def enqueue(self, source: int, target: int, payload: bytes) -> None:
        if self.rng.random() < self.faults.drop:
            return
        copies = 2 if self.rng.random() < self.faults.duplicate else 1
        for _ in range(copies):
            delay = self.rng.uniform(0.001, self.faults.max_delay_s)
            self.sequence += 1
            heapq.heappush(self.queue, (self.clock.now + delay, self.sequence, source, target, payload))

    def _deliver_due(self) -> None:
        while self.queue and self.queue[0][0] <= self.clock.now:
            _, _, source, target, payload = heapq.heappop(self.queue)
            member = self.members[target]
            if not member.alive or frozenset((source, target)) in self.cut_links:
                continue
            if not self.members[source].alive:
                continue  # a crashed sender's in-flight bytes die with its connection
            member.replica.transport.deliver(source, codec.decode(payload))

    # ---- the schedule ------------------------------------------------------

    def run(self, steps: int) -> None:
        with patched_clock(self.clock):
            random.seed(self.seed)       # pysyncobj draws election timeouts from `random`
            for node_id in self.members:
                self.start_node(node_id)
            for _ in range(steps):
                self.step()
            self.heal_and_converge()

    def step(self) -> None:
        self.step_number += 1
        self.clock.now += STEP_S
        self._deliver_due()
        for member in self.members.values():
            if member.alive:
                member.replica.doTick(0.0)
        self._random_fault()
        if self.rng.random() < self.faults.propose:
            self._propose()
        self.check_invariants()

    def _random_fault(self) -> None:
        rng, f = self.rng, self.faults
        alive = [m.node_id for m in self.members.values() if m.alive]
        dead = [m.node_id for m in self.members.values() if not m.alive]
        if alive and rng.random() < f.crash:
            self.crash_node(rng.choice(alive))
        for node_id in dead:
            if rng.random() < f.restart:
                self.start_node(node_id)
        if rng.random() < f.cut:
            a, b = rng.sample(sorted(self.members), 2)
            self.cut_links.add(frozenset((a, b)))
        if self.cut_links and rng.random() < f.heal:
            self.cut_links.discard(rng.choice(sorted(self.cut_links, key=sorted)))

    def _propose(self) -> None:
        leaders = [m for m in self.members.values() if m.alive and m.replica.is_leader]
        if not leaders:
            return
        member = self.rng.choice(leaders)
        self.proposals += 1
        payload = f"seed {self.seed} proposal {self.proposals}".encode()
        batch = build_batch([Record(payload, b"k", (), 1_700_000_000_000 + self.proposals)])
        term = member.replica.leader_epoch

        def acknowledged(base_offset: int | None, error: Exception | None) -> None:
            if error is None:
                self.acks.append(Ack(base_offset, payload, term))
        try:
            member.replica.propose_append(batch, acknowledged)
        except NotLeaderError:
            pass

    def heal_and_converge(self, max_steps: int = 3000) -> None:
        self.faults = Faults(drop=0, duplicate=0, crash=0, restart=1.0, cut=0, heal=1.0, propose=0,
                             max_delay_s=0.005)
        self.cut_links.clear()
        for _ in range(max_steps):
            self.step()
            if self._converged():
                break
        else:
            raise self._violation(f"no convergence within {max_steps} steps after healing: {self.describe()}")
        views = {m.node_id: self._readable(m) for m in self.members.values()}
        for ack in self.acks:
            for node_id, view in views.items():
                if _payload_at(view, ack.base_offset) != ack.payload:
                    raise self._violation(f"acknowledged append at offset {ack.base_offset} "
                                          f"({ack.payload!r}) missing on node {node_id} after healing")
        files = {m.node_id: _segment_bytes(m) for m in self.members.values()}
        if len(set(files.values())) != 1:
            raise self._violation(f"segment files differ after convergence: "
                                  f"{ {k: len(v) for k, v in files.items()} }")

    def _converged(self) -> bool:
        members = list(self.members.values())
        if not all(m.alive for m in members):
            return False
        leaders = [m for m in members if m.replica.is_leader]
        if len(leaders) != 1:
            return False
        leader = leaders[0].replica.view()
        if leader.commit_index != leader.last_index:
            return False
        return len({(m.replica.log.high_watermark, m.replica.log.log_end_offset,
                     m.replica.view().applied_index) for m in members}) == 1 \
            and not any(m.replica.catching_up for m in members)

    # ---- invariants ----------------------------------------------------------

    def check_invariants(self) -> None:
        for member in self.members.values():
            if not member.alive:
                continue
            replica = member.replica
            if replica.is_leader:
                term = replica.leader_epoch
                other = self.leaders_by_term.setdefault(term, member.node_id)
                if other != member.node_id:
                    raise self._violation(f"two leaders in term {term}: nodes {other} and {member.node_id}")
            log = replica.log
            if not log.high_watermark <= log.log_end_offset:
                raise self._violation(f"node {member.node_id}: high watermark {log.high_watermark} "
                                      f"> log end offset {log.log_end_offset}")
            if len(log.read(log.high_watermark, 1 << 20).buffer):
                raise self._violation(f"node {member.node_id}: readable past the high watermark "
                                      f"{log.high_watermark}")
            view = self._readable(member)
            _check_dense(view, member.node_id, self)
            self._check_agreement(view, member.node_id)
        for ack in self.acks:
            if _payload_at(self.agreed, ack.base_offset) not in (ack.payload, None):
                raise self._violation(f"acknowledged offset {ack.base_offset} holds another append")

    def _check_agreement(self, view: bytes, node_id: int) -> None:
        shorter, longer = sorted((view, self.agreed), key=len)
        if longer[:len(shorter)] != shorter:
            raise self._violation(f"node {node_id}'s committed log diverges from the agreed log")
        self.agreed = longer

    @staticmethod
    def _readable(member: SimNode) -> bytes:
        return readable_bytes(member.replica.log)

    def describe(self) -> str:
        parts = []
        for m in self.members.values():
            if not m.alive:
                parts.append(f"n{m.node_id}: down")
                continue
            r, raft = m.replica, m.replica.view()
            parts.append(f"n{m.node_id}: leader={r.is_leader} term={r.leader_epoch} hw={r.log.high_watermark} "
                         f"leo={r.log.log_end_offset} applied={raft.applied_index} "
                         f"commit={raft.commit_index} last={raft.last_index} "
                         f"catching_up={r.catching_up}")
        return "; ".join(parts)

    def _violation(self, what: str) -> InvariantViolation:
        return InvariantViolation(f"seed {self.seed}, step {self.step_number}: {what} "
                                  f"(replay: Simulation(root, seed={self.seed}).run(steps))")


def _payload_at(view: bytes, offset: int) -> bytes | None:
    for header, batch in iter_batches(view):
        if header.base_offset == offset:
            return next(iter(parse_records(batch))).value
        if header.base_offset > offset:
            return None
    return None


def _check_dense(view: bytes, node_id: int, sim: Simulation) -> None:
    expected = 0
    for header, _ in iter_batches(view):
        if header.base_offset != expected:
            raise sim._violation(f"node {node_id}: batch at offset {header.base_offset}, expected {expected}")
        expected = header.last_offset + 1


def _segment_bytes(member: SimNode) -> bytes:
    return b"".join(p.read_bytes() for p in sorted((member.root / "p-0").glob("*.log")))


def fresh_root(root: Path) -> Path:
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    return root
