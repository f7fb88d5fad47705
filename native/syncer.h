/*
 * syncer.h: group-commit fdatasyncs on native threads.
 *
 * The event loop hands a sync job (file descriptors to fdatasync in order,
 * then optionally a directory to fsync) to a small pool of pthreads and goes
 * on; a worker that finishes a job records its outcome and bumps an eventfd
 * the loop watches. Workers never touch the Python interpreter, so a finished
 * fdatasync does not wait for the GIL (a Python thread pool's worker must take
 * it, up to the switch interval, before the loop even hears of the result),
 * and a queued job does not wait for a Python worker to wake.
 *
 * Contract: the caller keeps every descriptor it submitted open until the
 * job's outcome comes back from rk_syncer_done. A job stops at its first
 * failing call; its error is that call's errno (0: every call succeeded).
 */
#ifndef RAFTKA_SYNCER_H
#define RAFTKA_SYNCER_H

#include <stdint.h>

typedef struct rk_syncer rk_syncer;

/* `threads` workers (1..64) and an eventfd; NULL with errno set on failure. */
rk_syncer *rk_syncer_new(int threads);
/* The eventfd (non-blocking) that becomes readable when outcomes are waiting. */
int rk_syncer_fd(const rk_syncer *syncer);
/* Queue job `id`: fdatasync fds[0..nfds), then fsync dir_fd if >= 0.
   0, or -1 with errno set (EINVAL: nfds < 0; ENOMEM; ESHUTDOWN). */
int rk_syncer_submit(rk_syncer *syncer, uint64_t id, const int *fds, int nfds, int dir_fd);
/* Take up to `max` outcomes: job id, errno (0 ok) and the sync calls made.
   Returns how many; drains the eventfd. */
int rk_syncer_done(rk_syncer *syncer, uint64_t *ids, int *errors, int *calls, int max);
/* Jobs submitted whose outcome has not been taken yet. */
int rk_syncer_pending(rk_syncer *syncer);
/* Run every queued job, stop and join the workers, free everything. Outcomes
   not taken are dropped (the descriptors stay the caller's). */
void rk_syncer_free(rk_syncer *syncer);

#endif
