"""Native hot path (C via cffi): CRC32C, batch validation, segment appends and reads.

`ffi` and `lib` come from the extension `pip install` builds out of
native/raftka.c; engine/storage is the only caller on the data path.
`crc32c` is the one Python wrapper of the checksum: record batches
(engine/records) and raft/'s journal, vote and checkpoint files use it.
"""
from raftka.native._raftka import ffi, lib

__all__ = ["crc32c", "ffi", "lib"]


def crc32c(data: bytes | bytearray | memoryview, crc: int = 0) -> int:
    """CRC32C (Castagnoli) of `data`, continuing from `crc`; native speed."""
    return lib.rk_crc32c(crc, ffi.from_buffer(data), len(data))
