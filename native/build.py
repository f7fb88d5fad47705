"""cffi (API mode, out-of-line) build of the native hot path: `native._raftka`.

Run by `pip install` through setup.py's cffi_modules; nothing is prebuilt.
"""
from pathlib import Path

from cffi import FFI

HERE = Path(__file__).resolve().parent

CDEF = """
#define RK_BASE_OFFSET_OFF ...
#define RK_BATCH_LENGTH_OFF ...
#define RK_LEADER_EPOCH_OFF ...
#define RK_MAGIC_OFF ...
#define RK_CRC_OFF ...
#define RK_ATTRIBUTES_OFF ...
#define RK_LAST_OFFSET_DELTA_OFF ...
#define RK_FIRST_TIMESTAMP_OFF ...
#define RK_MAX_TIMESTAMP_OFF ...
#define RK_PRODUCER_ID_OFF ...
#define RK_PRODUCER_EPOCH_OFF ...
#define RK_BASE_SEQUENCE_OFF ...
#define RK_RECORD_COUNT_OFF ...
#define RK_HEADER_SIZE ...
#define RK_LOG_OVERHEAD ...
#define RK_MAGIC_V2 ...
#define RK_OK ...
#define RK_ERR_TRUNCATED ...
#define RK_ERR_LENGTH ...
#define RK_ERR_MAGIC ...
#define RK_ERR_CRC ...
#define RK_ERR_COUNT ...
#define RK_ERR_OFFSET ...

typedef struct {
    int64_t position;
    int64_t base_offset;
    int64_t max_timestamp;
} rk_index_entry;

typedef struct {
    int32_t check_crc;
    int32_t check_offsets;
    int64_t max_batch_bytes;
    int64_t index_interval_bytes;
    int64_t next_offset;
    int64_t bytes_since_index;
    int64_t max_timestamp;
    int64_t valid_bytes;
    int64_t batch_count;
    int64_t record_count;
    int64_t entry_count;
    int32_t error;
} rk_scan_state;

uint32_t rk_crc32c(uint32_t crc, const uint8_t *buf, size_t len);
int rk_crc32c_hardware(void);
uint32_t rk_crc32c_portable(uint32_t crc, const uint8_t *buf, size_t len);
int32_t rk_murmur2(const uint8_t *buf, size_t len);
int64_t rk_scan(const uint8_t *buf, size_t len, rk_scan_state *st,
                rk_index_entry *entries, size_t max_entries);
int64_t rk_append(int fd, int64_t file_position, uint8_t *buf, size_t len,
                  int64_t first_offset, int32_t leader_epoch, int in_place);
int64_t rk_seek_offset(const uint8_t *buf, size_t len, int64_t pos, int64_t target_offset);
int64_t rk_seek_timestamp(const uint8_t *buf, size_t len, int64_t pos, int64_t target_timestamp);
int64_t rk_span(const uint8_t *buf, size_t len, int64_t pos, int64_t max_bytes,
                int64_t end_offset, int64_t *next_offset);
int64_t rk_max_timestamp(const uint8_t *buf, size_t len, int64_t pos, int64_t end_pos);
uint8_t *rk_map(int fd, int64_t length);
void rk_unmap(uint8_t *addr, int64_t length);
"""

ffibuilder = FFI()
ffibuilder.cdef(CDEF)
ffibuilder.set_source(
    "native._raftka",
    '#include "raftka.h"',
    sources=[str(Path("native") / "raftka.c")],
    include_dirs=[str(Path("native"))],
    extra_compile_args=["-O3", "-std=c11", "-Wall", "-Wextra"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
