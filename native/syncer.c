/*
 * Native group-commit syncer; see syncer.h for the contract.
 *
 * One mutex guards a FIFO of queued jobs and a FIFO of finished ones; workers
 * wait on a condition variable for work. A finished job is moved to the done
 * list and the eventfd is written (a counter, so several completions may
 * coalesce into one wakeup of the loop).
 */
#define _GNU_SOURCE
#include "syncer.h"

#include <errno.h>
#include <pthread.h>
#include <sched.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <unistd.h>

typedef struct rk_sync_job {
    struct rk_sync_job *next;
    uint64_t id;
    int dir_fd;
    int error;
    int calls;
    int nfds;
    int fds[];                /* nfds of them */
} rk_sync_job;

struct rk_syncer {
    pthread_mutex_t lock;
    pthread_cond_t work;
    rk_sync_job *queued_head, *queued_tail;
    rk_sync_job *done_head, *done_tail;
    int pending;              /* submitted, outcome not taken */
    int stopping;
    int event_fd;
    int threads;
    pthread_t workers[64];
};

static void run_job(rk_sync_job *job) {
    job->error = 0;
    job->calls = 0;
    for (int i = 0; i < job->nfds; i++) {
        job->calls++;
        if (fdatasync(job->fds[i]) != 0) {
            job->error = errno ? errno : EIO;
            return;
        }
    }
    if (job->dir_fd >= 0) {
        job->calls++;
        if (fsync(job->dir_fd) != 0)
            job->error = errno ? errno : EIO;
    }
}

static void *worker(void *arg) {
    rk_syncer *s = arg;
    /* SCHED_BATCH: a worker woken by a submit does not preempt the event
     * loop that woke it (CFS/EEVDF wakeup preemption); it runs on an idle
     * core at once, else when the loop's iteration ends. On the 2-core box
     * with three brokers the preemption cost the loop ~145 us per submit and
     * split its iterations; see raft/README "Durability". Best effort: the
     * policy needs no privilege, and a refusal only keeps SCHED_OTHER. */
    struct sched_param param = {0};
    (void)pthread_setschedparam(pthread_self(), SCHED_BATCH, &param);
    pthread_mutex_lock(&s->lock);
    for (;;) {
        while (s->queued_head == NULL && !s->stopping)
            pthread_cond_wait(&s->work, &s->lock);
        rk_sync_job *job = s->queued_head;
        if (job == NULL)
            break;                               /* stopping, and the queue is empty */
        s->queued_head = job->next;
        if (s->queued_head == NULL)
            s->queued_tail = NULL;
        pthread_mutex_unlock(&s->lock);
        run_job(job);
        pthread_mutex_lock(&s->lock);
        job->next = NULL;
        if (s->done_tail)
            s->done_tail->next = job;
        else
            s->done_head = job;
        s->done_tail = job;
        uint64_t one = 1;
        ssize_t written = write(s->event_fd, &one, sizeof one);
        (void)written;                           /* EAGAIN: the counter is already non-zero */
    }
    pthread_mutex_unlock(&s->lock);
    return NULL;
}

rk_syncer *rk_syncer_new(int threads) {
    if (threads < 1 || threads > 64) {
        errno = EINVAL;
        return NULL;
    }
    rk_syncer *s = calloc(1, sizeof *s);
    if (s == NULL)
        return NULL;
    s->event_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (s->event_fd < 0) {
        int saved = errno;
        free(s);
        errno = saved;
        return NULL;
    }
    pthread_mutex_init(&s->lock, NULL);
    pthread_cond_init(&s->work, NULL);
    for (int i = 0; i < threads; i++) {
        int rc = pthread_create(&s->workers[i], NULL, worker, s);
        if (rc != 0) {
            s->threads = i;
            rk_syncer_free(s);
            errno = rc;
            return NULL;
        }
        s->threads = i + 1;
    }
    return s;
}

int rk_syncer_fd(const rk_syncer *s) { return s->event_fd; }

int rk_syncer_submit(rk_syncer *s, uint64_t id, const int *fds, int nfds, int dir_fd) {
    if (nfds < 0) {
        errno = EINVAL;
        return -1;
    }
    rk_sync_job *job = calloc(1, sizeof *job + (size_t)nfds * sizeof(int));
    if (job == NULL)
        return -1;
    job->id = id;
    job->nfds = nfds;
    memcpy(job->fds, fds, (size_t)nfds * sizeof(int));
    job->dir_fd = dir_fd;
    pthread_mutex_lock(&s->lock);
    if (s->stopping) {
        pthread_mutex_unlock(&s->lock);
        free(job);
        errno = ESHUTDOWN;
        return -1;
    }
    if (s->queued_tail)
        s->queued_tail->next = job;
    else
        s->queued_head = job;
    s->queued_tail = job;
    s->pending++;
    pthread_cond_signal(&s->work);
    pthread_mutex_unlock(&s->lock);
    return 0;
}

int rk_syncer_done(rk_syncer *s, uint64_t *ids, int *errors, int *calls, int max) {
    uint64_t counter;
    ssize_t got = read(s->event_fd, &counter, sizeof counter);
    (void)got;                                   /* EAGAIN: nothing signalled since the last read */
    int n = 0;
    pthread_mutex_lock(&s->lock);
    while (n < max && s->done_head != NULL) {
        rk_sync_job *job = s->done_head;
        s->done_head = job->next;
        if (s->done_head == NULL)
            s->done_tail = NULL;
        ids[n] = job->id;
        errors[n] = job->error;
        calls[n] = job->calls;
        n++;
        s->pending--;
        free(job);
    }
    if (s->done_head != NULL) {                  /* more than `max`: stay readable */
        uint64_t one = 1;
        ssize_t written = write(s->event_fd, &one, sizeof one);
        (void)written;
    }
    pthread_mutex_unlock(&s->lock);
    return n;
}

int rk_syncer_pending(rk_syncer *s) {
    pthread_mutex_lock(&s->lock);
    int n = s->pending;
    pthread_mutex_unlock(&s->lock);
    return n;
}

void rk_syncer_free(rk_syncer *s) {
    if (s == NULL)
        return;
    pthread_mutex_lock(&s->lock);
    s->stopping = 1;
    pthread_cond_broadcast(&s->work);
    pthread_mutex_unlock(&s->lock);
    for (int i = 0; i < s->threads; i++)
        pthread_join(s->workers[i], NULL);
    for (rk_sync_job *job = s->done_head; job != NULL;) {
        rk_sync_job *next = job->next;
        free(job);
        job = next;
    }
    close(s->event_fd);
    pthread_cond_destroy(&s->work);
    pthread_mutex_destroy(&s->lock);
    free(s);
}
