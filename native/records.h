/*
 * records.h: the native codec of the records inside a Kafka v2 batch.
 *
 * A record (varints zigzag-encoded, as in protobuf; "varint" fields are
 * int32 and at most 5 bytes, "varlong" int64 and at most 10 bytes):
 *
 *   length varint | attributes int8 | timestampDelta varlong
 *   | offsetDelta varint | keyLength varint | key | valueLength varint | value
 *   | headerCount varint | (headerKeyLength varint | headerKey (UTF-8)
 *   | headerValueLength varint | headerValue)*
 *
 * A null key, value or header value has length -1; a header key is never
 * null. `length` counts the bytes after itself and must match the fields.
 *
 * Both directions work on columns, so Python crosses into C once per batch
 * and never per record (engine/records/codec.py is the only caller):
 *   encode  the non-null keys (values, header keys, header values) back to
 *           back in one buffer, their lengths in an int64 array, and one
 *           null flag per record (NULL: none is null);
 *   decode  per record: the absolute offset and timestamp, and [start, end)
 *           byte ranges into the decoded buffer for every field. Null fields
 *           get index 0 and non-null ones 1 + their rank, so Python builds a
 *           column as [None, *slices][index] without testing a record.
 * Every read is bounds-checked against the buffer: malformed input yields an
 * RK_REC_ERR_* code and the byte position of the problem, never a read past
 * `len`.
 */
#ifndef RAFTKA_RECORDS_H
#define RAFTKA_RECORDS_H

#include <stddef.h>
#include <stdint.h>

/* codec results (0 or a count when it worked) */
#define RK_REC_ERR_TRUNCATED -1     /* a field or varint runs past the buffer */
#define RK_REC_ERR_VARINT -2        /* a varint longer than its type allows or out of range */
#define RK_REC_ERR_LENGTH -3        /* a record's length disagrees with its fields */
#define RK_REC_ERR_FIELD_LENGTH -4  /* a length below -1, or a null header key */
#define RK_REC_ERR_COUNT -5         /* fewer records than recordCount, or bytes left after them */
#define RK_REC_ERR_SPACE -6         /* an output array or buffer is too small (caller's bug) */
#define RK_REC_ERR_INPUT -7         /* encode: columns disagree with their buffers (caller's bug) */
#define RK_REC_ERR_UTF8 -8          /* a header key is not well-formed UTF-8 */
/* the smallest record: length, attributes, timestamp, offset, key, value, header count */
#define RK_MIN_RECORD_BYTES 7
/* the largest encoding of a record's framing, and of a header's */
#define RK_MAX_RECORD_FRAMING_BYTES 36
#define RK_MAX_HEADER_FRAMING_BYTES 10

/* One nullable byte-string column, for encode. */
typedef struct {
    const uint8_t *data;       /* the non-null items back to back */
    int64_t data_len;
    const int64_t *lengths;    /* length of each non-null item, in order */
    const uint8_t *short_lengths; /* instead of `lengths` when every item is under 256 bytes */
    int64_t lengths_count;
    const uint8_t *nulls;      /* per item 1 = null, 0 = not; NULL: none is null */
} rk_bytes_column;

typedef struct {
    /* inputs */
    int64_t count;                 /* records */
    rk_bytes_column keys;
    rk_bytes_column values;
    const int64_t *timestamps;     /* per record, ms; NULL: all are `timestamp` */
    const uint8_t *timestamp_nulls;/* per record 1 = use `timestamp`; NULL: none */
    int64_t timestamps_count;      /* entries in `timestamps` (the non-null ones) */
    int64_t timestamp;             /* the default ("now") */
    const int64_t *header_counts;  /* per record; NULL: no record has headers */
    rk_bytes_column header_keys;   /* never null */
    rk_bytes_column header_values;
    /* cursor: where the next rk_records_encode call starts; zero to begin */
    int64_t next_record, next_key, next_value, next_timestamp, next_header, next_header_key,
        next_header_value;
    int64_t key_pos, value_pos, header_key_pos, header_value_pos;
    /* outputs of the last call */
    int64_t first_timestamp;
    int64_t max_timestamp;
} rk_record_columns;

typedef struct {
    int64_t base_offset;
    int32_t partition_leader_epoch;
    int16_t attributes;
    int64_t first_timestamp;
    int64_t max_timestamp;
    int64_t producer_id;
    int16_t producer_epoch;
    int32_t base_sequence;
    int32_t record_count;
} rk_batch_fields;

typedef struct {
    /* inputs: from the batch header */
    int64_t count;                 /* recordCount; every array below has `count` entries */
    int64_t base_offset;
    int64_t first_timestamp;
    int64_t max_timestamp;
    int32_t log_append_time;       /* 1: every record's timestamp is max_timestamp */
    int64_t header_capacity;       /* entries in the header arrays */
    /* per-record outputs */
    int64_t *offsets;
    int64_t *timestamps;
    int64_t *key_index;            /* 0 null, else 1 + rank among the non-null keys */
    int64_t *key_starts;           /* [start, end) of the non-null keys, in rank order */
    int64_t *key_ends;
    int64_t *value_index;
    int64_t *value_starts;
    int64_t *value_ends;
    int64_t *header_counts;
    /* per-header outputs, header_capacity entries each */
    int64_t *header_key_starts;
    int64_t *header_key_ends;
    int64_t *header_value_index;
    int64_t *header_value_starts;
    int64_t *header_value_ends;
    /* outputs */
    int64_t null_keys;
    int64_t null_values;
    int64_t header_total;          /* headers in the batch; > capacity: call again with more */
    int64_t null_header_values;
    int64_t key_bytes;             /* bytes of all non-null keys; values and header values alike */
    int64_t value_bytes;
    int64_t header_value_bytes;
    int32_t offsets_sequential;    /* 1: offsetDeltas are 0, 1, ..., count - 1 */
    int32_t timestamps_uniform;    /* 1: every record has the first record's timestamp */
    int64_t error_position;        /* on error: byte position of the bad record */
} rk_record_views;

/* Encodes records from the cursor on into out[0, cap), stopping before the
 * record that would take the total past `max_bytes` (but always at least one).
 * Returns the bytes written, or RK_REC_ERR_SPACE/RK_REC_ERR_INPUT. Timestamp
 * deltas are relative to the first record of this call. */
int64_t rk_records_encode(rk_record_columns *c, uint8_t *out, size_t cap, int64_t max_bytes);
/* Writes the 61-byte header of the batch in batch[0, len) (records already
 * in place after it), batchLength from len, and its CRC32C. */
int64_t rk_batch_seal(uint8_t *batch, size_t len, const rk_batch_fields *f);
/* Decodes the records section buf[start, end) (decompressed); returns count
 * or an RK_REC_ERR_* with v->error_position set. Byte positions are into buf. */
int64_t rk_records_decode(const uint8_t *buf, size_t start, size_t end, rk_record_views *v);
/* Copies the ranges buf[starts[i], ends[i]) for i < n back to back into out
 * (cap bytes) and their lengths into lengths; returns the bytes copied, or
 * RK_REC_ERR_SPACE. Turns a decoded column into one buffer that Python cuts
 * into bytes objects sequentially (io.BytesIO.read), with no slice objects. */
int64_t rk_gather(const uint8_t *buf, size_t len, const int64_t *starts, const int64_t *ends, int64_t n,
                  uint8_t *out, size_t cap, int64_t *lengths);
/* Checks the records section buf[0, len) holds exactly `count` well-formed
 * records with offsetDeltas 0..count-1; returns count or an RK_REC_ERR_*
 * (RK_REC_ERR_COUNT also for out-of-sequence offsetDeltas). Allocates nothing. */
int64_t rk_records_validate(const uint8_t *buf, size_t len, int64_t count, int64_t *error_position);
/* Kafka's default partitioner for a column of keys: out[i] = murmur2 of key i
 * mod partitions, or `sticky` for a null key; rank[i] = the records before i
 * going to the same partition; order = record indexes grouped by partition,
 * stable; per_partition[p] = records for p. Returns 0, or RK_REC_ERR_INPUT. */
int64_t rk_partition_keys(const rk_bytes_column *keys, int64_t count, int32_t partitions, int32_t sticky,
                          int32_t *out, int64_t *rank, int64_t *order, int64_t *per_partition);

/* ---- compaction (the log cleaner, engine/storage/cleaner.py) ----------------
 * The cleaner keeps, of the batches wholly in [from_offset, end_offset), the
 * latest record of each key; keyless records stay, and a tombstone (null
 * value) goes if it lies below tombstone_end_offset (the end of a clean old
 * enough that it kept the tombstone for delete.retention.ms). A rewritten batch keeps
 * its header (baseOffset, lastOffsetDelta, timestamps, producer fields) and
 * gets recordCount, batchLength and CRC32C anew, so offsets never move. A
 * batch left without records goes, unless it is its producer's last batch in
 * the range (idempotence state is rebuilt from the log), the last batch of
 * its segment (one rk_compact_filter call: segments stay contiguous) or holds
 * offset end_offset - 1 (the range keeps its end). Control batches are
 * copied whole; compressed ones too unless the caller cleaned them (it
 * decompresses, maps and filters them with these functions, recompresses:
 * rk_replacement). The output is a function of the range's bytes and the
 * three inputs alone: replicas cleaning the same log write the same bytes.
 */
typedef struct {
    uint64_t h1;
    uint64_t h2;
    int64_t offset;   /* offset + 1; 0: empty slot (a zeroed table is empty) */
} rk_key_slot;

/* A compressed batch the caller cleaned (decompressed, rk_compact_filter_one, recompressed):
   rk_compact_filter writes `data` (len 0: nothing) where the batch at `position` was. */
typedef struct {
    int64_t position;
    const uint8_t *data;
    int64_t len;
} rk_replacement;

typedef struct {
    /* inputs */
    int64_t from_offset;
    int64_t end_offset;
    int64_t tombstone_end_offset;
    rk_key_slot *keys;            /* open addressing; capacity a power of two, zeroed */
    int64_t key_capacity;
    rk_key_slot *producers;       /* h1 = producerId, offset = 1 + base offset of its last batch */
    int64_t producer_capacity;
    const rk_replacement *replacements;   /* of one rk_compact_filter call, by position */
    int64_t replacement_count;
    int64_t replacement_next;
    /* outputs, accumulated over calls */
    int64_t keys_used;
    int64_t producers_used;
    int64_t records_in;
    int64_t records_out;
    int64_t batches_kept_whole;   /* compressed or control batches in the range */
    int64_t error_position;
} rk_compact_state;

/* Records of the cleanable batches in buf (sizes the key table); producer batches counted into *producer_batches. */
int64_t rk_compact_count(const uint8_t *buf, size_t len, const rk_compact_state *st, int64_t *producer_batches);
/* Adds buf's keys (and producers) to the tables; call for every segment of the range, oldest first.
   0, or an RK_REC_ERR_* with error_position set (RK_REC_ERR_SPACE: a table is full). */
int64_t rk_compact_map(const uint8_t *buf, size_t len, rk_compact_state *st);
/* Writes buf (one whole segment) cleaned into out; returns the bytes written or an RK_REC_ERR_*
   (RK_REC_ERR_SPACE: out_cap is short, as it can be when a recompressed replacement grew). */
int64_t rk_compact_filter(const uint8_t *buf, size_t len, rk_compact_state *st, uint8_t *out, size_t out_cap);
/* One uncompressed batch (a compressed one, decompressed) cleaned into out, as rk_compact_filter would;
   segment_last: it is its segment's last batch. Returns the bytes written (0: it goes) or an RK_REC_ERR_*. */
int64_t rk_compact_filter_one(const uint8_t *batch, size_t len, int segment_last, rk_compact_state *st,
                              uint8_t *out, size_t out_cap);
/* Positions of the compressed data batches in the clean range from pos on (at most max_positions);
   *next_pos: where the walk stopped. Returns the count. */
int64_t rk_compact_compressed(const uint8_t *buf, size_t len, const rk_compact_state *st, int64_t pos,
                              int64_t *positions, size_t max_positions, int64_t *next_pos);
/* Position of the first uncompressed data batch holding a record without key, len if none,
   or an RK_REC_ERR_* for a malformed record (*error_position: the record). */
int64_t rk_null_key_batch(const uint8_t *buf, size_t len, int64_t *error_position);

#endif
