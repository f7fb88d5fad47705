"""`raftka bench`: the main job. Kafka clients against a Raftka cluster,
measured against this machine's own limits.

It starts a local cluster (3 broker processes, RF=3, acks=all; `--nodes 1`
for one broker) or targets a running one (`--bootstrap`), and runs three
workloads per message size (100 B, 1 KiB, 16 KiB by default), each on a
fresh topic:
- produce: producers write the volume;
- consume: consumers read back what was produced (partitions split among them);
- both: consumers read while producers write (end-to-end latency measured).
Producers and consumers are confluent-kafka (librdkafka) clients in
processes of their own, so the load generator does not share a GIL with
anything; each reports the CPU it used, and a generator near one full core
is reported as the bottleneck.

In the same run it measures the physical reference: raw sequential write and
read of the same volume, and loopback TCP throughput. Every result is given
in MB/s and msgs/s, with p50/p99 latency, as a ratio to that reference and
against the classic Kafka figures (50 MB/s per producer, 100 MB/s per
consumer) as PASS/MISS. A missed target is a result, not an error: the exit
status is non-zero only when something failed. JSON and a PNG chart go to
bench/results/ (`--out`).
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import resource
import signal
import socket
import statistics
import sys
import tempfile
import threading
import time
from contextlib import ExitStack
from pathlib import Path

from bench.broker_bench import Brokers, create_topic, mb_s, produce_waiting, producer
from bench.groups_bench import measure_raw_read
from bench.storage_bench import measure_raw_write

PRODUCER_TARGET_MB_S = 50.0     # the classic Kafka figure, per producer
CONSUMER_TARGET_MB_S = 100.0    # per consumer
GENERATOR_BOUND_CORES = 0.9     # a load generator using this much CPU was the bottleneck
WORKLOADS = ("produce", "consume", "both")


# ---- load generator processes -----------------------------------------------------

def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _percentiles(samples: list[float]) -> tuple[float, float]:
    if not samples:
        return 0.0, 0.0
    samples.sort()
    return 1000 * samples[len(samples) // 2], 1000 * samples[min(len(samples) - 1, int(len(samples) * 0.99))]


def producer_process(bootstrap: str, topic: str, acks: str, size: int, count: int, duration_s: float,
                     progress, results) -> None:
    """Write `count` records, or for `duration_s` seconds when that is set."""
    client = producer(bootstrap, acks)
    value = os.urandom(size)
    latencies: list[float] = []
    errors: list[str] = []

    def delivered(error, message) -> None:
        if error is not None:
            errors.append(str(error))
        elif len(latencies) < 200_000:
            latencies.append(message.latency())
    cpu, started = _cpu_seconds(), time.perf_counter()
    for i in range(count):
        produce_waiting(client, topic, value, b"%d" % (i % 1024), delivered)
        if i % 500 == 499:
            if duration_s and time.perf_counter() - started >= duration_s:
                count = i + 1
                break
            client.poll(0)
            with progress.get_lock():
                progress.value += 500 * size
    client.flush(600)
    seconds = time.perf_counter() - started
    p50, p99 = _percentiles(latencies)
    results.put({"role": "producer", "messages": count, "bytes": count * size, "seconds": seconds,
                 "p50_ms": p50, "p99_ms": p99, "cpu_cores": (_cpu_seconds() - cpu) / seconds,
                 "errors": errors[:3], "error_count": len(errors)})


def consumer_process(bootstrap: str, topic: str, partitions: list[int], target, timeout_s: float,
                     consumed, progress, results) -> None:
    """Read the partitions from offset 0 until all consumers together (the
    shared `consumed` count) have read what the producers wrote (`target`)."""
    from confluent_kafka import Consumer, TopicPartition
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "raftka-bench", "enable.auto.commit": False,
                         "fetch.max.bytes": 64 << 20, "max.partition.fetch.bytes": 16 << 20,
                         "fetch.wait.max.ms": 100})
    consumer.assign([TopicPartition(topic, p, 0) for p in partitions])
    got = size = 0
    e2e: list[float] = []
    cpu, started = _cpu_seconds(), time.perf_counter()
    first = last = 0.0
    deadline = started + timeout_s
    while consumed.value < target.value and time.perf_counter() < deadline:
        asked = time.perf_counter()
        messages = [m for m in consumer.consume(10000, 0.2) if m.error() is None]
        if not messages:
            continue
        first = first or asked           # from the call that brought the first records
        now = time.time()
        batch_bytes = sum(len(m.value()) for m in messages)
        e2e.extend(now - m.timestamp()[1] / 1000 for m in messages[::97])
        got, size = got + len(messages), size + batch_bytes
        last = time.perf_counter()
        with consumed.get_lock():
            consumed.value += len(messages)
        with progress.get_lock():
            progress.value += batch_bytes
    consumer.close()
    seconds = last - first if got else time.perf_counter() - started
    p50, p99 = _percentiles(e2e)
    results.put({"role": "consumer", "messages": got, "bytes": size, "seconds": seconds,
                 "p50_ms": p50, "p99_ms": p99, "cpu_cores": (_cpu_seconds() - cpu) / (time.perf_counter() - started)})


# ---- one workload --------------------------------------------------------------------

UNKNOWN_TOTAL = 2**62   # what consumers aim at until timed producers say how much they wrote


class Workload:
    """Runs producer and/or consumer processes and collects what they report.
    Producers write `count` records between them, or as many as they can in
    `duration_s`; consumers read until all of them together have read what
    the producers wrote (`target`, known once the producers are done)."""

    def __init__(self, args: argparse.Namespace, bootstrap: str, topic: str, size: int, count: int,
                 duration_s: float | None = None) -> None:
        self.args, self.bootstrap, self.topic, self.size = args, bootstrap, topic, size
        self.count, self.duration_s = count, duration_s
        self.context = multiprocessing.get_context("spawn")
        self.progress = self.context.Value("q", 0)      # bytes written or read so far
        self.consumed = self.context.Value("q", 0)      # records read by all consumers
        self.target = self.context.Value("q", UNKNOWN_TOTAL if duration_s else self.total)
        self.results = self.context.Queue()
        self.processes: list = []
        self.producers = 0

    @property
    def total(self) -> int:
        """Records a volume-bound run writes: `count` rounded down to a multiple of producers."""
        return (self.count // self.args.producers) * self.args.producers

    def start_producers(self) -> None:
        per = UNKNOWN_TOTAL if self.duration_s else self.count // self.args.producers
        for _ in range(self.args.producers):
            self._start(producer_process, (self.bootstrap, self.topic, self.args.acks, self.size, per,
                                           self.duration_s or 0.0))
        self.producers = self.args.producers

    def start_consumers(self, timeout_s: float) -> None:
        n = self.args.consumers
        for i in range(n):
            partitions = list(range(i, self.args.partitions, n))
            self._start(consumer_process, (self.bootstrap, self.topic, partitions, self.target, timeout_s,
                                           self.consumed))

    def _start(self, target, args: tuple) -> None:
        process = self.context.Process(target=target, args=(*args, self.progress, self.results), daemon=True)
        process.start()
        self.processes.append(process)

    def wait(self, show) -> list[dict]:
        reports: list[dict] = []
        while len(reports) < len(self.processes):
            try:
                reports.append(self.results.get(timeout=0.2))
            except Exception:   # queue.Empty: show progress, check the children
                if all(not p.is_alive() for p in self.processes) and self.results.empty():
                    raise RuntimeError(f"{len(self.processes) - len(reports)} load generator(s) died") from None
            produced = [r for r in reports if r["role"] == "producer"]
            if self.producers and len(produced) == self.producers:
                self.target.value = sum(r["messages"] for r in produced)
            show(self.progress.value)
        for p in self.processes:
            p.join(10)
        return reports

    def stop(self) -> None:
        for p in self.processes:
            if p.is_alive():
                p.terminate()
                p.join(5)


def produced_by(reports: list[dict]) -> int:
    return sum(r["messages"] for r in reports if r["role"] == "producer")


def summarise(reports: list[dict], role: str, target_mb_s: float, total: int) -> dict | None:
    """The role's figures together; RuntimeError if a record was not delivered,
    or not read back exactly once."""
    mine = [r for r in reports if r["role"] == role]
    if not mine:
        return None
    total_bytes = sum(r["bytes"] for r in mine)
    seconds = max(r["seconds"] for r in mine)
    per_client = [mb_s(r["bytes"], r["seconds"]) for r in mine]
    errors = sum(r.get("error_count", 0) for r in mine)
    handled = sum(r["messages"] for r in mine)
    if errors or handled != total:
        raise RuntimeError(f"{role}s handled {handled} of {total} records; {errors} delivery errors "
                           f"{[r.get('errors') for r in mine if r.get('errors')]}")
    median_per_client = statistics.median(per_client)
    return {"clients": len(mine), "mb_s": mb_s(total_bytes, seconds), "msgs_s": sum(r["messages"] for r in mine) / seconds,
            "per_client_mb_s": median_per_client, "p50_ms": max(r["p50_ms"] for r in mine),
            "p99_ms": max(r["p99_ms"] for r in mine), "generator_cores": max(r["cpu_cores"] for r in mine),
            "generator_bound": max(r["cpu_cores"] for r in mine) >= GENERATOR_BOUND_CORES,
            "target_mb_s": target_mb_s, "verdict": "PASS" if median_per_client >= target_mb_s else "MISS"}


def run_workload(args: argparse.Namespace, bootstrap: str, kind: str, size: int, volume: int, progress) -> dict:
    topic = f"raftka-bench-{kind}-{size}-{os.getpid()}-{int(time.time() * 1000) % 100000}"
    create_topic(bootstrap, args.replication_factor, topic, args.partitions)
    count = max(volume // size, args.producers)
    label = f"{kind:<8} {size:>6} B"
    task = progress.add_task(label, total=None if args.duration_s else count * size * (2 if kind == "both" else 1))
    show = lambda done: progress.update(task, completed=done)   # noqa: E731
    if kind in ("produce", "consume"):
        reports = _run(Workload(args, bootstrap, topic, size, count, args.duration_s), show, producers=True)
        total = produced_by(reports)
        if kind == "consume":
            reading = Workload(args, bootstrap, topic, size, total)   # what was written, read back
            reports = _run(reading, show, consumers=True)
    else:
        reports = _run(Workload(args, bootstrap, topic, size, count, args.duration_s), show,
                       producers=True, consumers=True)
        total = produced_by(reports)
    progress.update(task, total=progress.tasks[task].completed or 1, completed=progress.tasks[task].completed or 1)
    consumed = summarise(reports, "consumer", CONSUMER_TARGET_MB_S, total)
    if consumed is not None and kind == "consume":   # records written earlier: their age is no latency
        consumed["p50_ms"] = consumed["p99_ms"] = None
    return {"workload": kind, "message_bytes": size, "messages": total,
            "produce": summarise(reports, "producer", PRODUCER_TARGET_MB_S, total), "consume": consumed}


def _run(workload: Workload, show, producers: bool = False, consumers: bool = False) -> list[dict]:
    try:
        if consumers:
            workload.start_consumers(timeout_s=600 + (workload.duration_s or 0))
            if producers:
                time.sleep(1.0)             # consumers connected before the first record
        if producers:
            workload.start_producers()
        return workload.wait(show)
    finally:
        workload.stop()


# ---- the physical reference ------------------------------------------------------------

def loopback_mb_s(volume: int) -> float:
    """TCP throughput over 127.0.0.1 between two threads, 1 MiB sends."""
    listener = socket.create_server(("127.0.0.1", 0))
    chunk = os.urandom(1 << 20)

    def send() -> None:
        with socket.create_connection(listener.getsockname()) as sock:
            for _ in range(volume // len(chunk)):
                sock.sendall(chunk)
    sender = threading.Thread(target=send)
    sender.start()
    connection, _ = listener.accept()
    buffer = bytearray(1 << 20)
    received, started = 0, time.perf_counter()
    with connection:
        while True:
            n = connection.recv_into(buffer)
            if not n:
                break
            received += n
    seconds = time.perf_counter() - started
    sender.join()
    listener.close()
    return mb_s(received, seconds)


def measure_reference(workdir: Path, volume: int) -> dict:
    path = workdir / "raw"
    write = measure_raw_write(path, bytearray(os.urandom(1 << 20)), max(volume >> 20, 1))
    read = measure_raw_read(path, max(volume >> 20, 1) << 20)
    path.unlink()
    return {"raw_write_mb_s": write, "raw_read_mb_s": read, "loopback_mb_s": loopback_mb_s(max(volume, 64 << 20))}


# ---- report ------------------------------------------------------------------------------

def print_table(result: dict) -> None:
    ref = result["reference"]
    print(f"\nRaftka: {result['setup']}; {result['partitions']} partitions, {result['producers']} producer(s), "
          f"{result['consumers']} consumer(s), " + (f"{result['duration_s']:g} s" if result.get("duration_s")
                                                     else f"{result['volume_bytes'] >> 20} MiB") + " per workload")
    print(f"reference on this machine: raw write {ref['raw_write_mb_s']:.0f} MB/s, raw read "
          f"{ref['raw_read_mb_s']:.0f} MB/s, loopback TCP {ref['loopback_mb_s']:.0f} MB/s\n")
    print("| workload | msg | side | MB/s | msgs/s | per client MB/s | p50 / p99 ms | vs reference | target | result | generator CPU |")
    print("|---|---:|---|---:|---:|---:|---:|---:|---:|---|---|")
    for row in result["rows"]:
        for side, reference in (("produce", ref["raw_write_mb_s"]), ("consume", ref["loopback_mb_s"])):
            s = row[side]
            if s is None:
                continue
            bound = " (generator-bound)" if s["generator_bound"] else ""
            print(f"| {row['workload']} | {row['message_bytes']} B | {side} | {s['mb_s']:.1f} | {s['msgs_s']:,.0f} | "
                  f"{s['per_client_mb_s']:.1f} | {_latency(s)} | {s['mb_s'] / reference:.3f} | "
                  f"{s['target_mb_s']:.0f} | {s['verdict']} | {s['generator_cores']:.2f} cores{bound} |")
    print("\nlatency: produce = librdkafka's send-to-acknowledgement; consume (in 'both') = record timestamp to receipt."
          "\nvs reference: produce against raw write, consume against loopback TCP.")


def _latency(side: dict) -> str:
    return "-" if side["p50_ms"] is None else f"{side['p50_ms']:.1f} / {side['p99_ms']:.1f}"


def write_chart(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = result["rows"]
    labels = [f"{r['workload']}\n{r['message_bytes']} B" for r in rows]
    produce = [r["produce"]["mb_s"] if r["produce"] else 0 for r in rows]
    consume = [r["consume"]["mb_s"] if r["consume"] else 0 for r in rows]
    x = range(len(rows))
    fig, ax = plt.subplots(figsize=(max(6, len(rows) * 1.2), 4))
    ax.bar([i - 0.2 for i in x], produce, 0.4, label="produce")
    ax.bar([i + 0.2 for i in x], consume, 0.4, label="consume")
    ax.axhline(PRODUCER_TARGET_MB_S * result["producers"], color="C0", linestyle="--", linewidth=1, label="50 MB/s per producer")
    ax.axhline(CONSUMER_TARGET_MB_S * result["consumers"], color="C1", linestyle="--", linewidth=1, label="100 MB/s per consumer")
    ax.set_xticks(list(x), labels)
    ax.set_ylabel("MB/s")
    ax.set_title(f"raftka bench: {result['setup']}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# ---- main ---------------------------------------------------------------------------------

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="raftka bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="1 KiB messages, 16 MiB per workload (under a minute)")
    parser.add_argument("--nodes", type=int, default=3, help="brokers to start (default 3; RF = min(nodes, 3))")
    parser.add_argument("--bootstrap", help="benchmark a running cluster instead (host:port[,...])")
    parser.add_argument("--workloads", default=",".join(WORKLOADS), help="comma-separated of produce,consume,both")
    parser.add_argument("--sizes", default="100,1024,16384", help="message sizes in bytes, comma-separated")
    parser.add_argument("--partitions", type=int, default=6)
    parser.add_argument("--producers", type=int, default=1)
    parser.add_argument("--consumers", type=int, default=1)
    amount = parser.add_mutually_exclusive_group()
    amount.add_argument("--volume-mib", type=int, help="data per workload (default 64, --quick 16)")
    amount.add_argument("--duration-s", type=float, help="produce for this long per workload instead of a volume")
    parser.add_argument("--acks", choices=("all", "1", "0"), default="all")
    parser.add_argument("--replication-factor", type=int, help="default min(brokers, 3)")
    parser.add_argument("--out", type=Path, default=Path("bench/results"), help="where cluster.json and .png go")
    args = parser.parse_args(argv)
    if args.quick:
        args.sizes = "1024" if args.sizes == parser.get_default("sizes") else args.sizes
    args.volume_mib = args.volume_mib or (16 if args.quick else 64)
    try:
        args.size_list = [int(s) for s in args.sizes.split(",")]
    except ValueError:
        parser.error(f"--sizes must be integers, got {args.sizes!r}")
    args.workload_list = [w for w in args.workloads.split(",") if w]
    if not args.workload_list or set(args.workload_list) - set(WORKLOADS):
        parser.error(f"--workloads must be a comma-separated subset of {','.join(WORKLOADS)}")
    if args.duration_s is not None and args.duration_s <= 0:
        parser.error("--duration-s must be positive")
    for name in ("nodes", "partitions", "producers", "consumers", "volume_mib"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if not all(0 < s <= 1 << 20 for s in args.size_list):
        parser.error("--sizes must be in [1, 1048576]")
    if args.consumers > args.partitions:
        parser.error("--consumers cannot exceed --partitions (each consumer needs a partition)")
    if not args.bootstrap:
        args.replication_factor = args.replication_factor or min(args.nodes, 3)
    return args


def brokers_in(bootstrap: str) -> int:
    from confluent_kafka.admin import AdminClient
    return len(AdminClient({"bootstrap.servers": bootstrap}).list_topics(timeout=10).brokers)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeElapsedColumn, TransferSpeedColumn
    volume = args.volume_mib << 20
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="raftka-bench-") as tmp, ExitStack() as stack:
        workdir = Path(tmp)
        print(f"measuring this machine's reference ({args.volume_mib} MiB)...", flush=True)
        reference = measure_reference(workdir, volume)
        if args.bootstrap:
            bootstrap = args.bootstrap
            args.replication_factor = args.replication_factor or min(brokers_in(bootstrap), 3)
            setup = f"cluster at {args.bootstrap}, RF={args.replication_factor}, acks={args.acks}"
        else:
            print(f"starting {args.nodes} broker process(es)...", flush=True)
            brokers = stack.enter_context(Brokers(workdir / "cluster", args.nodes))
            bootstrap = brokers.bootstrap
            setup = f"{args.nodes} broker{'s' if args.nodes > 1 else ''}, RF={args.replication_factor}, acks={args.acks}"
        rows = []
        columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                   TimeElapsedColumn())
        with Progress(*columns) as progress:
            for size in args.size_list:
                for kind in args.workload_list:
                    rows.append(run_workload(args, bootstrap, kind, size, volume, progress))
    result = {"setup": setup, "nodes": None if args.bootstrap else args.nodes, "acks": args.acks,
              "partitions": args.partitions, "producers": args.producers, "consumers": args.consumers,
              "volume_bytes": volume, "duration_s": args.duration_s, "quick": args.quick, "reference": reference,
              "rows": rows}
    (args.out / "cluster.json").write_text(json.dumps(result, indent=1))
    print_table(result)
    write_chart(result, args.out / "cluster.png")
    print(f"\nwrote {args.out / 'cluster.json'} and {args.out / 'cluster.png'}")
    return 0


def _interrupt(_signal: int, _frame: object) -> None:
    raise KeyboardInterrupt


def run(argv: list[str] | None = None) -> int:
    """main() with errors as an exit status: 1 for a failure, 130 for Ctrl-C
    or SIGTERM (both stop the brokers and load generators and remove the
    temporary data on the way out)."""
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        return main(argv)
    except KeyboardInterrupt:
        print("\ninterrupted: brokers and load generators stopped, temporary data removed", file=sys.stderr)
        return 130
    except Exception as error:   # a failed run (no broker, a lost record, ...) is exit status 1, said in one line
        print(f"raftka bench failed: {type(error).__name__}: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(run())
