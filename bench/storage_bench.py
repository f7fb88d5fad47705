"""Storage engine benchmark: append and read throughput against the raw disk path.

Every figure sits next to a physical reference measured in the same run on
the same bytes, because the machine is shared and noisy:
  append   PartitionLog.append of 1 MiB requests (1 KiB or 1 MiB batches),
           fsync=never  vs  os.write of the same buffers to a plain file
  read     PartitionLog.read of up to 1 MiB + copying the view out once
           vs  readinto of the same file bytes into the same buffer
Each pair runs `repeats` times interleaved; medians and ratios are reported.
Also: LMDB group commits vs one commit per append, and peak RSS of a child
process appending a large volume (default 4 GiB).

Writes a table to stdout and JSON + PNG under the output directory.
"""
from __future__ import annotations

import argparse
import json
import mmap
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from raftka.config import Config
from raftka.records.batch import Record, build_batch
from raftka.storage.index import IndexStore
from raftka.storage.partition_log import PartitionLog

KIB = 1024
MIB = 1024 * KIB
GIB = 1024 * MIB
REQUEST_BYTES = MIB

APPEND_TARGET_RATIO = 0.70
READ_TARGET_RATIO = 0.80
READ_TARGET_BYTES_PER_S = 2e9
RSS_TARGET_BYTES = 300 * 1000 * 1000


@dataclass
class Pair:
    """One workload: ours against the raw reference, medians over repeats."""

    name: str
    batch_bytes: int
    ours_mb_s: float
    raw_mb_s: float
    ours_runs: list[float]
    raw_runs: list[float]
    target: str
    passed: bool

    @property
    def ratio(self) -> float:
        return self.ours_mb_s / self.raw_mb_s if self.raw_mb_s else 0.0


def batch_of_size(size_bytes: int, seed: int = 0) -> bytes:
    """One single-record batch of exactly size_bytes."""
    value_size = size_bytes - 80
    for _ in range(8):
        batch = build_batch([Record(os.urandom(max(0, value_size)), None, (), 1_700_000_000_000 + seed)])
        if len(batch) == size_bytes:
            return batch
        value_size += size_bytes - len(batch)
    raise AssertionError(f"cannot build a batch of exactly {size_bytes} bytes")


def request_of(batch_bytes: int, request_bytes: int) -> bytes:
    """A produce-request-sized buffer of back-to-back batches."""
    count = max(1, request_bytes // batch_bytes)
    return b"".join(batch_of_size(batch_bytes, seed=i) for i in range(count))


def open_log(directory: Path, **settings: object) -> tuple[IndexStore, PartitionLog]:
    config = Config(data_dir=directory, **settings)
    index = IndexStore(directory / "index.lmdb", config.lmdb_map_size_bytes)
    return index, PartitionLog("bench-0", directory / "bench-0", 0, index, config)


def mb_s(size_bytes: int, seconds: float) -> float:
    return size_bytes / seconds / 1e6


# ---- one measurement each -------------------------------------------------

def measure_raw_write(path: Path, request: bytearray, calls: int) -> float:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    started = time.perf_counter()
    for _ in range(calls):
        os.write(fd, request)
    elapsed = time.perf_counter() - started
    os.close(fd)
    return mb_s(len(request) * calls, elapsed)


def measure_append(directory: Path, request: bytearray, calls: int) -> tuple[float, IndexStore, PartitionLog]:
    index, log = open_log(directory)
    started = time.perf_counter()
    for _ in range(calls):
        log.append(request)
    log.flush_index()
    elapsed = time.perf_counter() - started
    log.set_high_watermark(log.log_end_offset)
    return mb_s(len(request) * calls, elapsed), index, log


def measure_raw_read(path: Path, chunk_bytes: int, sink: mmap.mmap) -> float:
    view = memoryview(sink)[:chunk_bytes]
    total = 0
    with open(path, "rb", buffering=0) as f:
        started = time.perf_counter()
        while n := f.readinto(view):
            total += n
        elapsed = time.perf_counter() - started
    return mb_s(total, elapsed)


def measure_read(log: PartitionLog, chunk_bytes: int, sink: mmap.mmap) -> float:
    offset, total = log.log_start_offset, 0
    end = log.high_watermark
    started = time.perf_counter()
    while offset < end:
        piece = log.read(offset, chunk_bytes)
        size = piece.size_bytes
        sink[:size] = piece.buffer  # one copy out, as a socket send would make
        total += size
        offset = piece.next_offset
    elapsed = time.perf_counter() - started
    return mb_s(total, elapsed)


# ---- workloads --------------------------------------------------------------

def run_pair_rounds(workdir: Path, batch_bytes: int, request_bytes: int, volume_bytes: int,
                    repeats: int) -> tuple[Pair, Pair]:
    # writable, like the broker's socket receive buffer; both sides write this one buffer
    request = bytearray(request_of(batch_bytes, request_bytes))
    calls = max(1, volume_bytes // len(request))
    # page-aligned: the kernel copies into a misaligned bytearray up to 5x
    # slower (seen here: 2.7 vs 14.5 GB/s), which would skew the reference
    sink = mmap.mmap(-1, 2 * MIB)
    append_ours, append_raw, read_ours, read_raw = [], [], [], []
    for round_no in range(repeats):
        directory = workdir / f"round-{batch_bytes}-{request_bytes}-{round_no}"
        directory.mkdir()

        def raw() -> None:
            raw_path = directory / "raw.bin"
            append_raw.append(measure_raw_write(raw_path, request, calls))
            read_raw.append(measure_raw_read(raw_path, MIB, sink))
            raw_path.unlink()  # its dirty pages go with it, not into the other side's timing

        def ours() -> None:
            speed, index, log = measure_append(directory / "log", request, calls)
            append_ours.append(speed)
            read_ours.append(measure_read(log, MIB, sink))
            log.close()
            index.close()
            shutil.rmtree(directory / "log")

        # alternate who goes first, and start each side with no dirty pages
        # pending, so kernel writeback does not land on one side only
        for side in ((raw, ours) if round_no % 2 == 0 else (ours, raw)):
            os.sync()
            side()
        shutil.rmtree(directory)
    label = f"{_size_label(batch_bytes)} batches, {_size_label(len(request))} per append"
    ours_append, raw_append = statistics.median(append_ours), statistics.median(append_raw)
    ours_read, raw_read = statistics.median(read_ours), statistics.median(read_raw)
    append = Pair(f"append {label}", batch_bytes, ours_append, raw_append, append_ours, append_raw,
                  f">= {APPEND_TARGET_RATIO:.0%} of raw write",
                  ours_append >= APPEND_TARGET_RATIO * raw_append)
    read = Pair(f"read {label}", batch_bytes, ours_read, raw_read, read_ours, read_raw,
                f">= 2 GB/s and >= {READ_TARGET_RATIO:.0%} of raw read",
                ours_read * 1e6 >= READ_TARGET_BYTES_PER_S and ours_read >= READ_TARGET_RATIO * raw_read)
    return append, read


def run_index_commit_choice(workdir: Path, appends: int) -> dict[str, float]:
    """Single 1 KiB batch appends: one LMDB commit per append vs grouped commits."""
    batch = batch_of_size(KIB)
    results = {}
    for mode in ("commit_per_append", "grouped"):
        directory = workdir / f"commit-{mode}"
        index, log = open_log(directory, index_interval_bytes=KIB)
        started = time.perf_counter()
        for _ in range(appends):
            log.append(batch)
            if mode == "commit_per_append":
                log.flush_index()
        log.flush_index()
        results[f"{mode}_appends_per_s"] = appends / (time.perf_counter() - started)
        log.close()
        index.close()
        shutil.rmtree(directory)
    results["grouped_speedup"] = results["grouped_appends_per_s"] / results["commit_per_append_appends_per_s"]
    return results


def rss_child(directory: Path, volume_bytes: int) -> None:
    """Append volume_bytes of 1 KiB batches in 1 MiB requests; print peak RSS as JSON."""
    index, log = open_log(directory)
    request = request_of(KIB, REQUEST_BYTES)
    started = time.perf_counter()
    for _ in range(volume_bytes // len(request)):
        log.append(request)
        if log.pending_index_entries >= 65536:
            log.flush_index()
    log.close()
    index.close()
    elapsed = time.perf_counter() - started
    peak = peak_rss_bytes()
    print(json.dumps({"peak_rss_bytes": peak, "volume_bytes": volume_bytes,
                      "append_mb_s": mb_s(volume_bytes, elapsed)}))


def peak_rss_bytes() -> int:
    """VmHWM of this process. Not ru_maxrss: Linux carries that across
    fork+execve, so a child would report its parent's peak."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run_rss(workdir: Path, volume_bytes: int) -> dict[str, float]:
    directory = workdir / "rss"
    directory.mkdir()
    # cwd: `python -m` puts it first on sys.path, and run from a source tree it
    # would shadow the installed packages with ones lacking the built extension
    out = subprocess.run([sys.executable, "-m", "raftka.bench.storage_bench", "--rss-child", str(directory),
                          "--rss-bytes", str(volume_bytes)], capture_output=True, text=True, cwd=directory)
    if out.returncode != 0:
        raise RuntimeError(f"RSS measurement child failed:\n{out.stderr}")
    shutil.rmtree(directory)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["target_bytes"] = RSS_TARGET_BYTES
    result["passed"] = result["peak_rss_bytes"] < RSS_TARGET_BYTES
    return result


# ---- report -------------------------------------------------------------------

def _size_label(size: int) -> str:
    return f"{size // MIB} MiB" if size >= MIB else f"{size // KIB} KiB"


def print_table(pairs: list[Pair], commits: dict[str, float], rss: dict[str, float]) -> None:
    header = f"{'workload':<44} {'ours MB/s':>10} {'raw MB/s':>10} {'ratio':>6}  {'target':<34} result"
    print(header)
    print("-" * len(header))
    for p in pairs:
        print(f"{p.name:<44} {p.ours_mb_s:>10.0f} {p.raw_mb_s:>10.0f} {p.ratio:>6.2f}  {p.target:<34} "
              f"{'PASS' if p.passed else 'MISS'}")
    print()
    print(f"LMDB index commits, single 1 KiB batch appends: grouped {commits['grouped_appends_per_s']:.0f}/s, "
          f"one commit per append {commits['commit_per_append_appends_per_s']:.0f}/s "
          f"({commits['grouped_speedup']:.1f}x)")
    print(f"peak RSS appending {rss['volume_bytes'] / GIB:.1f} GiB: {rss['peak_rss_bytes'] / 1e6:.0f} MB "
          f"(target < {RSS_TARGET_BYTES / 1e6:.0f} MB) {'PASS' if rss['passed'] else 'MISS'}")


def write_chart(pairs: list[Pair], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 4.8))
    xs = range(len(pairs))
    width = 0.38
    ax.bar([x - width / 2 for x in xs], [p.raw_mb_s for p in pairs], width, label="raw file I/O (same bytes)")
    ax.bar([x + width / 2 for x in xs], [p.ours_mb_s for p in pairs], width, label="Raftka PartitionLog")
    for x, p in zip(xs, pairs):
        ax.annotate(f"{p.ratio:.2f}x", (x + width / 2, p.ours_mb_s), ha="center", va="bottom", fontsize=8)
    ax.set_xticks(list(xs), [p.name.replace(", ", "\n") for p in pairs], fontsize=7)
    ax.set_ylabel("MB/s (median)")
    ax.set_title("Storage engine vs raw sequential I/O, same run, page cache")
    ax.legend(loc="center right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(out_dir: Path, quick: bool, workdir_parent: str | None) -> dict:
    volume = 256 * MIB if quick else GIB
    repeats = 3 if quick else 7
    rss_volume = GIB if quick else 4 * GIB
    workdir = Path(tempfile.mkdtemp(prefix="raftka-bench-", dir=workdir_parent))
    try:
        pairs: list[Pair] = []
        for batch_bytes, request_bytes in ((KIB, REQUEST_BYTES), (MIB, REQUEST_BYTES), (KIB, KIB)):
            pair_volume = volume if request_bytes == REQUEST_BYTES else volume // 8
            print(f"measuring {_size_label(batch_bytes)} batches, {_size_label(request_bytes)} per append, "
                  f"{pair_volume // MIB} MiB x {repeats} rounds ...", flush=True)
            append, read = run_pair_rounds(workdir, batch_bytes, request_bytes, pair_volume, repeats)
            # reads of that layout repeat the row measured with 1 MiB appends
            pairs += [append, read] if request_bytes == REQUEST_BYTES else [append]
        print("measuring LMDB commit grouping ...", flush=True)
        commits = run_index_commit_choice(workdir, 5_000 if quick else 20_000)
        print(f"measuring peak RSS while appending {rss_volume // GIB} GiB ...", flush=True)
        rss = run_rss(workdir, rss_volume)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print()
    print_table(pairs, commits, rss)
    report = {
        "benchmark": "storage",
        "quick": quick,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
        "volume_bytes": volume,
        "repeats": repeats,
        "pairs": [asdict(p) | {"ratio": p.ratio} for p in pairs],
        "index_commits": commits,
        "rss": rss,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "storage.json").write_text(json.dumps(report, indent=2))
    write_chart(pairs, out_dir / "storage.png")
    print(f"\nwrote {out_dir / 'storage.json'} and {out_dir / 'storage.png'}")
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="raftka bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller volumes (about a minute)")
    parser.add_argument("--out", type=Path, default=Path("bench/results"), help="where JSON and PNG go")
    parser.add_argument("--dir", default=None, help="parent of the scratch directory (default: system temp)")
    parser.add_argument("--rss-child", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--rss-bytes", type=int, default=4 * GIB, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.rss_child:
        rss_child(args.rss_child, args.rss_bytes)
        return 0
    run(args.out, args.quick, args.dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
