"""Log compaction benchmark: how fast the cleaner cleans, and what it does
to produce latency while it runs.

  cleaner   cleaner.clean (key map + rewrite, native, unthrottled) over
            sealed segments of 1 KiB records, 10,000 keys (most versions
            go) and every key distinct (everything stays): MB/s of segment
            bytes cleaned (median of rounds over the same segments; cleaning
            is a pure function of them), then one PartitionLog.clean_now with
            the swap (write, fdatasync, rename, index) included
  produce   a real broker (`raftka serve`, fsync=always, 127.0.0.1): p50/p99
            of acks=all produce latency (confluent-kafka, one message at a
            time, paced) while a large topic sits uncleaned, then while the
            cleaner rewrites it (its cleanup.policy switched to compact)

Prints a table; writes JSON under the output directory (compaction.json).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

from raftka.config import Config
from raftka.records.batch import Record, build_batch
from raftka.storage import cleaner
from raftka.storage.cleaner import CleanPlan
from raftka.storage.index import IndexStore
from raftka.storage.partition_log import PartitionLog

KIB = 1024
MIB = 1024 * KIB
BASE_MS = 1_700_000_000_000
RECORDS_PER_BATCH = 16
VALUE_BYTES = KIB


def filled_log(directory: Path, volume_bytes: int, keys: int) -> tuple[PartitionLog, IndexStore]:
    """A compacted log of `volume_bytes` of 1 KiB records over `keys` keys, every segment sealed."""
    config = Config(data_dir=directory, segment_bytes=64 * MIB, cleanup_policy="compact", fsync="never",
                    log_cleaner_io_max_bytes_per_second=0)
    index = IndexStore(directory / "index.lmdb", 1 << 30)
    log = PartitionLog("bench-0", directory / "bench-0", 0, index, config)
    value = os.urandom(VALUE_BYTES)
    n = 0
    while log.size_bytes < volume_bytes:
        records = [Record(value, b"key-%013d" % ((n + i) * 7919 % keys), (), BASE_MS + n + i)
                   for i in range(RECORDS_PER_BATCH)]
        log.append(build_batch(records))
        n += RECORDS_PER_BATCH
    log.roll()
    log.set_high_watermark(log.log_end_offset)
    return log, index


def measure_cleaner(workdir: Path, volume_bytes: int, keys: int, rounds: int) -> dict:
    log, index = filled_log(workdir / f"cleaner-{keys}", volume_bytes, keys)
    try:
        plan = CleanPlan(log.segments[-1].base_offset, 0)
        views = [segment.view() for segment in log.segments[:-1]]
        seconds, stats = [], None
        for _ in range(rounds):
            _outputs, stats = cleaner.clean(views, 0, plan, log.config.log_cleaner_dedupe_buffer_size,
                                            emit=lambda _k, _cleaned: None)   # the rewrite, not a copy of it
            seconds.append(stats.seconds)
        del views
        started = time.perf_counter()
        log.clean_now(plan)
        with_swap_s = time.perf_counter() - started
        assert stats is not None
        return {"volume_bytes": stats.bytes_in, "keys": keys, "records_in": stats.records_in,
                "records_out": stats.records_out, "bytes_out": stats.bytes_out, "rounds_s": seconds,
                "clean_mb_s": stats.bytes_in / statistics.median(seconds) / 1e6,
                "with_swap_s": with_swap_s, "with_swap_mb_s": stats.bytes_in / with_swap_s / 1e6}
    finally:
        log.close()
        index.close()


def produce_latencies(bootstrap: str, topic: str, seconds: float, rate_per_s: int) -> list[float]:
    """acks=all latencies (ms) of one message at a time, `rate_per_s` paced, for `seconds`."""
    from confluent_kafka import Producer
    producer = Producer({"bootstrap.servers": bootstrap, "acks": "all", "linger.ms": 0})
    latencies: list[float] = []
    deadline = time.perf_counter() + seconds
    interval_s = 1.0 / rate_per_s
    while time.perf_counter() < deadline:
        sent = time.perf_counter()
        producer.produce(topic, key=b"probe", value=b"x" * 100,
                         on_delivery=lambda error, _m, sent=sent: latencies.append((time.perf_counter() - sent) * 1000)
                         if error is None else None)
        producer.flush(10)
        time.sleep(max(0.0, interval_s - (time.perf_counter() - sent)))
    return latencies


def percentiles(latencies: list[float]) -> dict:
    ordered = sorted(latencies)
    return {"count": len(ordered), "p50_ms": ordered[len(ordered) // 2],
            "p99_ms": ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))], "max_ms": ordered[-1]}


def directory_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.glob("*.log")) if path.exists() else 0


def watch_swap(directory: Path, size_before: int, started: float, swapped: list[float]) -> None:
    """When (s after `started`) the cleaned segments replaced the originals (the directory halved)."""
    while time.perf_counter() - started < 120:
        if directory_bytes(directory) < size_before // 2:
            swapped.append(time.perf_counter() - started)
            return
        time.sleep(0.05)


def fill_topic(bootstrap: str, topic: str, volume_bytes: int, keys: int) -> None:
    from confluent_kafka import Producer
    producer = Producer({"bootstrap.servers": bootstrap, "acks": "all", "linger.ms": 5,
                         "queue.buffering.max.kbytes": 65536})
    value = os.urandom(VALUE_BYTES)
    for n in range(volume_bytes // VALUE_BYTES):
        while True:
            try:
                producer.produce(topic, key=b"key-%08d" % (n * 7919 % keys), value=value)
                break
            except BufferError:
                producer.poll(0.05)
        producer.poll(0)
    producer.flush(120)


def measure_produce(workdir: Path, volume_bytes: int, keys: int, seconds: float, throttle_bytes_s: int) -> dict:
    from confluent_kafka.admin import AdminClient, AlterConfigOpType, ConfigEntry, ConfigResource, NewTopic, \
        ResourceType
    from raftka.broker.local_cluster import LocalBrokers
    brokers = LocalBrokers(workdir / "broker", nodes=1, settings={
        "log_cleaner_backoff_ms": 500, "log_cleaner_io_max_bytes_per_second": throttle_bytes_s})
    brokers.start()
    try:
        bootstrap = brokers.bootstrap()
        admin = AdminClient({"bootstrap.servers": bootstrap})
        for topic, configs in (("bulk", {"segment.bytes": str(16 * MIB), "retention.ms": "-1",
                                         "min.cleanable.dirty.ratio": "0.01"}), ("probe", {})):
            admin.create_topics([NewTopic(topic, 1, 1, config=configs)])[topic].result(30)
        fill_topic(bootstrap, "bulk", volume_bytes, keys)
        bulk_dir = brokers.node_dir(1) / "data" / "bulk-0"
        size_before = directory_bytes(bulk_dir)
        idle = percentiles(produce_latencies(bootstrap, "probe", seconds, 200))
        resource = ConfigResource(ResourceType.TOPIC, "bulk", incremental_configs=[
            ConfigEntry("cleanup.policy", "compact", incremental_operation=AlterConfigOpType.SET)])
        admin.incremental_alter_configs([resource])[resource].result(30)
        started = time.perf_counter()
        swapped: list[float] = []
        watcher = threading.Thread(target=watch_swap, args=(bulk_dir, size_before, started, swapped), daemon=True)
        watcher.start()
        cleaning = percentiles(produce_latencies(bootstrap, "probe", seconds, 200))
        watcher.join(120)
        cleaned_s = swapped[0] if swapped else float("nan")
        return {"bulk_bytes_before": size_before, "bulk_bytes_after": directory_bytes(bulk_dir),
                "cleaner_throttle_bytes_s": throttle_bytes_s, "cleaned_within_s": cleaned_s, "window_s": seconds,
                "idle": idle, "while_cleaning": cleaning}
    finally:
        brokers.stop()


def print_table(cleaners: list[dict], produce: dict) -> None:
    print(f"{'measure':72} {'value':>16}")
    rows = []
    for result in cleaners:
        keys = "every key distinct" if result["keys"] >= result["records_in"] else f"{result['keys']} keys"
        label = f"{keys}, {result['records_in']} -> {result['records_out']} records"
        rows += [(f"cleaner MB/s, map + rewrite, unthrottled ({label})", f"{result['clean_mb_s']:.0f}"),
                 ("  with the swap (write, fdatasync, rename, index: none if nothing went)",
                  f"{result['with_swap_mb_s']:.0f}")]
    rows += [
        ("produce p50 / p99 ms, cleaner idle",
         f"{produce['idle']['p50_ms']:.2f} / {produce['idle']['p99_ms']:.2f}"),
        ("produce p50 / p99 ms, cleaner running",
         f"{produce['while_cleaning']['p50_ms']:.2f} / {produce['while_cleaning']['p99_ms']:.2f}"),
        (f"broker: cleaned segments swapped in, s after the switch (window {produce['window_s']:g} s)",
         f"{produce['cleaned_within_s']:.1f}"),
    ]
    for name, value in rows:
        print(f"{name:72} {value:>16}")


def run(out_dir: Path, quick: bool, scratch: str | None) -> dict:
    workdir = Path(tempfile.mkdtemp(prefix="raftka-compaction-bench-", dir=scratch))
    volume = (64 if quick else 256) * MIB
    try:
        cleaners = []
        for keys in (10_000, 1 << 40):    # most versions go; every record is its key's only one (all stay)
            print(f"measuring the cleaner over {volume // MIB} MiB, {keys} keys ...", flush=True)
            cleaners.append(measure_cleaner(workdir, volume, keys=keys, rounds=3 if quick else 5))
        print(f"measuring produce latency against a broker cleaning {volume // 2 // MIB} MiB ...", flush=True)
        produce = measure_produce(workdir, volume // 2, keys=10_000, seconds=3 if quick else 6,
                                  throttle_bytes_s=32 * MIB)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print()
    print_table(cleaners, produce)
    report = {"benchmark": "compaction", "quick": quick,
              "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
              "cleaner": cleaners, "produce": produce}
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "compaction.json").write_text(json.dumps(report, indent=2))
    print(f"\nwrote {out_dir / 'compaction.json'}")
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m raftka.bench.compaction_bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller volumes (well under a minute)")
    parser.add_argument("--out", type=Path, default=Path("bench/results"), help="where the JSON goes")
    parser.add_argument("--dir", default=None, help="parent of the scratch directory (default: system temp)")
    args = parser.parse_args(argv)
    run(args.out, args.quick, args.dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
