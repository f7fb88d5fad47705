"""The record batch v2 header as Python sees it.

The byte offsets are defined once, in native/raftka.h (the C hot path needs
them); this module reads them from the extension and adds what only Python
uses: the struct for the whole header and the attribute bits.
"""
from __future__ import annotations

import struct

from raftka.native import lib

BASE_OFFSET_OFF: int = lib.RK_BASE_OFFSET_OFF
BATCH_LENGTH_OFF: int = lib.RK_BATCH_LENGTH_OFF
LEADER_EPOCH_OFF: int = lib.RK_LEADER_EPOCH_OFF
MAGIC_OFF: int = lib.RK_MAGIC_OFF
CRC_OFF: int = lib.RK_CRC_OFF
ATTRIBUTES_OFF: int = lib.RK_ATTRIBUTES_OFF
LAST_OFFSET_DELTA_OFF: int = lib.RK_LAST_OFFSET_DELTA_OFF
MAX_TIMESTAMP_OFF: int = lib.RK_MAX_TIMESTAMP_OFF
RECORD_COUNT_OFF: int = lib.RK_RECORD_COUNT_OFF
HEADER_SIZE: int = lib.RK_HEADER_SIZE
LOG_OVERHEAD: int = lib.RK_LOG_OVERHEAD
MAGIC: int = lib.RK_MAGIC_V2

# baseOffset batchLength partitionLeaderEpoch magic crc attributes
# lastOffsetDelta firstTimestamp maxTimestamp producerId producerEpoch
# baseSequence recordCount
HEADER = struct.Struct(">qiibIhiqqqhii")
assert HEADER.size == HEADER_SIZE, "struct and native/raftka.h disagree on the header size"

COMPRESSION_MASK = 0x07
TIMESTAMP_TYPE_MASK = 0x08  # 1 = LogAppendTime
TRANSACTIONAL_MASK = 0x10
CONTROL_MASK = 0x20
