/*
 * raftka native hot path: the Kafka v2 record batch layout, CRC32C, batch
 * scanning/validation, segment appends and the header walks used by fetch.
 *
 * This header is the one place the record batch header layout is written
 * down; Python reads these constants through cffi (engine/records/layout.py).
 *
 * Record batch v2 (all integers big-endian):
 *
 *   offset  size  field
 *        0     8  baseOffset             rewritten by the broker on append
 *        8     4  batchLength            bytes that follow this field
 *       12     4  partitionLeaderEpoch   rewritten by the broker on append
 *       16     1  magic                  must be 2
 *       17     4  crc                    CRC32C (Castagnoli) of [21, end)
 *       21     2  attributes             bits 0-2 compression, 3 timestamp
 *                                        type, 4 transactional, 5 control
 *       23     4  lastOffsetDelta
 *       27     8  firstTimestamp
 *       35     8  maxTimestamp
 *       43     8  producerId
 *       51     2  producerEpoch
 *       53     4  baseSequence
 *       57     4  recordCount
 *       61     .  records (possibly compressed)
 *
 * Because the CRC starts at attributes, baseOffset and partitionLeaderEpoch
 * can be rewritten without recomputing it.
 */
#ifndef RAFTKA_H
#define RAFTKA_H

#include <stddef.h>
#include <stdint.h>

#define RK_BASE_OFFSET_OFF 0
#define RK_BATCH_LENGTH_OFF 8
#define RK_LEADER_EPOCH_OFF 12
#define RK_MAGIC_OFF 16
#define RK_CRC_OFF 17
#define RK_ATTRIBUTES_OFF 21
#define RK_LAST_OFFSET_DELTA_OFF 23
#define RK_FIRST_TIMESTAMP_OFF 27
#define RK_MAX_TIMESTAMP_OFF 35
#define RK_PRODUCER_ID_OFF 43
#define RK_PRODUCER_EPOCH_OFF 51
#define RK_BASE_SEQUENCE_OFF 53
#define RK_RECORD_COUNT_OFF 57
#define RK_HEADER_SIZE 61
/* baseOffset + batchLength: the bytes not counted by batchLength */
#define RK_LOG_OVERHEAD 12
/* bytes rewritten on append: baseOffset, batchLength, partitionLeaderEpoch */
#define RK_PATCH_SIZE 16
#define RK_MAGIC_V2 2

/* scan results: the first problem found, in buffer order */
#define RK_OK 0
#define RK_ERR_TRUNCATED 1   /* fewer bytes than the header or batchLength say */
#define RK_ERR_LENGTH 2      /* batchLength below the header size or above the cap */
#define RK_ERR_MAGIC 3       /* magic byte is not 2 */
#define RK_ERR_CRC 4         /* CRC32C mismatch */
#define RK_ERR_COUNT 5       /* recordCount < 1 or lastOffsetDelta != recordCount - 1 */
#define RK_ERR_OFFSET 6      /* baseOffset not contiguous with the previous batch */

/* check_offsets mode of a compacted log: gaps between batches, fewer records than offsets */
#define RK_CHECK_COMPACTED 2

typedef struct {
    int64_t position;      /* byte position of the batch in the scanned buffer */
    int64_t base_offset;   /* assigned (append) or stored (recovery) base offset */
    int64_t max_timestamp; /* running maximum of maxTimestamp up to this batch */
} rk_index_entry;

typedef struct {
    /* inputs */
    int32_t check_crc;            /* 1: verify CRC32C of every batch */
    int32_t check_offsets;        /* 1: stored baseOffset must equal next_offset (recovery);
                                     RK_CHECK_COMPACTED: stored batches of a log the cleaner may
                                     have rewritten (recordCount 0..lastOffsetDelta + 1, baseOffset
                                     >= next_offset, offsets kept as stored) */
    int64_t max_batch_bytes;      /* cap on one batch, header included */
    int64_t index_interval_bytes; /* emit an index entry once this many bytes went unindexed */
    /* inputs and outputs */
    int64_t next_offset;          /* offset the next batch gets; advanced per batch */
    int64_t bytes_since_index;    /* bytes appended since the last index entry */
    int64_t max_timestamp;        /* running maximum of maxTimestamp */
    /* outputs */
    int64_t valid_bytes;          /* length of the valid prefix scanned */
    int64_t batch_count;
    int64_t record_count;
    int64_t entry_count;
    int32_t error;                /* RK_OK or the RK_ERR_* that stopped the scan */
} rk_scan_state;

uint32_t rk_crc32c(uint32_t crc, const uint8_t *buf, size_t len);
int rk_crc32c_hardware(void);
uint32_t rk_crc32c_portable(uint32_t crc, const uint8_t *buf, size_t len);
int32_t rk_murmur2(const uint8_t *buf, size_t len);

int64_t rk_scan(const uint8_t *buf, size_t len, rk_scan_state *st,
                rk_index_entry *entries, size_t max_entries);
/* first_offset < 0: keep the batches' stored base offsets (a compacted log's data, copied) */
int64_t rk_append(int fd, int64_t file_position, uint8_t *buf, size_t len,
                  int64_t first_offset, int32_t leader_epoch, int in_place);
int64_t rk_seek_offset(const uint8_t *buf, size_t len, int64_t pos, int64_t target_offset);
int64_t rk_seek_timestamp(const uint8_t *buf, size_t len, int64_t pos, int64_t target_timestamp);
int64_t rk_span(const uint8_t *buf, size_t len, int64_t pos, int64_t max_bytes,
                int64_t end_offset, int64_t *next_offset);
int64_t rk_max_timestamp(const uint8_t *buf, size_t len, int64_t pos, int64_t end_pos);
/* Records of the whole batches in buf (a compacted log's batches may hold none) */
int64_t rk_record_total(const uint8_t *buf, size_t len);
/* positions of the batches from pos on that carry a producer id (at most max_positions);
   *next_pos = where the walk stopped, so a caller continues there; returns the count */
int64_t rk_producer_batches(const uint8_t *buf, size_t len, int64_t pos, int64_t *positions,
                            size_t max_positions, int64_t *next_pos);
/* read-only shared mapping of a segment; may extend past EOF (never read there) */
uint8_t *rk_map(int fd, int64_t length);
void rk_unmap(uint8_t *addr, int64_t length);

#endif
