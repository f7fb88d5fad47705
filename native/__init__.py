"""Native hot path (C via cffi): CRC32C, batch validation, segment appends and reads.

`ffi` and `lib` come from the extension `pip install` builds out of
native/raftka.c; engine/storage is the only caller on the data path.
"""
from native._raftka import ffi, lib

__all__ = ["ffi", "lib"]
