/*
 * raftka native load generator: Kafka producers and consumers whose whole
 * per-message loop runs in C, so `raftka bench` measures the broker and not
 * a Python produce() loop.
 *
 * It drives librdkafka, loaded at run time with dlopen from the path the
 * caller gives (the copy confluent-kafka already loaded), so building it
 * needs no librdkafka headers and it always uses the same library as the
 * Python clients. Only librdkafka's stable C ABI is used.
 *
 * Latency: an acknowledgement latency is librdkafka's own
 * rd_kafka_message_latency() (produce() call to delivery report); an
 * end-to-end latency is the consumer's clock minus the send time the
 * producer writes into the first 8 bytes of each payload (CLOCK_REALTIME,
 * microseconds, little-endian), both processes on one machine.
 */
#ifndef RAFTKA_LOADGEN_H
#define RAFTKA_LOADGEN_H

#include <stddef.h>
#include <stdint.h>

/* Keeps every `every`-th value offered until `capacity` are kept. */
typedef struct rk_lg_sampler {
    uint32_t *values;
    uint64_t capacity;
    uint64_t kept;
    uint64_t seen;
    uint32_t every;
} rk_lg_sampler;

void rk_lg_sample(rk_lg_sampler *sampler, uint32_t value);

/* How many messages a generator paced at `rate` msgs/s may send now,
 * `elapsed_s` after it started, having sent `sent`: at most `burst`.
 * rate <= 0 means unpaced (always `burst`). */
uint64_t rk_lg_due(double rate, double elapsed_s, uint64_t sent, uint64_t burst);

typedef struct rk_lg_result {
    uint64_t messages;      /* produced and acknowledged, or consumed */
    uint64_t bytes;         /* their payload bytes */
    uint64_t failed;        /* delivery reports with an error */
    int32_t first_error;    /* librdkafka error code of the first failure, 0 if none */
    double seconds;         /* first produce to last delivery; first to last record consumed */
    double thread_cpu_s;    /* CPU of the calling (producing / polling) thread */
    char error[256];        /* set when the call returns -1 */
} rk_lg_result;

/* dlopen librdkafka and look up what the generator calls. 0, or -1 with
 * the reason in errstr. */
int rk_lg_load(const char *library_path, char *errstr, size_t errstr_size);

/* Produce `count` messages of `size` bytes (or for `duration_s` seconds when
 * > 0) to `topic`, paced at `rate` msgs/s when > 0. `conf` holds
 * `n_conf` key, value pairs of librdkafka settings. Acknowledgement
 * latencies (us) go to `sampler` when not NULL. `progress` (shared memory,
 * may be NULL) grows by acknowledged bytes. `stop` (may be NULL) ends the
 * run early when it becomes non-zero. 0, or -1 with result->error. */
int rk_lg_produce(const char *const *conf, int n_conf, const char *topic, uint32_t size, uint64_t count,
                  double duration_s, double rate, rk_lg_sampler *sampler, int64_t *progress,
                  volatile int32_t *stop, rk_lg_result *result);

/* Consume `partitions` of `topic` from offset 0 until the consumers together
 * (the shared `consumed` count) have read `*target` messages, or `timeout_s`
 * passes. End-to-end latencies (us) go to `sampler` when not NULL.
 * 0, or -1 with result->error. */
int rk_lg_consume(const char *const *conf, int n_conf, const char *topic, const int32_t *partitions,
                  int n_partitions, volatile int64_t *target, int64_t *consumed, double timeout_s,
                  rk_lg_sampler *sampler, int64_t *progress, rk_lg_result *result);

#endif
