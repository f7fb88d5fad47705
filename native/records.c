/*
 * The native codec of the records inside a Kafka v2 batch: encode columns
 * of keys, values, headers and timestamps into a batch (CRC32C included),
 * decode a records section into byte ranges, validate one without output.
 * See records.h for the record format and the column conventions.
 *
 * Neighbours: engine/records/codec.py marshals Python columns in and out
 * (one call per batch); raftka.c provides CRC32C and murmur2. Nothing here
 * allocates: callers size the outputs (the bounds are in records.h).
 *
 * Invariant of every decoder step: `pos <= end`, and no byte at or after
 * `end` is read; each varint read checks the bound before each byte.
 */
#include "records.h"
#include "raftka.h"

#include <string.h>

/* ---- varints ------------------------------------------------------------ */

static inline uint64_t zigzag(int64_t v) { return ((uint64_t)v << 1) ^ (uint64_t)(v >> 63); }

static inline size_t varint_size(int64_t v) {
    uint64_t u = zigzag(v);
    size_t n = 1;
    while (u > 0x7F) { u >>= 7; n++; }
    return n;
}

static inline uint8_t *put_varint(uint8_t *p, int64_t v) {
    uint64_t u = zigzag(v);
    while (u > 0x7F) { *p++ = (uint8_t)((u & 0x7F) | 0x80); u >>= 7; }
    *p++ = (uint8_t)u;
    return p;
}

/* Reads a zigzag varint of at most max_bytes from buf[*pos, end); 0 or an error. */
static inline int get_varint(const uint8_t *buf, size_t *pos, size_t end, int max_bytes, int64_t *out) {
    uint64_t result = 0;
    size_t p = *pos;
    for (int i = 0; i < max_bytes; i++) {
        if (p >= end) return RK_REC_ERR_TRUNCATED;
        uint8_t byte = buf[p++];
        result |= (uint64_t)(byte & 0x7F) << (7 * i);
        if (!(byte & 0x80)) {
            *pos = p;
            *out = (int64_t)(result >> 1) ^ -(int64_t)(result & 1);
            return 0;
        }
    }
    return RK_REC_ERR_VARINT;
}

/* an int32 field: at most 5 bytes and within int32 */
static inline int get_varint32(const uint8_t *buf, size_t *pos, size_t end, int64_t *out) {
    int err = get_varint(buf, pos, end, 5, out);
    if (err) return err;
    return (*out < INT32_MIN || *out > INT32_MAX) ? RK_REC_ERR_VARINT : 0;
}

/* ---- encoding ----------------------------------------------------------- */

/* A column's next item: its length (-1 null) and where its bytes are. */
static inline int next_item(const rk_bytes_column *col, int64_t record, int64_t *item, int64_t *pos,
                            int64_t *len, const uint8_t **data) {
    if (col->nulls && col->nulls[record]) { *len = -1; *data = NULL; return 0; }
    if (*item >= col->lengths_count) return RK_REC_ERR_INPUT;
    int64_t n = col->short_lengths ? (int64_t)col->short_lengths[*item] : col->lengths[*item];
    if (n < 0 || n > INT32_MAX || n > col->data_len - *pos) return RK_REC_ERR_INPUT;
    *len = n;
    *data = col->data + *pos;
    *item += 1;
    *pos += n;
    return 0;
}

static inline size_t field_size(int64_t len) { return varint_size(len) + (len > 0 ? (size_t)len : 0); }

static inline uint8_t *put_field(uint8_t *p, int64_t len, const uint8_t *data) {
    p = put_varint(p, len);
    if (len > 0) { memcpy(p, data, (size_t)len); p += len; }
    return p;
}

typedef struct {
    int64_t key_len, value_len, timestamp, header_count;
    const uint8_t *key, *value;
} record_fields;

static int record_timestamp(rk_record_columns *c, int64_t i, int64_t *ts) {
    if (!c->timestamps || (c->timestamp_nulls && c->timestamp_nulls[i])) { *ts = c->timestamp; return 0; }
    if (c->next_timestamp >= c->timestamps_count) return RK_REC_ERR_INPUT;
    *ts = c->timestamps[c->next_timestamp++];
    return 0;
}

/* Size of record i's headers; leaves the header cursors where they were. */
static int headers_size(const rk_record_columns *c, int64_t count, int64_t *size) {
    int64_t item_k = c->next_header_key, pos_k = c->header_key_pos;
    int64_t item_v = c->next_header_value, pos_v = c->header_value_pos;
    int64_t total = 0;
    for (int64_t h = 0; h < count; h++) {
        int64_t klen, vlen;
        const uint8_t *data;
        int err = next_item(&c->header_keys, c->next_header + h, &item_k, &pos_k, &klen, &data);
        if (!err) err = next_item(&c->header_values, c->next_header + h, &item_v, &pos_v, &vlen, &data);
        if (err || klen < 0) return RK_REC_ERR_INPUT;
        total += (int64_t)(field_size(klen) + field_size(vlen));
    }
    *size = total;
    return 0;
}

/* Writes `count` headers; headers_size checked them, so next_item cannot fail here. */
static uint8_t *put_headers(rk_record_columns *c, uint8_t *p, int64_t count) {
    for (int64_t h = 0; h < count; h++) {
        int64_t klen = 0, vlen = -1;
        const uint8_t *kdata = NULL, *vdata = NULL;
        next_item(&c->header_keys, c->next_header, &c->next_header_key, &c->header_key_pos, &klen, &kdata);
        next_item(&c->header_values, c->next_header, &c->next_header_value, &c->header_value_pos, &vlen, &vdata);
        p = put_field(p, klen, kdata);
        p = put_field(p, vlen, vdata);
        c->next_header++;
    }
    return p;
}

/* The cursor fields that one record advances, saved so a record that does not fit can be undone. */
typedef struct { int64_t key, value, timestamp, key_pos, value_pos; } cursor;

static cursor save_cursor(const rk_record_columns *c) {
    return (cursor){c->next_key, c->next_value, c->next_timestamp, c->key_pos, c->value_pos};
}

static void restore_cursor(rk_record_columns *c, cursor s) {
    c->next_key = s.key; c->next_value = s.value; c->next_timestamp = s.timestamp;
    c->key_pos = s.key_pos; c->value_pos = s.value_pos;
}

int64_t rk_records_encode(rk_record_columns *c, uint8_t *out, size_t cap, int64_t max_bytes) {
    uint8_t *p = out;
    int64_t first = c->next_record;
    while (c->next_record < c->count) {
        int64_t i = c->next_record;
        cursor saved = save_cursor(c);
        record_fields r;
        int64_t headers_bytes = 0;
        r.header_count = c->header_counts ? c->header_counts[i] : 0;
        int err = next_item(&c->keys, i, &c->next_key, &c->key_pos, &r.key_len, &r.key);
        if (!err) err = next_item(&c->values, i, &c->next_value, &c->value_pos, &r.value_len, &r.value);
        if (!err) err = record_timestamp(c, i, &r.timestamp);
        if (!err && (r.header_count < 0 || r.header_count > INT32_MAX)) err = RK_REC_ERR_INPUT;
        if (!err) err = headers_size(c, r.header_count, &headers_bytes);
        if (err) return err;
        if (i == first) c->first_timestamp = c->max_timestamp = r.timestamp;
        int64_t offset_delta = i - first;
        int64_t timestamp_delta = (int64_t)((uint64_t)r.timestamp - (uint64_t)c->first_timestamp);
        int64_t body = 1 + (int64_t)(varint_size(timestamp_delta) + varint_size(offset_delta) +
                                     field_size(r.key_len) + field_size(r.value_len) +
                                     varint_size(r.header_count)) + headers_bytes;
        int64_t size = (int64_t)varint_size(body) + body;
        int64_t written = (int64_t)(p - out);
        if (i > first && written + size > max_bytes) { restore_cursor(c, saved); break; }
        if (size > (int64_t)cap - written) { restore_cursor(c, saved); return RK_REC_ERR_SPACE; }
        p = put_varint(p, body);
        *p++ = 0; /* record attributes: unused */
        p = put_varint(p, timestamp_delta);
        p = put_varint(p, offset_delta);
        p = put_field(p, r.key_len, r.key);
        p = put_field(p, r.value_len, r.value);
        p = put_varint(p, r.header_count);
        p = put_headers(c, p, r.header_count);
        if (r.timestamp > c->max_timestamp) c->max_timestamp = r.timestamp;
        c->next_record++;
    }
    return (int64_t)(p - out);
}

static inline void put_be64(uint8_t *p, int64_t v) {
    uint64_t u = (uint64_t)v;
    for (int i = 7; i >= 0; i--) { p[i] = (uint8_t)u; u >>= 8; }
}

static inline void put_be32(uint8_t *p, int32_t v) {
    uint32_t u = (uint32_t)v;
    p[0] = (uint8_t)(u >> 24); p[1] = (uint8_t)(u >> 16); p[2] = (uint8_t)(u >> 8); p[3] = (uint8_t)u;
}

static inline void put_be16(uint8_t *p, int16_t v) {
    uint16_t u = (uint16_t)v;
    p[0] = (uint8_t)(u >> 8); p[1] = (uint8_t)u;
}

int64_t rk_batch_seal(uint8_t *batch, size_t len, const rk_batch_fields *f) {
    if (len < RK_HEADER_SIZE || len - RK_LOG_OVERHEAD > INT32_MAX || f->record_count < 1)
        return RK_REC_ERR_INPUT;
    put_be64(batch + RK_BASE_OFFSET_OFF, f->base_offset);
    put_be32(batch + RK_BATCH_LENGTH_OFF, (int32_t)(len - RK_LOG_OVERHEAD));
    put_be32(batch + RK_LEADER_EPOCH_OFF, f->partition_leader_epoch);
    batch[RK_MAGIC_OFF] = RK_MAGIC_V2;
    put_be16(batch + RK_ATTRIBUTES_OFF, f->attributes);
    put_be32(batch + RK_LAST_OFFSET_DELTA_OFF, f->record_count - 1);
    put_be64(batch + RK_FIRST_TIMESTAMP_OFF, f->first_timestamp);
    put_be64(batch + RK_MAX_TIMESTAMP_OFF, f->max_timestamp);
    put_be64(batch + RK_PRODUCER_ID_OFF, f->producer_id);
    put_be16(batch + RK_PRODUCER_EPOCH_OFF, f->producer_epoch);
    put_be32(batch + RK_BASE_SEQUENCE_OFF, f->base_sequence);
    put_be32(batch + RK_RECORD_COUNT_OFF, f->record_count);
    uint32_t crc = rk_crc32c(0, batch + RK_ATTRIBUTES_OFF, len - RK_ATTRIBUTES_OFF);
    put_be32(batch + RK_CRC_OFF, (int32_t)crc);
    return (int64_t)len;
}

/* ---- decoding ----------------------------------------------------------- */

/* 1 if p[0, n) is well-formed UTF-8 (no overlong forms, surrogates or code
 * points past U+10FFFF: what Python's strict decoder accepts). */
static int utf8_valid(const uint8_t *p, size_t n) {
    size_t i = 0;
    while (i < n) {
        uint8_t c = p[i];
        if (c < 0x80) { i++; continue; }
        size_t more;
        uint8_t lo = 0x80, hi = 0xBF;
        if (c >= 0xC2 && c <= 0xDF) more = 1;
        else if (c >= 0xE0 && c <= 0xEF) { more = 2; if (c == 0xE0) lo = 0xA0; if (c == 0xED) hi = 0x9F; }
        else if (c >= 0xF0 && c <= 0xF4) { more = 3; if (c == 0xF0) lo = 0x90; if (c == 0xF4) hi = 0x8F; }
        else return 0;
        if (more > n - i - 1) return 0;
        if (p[i + 1] < lo || p[i + 1] > hi) return 0;
        for (size_t k = 2; k <= more; k++)
            if ((p[i + k] & 0xC0) != 0x80) return 0;
        i += more + 1;
    }
    return 1;
}

/* A header key: a non-null length-prefixed UTF-8 string. */
static inline int get_header_key(const uint8_t *buf, size_t *pos, size_t end, int64_t *start, int64_t *len);

/* A length-prefixed field at *pos within [*pos, end): -1 null (if allowed). */
static inline int get_field(const uint8_t *buf, size_t *pos, size_t end, int nullable,
                            int64_t *start, int64_t *len) {
    int err = get_varint32(buf, pos, end, len);
    if (err) return err;
    if (*len < -1 || (*len == -1 && !nullable)) return RK_REC_ERR_FIELD_LENGTH;
    *start = (int64_t)*pos;
    if (*len > 0) {
        if ((uint64_t)*len > end - *pos) return RK_REC_ERR_TRUNCATED;
        *pos += (size_t)*len;
    }
    return 0;
}

static inline int get_header_key(const uint8_t *buf, size_t *pos, size_t end, int64_t *start, int64_t *len) {
    int err = get_field(buf, pos, end, 0, start, len);
    if (err) return err;
    return utf8_valid(buf + *start, (size_t)*len) ? 0 : RK_REC_ERR_UTF8;
}

/* The fixed part of a record at *pos: its end, timestamp and offset deltas. */
static int record_prefix(const uint8_t *buf, size_t *pos, size_t end, size_t *record_end,
                         int64_t *timestamp_delta, int64_t *offset_delta) {
    int64_t length;
    int err = get_varint32(buf, pos, end, &length);
    if (err) return err;
    if (length < RK_MIN_RECORD_BYTES - 1) return RK_REC_ERR_LENGTH;
    if ((uint64_t)length > end - *pos) return RK_REC_ERR_TRUNCATED;
    *record_end = *pos + (size_t)length;
    *pos += 1; /* attributes */
    err = get_varint(buf, pos, *record_end, 10, timestamp_delta);
    if (!err) err = get_varint32(buf, pos, *record_end, offset_delta);
    return err;
}

static void put_view(int64_t start, int64_t len, int64_t *index, int64_t *starts, int64_t *ends,
                     int64_t *rank, int64_t *nulls, int64_t *bytes) {
    if (len < 0) { *index = 0; *nulls += 1; return; }
    *bytes += len;
    starts[*rank] = start;
    ends[*rank] = start + len;
    *rank += 1;
    *index = *rank;
}

static int decode_headers(const uint8_t *buf, size_t *pos, size_t record_end, int64_t count,
                          rk_record_views *v, int64_t *value_rank) {
    for (int64_t h = 0; h < count; h++) {
        int64_t kstart, klen, vstart, vlen;
        int err = get_header_key(buf, pos, record_end, &kstart, &klen);
        if (!err) err = get_field(buf, pos, record_end, 1, &vstart, &vlen);
        if (err) return err;
        int64_t n = v->header_total++;
        if (n >= v->header_capacity) continue; /* count them all; the caller retries with room */
        v->header_key_starts[n] = kstart;
        v->header_key_ends[n] = kstart + klen;
        put_view(vstart, vlen, &v->header_value_index[n], v->header_value_starts, v->header_value_ends,
                 value_rank, &v->null_header_values, &v->header_value_bytes);
    }
    return 0;
}

static int decode_record(const uint8_t *buf, size_t *pos, size_t end, int64_t i, rk_record_views *v,
                         int64_t *key_rank, int64_t *value_rank, int64_t *header_value_rank) {
    size_t record_end;
    int64_t timestamp_delta, offset_delta, start, len, header_count;
    int err = record_prefix(buf, pos, end, &record_end, &timestamp_delta, &offset_delta);
    if (err) return err;
    v->offsets[i] = v->base_offset + offset_delta;
    v->timestamps[i] = v->log_append_time ? v->max_timestamp
                       : (int64_t)((uint64_t)v->first_timestamp + (uint64_t)timestamp_delta);
    if (offset_delta != i) v->offsets_sequential = 0;
    if (v->timestamps[i] != v->timestamps[0]) v->timestamps_uniform = 0;
    err = get_field(buf, pos, record_end, 1, &start, &len);
    if (err) return err;
    put_view(start, len, &v->key_index[i], v->key_starts, v->key_ends, key_rank, &v->null_keys, &v->key_bytes);
    err = get_field(buf, pos, record_end, 1, &start, &len);
    if (err) return err;
    put_view(start, len, &v->value_index[i], v->value_starts, v->value_ends, value_rank, &v->null_values,
             &v->value_bytes);
    err = get_varint32(buf, pos, record_end, &header_count);
    if (err) return err;
    if (header_count < 0 || header_count > (int64_t)(record_end - *pos) / 2) return RK_REC_ERR_FIELD_LENGTH;
    v->header_counts[i] = header_count;
    err = decode_headers(buf, pos, record_end, header_count, v, header_value_rank);
    if (err) return err;
    return *pos == record_end ? 0 : RK_REC_ERR_LENGTH;
}

int64_t rk_records_decode(const uint8_t *buf, size_t start, size_t end, rk_record_views *v) {
    size_t pos = start;
    int64_t key_rank = 0, value_rank = 0, header_value_rank = 0;
    v->null_keys = v->null_values = v->header_total = v->null_header_values = 0;
    v->key_bytes = v->value_bytes = v->header_value_bytes = 0;
    v->offsets_sequential = v->timestamps_uniform = 1;
    v->error_position = -1;
    if (start > end || v->count < 0 || v->count > (int64_t)((end - start) / RK_MIN_RECORD_BYTES)) {
        v->error_position = (int64_t)start;
        return RK_REC_ERR_COUNT;
    }
    for (int64_t i = 0; i < v->count; i++) {
        size_t record_start = pos;
        int err = decode_record(buf, &pos, end, i, v, &key_rank, &value_rank, &header_value_rank);
        if (err) { v->error_position = (int64_t)record_start; return err; }
    }
    if (pos != end) { v->error_position = (int64_t)pos; return RK_REC_ERR_COUNT; }
    return v->count;
}

int64_t rk_gather(const uint8_t *buf, size_t len, const int64_t *starts, const int64_t *ends, int64_t n,
                  uint8_t *out, size_t cap, int64_t *lengths) {
    size_t written = 0;
    for (int64_t i = 0; i < n; i++) {
        int64_t start = starts[i], end = ends[i];
        if (start < 0 || end < start || (uint64_t)end > len) return RK_REC_ERR_INPUT;
        size_t size = (size_t)(end - start);
        if (size > cap - written) return RK_REC_ERR_SPACE;
        memcpy(out + written, buf + start, size);
        written += size;
        lengths[i] = (int64_t)size;
    }
    return (int64_t)written;
}

int64_t rk_records_validate(const uint8_t *buf, size_t len, int64_t count, int64_t *error_position) {
    size_t pos = 0;
    *error_position = 0;
    if (count < 0 || count > (int64_t)(len / RK_MIN_RECORD_BYTES)) return RK_REC_ERR_COUNT;
    for (int64_t i = 0; i < count; i++) {
        size_t record_end;
        int64_t timestamp_delta, offset_delta, start, field_len, header_count;
        *error_position = (int64_t)pos;
        int err = record_prefix(buf, &pos, len, &record_end, &timestamp_delta, &offset_delta);
        if (!err && offset_delta != i) err = RK_REC_ERR_COUNT;
        if (!err) err = get_field(buf, &pos, record_end, 1, &start, &field_len);
        if (!err) err = get_field(buf, &pos, record_end, 1, &start, &field_len);
        if (!err) err = get_varint32(buf, &pos, record_end, &header_count);
        if (!err && header_count < 0) err = RK_REC_ERR_FIELD_LENGTH;
        for (int64_t h = 0; !err && h < header_count; h++) {
            err = get_header_key(buf, &pos, record_end, &start, &field_len);
            if (!err) err = get_field(buf, &pos, record_end, 1, &start, &field_len);
        }
        if (!err && pos != record_end) err = RK_REC_ERR_LENGTH;
        if (err) return err;
    }
    *error_position = (int64_t)pos;
    return pos == len ? count : RK_REC_ERR_COUNT;
}

/* ---- partitioning ------------------------------------------------------- */

int64_t rk_partition_keys(const rk_bytes_column *keys, int64_t count, int32_t partitions, int32_t sticky,
                          int32_t *out, int64_t *rank, int64_t *order, int64_t *per_partition) {
    if (partitions < 1 || sticky < 0 || sticky >= partitions) return RK_REC_ERR_INPUT;
    int64_t item = 0, pos = 0;
    memset(per_partition, 0, sizeof(int64_t) * (size_t)partitions);
    for (int64_t i = 0; i < count; i++) {
        int64_t len;
        const uint8_t *data;
        if (next_item(keys, i, &item, &pos, &len, &data)) return RK_REC_ERR_INPUT;
        int32_t p = len < 0 ? sticky
                  : (int32_t)(((uint32_t)rk_murmur2(data, (size_t)len) & 0x7fffffffu) % (uint32_t)partitions);
        out[i] = p;
        rank[i] = per_partition[p]++;
    }
    /* stable counting sort: each partition's records start after the earlier partitions' */
    int64_t start = 0;
    for (int32_t p = 0; p < partitions; p++) {
        int64_t n = per_partition[p];
        per_partition[p] = start;
        start += n;
    }
    for (int64_t i = 0; i < count; i++) order[per_partition[out[i]] + rank[i]] = i;
    for (int32_t p = 0; p < partitions; p++) {  /* starts back to counts */
        int64_t next = p + 1 < partitions ? per_partition[p + 1] : count;
        per_partition[p] = next - per_partition[p];
    }
    return 0;
}

/* ---- compaction ------------------------------------------------------------ */

#define RK_ATTR_COMPRESSION 0x07
#define RK_ATTR_CONTROL 0x20

static inline int64_t rd64(const uint8_t *p) {
    uint64_t v = 0;
    for (int i = 0; i < 8; i++) v = (v << 8) | p[i];
    return (int64_t)v;
}

static inline int32_t rd32(const uint8_t *p) {
    return (int32_t)(((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) | ((uint32_t)p[2] << 8) | p[3]);
}

static inline int16_t rd16(const uint8_t *p) { return (int16_t)(((uint16_t)p[0] << 8) | p[1]); }

/* Size of the stored batch at pos, 0 if it does not fit in len. */
static inline int64_t batch_size_at(const uint8_t *buf, size_t len, size_t pos) {
    if (pos + RK_HEADER_SIZE > len) return 0;
    int64_t size = (int64_t)rd32(buf + pos + RK_BATCH_LENGTH_OFF) + RK_LOG_OVERHEAD;
    if (size < RK_HEADER_SIZE || pos + (size_t)size > len) return 0;
    return size;
}

static inline int in_clean_range(const uint8_t *p, const rk_compact_state *st) {
    int64_t base = rd64(p + RK_BASE_OFFSET_OFF);
    return base >= st->from_offset && base + rd32(p + RK_LAST_OFFSET_DELTA_OFF) < st->end_offset;
}

/* Batches whose records the cleaner reads: uncompressed data batches in the clean range. */
static inline int records_cleanable(const uint8_t *p, const rk_compact_state *st) {
    return in_clean_range(p, st) && !(rd16(p + RK_ATTRIBUTES_OFF) & (RK_ATTR_COMPRESSION | RK_ATTR_CONTROL));
}

/* Two independent 64-bit hashes of a key: 128 bits name it (Kafka's map keeps a 16-byte digest). */
static inline void key_hash(const uint8_t *p, int64_t n, uint64_t *h1, uint64_t *h2) {
    uint64_t a = 0xcbf29ce484222325ULL, b = 0x9e3779b97f4a7c15ULL ^ (uint64_t)n;
    for (int64_t i = 0; i < n; i++) {
        a = (a ^ p[i]) * 0x100000001b3ULL;
        b = (b ^ p[i]) * 0xff51afd7ed558ccdULL;
        b ^= b >> 29;
    }
    a ^= a >> 33; a *= 0xc4ceb9fe1a85ec53ULL; a ^= a >> 33;
    b ^= b >> 31; b *= 0x94d049bb133111ebULL; b ^= b >> 32;
    *h1 = a;
    *h2 = b;
}

/* The slot of (h1, h2): found, or claimed when `insert` (NULL when absent, or the table is 3/4 full). */
static rk_key_slot *slot_of(rk_key_slot *table, int64_t capacity, int64_t *used, uint64_t h1, uint64_t h2,
                            int insert) {
    uint64_t mask = (uint64_t)capacity - 1, i = h1 & mask;
    for (int64_t probe = 0; probe < capacity; probe++, i = (i + 1) & mask) {
        rk_key_slot *slot = &table[i];
        if (slot->offset == 0) {
            if (!insert || 4 * (*used + 1) > 3 * capacity) return NULL;
            slot->h1 = h1;
            slot->h2 = h2;
            *used += 1;
            return slot;
        }
        if (slot->h1 == h1 && slot->h2 == h2) return slot;
    }
    return NULL;
}

/* One record at *pos of a batch's records ending at `end`: its bounds, offset delta, key and value. */
typedef struct {
    size_t start, end;
    int64_t timestamp_delta, offset_delta, key_start, key_len, value_start, value_len;
} compact_record;

static int next_record(const uint8_t *buf, size_t *pos, size_t end, compact_record *r) {
    r->start = *pos;
    int err = record_prefix(buf, pos, end, &r->end, &r->timestamp_delta, &r->offset_delta);
    if (!err) err = get_field(buf, pos, r->end, 1, &r->key_start, &r->key_len);
    if (!err) err = get_field(buf, pos, r->end, 1, &r->value_start, &r->value_len);
    *pos = r->end;
    return err;
}

int64_t rk_compact_count(const uint8_t *buf, size_t len, const rk_compact_state *st, int64_t *producer_batches) {
    int64_t records = 0, size;
    for (size_t pos = 0; (size = batch_size_at(buf, len, pos)) > 0; pos += (size_t)size) {
        const uint8_t *p = buf + pos;
        if (!in_clean_range(p, st)) continue;
        if (rd64(p + RK_PRODUCER_ID_OFF) != -1) *producer_batches += 1;
        if (!(rd16(p + RK_ATTRIBUTES_OFF) & RK_ATTR_CONTROL)) records += rd32(p + RK_RECORD_COUNT_OFF);
    }
    return records;
}

int64_t rk_compact_map(const uint8_t *buf, size_t len, rk_compact_state *st) {
    int64_t size;
    for (size_t pos = 0; (size = batch_size_at(buf, len, pos)) > 0; pos += (size_t)size) {
        const uint8_t *p = buf + pos;
        if (!in_clean_range(p, st)) continue;
        int64_t base = rd64(p + RK_BASE_OFFSET_OFF), producer = rd64(p + RK_PRODUCER_ID_OFF);
        if (producer != -1) {
            rk_key_slot *slot = slot_of(st->producers, st->producer_capacity, &st->producers_used,
                                        (uint64_t)producer, 0, 1);
            if (!slot) { st->error_position = (int64_t)pos; return RK_REC_ERR_SPACE; }
            if (slot->offset < base + 1) slot->offset = base + 1;
        }
        if (!records_cleanable(p, st)) continue;
        size_t rpos = pos + RK_HEADER_SIZE, end = pos + (size_t)size;
        for (int32_t i = 0, n = rd32(p + RK_RECORD_COUNT_OFF); i < n; i++) {
            compact_record r;
            int err = next_record(buf, &rpos, end, &r);
            if (err) { st->error_position = (int64_t)r.start; return err; }
            if (r.key_len < 0) continue;
            uint64_t h1, h2;
            key_hash(buf + r.key_start, r.key_len, &h1, &h2);
            rk_key_slot *slot = slot_of(st->keys, st->key_capacity, &st->keys_used, h1, h2, 1);
            if (!slot) { st->error_position = (int64_t)r.start; return RK_REC_ERR_SPACE; }
            /* the latest wins, whatever order batches come in (compressed ones are mapped apart) */
            if (slot->offset < base + r.offset_delta + 1) slot->offset = base + r.offset_delta + 1;
        }
    }
    return 0;
}

/* Is the record the latest of its key, and not a tombstone a clean already kept long enough? Keyless ones stay. */
static int record_kept(const uint8_t *buf, const compact_record *r, int64_t base, rk_compact_state *st) {
    if (r->key_len < 0) return 1;
    uint64_t h1, h2;
    key_hash(buf + r->key_start, r->key_len, &h1, &h2);
    rk_key_slot *slot = slot_of(st->keys, st->key_capacity, &st->keys_used, h1, h2, 0);
    if (!slot || slot->offset != base + r->offset_delta + 1) return 0;
    return !(r->value_len < 0 && base + r->offset_delta < st->tombstone_end_offset);
}

/* The batch at p rewritten with its kept records into out: the header as it was (base offset,
   lastOffsetDelta, timestamps, producer fields), recordCount, batchLength and CRC32C new.
   Returns the bytes written (0: the batch goes), or an RK_REC_ERR_*. */
static int64_t filter_batch(const uint8_t *buf, size_t pos, int64_t size, int segment_last, rk_compact_state *st,
                            uint8_t *out) {
    const uint8_t *p = buf + pos;
    int64_t base = rd64(p + RK_BASE_OFFSET_OFF), producer = rd64(p + RK_PRODUCER_ID_OFF);
    int32_t count = rd32(p + RK_RECORD_COUNT_OFF), kept = 0;
    size_t rpos = pos + RK_HEADER_SIZE, end = pos + (size_t)size, written = RK_HEADER_SIZE;
    for (int32_t i = 0; i < count; i++) {
        compact_record r;
        int err = next_record(buf, &rpos, end, &r);
        if (err) { st->error_position = (int64_t)r.start; return err; }
        if (!record_kept(buf, &r, base, st)) continue;
        memcpy(out + written, buf + r.start, r.end - r.start);
        written += r.end - r.start;
        kept++;
    }
    st->records_in += count;
    st->records_out += kept;
    if (kept == 0) {
        int64_t last = base + rd32(p + RK_LAST_OFFSET_DELTA_OFF);
        rk_key_slot *slot = producer == -1 ? NULL
            : slot_of(st->producers, st->producer_capacity, &st->producers_used, (uint64_t)producer, 0, 0);
        int producer_last = slot && slot->offset == base + 1;   /* its sequence state outlives the records */
        /* the range's and each segment's last offset stay, so segments stay contiguous */
        if (!producer_last && !segment_last && last != st->end_offset - 1) return 0;
    }
    memcpy(out, p, RK_HEADER_SIZE);
    uint32_t batch_length = (uint32_t)(written - RK_LOG_OVERHEAD);
    for (int i = 0; i < 4; i++) out[RK_BATCH_LENGTH_OFF + i] = (uint8_t)(batch_length >> (24 - 8 * i));
    for (int i = 0; i < 4; i++) out[RK_RECORD_COUNT_OFF + i] = (uint8_t)((uint32_t)kept >> (24 - 8 * i));
    uint32_t crc = rk_crc32c(0, out + RK_ATTRIBUTES_OFF, written - RK_ATTRIBUTES_OFF);
    for (int i = 0; i < 4; i++) out[RK_CRC_OFF + i] = (uint8_t)(crc >> (24 - 8 * i));
    return (int64_t)written;
}

/* The batch at p copied whole, or its replacement (a compressed batch the caller cleaned) if one names pos. */
static int64_t copy_batch(const uint8_t *p, size_t pos, int64_t size, rk_compact_state *st, uint8_t *out,
                          size_t room) {
    const uint8_t *from = p;
    int64_t n = size;
    if (st->replacement_next < st->replacement_count && st->replacements[st->replacement_next].position == (int64_t)pos) {
        from = st->replacements[st->replacement_next].data;
        n = st->replacements[st->replacement_next].len;
        st->replacement_next += 1;
    } else if (in_clean_range(p, st)) {
        st->batches_kept_whole += 1;
    }
    if ((uint64_t)n > room) return RK_REC_ERR_SPACE;
    memcpy(out, from, (size_t)n);
    return n;
}

int64_t rk_compact_filter(const uint8_t *buf, size_t len, rk_compact_state *st, uint8_t *out, size_t out_cap) {
    size_t written = 0;
    int64_t size;
    st->replacement_next = 0;
    for (size_t pos = 0; (size = batch_size_at(buf, len, pos)) > 0; pos += (size_t)size) {
        const uint8_t *p = buf + pos;
        int64_t n;
        if (!records_cleanable(p, st)) {
            n = copy_batch(p, pos, size, st, out + written, out_cap - written);
        } else if ((uint64_t)size > out_cap - written) {
            n = RK_REC_ERR_SPACE;   /* a rewrite is never larger than its batch */
        } else {
            n = filter_batch(buf, pos, size, pos + (size_t)size == len, st, out + written);
        }
        if (n < 0) return n;
        written += (size_t)n;
    }
    return (int64_t)written;
}

int64_t rk_compact_filter_one(const uint8_t *batch, size_t len, int segment_last, rk_compact_state *st,
                              uint8_t *out, size_t out_cap) {
    int64_t size = batch_size_at(batch, len, 0);
    if (size <= 0 || (size_t)size != len || !records_cleanable(batch, st)) return RK_REC_ERR_INPUT;
    if ((uint64_t)size > out_cap) return RK_REC_ERR_SPACE;
    return filter_batch(batch, 0, size, segment_last, st, out);
}

int64_t rk_compact_compressed(const uint8_t *buf, size_t len, const rk_compact_state *st, int64_t pos,
                              int64_t *positions, size_t max_positions, int64_t *next_pos) {
    int64_t size, count = 0;
    while ((size_t)count < max_positions && (size = batch_size_at(buf, len, (size_t)pos)) > 0) {
        const uint8_t *p = buf + pos;
        int16_t attributes = rd16(p + RK_ATTRIBUTES_OFF);
        if (in_clean_range(p, st) && (attributes & RK_ATTR_COMPRESSION) && !(attributes & RK_ATTR_CONTROL))
            positions[count++] = pos;
        pos += size;
    }
    *next_pos = pos;
    return count;
}

int64_t rk_null_key_batch(const uint8_t *buf, size_t len, int64_t *error_position) {
    int64_t size;
    for (size_t pos = 0; (size = batch_size_at(buf, len, pos)) > 0; pos += (size_t)size) {
        const uint8_t *p = buf + pos;
        if (rd16(p + RK_ATTRIBUTES_OFF) & (RK_ATTR_COMPRESSION | RK_ATTR_CONTROL)) continue;
        size_t rpos = pos + RK_HEADER_SIZE, end = pos + (size_t)size;
        for (int32_t i = 0, n = rd32(p + RK_RECORD_COUNT_OFF); i < n; i++) {
            compact_record r;
            int err = next_record(buf, &rpos, end, &r);
            if (err) { *error_position = (int64_t)r.start; return err; }
            if (r.key_len < 0) { *error_position = (int64_t)r.start; return (int64_t)pos; }
        }
    }
    return (int64_t)len;
}
