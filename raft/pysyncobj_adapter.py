"""The one module that touches pysyncobj's internals (DESIGN.md, "Layering").

Written against pysyncobj 0.3.17 (pinned in pyproject.toml). Everything else
in raft/, engine/, bench/ and tests/ goes through what this module offers,
never through pysyncobj's private names (tests/test_layering.py checks):

- `AdaptedSyncObj`: a SyncObj that applies only the command types its
  subclass declares (`COMMAND_TYPES`) and pysyncobj's no-op: anything else
  raises ForeignCommandError and never reaches pysyncobj's own apply, which
  would unpickle it (its types REGULAR, MEMBERSHIP and VERSION). It has
  protected hooks (`_apply_hook`,
  `_load_dump_hook`, `_try_compaction_hook`, `_before_tick_hook`,
  `_after_tick_hook`) in place of name-mangled overrides, and protected
  accessors for the Raft state pysyncobj keeps private (commit index, next and
  match index, election deadline, ...). It never polls (RaftNode ticks it).
- `AdaptedTransport`: a Transport whose pysyncobj callbacks have public names.
- `AdaptedJournal`: pysyncobj's Journal interface with `close()` for `_destroy`.
- `monotonic_time()` / `patched_clock()`: pysyncobj's clock, read and replaced.
- The global patches, applied at import: no pipe notifier (RaftNode ticks
  every group; it would only cost two file descriptors per group), and a
  journalFile value with an `open_journal()` method (raft.journal.JournalPath)
  opens that journal instead of pysyncobj's FileJournal.

At import it checks that every private method, attribute and module global
used here still exists, and raises ImportError naming what is missing: a
pysyncobj upgrade must fail loudly here, not misbehave somewhere else.
"""
from __future__ import annotations

import inspect
import re
import warnings
from contextlib import contextmanager
from importlib import metadata
from typing import Any, Callable, Iterator

from pysyncobj import SyncObj
from pysyncobj import syncobj as _syncobj
from pysyncobj.journal import Journal
from pysyncobj.node import Node
from pysyncobj.transport import Transport

PYSYNCOBJ_VERSION = "0.3.17"


def command_type(command: Any) -> int | None:
    """A Raft command's type (its first byte); None when it is not bytes or is empty."""
    return command[0] if isinstance(command, (bytes, bytearray, memoryview)) and len(command) else None


class ForeignCommandError(Exception):
    """A Raft entry whose command type is not one its group declares: refused
    as corruption (from a peer, a journal or a proposal), never applied."""

    def __init__(self, group: Any, command: Any, where: str) -> None:
        self.command_type = command_type(command)
        super().__init__(f"group {group}: {where}: command type {self.command_type} is not one of this group's; "
                         "refused")

# What this module overrides, calls or reads, per owner. Tests forbid these
# names (and every other private name of pysyncobj's classes) outside this module.
SYNCOBJ_METHODS = ("_SyncObj__doApplyCommand", "_SyncObj__loadDumpFile", "_SyncObj__tryLogCompaction",
                   "_SyncObj__applyLogEntries",
                   "_SyncObj__getCurrentLogIndex", "_SyncObj__getCurrentLogTerm",
                   "_SyncObj__generateRaftTimeout", "_onTick", "_applyCommand", "_isLeader", "_getLeader")
SYNCOBJ_ATTRIBUTES = ("__raftCommitIndex", "__raftLastApplied", "__raftCurrentTerm", "__raftLog", "__noopIDx",
                      "__raftMatchIndex", "__raftNextIndex", "__connectedNodes", "__otherNodes",
                      "__raftElectionDeadline", "__newAppendEntriesTime", "__lastResponseTime",
                      "__forceLogCompaction", "_poller")   # as assigned in SyncObj.__init__
TRANSPORT_METHODS = ("_onMessageReceived", "_onNodeConnected", "_onNodeDisconnected")
JOURNAL_METHODS = ("_destroy",)
MODULE_GLOBALS = ("PIPE_NOTIFIER_ENABLED", "createJournal", "monotonicTime", "_COMMAND_TYPE")


def _missing() -> list[str]:
    missing = [f"SyncObj.{name}" for name in SYNCOBJ_METHODS if not callable(getattr(SyncObj, name, None))]
    missing += [f"Transport.{name}" for name in TRANSPORT_METHODS if not callable(getattr(Transport, name, None))]
    missing += [f"Journal.{name}" for name in JOURNAL_METHODS if not callable(getattr(Journal, name, None))]
    missing += [f"pysyncobj.syncobj.{name}" for name in MODULE_GLOBALS if not hasattr(_syncobj, name)]
    try:
        init_source = inspect.getsource(SyncObj.__init__)
    except (OSError, TypeError):
        return missing + ["the source of SyncObj.__init__ (to find its private attributes)"]
    assigned = set(re.findall(r"self\.(\w+)\s*=", init_source))
    missing += [f"SyncObj.__init__ assigning self.{name}" for name in SYNCOBJ_ATTRIBUTES if name not in assigned]
    return missing


def _check_pysyncobj() -> None:
    missing = _missing()
    if missing:
        raise ImportError(f"raft.pysyncobj_adapter was written against pysyncobj {PYSYNCOBJ_VERSION}; "
                          f"the installed one lacks: {', '.join(missing)}")
    try:
        installed = metadata.version("pysyncobj")
    except metadata.PackageNotFoundError:
        return
    if installed != PYSYNCOBJ_VERSION:
        warnings.warn(f"pysyncobj {installed} installed; raft/ was written against {PYSYNCOBJ_VERSION}")


_check_pysyncobj()

NO_OP_COMMAND: int = _syncobj._COMMAND_TYPE.NO_OP   # the entry a new leader appends at the start of its term
NO_OP_ENTRY = bytes((NO_OP_COMMAND,))                # that entry's whole command


# ---- global patches --------------------------------------------------------

_syncobj.PIPE_NOTIFIER_ENABLED = False
_stock_create_journal = _syncobj.createJournal


def _create_journal(journal_file: Any = None) -> Journal:
    """pysyncobj builds its journal from `conf.journalFile` through
    `createJournal` and offers no other hook."""
    open_journal = getattr(journal_file, "open_journal", None)
    if open_journal is not None:
        return open_journal()
    return _stock_create_journal(journal_file)


_syncobj.createJournal = _create_journal


def monotonic_time() -> float:
    """pysyncobj's clock (the simulation replaces it: patched_clock)."""
    return _syncobj.monotonicTime()


@contextmanager
def patched_clock(clock: Callable[[], float]) -> Iterator[None]:
    """pysyncobj (and everything reading monotonic_time) runs on `clock` inside."""
    original = _syncobj.monotonicTime
    _syncobj.monotonicTime = clock
    try:
        yield
    finally:
        _syncobj.monotonicTime = original


# ---- the classes -------------------------------------------------------------

class _NullPoller:
    """RaftNode does the waiting; a group's tick must never block or poll."""

    def subscribe(self, *args: Any) -> None:
        pass

    def unsubscribe(self, *args: Any) -> None:
        pass

    def poll(self, timeout: float) -> None:
        pass


class AdaptedJournal(Journal):
    """pysyncobj's Journal interface; it closes a journal through `_destroy`."""

    def _destroy(self) -> None:
        self.close()

    def close(self) -> None:
        raise NotImplementedError


class AdaptedTransport(Transport):
    """pysyncobj's Transport, its callbacks into SyncObj under public names."""

    def handle_raft_message(self, node: Node, message: Any) -> None:
        """Hand `message` from `node` to pysyncobj's own handler."""
        self._onMessageReceived(node, message)

    def handle_node_connected(self, node: Node) -> None:
        self._onNodeConnected(node)

    def handle_node_disconnected(self, node: Node) -> None:
        self._onNodeDisconnected(node)


class AdaptedSyncObj(SyncObj):
    """A SyncObj that never polls, with hooks and accessors in place of
    pysyncobj's private names. Subclasses override the `_..._hook` methods and
    call `super()` for pysyncobj's own behaviour."""

    COMMAND_TYPES: frozenset[int] = frozenset()   # the first bytes of the commands a subclass applies

    def __init__(self, self_node: Node, other_nodes: list[Node], conf: Any, transport: Transport) -> None:
        super().__init__(self_node, other_nodes, conf, transport=transport)
        self._poller = _NullPoller()

    @classmethod
    def accepts_command(cls, command: Any) -> bool:
        """Whether `command` may be in this group's log: one of COMMAND_TYPES, or the no-op."""
        return command_type(command) in cls.COMMAND_TYPES or command == NO_OP_ENTRY

    # ---- hooks ---------------------------------------------------------------

    def _apply_hook(self, command: bytes) -> Any:
        """Apply one committed command of a type in COMMAND_TYPES (subclasses do)."""
        raise ForeignCommandError(getattr(self, "group_id", "?"), command, "apply")

    def _load_dump_hook(self, clear_journal: bool) -> None:
        """Load the checkpoint (at start, or one received: `clear_journal`)."""
        SyncObj._SyncObj__loadDumpFile(self, clear_journal)

    def _try_compaction_hook(self) -> None:
        """Compact the journal if due (pysyncobj's conditions)."""
        SyncObj._SyncObj__tryLogCompaction(self)

    def _before_tick_hook(self) -> None:
        """Runs at the start of every tick."""

    def _after_tick_hook(self) -> None:
        """Runs at the end of every tick."""

    def _before_apply_hook(self) -> None:
        """Runs before committed entries are applied (after the leader counted
        its commit index), so a subclass may hold the commit index back."""

    def _after_apply_hook(self, send_now: bool) -> bool:
        """Runs after committed entries were applied; `send_now` is pysyncobj's
        wish to send append_entries at once (to tell followers the commit
        index). Returns whether it does: a subclass may send it later."""
        return send_now

    def _SyncObj__applyLogEntries(self) -> Any:
        self._before_apply_hook()
        return self._after_apply_hook(SyncObj._SyncObj__applyLogEntries(self))

    def _SyncObj__doApplyCommand(self, command: bytes) -> Any:
        if command == NO_OP_ENTRY:
            return None
        if not self.accepts_command(command):
            raise ForeignCommandError(getattr(self, "group_id", "?"), command, "apply")
        return self._apply_hook(command)

    def _SyncObj__loadDumpFile(self, clearJournal: bool) -> None:
        self._load_dump_hook(clearJournal)

    def _SyncObj__tryLogCompaction(self) -> None:
        self._try_compaction_hook()

    def _onTick(self, timeToWait: float = 0.0) -> None:
        self._before_tick_hook()
        SyncObj._onTick(self, timeToWait)
        self._after_tick_hook()

    # ---- proposing -----------------------------------------------------------

    def _submit_command(self, command: bytes, callback: Callable[[Any, int], None]) -> None:
        """Queue `command` for replication; `callback(result, FAIL_REASON)`."""
        self._applyCommand(command, callback)

    # ---- Raft state ------------------------------------------------------------
    # Methods, not properties: SyncObj.__init__ calls getattr on every
    # attribute of the object before it has set most of its own.

    def _raft_is_leader(self) -> bool:
        return self._isLeader()

    def _raft_leader(self) -> Node | None:
        """The last known leader (possibly outdated)."""
        return self._getLeader()

    def _raft_term(self) -> int:
        return self._SyncObj__raftCurrentTerm

    def _raft_commit_index(self) -> int:
        return self._SyncObj__raftCommitIndex

    def _set_commit_index(self, index: int) -> None:
        """Move the commit index (here and in the journal's record of it)."""
        self._SyncObj__raftCommitIndex = index
        self._SyncObj__raftLog.setRaftCommitIndex(index)

    def _raft_last_applied(self) -> int:
        return self._SyncObj__raftLastApplied

    def _set_last_applied(self, index: int) -> None:
        """Everything up to `index` is applied (a checkpoint the journal already covers)."""
        self._SyncObj__raftLastApplied = index

    def _raft_log(self) -> Journal:
        return self._SyncObj__raftLog

    def _last_log_index(self) -> int:
        return self._SyncObj__getCurrentLogIndex()

    def _last_log_term(self) -> int:
        return self._SyncObj__getCurrentLogTerm()

    def _noop_index(self) -> int | None:
        """Index of the no-op this leader appended at the start of its term."""
        return self._SyncObj__noopIDx

    def _match_index(self) -> dict[Node, int]:
        """Leader: each follower's highest index known replicated (pysyncobj's own dict)."""
        return self._SyncObj__raftMatchIndex

    def _next_index(self) -> dict[Node, int]:
        """Leader: the next index to send each follower (pysyncobj's own dict; writable)."""
        return self._SyncObj__raftNextIndex

    def _connected_nodes(self) -> set[Node]:
        return self._SyncObj__connectedNodes

    def _other_nodes(self) -> set[Node]:
        return self._SyncObj__otherNodes

    def _election_deadline(self) -> float:
        return self._SyncObj__raftElectionDeadline

    def _set_election_deadline(self, deadline: float) -> None:
        self._SyncObj__raftElectionDeadline = deadline

    def _new_election_timeout(self) -> float:
        """A random election timeout, drawn as pysyncobj draws it."""
        return self._SyncObj__generateRaftTimeout()

    def _append_entries_due(self) -> float:
        """Leader: when pysyncobj sends its next append_entries (heartbeat)."""
        return self._SyncObj__newAppendEntriesTime

    def _set_append_entries_due(self, due: float) -> None:
        self._SyncObj__newAppendEntriesTime = due

    def _record_response(self, node: Node, now: float) -> None:
        """Leader: `node` answered at `now` (leader fallback, CheckQuorum)."""
        self._SyncObj__lastResponseTime[node] = now

    def _force_compaction(self) -> None:
        """Compact at the next compaction attempt whatever pysyncobj's thresholds say."""
        self._SyncObj__forceLogCompaction = True
