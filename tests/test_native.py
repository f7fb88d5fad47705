"""native/: CRC32C against standard vectors and the crc32c package, murmur2,
and the batch validator's verdicts."""
from __future__ import annotations

import crc32c as crc32c_reference
from hypothesis import given, strategies as st
from kafka.partitioner.default import murmur2 as kafka_python_murmur2

from raftka.partitioner import murmur2
from raftka.records import layout
from raftka.native import ffi, lib
from tests.conftest import make_batch

# RFC 3720 (iSCSI) appendix B.4 and the common check value
CRC32C_VECTORS = [
    (b"123456789", 0xE3069283),
    (bytes(32), 0x8A9136AA),
    (b"\xff" * 32, 0x62A8AB43),
    (bytes(range(32)), 0x46DD794E),
    (bytes(range(31, -1, -1)), 0x113FDB5C),
    (b"", 0),
]


def crc_hw(data: bytes, crc: int = 0) -> int:
    return lib.rk_crc32c(crc, data, len(data))


def crc_portable(data: bytes, crc: int = 0) -> int:
    return lib.rk_crc32c_portable(crc, data, len(data))


def test_crc32c_matches_standard_vectors_on_both_paths():
    for data, expected in CRC32C_VECTORS:
        assert crc_hw(data) == expected, data
        assert crc_portable(data) == expected, data


@given(st.binary(max_size=40_000))
def test_crc32c_matches_crc32c_package_on_random_data(data):
    expected = crc32c_reference.crc32c(data)
    assert crc_hw(data) == expected
    assert crc_portable(data) == expected


@given(st.binary(max_size=30_000), st.integers(min_value=0, max_value=30_000))
def test_crc32c_continues_across_split_buffers(data, cut):
    cut = min(cut, len(data))
    assert crc_hw(data[cut:], crc_hw(data[:cut])) == crc_hw(data)


def test_crc32c_three_lane_path_covers_large_unaligned_buffers():
    data = bytes(range(256)) * 1000
    for start in range(0, 9):
        chunk = data[start:start + 12_288 * 5 + 7]
        assert crc_hw(chunk) == crc32c_reference.crc32c(chunk)


# org.apache.kafka.common.utils.UtilsTest#testMurmur2
MURMUR2_JAVA_VECTORS = [
    (b"21", -973932308),
    (b"foobar", -790332482),
    (b"a-little-bit-long-string", -985981536),
    (b"a-little-bit-longer-string", -1486304829),
    (b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8", -58897971),
    (b"abc", 479470107),
]


def test_murmur2_matches_java_client_vectors():
    for key, expected in MURMUR2_JAVA_VECTORS:
        assert murmur2(key) == expected, key


@given(st.binary(max_size=64))
def test_murmur2_matches_kafka_python_modulo_2_32(data):
    # kafka-python returns the same 32 bits, sometimes as an unsigned int
    assert murmur2(data) & 0xFFFFFFFF == kafka_python_murmur2(data) & 0xFFFFFFFF


def scan(data: bytes, max_batch_bytes: int = 1 << 20, next_offset: int = 0, check_offsets: int = 0):
    state = ffi.new("rk_scan_state *")
    state.check_crc = 1
    state.check_offsets = check_offsets
    state.max_batch_bytes = max_batch_bytes
    state.index_interval_bytes = 1 << 30
    state.next_offset = next_offset
    entries = ffi.new("rk_index_entry[]", 4)
    lib.rk_scan(data, len(data), state, entries, 4)
    return state


def test_scan_accepts_back_to_back_valid_batches_and_assigns_offsets():
    data = make_batch(3) + make_batch(5, seed=1)
    state = scan(data, next_offset=100)
    assert (state.error, state.valid_bytes, state.batch_count, state.record_count) == (lib.RK_OK, len(data), 2, 8)
    assert state.next_offset == 108


def test_scan_reports_the_valid_prefix_and_the_first_error():
    good = make_batch(2)
    bad_crc = bytearray(make_batch(2, seed=3))
    bad_crc[-1] ^= 0xFF
    bad_magic = bytearray(make_batch(2))
    bad_magic[layout.MAGIC_OFF] = 1
    cases = [
        (good + bytes(bad_crc), lib.RK_ERR_CRC),
        (good + bytes(bad_magic), lib.RK_ERR_MAGIC),
        (good + good[:30], lib.RK_ERR_TRUNCATED),
        (good + good[:-1], lib.RK_ERR_TRUNCATED),
        (good + bytes(61), lib.RK_ERR_LENGTH),
    ]
    for data, error in cases:
        state = scan(data)
        assert (state.error, state.valid_bytes, state.batch_count) == (error, len(good), 1), error


def test_scan_rejects_batches_over_the_size_cap_and_record_count_mismatch():
    batch = make_batch(2, value_size=100)
    assert scan(batch, max_batch_bytes=len(batch) - 1).error == lib.RK_ERR_LENGTH
    wrong_count = bytearray(batch)
    wrong_count[layout.RECORD_COUNT_OFF + 3] = 7  # then re-seal the CRC so only the count is wrong
    crc = lib.rk_crc32c(0, bytes(wrong_count[layout.ATTRIBUTES_OFF:]), len(wrong_count) - layout.ATTRIBUTES_OFF)
    wrong_count[layout.CRC_OFF:layout.CRC_OFF + 4] = crc.to_bytes(4, "big")
    assert scan(bytes(wrong_count)).error == lib.RK_ERR_COUNT


def test_scan_in_recovery_mode_requires_contiguous_stored_offsets():
    batch = make_batch(2)  # stored base offset 0
    assert scan(batch, next_offset=0, check_offsets=1).error == lib.RK_OK
    assert scan(batch, next_offset=5, check_offsets=1).error == lib.RK_ERR_OFFSET
