/*
 * Fuzz driver for native/records.c, built by tests/test_records_asan.py with
 * AddressSanitizer and UBSan: mutates and truncates the records section read
 * from argv[1] (recordCount argv[2]) and decodes and validates each variant
 * from a heap buffer of exactly its length, so any read past the end aborts.
 * Prints "accepted N rejected M".
 */
#include "records.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define MAX_RECORDS 64
#define MAX_HEADERS 512

int main(int argc, char **argv) {
    if (argc != 4) { fprintf(stderr, "usage: fuzz_records SEED_FILE RECORD_COUNT ITERATIONS\n"); return 2; }
    static uint8_t seed[1 << 16];
    FILE *f = fopen(argv[1], "rb");
    if (!f) { perror(argv[1]); return 2; }
    size_t seed_len = fread(seed, 1, sizeof seed, f);
    fclose(f);
    int64_t count = atoll(argv[2]);
    long iterations = atol(argv[3]);
    if (count < 0 || count > MAX_RECORDS) { fprintf(stderr, "at most %d records\n", MAX_RECORDS); return 2; }
    static int64_t records[9][MAX_RECORDS], headers[5][MAX_HEADERS];
    long accepted = 0, rejected = 0;
    srand(1);
    for (long iteration = 0; iteration < iterations; iteration++) {
        size_t len = iteration == 0 ? seed_len : (size_t)rand() % (seed_len + 1);
        uint8_t *buf = malloc(len ? len : 1);
        memcpy(buf, seed, len);
        for (int flip = iteration == 0 ? 4 : rand() % 4; flip < 4 && len; flip++) buf[rand() % len] = (uint8_t)rand();
        rk_record_views v = {.count = count, .header_capacity = MAX_HEADERS,
            .offsets = records[0], .timestamps = records[1], .key_index = records[2], .key_starts = records[3],
            .key_ends = records[4], .value_index = records[5], .value_starts = records[6],
            .value_ends = records[7], .header_counts = records[8], .header_key_starts = headers[0],
            .header_key_ends = headers[1], .header_value_index = headers[2], .header_value_starts = headers[3],
            .header_value_ends = headers[4]};
        int64_t error_position;
        int64_t decoded = rk_records_decode(buf, 0, len, &v);
        int64_t validated = rk_records_validate(buf, len, count, &error_position);
        if (decoded >= 0) accepted++; else rejected++;
        if (validated >= 0 && decoded < 0) { fprintf(stderr, "validate accepted what decode refused\n"); return 1; }
        free(buf);
    }
    printf("accepted %ld rejected %ld\n", accepted, rejected);
    return 0;
}
