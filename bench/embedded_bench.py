"""Embedded Raftka against SQLite, side by side in one run, on the same records.

The question a user asks before embedding Raftka as a storage layer: is it at
least as fast as SQLite at what a log is for, appending batches and scanning
them back in order? Per variant (100-byte values; 16-byte values; 100-byte
values zstd-compressed), each repeat writes 200,000 records with 1,000
distinct keys in batches of 10,000 to a fresh one-partition topic and reads
them all back:

  Raftka write        the caller builds one `Record(value, key, (), ts)` per
                      record, then `produce_batch` per batch (fsync=never)
  SQLite write        the caller builds one `(key, value, ts)` tuple per row,
                      then `executemany` INSERT + COMMIT per batch; WAL mode,
                      synchronous=NORMAL (fsync at checkpoints only)
  Raftka read()       `for record in rk.read(topic, 0)`: one ConsumerRecord each
  Raftka read_batches `for batch in rk.read_batches(topic, 0)`: keys() and
                      values() of each batch (bytes per record), offsets and
                      timestamps as memoryviews
  SQLite read         `for row in SELECT offset, key, value, ts ORDER BY offset`
  raw disk            os.write of Raftka's segment bytes in 1 MiB chunks and
                      readinto back: the physical limit of the same volume
  codec alone         (compressed variant) compress and decompress of the same
                      batches' records sections: the compressor's own ceiling

Repeats interleave the two stores (alternating which goes first); medians.
Targets (100 B variant): read() >= SQLite's read rate, read_batches >= 1.5x
it, write >= 2x SQLite's write rate. Writes a table to stdout and JSON + PNG
under bench/results/ (embedded.json, embedded.png).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import raftka
from raftka.records import layout
from raftka.records.batch import Record, build_batch
from raftka.records.compression import Compression, compress, decompress

TOPIC = "events"
RECORDS = 200_000
DISTINCT_KEYS = 1_000
BATCH_RECORDS = 10_000
REPEATS = 3
TIMESTAMP_MS = 1_700_000_000_000
RAW_CHUNK_BYTES = 1 << 20
VARIANTS = (("100 B", 100, "none"), ("16 B", 16, "none"), ("100 B zstd", 100, "zstd"))
TARGETS = {"write": 2.0, "read": 1.0, "read_batches": 1.5}  # x SQLite's rate, 100 B variant


def make_records(count: int, value_bytes: int, seed: int) -> tuple[list[bytes], list[bytes]]:
    """Keys from 1,000 distinct ones; values of hex text (zstd halves them, as it would JSON)."""
    rng = random.Random(seed)
    keys = [b"user-%04d" % rng.randrange(DISTINCT_KEYS) for _ in range(count)]
    values = [rng.randbytes((value_bytes + 1) // 2).hex().encode()[:value_bytes] for _ in range(count)]
    return keys, values


def timed(action: Callable[[], int]) -> tuple[float, int]:
    started = time.perf_counter()
    count = action()
    return time.perf_counter() - started, count


# ---- Raftka ---------------------------------------------------------------------

def raftka_write(rk: raftka.Raftka, keys: list[bytes], values: list[bytes], compression: str) -> int:
    for start in range(0, len(values), BATCH_RECORDS):
        end = start + BATCH_RECORDS
        records = [Record(value, key, (), TIMESTAMP_MS) for key, value in zip(keys[start:end], values[start:end])]
        rk.produce_batch(TOPIC, records, partition=0, compression=compression)
    return len(values)


def raftka_read(rk: raftka.Raftka) -> int:
    count = 0
    for _record in rk.read(TOPIC, 0):
        count += 1
    return count


def raftka_read_batches(rk: raftka.Raftka) -> int:
    count = 0
    for batch in rk.read_batches(TOPIC, 0):
        batch.keys(), batch.values(), batch.offsets, batch.timestamps
        count += len(batch)
    return count


def run_raftka(workdir: Path, keys: list[bytes], values: list[bytes], compression: str) -> dict:
    with raftka.open(workdir / "raftka", fsync="never") as rk:
        rk.create_topic(TOPIC, partitions=1)
        write_s, written = timed(lambda: raftka_write(rk, keys, values, compression))
        read_s, read = timed(lambda: raftka_read(rk))
        batches_s, batched = timed(lambda: raftka_read_batches(rk))
    if not written == read == batched == len(values):
        raise AssertionError(f"wrote {written}, read {read}, read_batches {batched} of {len(values)} records")
    log_bytes = sum(p.stat().st_size for p in (workdir / "raftka").rglob("*.log"))
    return {"write": written / write_s, "read": read / read_s, "read_batches": batched / batches_s,
            "log_bytes": log_bytes}


# ---- SQLite ---------------------------------------------------------------------

def run_sqlite(workdir: Path, keys: list[bytes], values: list[bytes]) -> dict:
    db = sqlite3.connect(workdir / "sqlite.db", isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=NORMAL")
    db.execute("CREATE TABLE records (offset INTEGER PRIMARY KEY, key BLOB, value BLOB, timestamp_ms INTEGER)")

    def write() -> int:
        for start in range(0, len(values), BATCH_RECORDS):
            end = start + BATCH_RECORDS
            rows = [(key, value, TIMESTAMP_MS) for key, value in zip(keys[start:end], values[start:end])]
            db.execute("BEGIN")
            db.executemany("INSERT INTO records (key, value, timestamp_ms) VALUES (?, ?, ?)", rows)
            db.execute("COMMIT")
        return len(values)

    def read() -> int:
        count = 0
        for _row in db.execute("SELECT offset, key, value, timestamp_ms FROM records ORDER BY offset"):
            count += 1
        return count

    write_s, written = timed(write)
    read_s, read_count = timed(read)
    db.close()
    if not written == read_count == len(values):
        raise AssertionError(f"SQLite wrote {written}, read {read_count} of {len(values)} rows")
    return {"write": written / write_s, "read": read_count / read_s}


# ---- the physical limit ----------------------------------------------------------

def run_raw(workdir: Path, volume_bytes: int) -> dict:
    """Write and read back volume_bytes in 1 MiB chunks: what the disk and page cache allow."""
    chunk = os.urandom(RAW_CHUNK_BYTES)
    path = workdir / "raw.bin"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    started = time.perf_counter()
    for _ in range(0, volume_bytes, RAW_CHUNK_BYTES):
        os.write(fd, chunk)
    write_s = time.perf_counter() - started
    os.close(fd)
    buffer = bytearray(RAW_CHUNK_BYTES)
    started = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        while f.readinto(buffer):
            pass
    read_s = time.perf_counter() - started
    return {"write_mb_s": volume_bytes / write_s / 1e6, "read_mb_s": volume_bytes / read_s / 1e6}


def run_codec(keys: list[bytes], values: list[bytes], compression: str) -> dict:
    """The compressor alone on the same records sections (the ceiling of a compressed variant)."""
    codec = Compression.parse(compression)
    sections = [build_batch([Record(value, key, (), TIMESTAMP_MS) for key, value in
                             zip(keys[start:start + BATCH_RECORDS], values[start:start + BATCH_RECORDS])])
                [layout.HEADER_SIZE:] for start in range(0, len(values), BATCH_RECORDS)]
    compress_s, compressed = timed(lambda: [compress(codec, section) for section in sections])
    decompress_s, _ = timed(lambda: [decompress(codec, blob) for blob in compressed])
    return {"compress": len(values) / compress_s, "decompress": len(values) / decompress_s}


# ---- one variant -------------------------------------------------------------------

def run_variant(name: str, value_bytes: int, compression: str, repeats: int, records: int, progress) -> dict:
    keys, values = make_records(records, value_bytes, seed=value_bytes)
    runs: dict[str, list[dict]] = {"raftka": [], "sqlite": [], "raw": [], "codec": []}
    for repeat in range(repeats):
        if compression != "none":
            runs["codec"].append(run_codec(keys, values, compression))
        order = ("raftka", "sqlite") if repeat % 2 == 0 else ("sqlite", "raftka")
        for store in order:
            workdir = Path(tempfile.mkdtemp(prefix=f"raftka-embedded-bench-{store}-"))
            try:
                if store == "raftka":
                    runs["raftka"].append(run_raftka(workdir, keys, values, compression))
                    runs["raw"].append(run_raw(workdir, runs["raftka"][-1]["log_bytes"]))
                else:
                    runs["sqlite"].append(run_sqlite(workdir, keys, values))
            finally:
                shutil.rmtree(workdir, ignore_errors=True)
            progress(f"{name}: {store} run {repeat + 1}/{repeats} done")
    return summarise(name, value_bytes, compression, records, runs)


def summarise(name: str, value_bytes: int, compression: str, records: int, runs: dict) -> dict:
    def median(store: str, key: str) -> float:
        return statistics.median(run[key] for run in runs[store])

    raftka_rates = {key: median("raftka", key) for key in ("write", "read", "read_batches")}
    sqlite_rates = {key: median("sqlite", key) for key in ("write", "read")}
    log_bytes = median("raftka", "log_bytes")
    ratios = {"write": raftka_rates["write"] / sqlite_rates["write"],
              "read": raftka_rates["read"] / sqlite_rates["read"],
              "read_batches": raftka_rates["read_batches"] / sqlite_rates["read"]}
    return {
        "variant": name, "value_bytes": value_bytes, "compression": compression, "records": records,
        "raftka_records_s": raftka_rates, "sqlite_records_s": sqlite_rates, "vs_sqlite": ratios,
        "passed": {key: ratios[key] >= target for key, target in TARGETS.items()},
        "raftka_log_bytes": log_bytes,
        "raw_disk": {"write_mb_s": median("raw", "write_mb_s"), "read_mb_s": median("raw", "read_mb_s")},
        "codec_alone_records_s": ({key: median("codec", key) for key in ("compress", "decompress")}
                                  if runs["codec"] else None),
        "runs": runs,
    }


# ---- report ------------------------------------------------------------------------

def print_table(results: list[dict]) -> None:
    print("\n| values | operation | Raftka records/s | SQLite records/s | Raftka / SQLite | target | result "
          "| raw disk records/s |")
    print("|---|---|---:|---:|---:|---:|---|---:|")
    for r in results:
        per_record = r["raftka_log_bytes"] / r["records"]
        raw_write = r["raw_disk"]["write_mb_s"] * 1e6 / per_record
        raw_read = r["raw_disk"]["read_mb_s"] * 1e6 / per_record
        rows = (("write (produce_batch)", "write", "write", raw_write),
                ("read() full scan", "read", "read", raw_read),
                ("read_batches full scan", "read_batches", "read", raw_read))
        for label, ours, theirs, raw in rows:
            target = TARGETS[ours]
            verdict = ("PASS" if r["passed"][ours] else "MISS") if r["variant"] == "100 B" else "-"
            print(f"| {r['variant']} | {label} | {r['raftka_records_s'][ours]:,.0f} | "
                  f"{r['sqlite_records_s'][theirs]:,.0f} | {r['vs_sqlite'][ours]:.2f}x | >= {target:g}x | "
                  f"{verdict} | {raw:,.0f} |")
        if r["codec_alone_records_s"]:
            alone = r["codec_alone_records_s"]
            print(f"| {r['variant']} | {r['compression']} alone, compress / decompress | "
                  f"{alone['compress']:,.0f} / {alone['decompress']:,.0f} | | | | | |")
    print("\nmedians; targets apply to the 100 B variant; raw disk = the same segment bytes written and read "
          "back in 1 MiB chunks, in records/s")


def write_chart(results: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(results), figsize=(4 * len(results), 4), sharey=True)
    for axis, r in zip(axes, results):
        labels = ["write", "read", "read\nbatches"]
        ours = [r["raftka_records_s"][k] / 1e6 for k in ("write", "read", "read_batches")]
        theirs = [r["sqlite_records_s"][k] / 1e6 for k in ("write", "read", "read")]
        positions = range(len(labels))
        axis.bar([p - 0.2 for p in positions], ours, width=0.4, label="Raftka embedded")
        axis.bar([p + 0.2 for p in positions], theirs, width=0.4, label="SQLite (WAL)")
        axis.set_xticks(list(positions), labels)
        axis.set_title(f"{r['variant']} values")
    axes[0].set_ylabel("million records/s (median)")
    axes[0].legend()
    fig.suptitle(f"{results[0]['records']:,} records, {DISTINCT_KEYS:,} keys, batches of {BATCH_RECORDS:,}")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m raftka.bench.embedded_bench",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--repeats", type=int, default=REPEATS)
    parser.add_argument("--records", type=int, default=RECORDS)
    args = parser.parse_args(argv)

    def progress(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    results = [run_variant(name, size, codec, args.repeats, args.records, progress) for name, size, codec in VARIANTS]
    print_table(results)
    machine = {"cpus": os.cpu_count(), "python": platform.python_version(), "sqlite": sqlite3.sqlite_version}
    json_path, chart_path = args.out / "embedded.json", args.out / "embedded.png"
    args.out.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps({"machine": machine, "variants": results}, indent=1))
    write_chart(results, chart_path)
    print(f"\nwrote {json_path} and {chart_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
