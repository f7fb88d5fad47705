"""FileSyncer: journal group commits (SyncJob) on native threads, their
outcomes delivered on the event loop.

RaftNode hands every group commit here so the event loop never waits for a
disk and syncs of different groups overlap. The fdatasyncs run on pthreads
(native/syncer.c) that never take the GIL: a Python thread pool's worker
must take it before it can even tell the loop a sync returned, and under
load that wait (up to the interpreter's switch interval, 5 ms) was 1-3 ms
of a 4-8 ms sync round. A finished job bumps an eventfd the loop
reads; its callback then runs on the loop's thread, in the same iteration.
"""
from __future__ import annotations

import asyncio
import os
from typing import Callable

from raftka.native import ffi, lib
from raftka.raft.journal import SyncJob

SyncCallback = Callable[[OSError | None], None]
DONE_BATCH = 64                   # outcomes taken per native call


class FileSyncer:
    """Runs SyncJobs on `threads` native threads; `callback(error)` runs on
    `loop` once the job's files are synced (error None) or a call failed (the
    OSError, errno kept). Not thread-safe: use from the loop's thread."""

    def __init__(self, loop: asyncio.AbstractEventLoop, threads: int) -> None:
        handle = lib.rk_syncer_new(threads)
        if handle == ffi.NULL:
            errno = ffi.errno
            raise OSError(errno, f"cannot start the syncer threads: {os.strerror(errno)}")
        self._handle = handle
        self._loop = loop
        self._fd = lib.rk_syncer_fd(handle)
        self._jobs: dict[int, tuple[SyncJob, int, SyncCallback]] = {}   # id -> job, directory fd, callback
        self._next_id = 0
        self._ids = ffi.new("uint64_t[]", DONE_BATCH)
        self._errors = ffi.new("int[]", DONE_BATCH)
        self._calls = ffi.new("int[]", DONE_BATCH)
        loop.add_reader(self._fd, self._drain)

    @property
    def pending(self) -> int:
        """Jobs submitted whose callback has not run yet."""
        return len(self._jobs)

    def submit(self, job: SyncJob, callback: SyncCallback) -> None:
        """Sync `job`'s files (then its directory) off the loop; raises OSError
        if it cannot be queued (the job is then still the caller's)."""
        if self._handle is None:
            raise OSError(0, "the syncer is closed")
        dir_fd = os.open(job.directory, os.O_RDONLY | os.O_DIRECTORY) if job.directory is not None else -1
        self._next_id += 1
        if lib.rk_syncer_submit(self._handle, self._next_id, ffi.new("int[]", job.fds), len(job.fds), dir_fd) != 0:
            errno = ffi.errno
            if dir_fd >= 0:
                os.close(dir_fd)
            raise OSError(errno, f"cannot queue a sync job: {os.strerror(errno)}")
        self._jobs[self._next_id] = (job, dir_fd, callback)

    def _drain(self) -> None:
        if self._handle is None:
            return
        while True:
            count = lib.rk_syncer_done(self._handle, self._ids, self._errors, self._calls, DONE_BATCH)
            for i in range(count):
                job, dir_fd, callback = self._jobs.pop(self._ids[i])
                job.sync_calls += self._calls[i]
                errno = self._errors[i]
                if dir_fd >= 0:
                    os.close(dir_fd)
                job.release()
                callback(OSError(errno, os.strerror(errno)) if errno else None)
            if count < DONE_BATCH:
                return

    def close(self) -> None:
        """Let queued jobs finish, stop the threads, release every job's
        descriptors; callbacks not yet run never run."""
        if self._handle is None:
            return
        self._loop.remove_reader(self._fd)
        lib.rk_syncer_free(self._handle)     # joins: every queued job ran
        self._handle = None
        for job, dir_fd, _callback in self._jobs.values():
            if dir_fd >= 0:
                os.close(dir_fd)
            job.release()
        self._jobs.clear()
