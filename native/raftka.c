/*
 * raftka native hot path. See raftka.h for the batch layout and contracts.
 *
 * Neighbours: engine/storage/segment.py calls rk_scan/rk_append to accept
 * batches and recover segment tails, and the rk_seek_offset, rk_seek_timestamp
 * and rk_span walks to
 * serve reads out of an mmap of a segment. Nothing here allocates Python
 * objects or copies batch bytes except into the kernel (pwritev).
 */
#define _GNU_SOURCE
#include "raftka.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>
#include <sys/mman.h>
#include <sys/uio.h>
#include <unistd.h>
#include <limits.h>

#if defined(__x86_64__)
#include <nmmintrin.h>
#endif

/* ---- big-endian helpers ------------------------------------------------ */

static inline int64_t be64(const uint8_t *p) {
    uint64_t v = 0;
    for (int i = 0; i < 8; i++) v = (v << 8) | p[i];
    return (int64_t)v;
}

static inline int32_t be32(const uint8_t *p) {
    return (int32_t)(((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) |
                     ((uint32_t)p[2] << 8) | (uint32_t)p[3]);
}

static inline void put_be64(uint8_t *p, int64_t v) {
    uint64_t u = (uint64_t)v;
    for (int i = 7; i >= 0; i--) { p[i] = (uint8_t)u; u >>= 8; }
}

static inline void put_be32(uint8_t *p, int32_t v) {
    uint32_t u = (uint32_t)v;
    p[0] = (uint8_t)(u >> 24); p[1] = (uint8_t)(u >> 16);
    p[2] = (uint8_t)(u >> 8); p[3] = (uint8_t)u;
}

/* ---- CRC32C (Castagnoli, reflected polynomial 0x82F63B78) -------------- */

#define CRC32C_POLY 0x82F63B78u
/* Bytes per lane of the 3-way interleaved hardware loop: big lanes for long
 * buffers, small ones so 1 KiB batches still run three lanes at once. */
#define CRC_LANE_BIG 4096
#define CRC_LANE_SMALL 256
#define CRC_LANE_TINY 64

/* shift_*[k][b]: the raw register after a lane's worth of zero bytes,
 * starting from byte b in position k; joins lanes computed in parallel. */
static uint32_t shift_big[4][256];
static uint32_t shift_small[4][256];
static uint32_t shift_tiny[4][256];
static uint32_t crc_table[8][256];
static int crc_hw = -1;

static void crc_init_tables(void) {
    for (uint32_t n = 0; n < 256; n++) {
        uint32_t c = n;
        for (int k = 0; k < 8; k++) c = (c & 1) ? (c >> 1) ^ CRC32C_POLY : c >> 1;
        crc_table[0][n] = c;
    }
    for (uint32_t n = 0; n < 256; n++) {
        uint32_t c = crc_table[0][n];
        for (int k = 1; k < 8; k++) {
            c = crc_table[0][c & 0xff] ^ (c >> 8);
            crc_table[k][n] = c;
        }
    }
}

/* raw register update (no pre/post inversion), portable slice-by-8 */
static uint32_t crc_raw_sw(uint32_t c, const uint8_t *p, size_t n) {
    while (n && ((uintptr_t)p & 7)) { c = crc_table[0][(c ^ *p++) & 0xff] ^ (c >> 8); n--; }
    while (n >= 8) {
        uint32_t lo = c ^ ((uint32_t)p[0] | ((uint32_t)p[1] << 8) |
                           ((uint32_t)p[2] << 16) | ((uint32_t)p[3] << 24));
        uint32_t hi = (uint32_t)p[4] | ((uint32_t)p[5] << 8) |
                      ((uint32_t)p[6] << 16) | ((uint32_t)p[7] << 24);
        c = crc_table[7][lo & 0xff] ^ crc_table[6][(lo >> 8) & 0xff] ^
            crc_table[5][(lo >> 16) & 0xff] ^ crc_table[4][lo >> 24] ^
            crc_table[3][hi & 0xff] ^ crc_table[2][(hi >> 8) & 0xff] ^
            crc_table[1][(hi >> 16) & 0xff] ^ crc_table[0][hi >> 24];
        p += 8; n -= 8;
    }
    while (n--) c = crc_table[0][(c ^ *p++) & 0xff] ^ (c >> 8);
    return c;
}

#if defined(__x86_64__)
__attribute__((target("sse4.2")))
static uint64_t crc_raw_hw_serial(uint64_t c, const uint8_t *p, size_t n) {
    while (n && ((uintptr_t)p & 7)) { c = _mm_crc32_u8((uint32_t)c, *p++); n--; }
    while (n >= 8) { uint64_t w; memcpy(&w, p, 8); c = _mm_crc32_u64(c, w); p += 8; n -= 8; }
    while (n--) c = _mm_crc32_u8((uint32_t)c, *p++);
    return c;
}

static inline uint32_t crc_shift(const uint32_t table[4][256], uint32_t c) {
    return table[0][c & 0xff] ^ table[1][(c >> 8) & 0xff] ^
           table[2][(c >> 16) & 0xff] ^ table[3][c >> 24];
}

/* Three independent lanes hide the 3-cycle latency of the crc32 instruction;
 * the lanes are joined by the linear "append `lane` zero bytes" map. */
__attribute__((target("sse4.2")))
static uint64_t crc_three_lanes(uint64_t c0, const uint8_t **pp, size_t *np, size_t lane,
                                const uint32_t table[4][256]) {
    const uint8_t *p = *pp;
    size_t n = *np;
    while (n >= 3 * lane) {
        uint64_t c1 = 0, c2 = 0;
        const uint8_t *p1 = p + lane, *p2 = p + 2 * lane;
        for (size_t i = 0; i < lane; i += 8) {
            uint64_t w0, w1, w2;
            memcpy(&w0, p + i, 8); memcpy(&w1, p1 + i, 8); memcpy(&w2, p2 + i, 8);
            c0 = _mm_crc32_u64(c0, w0);
            c1 = _mm_crc32_u64(c1, w1);
            c2 = _mm_crc32_u64(c2, w2);
        }
        c0 = crc_shift(table, (uint32_t)c0) ^ (uint32_t)c1;
        c0 = crc_shift(table, (uint32_t)c0) ^ (uint32_t)c2;
        p += 3 * lane; n -= 3 * lane;
    }
    *pp = p;
    *np = n;
    return c0;
}

__attribute__((target("sse4.2")))
static uint32_t crc_raw_hw(uint32_t crc, const uint8_t *p, size_t n) {
    uint64_t c = crc_three_lanes(crc, &p, &n, CRC_LANE_BIG, shift_big);
    c = crc_three_lanes(c, &p, &n, CRC_LANE_SMALL, shift_small);
    c = crc_three_lanes(c, &p, &n, CRC_LANE_TINY, shift_tiny);
    return (uint32_t)crc_raw_hw_serial(c, p, n);
}

static void crc_init_shift_table(size_t lane, uint32_t table[4][256]) {
    static const uint8_t zeros[CRC_LANE_BIG];
    uint32_t basis[32];
    for (int bit = 0; bit < 32; bit++)
        basis[bit] = (uint32_t)crc_raw_hw_serial(1u << bit, zeros, lane);
    for (int k = 0; k < 4; k++)
        for (uint32_t b = 0; b < 256; b++) {
            uint32_t v = 0;
            for (int i = 0; i < 8; i++)
                if (b & (1u << i)) v ^= basis[k * 8 + i];
            table[k][b] = v;
        }
}
#endif

static void crc_init(void) {
    if (crc_hw >= 0) return;
    crc_init_tables();
#if defined(__x86_64__)
    __builtin_cpu_init();
    if (__builtin_cpu_supports("sse4.2")) {
        crc_init_shift_table(CRC_LANE_BIG, shift_big);
        crc_init_shift_table(CRC_LANE_SMALL, shift_small);
        crc_init_shift_table(CRC_LANE_TINY, shift_tiny);
        crc_hw = 1;
        return;
    }
#endif
    crc_hw = 0;
}

int rk_crc32c_hardware(void) {
    crc_init();
    return crc_hw;
}

/* CRC32C of buf, continuing from a previous result (0 to start). */
uint32_t rk_crc32c(uint32_t crc, const uint8_t *buf, size_t len) {
    crc_init();
    uint32_t c = ~crc;
#if defined(__x86_64__)
    if (crc_hw) return ~crc_raw_hw(c, buf, len);
#endif
    return ~crc_raw_sw(c, buf, len);
}

/* The table-driven path, whatever the CPU has (tests compare both paths). */
uint32_t rk_crc32c_portable(uint32_t crc, const uint8_t *buf, size_t len) {
    crc_init();
    return ~crc_raw_sw(~crc, buf, len);
}

/* ---- murmur2, as org.apache.kafka.common.utils.Utils.murmur2 ----------- */

int32_t rk_murmur2(const uint8_t *data, size_t length) {
    const uint32_t m = 0x5bd1e995u;
    const int r = 24;
    uint32_t h = 0x9747b28cu ^ (uint32_t)length;
    size_t length4 = length / 4;
    for (size_t i = 0; i < length4; i++) {
        const uint8_t *q = data + i * 4;
        uint32_t k = (uint32_t)q[0] | ((uint32_t)q[1] << 8) |
                     ((uint32_t)q[2] << 16) | ((uint32_t)q[3] << 24);
        k *= m; k ^= k >> r; k *= m;
        h *= m; h ^= k;
    }
    size_t tail = length & ~(size_t)3;
    switch (length % 4) {
    case 3: h ^= (uint32_t)data[tail + 2] << 16; /* fall through */
    case 2: h ^= (uint32_t)data[tail + 1] << 8;  /* fall through */
    case 1: h ^= (uint32_t)data[tail]; h *= m;
    }
    h ^= h >> 13; h *= m; h ^= h >> 15;
    return (int32_t)h;
}

/* ---- batch scanning ---------------------------------------------------- */

/* Checks one batch at p (avail bytes available); returns RK_OK and its size. */
static int check_batch(const uint8_t *p, size_t avail, const rk_scan_state *st,
                       int64_t *size_out) {
    if (avail < RK_HEADER_SIZE) return RK_ERR_TRUNCATED;
    int64_t size = (int64_t)be32(p + RK_BATCH_LENGTH_OFF) + RK_LOG_OVERHEAD;
    if (size < RK_HEADER_SIZE || size > st->max_batch_bytes) return RK_ERR_LENGTH;
    if ((uint64_t)size > avail) return RK_ERR_TRUNCATED;
    if (p[RK_MAGIC_OFF] != RK_MAGIC_V2) return RK_ERR_MAGIC;
    int32_t count = be32(p + RK_RECORD_COUNT_OFF);
    int32_t last_delta = be32(p + RK_LAST_OFFSET_DELTA_OFF);
    if (st->check_offsets == RK_CHECK_COMPACTED) {
        /* the cleaner keeps base offset and lastOffsetDelta, removes records (even all of them) */
        if (count < 0 || last_delta < 0 || count > (int64_t)last_delta + 1) return RK_ERR_COUNT;
        if (be64(p + RK_BASE_OFFSET_OFF) < st->next_offset) return RK_ERR_OFFSET;
    } else {
        if (count < 1 || last_delta != count - 1) return RK_ERR_COUNT;
        if (st->check_offsets && be64(p + RK_BASE_OFFSET_OFF) != st->next_offset)
            return RK_ERR_OFFSET;
    }
    if (st->check_crc) {
        uint32_t want = (uint32_t)be32(p + RK_CRC_OFF);
        if (rk_crc32c(0, p + RK_ATTRIBUTES_OFF, (size_t)size - RK_ATTRIBUTES_OFF) != want)
            return RK_ERR_CRC;
    }
    *size_out = size;
    return RK_OK;
}

/*
 * Validates batches back to back from buf[0] and reports the valid prefix.
 * Assigns offsets from st->next_offset on, and emits an index entry for a
 * batch whenever index_interval_bytes went unindexed before it. Stops early,
 * with error RK_OK and valid_bytes < len, when `entries` is full: call again
 * on the rest. Returns the number of batches accepted by this call.
 */
int64_t rk_scan(const uint8_t *buf, size_t len, rk_scan_state *st,
                rk_index_entry *entries, size_t max_entries) {
    size_t pos = 0;
    int64_t batches = 0;
    st->error = RK_OK;
    st->entry_count = 0;
    while (pos < len) {
        const uint8_t *p = buf + pos;
        int64_t size = 0;
        int err = check_batch(p, len - pos, st, &size);
        if (err != RK_OK) { st->error = err; break; }
        int64_t batch_max_ts = be64(p + RK_MAX_TIMESTAMP_OFF);
        int needs_entry = st->bytes_since_index >= st->index_interval_bytes;
        if (needs_entry && (size_t)st->entry_count >= max_entries) break;
        if (batch_max_ts > st->max_timestamp) st->max_timestamp = batch_max_ts;
        if (st->check_offsets == RK_CHECK_COMPACTED) st->next_offset = be64(p + RK_BASE_OFFSET_OFF);
        if (needs_entry) {
            rk_index_entry *e = &entries[st->entry_count++];
            e->position = (int64_t)pos;
            e->base_offset = st->next_offset;
            e->max_timestamp = st->max_timestamp;
            st->bytes_since_index = 0;
        }
        int32_t count = be32(p + RK_RECORD_COUNT_OFF);
        st->bytes_since_index += size;
        st->next_offset += st->check_offsets == RK_CHECK_COMPACTED ? (int64_t)be32(p + RK_LAST_OFFSET_DELTA_OFF) + 1
                                                                   : count;
        st->record_count += count;
        st->batch_count += 1;
        batches += 1;
        pos += (size_t)size;
    }
    st->valid_bytes = (int64_t)pos;
    return batches;
}

/* ---- appending --------------------------------------------------------- */

static int64_t write_all(int fd, struct iovec *iov, int cnt, int64_t at) {
    int64_t total = 0;
    while (cnt > 0) {
        int n = cnt > IOV_MAX ? IOV_MAX : cnt;
        ssize_t w = pwritev(fd, iov, n, (off_t)at);
        if (w < 0) {
            if (errno == EINTR) continue;
            return -errno;
        }
        if (w == 0) return -EIO;
        total += w; at += w;
        /* skip fully written iovecs, trim the partially written one */
        while (cnt > 0 && (size_t)w >= iov->iov_len) { w -= (ssize_t)iov->iov_len; iov++; cnt--; }
        if (cnt > 0 && w > 0) {
            iov->iov_base = (uint8_t *)iov->iov_base + w;
            iov->iov_len -= (size_t)w;
        }
    }
    return total;
}

/* Rewrites the header fields the broker owns in one batch's first 16 bytes. */
static inline void patch_header(uint8_t *patch, int64_t offset, int32_t leader_epoch) {
    if (offset >= 0) put_be64(patch + RK_BASE_OFFSET_OFF, offset);
    if (leader_epoch >= 0) put_be32(patch + RK_LEADER_EPOCH_OFF, leader_epoch);
}

static int64_t finish_append(int fd, int64_t file_position, int64_t written) {
    if (written < 0) {
        int saved = (int)-written;
        while (ftruncate(fd, (off_t)file_position) < 0 && errno == EINTR) {}
        return -saved;
    }
    return written;
}

/*
 * Writes already validated batches at file_position, giving them offsets
 * first_offset, first_offset + count0, ... and (if leader_epoch >= 0) that
 * partitionLeaderEpoch. With in_place the caller's (writable) buffer gets the
 * new header fields and goes out in one write; otherwise the buffer is not
 * modified: each batch goes out as a patched 16-byte prefix plus the rest
 * straight from `buf`. Returns bytes written, or -errno after truncating back
 * to file_position, so a failed append leaves the file as it was.
 */
int64_t rk_append(int fd, int64_t file_position, uint8_t *buf, size_t len,
                  int64_t first_offset, int32_t leader_epoch, int in_place) {
    int64_t offset = first_offset;
    if (in_place) {
        for (size_t pos = 0; pos + RK_HEADER_SIZE <= len;
             pos += (size_t)be32(buf + pos + RK_BATCH_LENGTH_OFF) + RK_LOG_OVERHEAD) {
            patch_header(buf + pos, offset, leader_epoch);
            if (offset >= 0) offset += be32(buf + pos + RK_RECORD_COUNT_OFF);
        }
        struct iovec whole = { .iov_base = buf, .iov_len = len };
        return finish_append(fd, file_position, write_all(fd, &whole, 1, file_position));
    }
    size_t batches = 0;
    for (size_t pos = 0; pos + RK_HEADER_SIZE <= len;
         pos += (size_t)be32(buf + pos + RK_BATCH_LENGTH_OFF) + RK_LOG_OVERHEAD)
        batches++;
    uint8_t *patches = malloc(batches * RK_PATCH_SIZE + 1);
    struct iovec *iov = malloc(batches * 2 * sizeof(struct iovec) + 1);
    if (!patches || !iov) { free(patches); free(iov); return -ENOMEM; }
    size_t pos = 0;
    for (size_t i = 0; i < batches; i++) {
        const uint8_t *p = buf + pos;
        size_t size = (size_t)be32(p + RK_BATCH_LENGTH_OFF) + RK_LOG_OVERHEAD;
        uint8_t *patch = patches + i * RK_PATCH_SIZE;
        memcpy(patch, p, RK_PATCH_SIZE);
        patch_header(patch, offset, leader_epoch);
        iov[2 * i].iov_base = patch;
        iov[2 * i].iov_len = RK_PATCH_SIZE;
        iov[2 * i + 1].iov_base = (void *)(p + RK_PATCH_SIZE);
        iov[2 * i + 1].iov_len = size - RK_PATCH_SIZE;
        if (offset >= 0) offset += be32(p + RK_RECORD_COUNT_OFF);
        pos += size;
    }
    int64_t written = write_all(fd, iov, (int)(2 * batches), file_position);
    free(patches);
    free(iov);
    return finish_append(fd, file_position, written);
}

/* ---- header walks over stored (already validated) batches -------------- */

/* Size of the whole batch at pos, or 0 if it does not fit in len. */
static inline int64_t stored_batch_size(const uint8_t *buf, size_t len, int64_t pos) {
    if (pos < 0 || (size_t)pos + RK_HEADER_SIZE > len) return 0;
    int64_t size = (int64_t)be32(buf + pos + RK_BATCH_LENGTH_OFF) + RK_LOG_OVERHEAD;
    if (size < RK_HEADER_SIZE || (size_t)(pos + size) > len) return 0;
    return size;
}

static inline int64_t stored_last_offset(const uint8_t *p) {
    return be64(p + RK_BASE_OFFSET_OFF) + be32(p + RK_LAST_OFFSET_DELTA_OFF);
}

/* Position of the first batch at or after pos whose last offset >= target. */
int64_t rk_seek_offset(const uint8_t *buf, size_t len, int64_t pos, int64_t target_offset) {
    int64_t size;
    while ((size = stored_batch_size(buf, len, pos)) > 0) {
        if (stored_last_offset(buf + pos) >= target_offset) return pos;
        pos += size;
    }
    return pos;
}

/* Position of the first batch at or after pos whose maxTimestamp >= target. */
int64_t rk_seek_timestamp(const uint8_t *buf, size_t len, int64_t pos, int64_t target_timestamp) {
    int64_t size;
    while ((size = stored_batch_size(buf, len, pos)) > 0) {
        if (be64(buf + pos + RK_MAX_TIMESTAMP_OFF) >= target_timestamp) return pos;
        pos += size;
    }
    return pos;
}

/*
 * Bytes of whole batches from pos to serve a read: batches whose last offset
 * is below end_offset (the high watermark), at most max_bytes of them but
 * always the first one, as Kafka does so an oversized batch still makes
 * progress. *next_offset is the offset after the last batch included
 * (unchanged if none is).
 */
int64_t rk_span(const uint8_t *buf, size_t len, int64_t pos, int64_t max_bytes,
                int64_t end_offset, int64_t *next_offset) {
    int64_t total = 0, size;
    while ((size = stored_batch_size(buf, len, pos + total)) > 0) {
        int64_t last = stored_last_offset(buf + pos + total);
        if (last >= end_offset) break;
        if (total > 0 && total + size > max_bytes) break;
        total += size;
        *next_offset = last + 1;
    }
    return total;
}

/* Largest maxTimestamp of the batches in [pos, end_pos), or -1 if none. */
int64_t rk_max_timestamp(const uint8_t *buf, size_t len, int64_t pos, int64_t end_pos) {
    int64_t best = -1, size;
    if ((size_t)end_pos < len) len = (size_t)end_pos;
    while ((size = stored_batch_size(buf, len, pos)) > 0) {
        int64_t ts = be64(buf + pos + RK_MAX_TIMESTAMP_OFF);
        if (ts > best) best = ts;
        pos += size;
    }
    return best;
}

int64_t rk_record_total(const uint8_t *buf, size_t len) {
    int64_t total = 0, size;
    for (int64_t pos = 0; (size = stored_batch_size(buf, len, pos)) > 0; pos += size)
        total += be32(buf + pos + RK_RECORD_COUNT_OFF);
    return total;
}

/*
 * Idempotent producers' batches (producerId != -1) from `pos` on: their
 * positions, so producer state is rebuilt by touching only those headers
 * however much other traffic the log holds. Stops after max_positions of
 * them or at the first incomplete batch; *next_pos is the position after the
 * last batch walked (the end of the walk when it returns < max_positions).
 */
int64_t rk_producer_batches(const uint8_t *buf, size_t len, int64_t pos, int64_t *positions,
                            size_t max_positions, int64_t *next_pos) {
    int64_t size, count = 0;
    while ((size_t)count < max_positions && (size = stored_batch_size(buf, len, pos)) > 0) {
        if ((int64_t)be64(buf + pos + RK_PRODUCER_ID_OFF) != -1) positions[count++] = pos;
        pos += size;
    }
    *next_pos = pos;
    return count;
}

/* ---- mappings for reads ------------------------------------------------ */

/*
 * Maps `length` bytes of a segment read-only. The active segment is mapped
 * to its full capacity up front: pages past EOF become readable as appends
 * extend the file, and readers never go past the high watermark, which is
 * always below EOF. Returns NULL on failure (errno set).
 */
uint8_t *rk_map(int fd, int64_t length) {
    void *addr = mmap(NULL, (size_t)length, PROT_READ, MAP_SHARED, fd, 0);
    return addr == MAP_FAILED ? NULL : (uint8_t *)addr;
}

void rk_unmap(uint8_t *addr, int64_t length) {
    if (addr) munmap(addr, (size_t)length);
}

