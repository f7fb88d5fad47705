/* raftka native load generator: see loadgen.h. */
#define _GNU_SOURCE
#include "loadgen.h"

#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

/* ---- the part of librdkafka's stable C ABI we use ---------------------- */

typedef struct rd_kafka_s rd_kafka_t;
typedef struct rd_kafka_conf_s rd_kafka_conf_t;
typedef struct rd_kafka_topic_s rd_kafka_topic_t;
typedef struct rd_kafka_topic_partition_list_s rd_kafka_topic_partition_list_t;
typedef struct rd_kafka_topic_partition_s rd_kafka_topic_partition_t;

typedef struct rd_kafka_message_s {   /* rdkafka.h, unchanged since 0.9 */
    int err;
    rd_kafka_topic_t *rkt;
    int32_t partition;
    void *payload;
    size_t len;
    void *key;
    size_t key_len;
    int64_t offset;
    void *_private;
} rd_kafka_message_t;

enum { RD_KAFKA_PRODUCER = 0, RD_KAFKA_CONSUMER = 1 };
#define RD_KAFKA_CONF_OK 0
#define RD_KAFKA_MSG_F_COPY 0x2
#define RD_KAFKA_PARTITION_UA ((int32_t)-1)
#define ERR_QUEUE_FULL (-184)
#define ERR_PARTITION_EOF (-191)

typedef void (*dr_msg_cb_t)(rd_kafka_t *, const rd_kafka_message_t *, void *);

static struct {
    int loaded;
    rd_kafka_conf_t *(*conf_new)(void);
    int (*conf_set)(rd_kafka_conf_t *, const char *, const char *, char *, size_t);
    void (*conf_destroy)(rd_kafka_conf_t *);
    void (*conf_set_dr_msg_cb)(rd_kafka_conf_t *, dr_msg_cb_t);
    void (*conf_set_opaque)(rd_kafka_conf_t *, void *);
    rd_kafka_t *(*new_)(int, rd_kafka_conf_t *, char *, size_t);
    void (*destroy)(rd_kafka_t *);
    rd_kafka_topic_t *(*topic_new)(rd_kafka_t *, const char *, void *);
    void (*topic_destroy)(rd_kafka_topic_t *);
    int (*produce)(rd_kafka_topic_t *, int32_t, int, void *, size_t, const void *, size_t, void *);
    int (*poll)(rd_kafka_t *, int);
    int (*flush)(rd_kafka_t *, int);
    int (*outq_len)(rd_kafka_t *);
    int (*last_error)(void);
    const char *(*err2str)(int);
    int64_t (*message_latency)(const rd_kafka_message_t *);
    int (*poll_set_consumer)(rd_kafka_t *);
    rd_kafka_topic_partition_list_t *(*tpl_new)(int);
    rd_kafka_topic_partition_t *(*tpl_add)(rd_kafka_topic_partition_list_t *, const char *, int32_t);
    int (*tpl_set_offset)(rd_kafka_topic_partition_list_t *, const char *, int32_t, int64_t);
    void (*tpl_destroy)(rd_kafka_topic_partition_list_t *);
    int (*assign)(rd_kafka_t *, const rd_kafka_topic_partition_list_t *);
    rd_kafka_message_t *(*consumer_poll)(rd_kafka_t *, int);
    void (*message_destroy)(rd_kafka_message_t *);
    int (*consumer_close)(rd_kafka_t *);
} K;

int rk_lg_load(const char *library_path, char *errstr, size_t errstr_size) {
    if (K.loaded)
        return 0;
    void *lib = dlopen(library_path, RTLD_NOW | RTLD_GLOBAL);
    if (!lib) {
        snprintf(errstr, errstr_size, "dlopen %s: %s", library_path, dlerror());
        return -1;
    }
#define SYM(field, name)                                                              \
    do {                                                                              \
        *(void **)(&K.field) = dlsym(lib, name);                                      \
        if (!K.field) {                                                               \
            snprintf(errstr, errstr_size, "%s has no %s", library_path, name);        \
            return -1;                                                                \
        }                                                                             \
    } while (0)
    SYM(conf_new, "rd_kafka_conf_new");
    SYM(conf_set, "rd_kafka_conf_set");
    SYM(conf_destroy, "rd_kafka_conf_destroy");
    SYM(conf_set_dr_msg_cb, "rd_kafka_conf_set_dr_msg_cb");
    SYM(conf_set_opaque, "rd_kafka_conf_set_opaque");
    SYM(new_, "rd_kafka_new");
    SYM(destroy, "rd_kafka_destroy");
    SYM(topic_new, "rd_kafka_topic_new");
    SYM(topic_destroy, "rd_kafka_topic_destroy");
    SYM(produce, "rd_kafka_produce");
    SYM(poll, "rd_kafka_poll");
    SYM(flush, "rd_kafka_flush");
    SYM(outq_len, "rd_kafka_outq_len");
    SYM(last_error, "rd_kafka_last_error");
    SYM(err2str, "rd_kafka_err2str");
    SYM(message_latency, "rd_kafka_message_latency");
    SYM(poll_set_consumer, "rd_kafka_poll_set_consumer");
    SYM(tpl_new, "rd_kafka_topic_partition_list_new");
    SYM(tpl_add, "rd_kafka_topic_partition_list_add");
    SYM(tpl_set_offset, "rd_kafka_topic_partition_list_set_offset");
    SYM(tpl_destroy, "rd_kafka_topic_partition_list_destroy");
    SYM(assign, "rd_kafka_assign");
    SYM(consumer_poll, "rd_kafka_consumer_poll");
    SYM(message_destroy, "rd_kafka_message_destroy");
    SYM(consumer_close, "rd_kafka_consumer_close");
#undef SYM
    K.loaded = 1;
    return 0;
}

/* ---- sampling and pacing ------------------------------------------------ */

void rk_lg_sample(rk_lg_sampler *sampler, uint32_t value) {
    uint64_t seen = sampler->seen++;
    if (sampler->kept < sampler->capacity && seen % (sampler->every ? sampler->every : 1) == 0)
        sampler->values[sampler->kept++] = value;
}

uint64_t rk_lg_due(double rate, double elapsed_s, uint64_t sent, uint64_t burst) {
    if (rate <= 0)
        return burst;
    double allowed = rate * elapsed_s;
    if (allowed <= (double)sent)
        return 0;
    double due = allowed - (double)sent;
    return due >= (double)burst ? burst : (uint64_t)due;
}

static double clock_s(clockid_t clock) {
    struct timespec ts;
    clock_gettime(clock, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static uint64_t wall_us(void) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (uint64_t)ts.tv_sec * 1000000u + (uint64_t)ts.tv_nsec / 1000u;
}

static void sleep_s(double seconds) {
    struct timespec ts = {(time_t)seconds, (long)((seconds - (double)(time_t)seconds) * 1e9)};
    nanosleep(&ts, NULL);
}

static void clamp_u32(rk_lg_sampler *sampler, int64_t us) {
    if (sampler)
        rk_lg_sample(sampler, us < 0 ? 0 : us > UINT32_MAX ? UINT32_MAX : (uint32_t)us);
}

#define PROGRESS_STEP (1 << 20)   /* shared counter updated every MiB */

static void add_progress(int64_t *progress, uint64_t *pending, uint64_t bytes, int force) {
    *pending += bytes;
    if (progress && (force || *pending >= PROGRESS_STEP)) {
        __atomic_fetch_add(progress, (int64_t)*pending, __ATOMIC_RELAXED);
        *pending = 0;
    }
}

static rd_kafka_t *client(int type, const char *const *conf, int n_conf, void *opaque, dr_msg_cb_t on_delivery,
                          rk_lg_result *result) {
    rd_kafka_conf_t *c = K.conf_new();
    for (int i = 0; i < n_conf; i++) {
        if (K.conf_set(c, conf[2 * i], conf[2 * i + 1], result->error, sizeof result->error) != RD_KAFKA_CONF_OK) {
            K.conf_destroy(c);
            return NULL;
        }
    }
    if (on_delivery)
        K.conf_set_dr_msg_cb(c, on_delivery);
    K.conf_set_opaque(c, opaque);
    rd_kafka_t *rk = K.new_(type, c, result->error, sizeof result->error);
    if (!rk)
        K.conf_destroy(c);
    return rk;
}

/* ---- producer ---------------------------------------------------------- */

typedef struct producer_state {
    rk_lg_sampler *sampler;
    int64_t *progress;
    uint64_t pending_progress;
    uint64_t delivered, bytes, failed;
    int32_t first_error;
    double last_delivery;
} producer_state;

static void on_delivery(rd_kafka_t *rk, const rd_kafka_message_t *m, void *opaque) {
    (void)rk;
    producer_state *s = opaque;
    if (m->err) {
        if (!s->failed++)
            s->first_error = m->err;
        return;
    }
    s->delivered++;
    s->bytes += m->len;
    clamp_u32(s->sampler, K.message_latency(m));
    add_progress(s->progress, &s->pending_progress, m->len, 0);
}

#define BURST 256

int rk_lg_produce(const char *const *conf, int n_conf, const char *topic, uint32_t size, uint64_t count,
                  double duration_s, double rate, rk_lg_sampler *sampler, int64_t *progress,
                  volatile int32_t *stop, rk_lg_result *result) {
    memset(result, 0, sizeof *result);
    if (!K.loaded) {
        snprintf(result->error, sizeof result->error, "librdkafka not loaded (rk_lg_load)");
        return -1;
    }
    producer_state state = {.sampler = sampler, .progress = progress};
    rd_kafka_t *rk = client(RD_KAFKA_PRODUCER, conf, n_conf, &state, on_delivery, result);
    if (!rk)
        return -1;
    rd_kafka_topic_t *rkt = K.topic_new(rk, topic, NULL);
    char *payload = malloc(size ? size : 1);
    for (uint32_t i = 0; i < size; i++)
        payload[i] = (char)(i * 131u + 7u);   /* built once */
    int stamped = size >= 8;
    double cpu0 = clock_s(CLOCK_THREAD_CPUTIME_ID), started = clock_s(CLOCK_MONOTONIC);
    double pause = rate > 0 ? (1.0 / rate < 200e-6 ? 1.0 / rate : 200e-6) : 0;
    uint64_t sent = 0;
    int rc = 0;
    while (sent < count && !(stop && *stop)) {
        double elapsed = clock_s(CLOCK_MONOTONIC) - started;
        if (duration_s > 0 && elapsed >= duration_s)
            break;
        uint64_t n = rk_lg_due(rate, elapsed, sent, BURST);
        if (n == 0) {
            K.poll(rk, 0);
            sleep_s(pause);
            continue;
        }
        for (uint64_t i = 0; i < n && sent < count; i++) {
            if (stamped) {
                uint64_t now = wall_us();
                memcpy(payload, &now, 8);
            }
            while (K.produce(rkt, RD_KAFKA_PARTITION_UA, RD_KAFKA_MSG_F_COPY, payload, size, NULL, 0, NULL) == -1) {
                int err = K.last_error();
                if (err != ERR_QUEUE_FULL) {
                    snprintf(result->error, sizeof result->error, "produce: %s", K.err2str(err));
                    rc = -1;
                    goto done;
                }
                K.poll(rk, 1);   /* queue full: serve delivery reports, then retry */
            }
            sent++;
        }
        K.poll(rk, 0);
    }
done:
    while (K.outq_len(rk) > 0 && clock_s(CLOCK_MONOTONIC) - started < duration_s + 600)
        K.poll(rk, 50);
    result->thread_cpu_s = clock_s(CLOCK_THREAD_CPUTIME_ID) - cpu0;
    result->seconds = clock_s(CLOCK_MONOTONIC) - started;
    add_progress(progress, &state.pending_progress, 0, 1);
    result->messages = state.delivered;
    result->bytes = state.bytes;
    result->failed = state.failed + (sent - state.delivered - state.failed);   /* never reported: lost */
    result->first_error = state.first_error;
    if (rc == 0 && K.outq_len(rk) > 0) {
        snprintf(result->error, sizeof result->error, "%d messages never acknowledged", K.outq_len(rk));
        rc = -1;
    }
    K.topic_destroy(rkt);
    K.destroy(rk);
    free(payload);
    return rc;
}

/* ---- consumer ---------------------------------------------------------- */

int rk_lg_consume(const char *const *conf, int n_conf, const char *topic, const int32_t *partitions,
                  int n_partitions, volatile int64_t *target, int64_t *consumed, double timeout_s,
                  rk_lg_sampler *sampler, int64_t *progress, rk_lg_result *result) {
    memset(result, 0, sizeof *result);
    if (!K.loaded) {
        snprintf(result->error, sizeof result->error, "librdkafka not loaded (rk_lg_load)");
        return -1;
    }
    rd_kafka_t *rk = client(RD_KAFKA_CONSUMER, conf, n_conf, NULL, NULL, result);
    if (!rk)
        return -1;
    K.poll_set_consumer(rk);
    rd_kafka_topic_partition_list_t *list = K.tpl_new(n_partitions);
    for (int i = 0; i < n_partitions; i++) {
        K.tpl_add(list, topic, partitions[i]);
        K.tpl_set_offset(list, topic, partitions[i], 0);
    }
    int err = K.assign(rk, list);
    K.tpl_destroy(list);
    if (err) {
        snprintf(result->error, sizeof result->error, "assign: %s", K.err2str(err));
        K.destroy(rk);
        return -1;
    }
    double cpu0 = clock_s(CLOCK_THREAD_CPUTIME_ID), started = clock_s(CLOCK_MONOTONIC);
    double first = 0, last = 0;
    uint64_t pending = 0, unshared = 0;
    while (__atomic_load_n(consumed, __ATOMIC_RELAXED) + (int64_t)unshared < *target &&
           clock_s(CLOCK_MONOTONIC) - started < timeout_s) {
        double asked = clock_s(CLOCK_MONOTONIC);
        rd_kafka_message_t *m = K.consumer_poll(rk, 100);
        if (!m) {
            if (unshared) {
                __atomic_fetch_add(consumed, (int64_t)unshared, __ATOMIC_RELAXED);
                unshared = 0;
            }
            continue;
        }
        if (m->err) {
            int code = m->err;
            K.message_destroy(m);
            if (code == ERR_PARTITION_EOF)
                continue;
            if (!result->failed++)
                result->first_error = code;
            continue;
        }
        if (!first)
            first = asked;   /* from the call that brought the first record */
        result->messages++;
        result->bytes += m->len;
        if (sampler && m->len >= 8) {
            uint64_t sent;
            memcpy(&sent, m->payload, 8);
            clamp_u32(sampler, (int64_t)(wall_us() - sent));
        }
        add_progress(progress, &pending, m->len, 0);
        if (++unshared >= 1024) {   /* the shared count, in steps */
            __atomic_fetch_add(consumed, (int64_t)unshared, __ATOMIC_RELAXED);
            unshared = 0;
        }
        last = clock_s(CLOCK_MONOTONIC);
        K.message_destroy(m);
    }
    if (unshared)
        __atomic_fetch_add(consumed, (int64_t)unshared, __ATOMIC_RELAXED);
    add_progress(progress, &pending, 0, 1);
    result->thread_cpu_s = clock_s(CLOCK_THREAD_CPUTIME_ID) - cpu0;
    result->seconds = first ? last - first : clock_s(CLOCK_MONOTONIC) - started;
    K.consumer_close(rk);
    K.destroy(rk);
    return 0;
}
