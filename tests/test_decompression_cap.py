"""Every codec's decompression stops at its output cap: a small batch that
claims a huge expansion is corrupt, and costs no more memory than the cap."""
from __future__ import annotations

import resource

import pytest

from raftka.errors import CorruptRecordError
from raftka.records.compression import Compression, compress, decompress

CODECS = [Compression.GZIP, Compression.SNAPPY, Compression.LZ4, Compression.ZSTD]


@pytest.mark.parametrize("codec", CODECS, ids=lambda c: c.name.lower())
def test_payload_within_the_cap_round_trips(codec: Compression) -> None:
    data = b"raftka record bytes " * 5000
    assert decompress(codec, compress(codec, data), max_bytes=len(data)) == data


@pytest.mark.parametrize("codec", CODECS, ids=lambda c: c.name.lower())
def test_payload_one_byte_past_the_cap_is_corrupt(codec: Compression) -> None:
    data = b"z" * 100_001
    with pytest.raises(CorruptRecordError, match="limit"):
        decompress(codec, compress(codec, data), position=7, max_bytes=100_000)


@pytest.mark.parametrize("codec", CODECS, ids=lambda c: c.name.lower())
def test_bomb_of_zeros_is_refused_without_expanding_it(codec: Compression) -> None:
    bomb = compress(codec, bytes(64 << 20))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(CorruptRecordError):
        decompress(codec, bomb, max_bytes=1 << 20)
    grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    assert grown_kib < 32 * 1024, f"peak RSS grew {grown_kib} KiB decoding a bomb"


def test_concatenated_gzip_members_are_all_read() -> None:
    data = compress(Compression.GZIP, b"first ") + compress(Compression.GZIP, b"second")
    assert decompress(Compression.GZIP, data) == b"first second"


def test_truncated_payload_is_corrupt_not_too_large() -> None:
    data = compress(Compression.ZSTD, b"x" * 10_000)
    with pytest.raises(CorruptRecordError, match="does not decode"):
        decompress(Compression.ZSTD, data[:-4])
