"""StateMachineReplica: a Raft group whose state is a small in-memory state
machine (the cluster metadata), replicated command by command.

A command is raw bytes, `0x11 | payload`; every replica hands the payload to
its machine's `apply` in commit order and the proposer gets the result.
Compaction writes the machine's whole `snapshot()` into the checkpoint, and
a restart restores it, then re-applies the journal entries after it, so the
machine needs no storage of its own. It must be deterministic: same
commands, same state, on every replica.
"""
from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any, Protocol

from raftka.raft import checkpoint
from raftka.raft.group import MAX_COMMAND_BYTES, PeerNode, RaftGroup

STATE_COMMAND = b"\x11"


class StateMachine(Protocol):
    def apply(self, payload: memoryview) -> Any:
        """Apply one committed command; the result goes to its proposer."""

    def snapshot(self) -> bytes:
        """The whole state, for a checkpoint."""

    def restore(self, snapshot: bytes) -> None:
        """Replace the state with a snapshot's."""


class StateMachineReplica(RaftGroup):
    """This broker's member of a group replicating `machine`."""

    COMMAND_TYPES = frozenset(STATE_COMMAND)

    def __init__(self, group_id: int, machine: StateMachine, self_id: int, replica_ids: list[int],
                 network: Any, group_dir: Path, **raft_settings: Any) -> None:
        self.machine = machine
        super().__init__(group_id, self_id, replica_ids, network, group_dir, **raft_settings)

    def propose(self, payload: bytes) -> "asyncio.Future[Any]":
        """Replicate a command; the future resolves to what applying it
        returned here. Leader only (NotLeaderError otherwise)."""
        if len(payload) + 1 > MAX_COMMAND_BYTES:
            raise ValueError(f"state machine command of {len(payload)} bytes is over the limit")
        return self._propose_future(STATE_COMMAND + payload)

    def _apply_hook(self, command: bytes) -> Any:
        return self.machine.apply(memoryview(command)[1:])

    def _write_checkpoint(self, path: str, raft_data: tuple) -> None:
        last_applied, previous, _cluster = raft_data
        checkpoint.write(Path(path), checkpoint.Checkpoint(
            applied_index=last_applied[1], log_end_offset=0,
            entries=(tuple(previous), tuple(last_applied)), state=self.machine.snapshot()))

    def _read_checkpoint(self, path: str) -> tuple:
        point = checkpoint.read(Path(path))
        self.machine.restore(point.state)
        previous, last_applied = point.entries
        return last_applied, previous, {PeerNode(rid) for rid in self.replica_ids}
