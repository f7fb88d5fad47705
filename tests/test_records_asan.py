"""native/records.c under AddressSanitizer and UBSan: decoding and validating
mutated and truncated records sections never reads past the buffer it is
given (tests/fuzz_records.c is the driver). Needs gcc with libasan; skipped,
saying why, where there is none."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from raftka.records import layout
from raftka.records.batch import Record, build_batch

REPO = Path(__file__).resolve().parent.parent
ITERATIONS = 200_000


@pytest.fixture(scope="module")
def fuzzer(tmp_path_factory) -> Path:
    if shutil.which("gcc") is None:
        pytest.skip("no gcc to build the sanitized fuzz driver")
    binary = tmp_path_factory.mktemp("asan") / "fuzz_records"
    build = subprocess.run(
        ["gcc", "-O1", "-g", "-std=c11", "-fsanitize=address,undefined", "-fno-sanitize-recover=all",
         f"-I{REPO / 'native'}", str(REPO / "tests" / "fuzz_records.c"), str(REPO / "native" / "records.c"),
         str(REPO / "native" / "raftka.c"), "-o", str(binary)], capture_output=True, text=True, timeout=120)
    if build.returncode != 0 and "asan" in build.stderr.lower():
        pytest.skip(f"gcc cannot link the sanitizers here: {build.stderr.strip()[:200]}")
    assert build.returncode == 0, build.stderr
    return binary


SEEDS = {
    "keys, values, headers and nulls": [
        Record(b"v%d" % i * (i % 5), None if i % 3 == 0 else b"k%d" % i,
               (("h", b"x"), ("n", None)) if i % 2 else (), 1_000 + i) for i in range(20)],
    "one empty record": [Record(b"")],
    "large fields": [Record(b"x" * 300, b"y" * 200, (("\u00e9t\u00e9", b"z" * 130),), 5)] * 3,
}


@pytest.mark.parametrize("name", sorted(SEEDS))
def test_mutated_records_never_read_past_the_buffer_under_asan(fuzzer, tmp_path, name):
    records = SEEDS[name]
    seed = tmp_path / "seed.bin"
    seed.write_bytes(build_batch(records)[layout.HEADER_SIZE:])
    run = subprocess.run([str(fuzzer), str(seed), str(len(records)), str(ITERATIONS)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    accepted, rejected = (int(word) for word in run.stdout.split()[1::2])
    assert accepted >= 1 and rejected >= 1 and accepted + rejected == ITERATIONS  # the seed itself decodes
