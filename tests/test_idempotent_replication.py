"""Idempotent producers across leader changes and restarts, on the real
PartitionReplica under the deterministic simulation's clock and network: a
retry is answered with its original's offset only while that offset holds
the original, and a replica that restarts decides about retries as the
others do (its producer state comes from the whole retained log)."""
from __future__ import annotations

import asyncio
import random
from pathlib import Path

from raftka.raft.pysyncobj_adapter import patched_clock
from raftka.records.batch import Record, build_batch, read_header
from raftka.replication.simulation import Faults, Simulation, payload_at, readable_bytes

QUIET = Faults.of([], propose=0.0, heal=0.0, retention=0.0)   # no random faults or traffic: the test drives


def run_steps(sim: Simulation, count: int) -> None:
    with patched_clock(sim.clock):
        for _ in range(count):
            sim.step()


def leader_of(sim: Simulation, exclude: int | None = None):
    return next(m.replicas[1] for m in sim.members.values()
                if m.alive and m.node_id != exclude and m.replicas[1].is_leader)


def start(sim: Simulation, seed: int) -> None:
    random.seed(seed)   # pysyncobj draws its election timeouts from `random`
    with patched_clock(sim.clock):
        for node_id in sim.members:
            sim.start_node(node_id)
    run_steps(sim, 100)


def test_a_retry_parked_on_an_uncommitted_original_is_never_answered_with_another_batchs_offset(tmp_path):
    async def run() -> None:
        sim = Simulation(Path(tmp_path), 4, faults=QUIET)
        start(sim, 4)
        try:
            old = leader_of(sim)
            for other in sim.members:             # the leader is cut off: what it appends never commits
                if other != old.self_id:
                    sim.cut_links.add(frozenset((old.self_id, other)))
            original = build_batch([Record(b"idempotent", b"k", (), 1_700_000_000_000)], producer_id=5,
                                   producer_epoch=0, base_sequence=0)
            first = old.append(bytearray(original))
            run_steps(sim, 1)
            retry = old.append(bytearray(original))   # the client timed out and retries: parked on offset 0
            run_steps(sim, 200)                       # the others elect a leader of a later term
            new = leader_of(sim, exclude=old.self_id)
            for i in range(3):                        # ... which writes other batches at offsets 0, 1, 2
                new.propose_append(build_batch([Record(b"other-%d" % i, b"k", (), 1_700_000_000_100 + i)]),
                                   lambda _offset, _error: None)
                run_steps(sim, 5)
            sim.cut_links.clear()                     # the old leader rejoins: its offset 0 is truncated
            run_steps(sim, 300)
            assert payload_at(readable_bytes(old.log), 0) == b"other-0"
            for future in (first, retry):
                assert future.done()
                assert future.exception() is not None, f"acknowledged at offset {future.result()}, " \
                                                       f"which holds another batch"
        finally:
            sim.stop_all()
    asyncio.run(run())


def test_a_restarted_replica_still_knows_a_producer_whose_last_batch_is_many_segments_back(tmp_path):
    sim = Simulation(Path(tmp_path), 3, faults=QUIET, log_settings=dict(segment_bytes=1024))
    start(sim, 3)
    try:
        original = build_batch([Record(b"idem", b"k", (), 1_700_000_000_000)], producer_id=77, producer_epoch=0,
                               base_sequence=0)
        acked = []
        leader_of(sim).propose_append(original, lambda offset, error: acked.append((offset, error)))
        run_steps(sim, 20)
        for i in range(40):                           # other traffic fills several segments
            leader_of(sim).propose_append(build_batch([Record(b"x" * 200, b"k", (), 1_700_000_000_001 + i)]),
                                          lambda _offset, _error: None)
            run_steps(sim, 3)
        run_steps(sim, 30)
        assert acked == [(0, None)]
        retry = read_header(original)
        for member in sim.members.values():
            assert len(member.replicas[1].log.segments) > 3
            assert member.replicas[1].producers.check(retry) == 0
        sim.crash_node(1)
        with patched_clock(sim.clock):
            sim.start_node(1)
        assert sim.members[1].replicas[1].producers.check(retry) == 0   # a retry, as for the others
    finally:
        sim.stop_all()
