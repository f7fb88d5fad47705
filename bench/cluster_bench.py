"""`raftka bench`: the main job. Kafka clients against a Raftka cluster,
measured against this machine's own limits.

It starts a local cluster (3 broker processes, RF=3, acks=all; `--nodes 1`
for one broker) or targets a running one (`--bootstrap`), and runs three
workloads per message size (100 B, 1 KiB, 16 KiB by default), each on a
fresh topic:
- produce: producers write the volume;
- consume: consumers read back what was produced (partitions split among them);
- both: consumers read while producers write.
Then latency at fixed load: a producer paced at 25% and 50% of the measured
1 KiB peak (linger.ms=1), with a consumer reading along, reports p50/p99/p99.9
acknowledgement and end-to-end latency from at least 10^5 samples per rate;
the targets apply to these. Last, 50% of the peak once more at librdkafka's
default linger.ms (5), what a producer that sets nothing gets: no target
(its linger alone is the p50 target), but the brokers then see a fifth of
the requests, and this row shows what that does to the tail.

The load generator is native (bench/loadgen.py: C loops over librdkafka, the
library confluent-kafka uses), one process per producer or consumer, with
throughput settings (linger.ms=5, 1 MB batches, no compression): it costs
what librdkafka costs, not a Python call per message. A generator whose
producing/polling thread was busy nearly all the time is reported as the
bottleneck (GEN-BOUND), not as the broker's MISS.

In the same run it measures the physical reference: the rate this machine
durably writes the same bytes RF times (fdatasync'd sequential write / RF)
next to produce, and loopback TCP next to consume. Every result is given in
MB/s and msgs/s, as a ratio to that reference and against the classic Kafka
figures (50 MB/s per producer, 100 MB/s per consumer) as PASS/MISS. A missed
target is a result, not an error: the exit status is non-zero only when
something failed. JSON and a PNG chart go to bench/results/ (`--out`).
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

from raftka.bench import loadgen
from raftka.bench.broker_bench import create_topic, mb_s
from raftka.broker.local_cluster import LocalBrokers

PRODUCER_TARGET_MB_S = 50.0     # the classic Kafka figure, per producer
CONSUMER_TARGET_MB_S = 100.0    # per consumer
GENERATOR_BOUND_CORES = 0.9     # a generator thread this busy was the bottleneck
WORKLOADS = ("produce", "consume", "both")
LATENCY_LOADS = (0.25, 0.5)     # fractions of the measured peak msgs/s
LATENCY_LINGER_MS = 1           # DEFAULT_LINGER_MS would be the floor of every figure
DEFAULT_LINGER_MS = 5           # librdkafka's default linger.ms: the extra, target-less row
LATENCY_SAMPLES = 100_000       # per rate, after the warm-up
LATENCY_MIN_S = 2.0             # and at least this long
LATENCY_WARMUP_S = 0.5          # connecting and metadata: not counted
LATENCY_TARGETS_MS = {"p50": 5.0, "p99": 20.0, "p99.9": 50.0}   # at 50% of peak (issue 12)
E2E_EVERY = 97                  # end-to-end samples in throughput runs: every 97th record


def producer_settings(bootstrap: str, acks: str, linger_ms: int = 5) -> dict[str, object]:
    """What a Kafka user sets for throughput; the same for every producer of a run."""
    return {"bootstrap.servers": bootstrap, "acks": acks, "linger.ms": linger_ms, "batch.size": 1_000_000,
            "compression.type": "none", "queue.buffering.max.kbytes": 512 * 1024,
            "queue.buffering.max.messages": 1_000_000}


def consumer_settings(bootstrap: str) -> dict[str, object]:
    """What a Kafka user sets for throughput. queued.min.messages: librdkafka
    stops fetching a partition once that many messages wait in its queue and
    then backs off fetch.queue.backoff.ms (1 s); at the default 100,000 that
    is 10 MB of 100 B records, and the consumer idled most of the run (59 MB/s
    at 100 B with the brokers at 0.06 cores). The byte cap bounds the queue."""
    return {"bootstrap.servers": bootstrap, "group.id": "raftka-bench", "enable.auto.commit": False,
            "fetch.max.bytes": 64 << 20, "max.partition.fetch.bytes": 16 << 20, "fetch.wait.max.ms": 100,
            "queued.max.messages.kbytes": 256 * 1024, "queued.min.messages": 10_000_000}


# ---- load generator processes -----------------------------------------------------

def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _report(role: str, run: loadgen.Run, cpu_s: float, wall_s: float, warmup: int = 0) -> dict:
    samples = run.latencies_us[warmup:]
    return {"role": role, "messages": run.messages, "bytes": run.bytes, "seconds": run.seconds,
            "failed": run.failed, "first_error": run.first_error, "latency_ms": loadgen.percentiles(samples),
            "samples": len(samples), "thread_cores": run.thread_cores, "cpu_cores": cpu_s / max(wall_s, 1e-9)}


def _every(count: int, duration_s: float, rate: float, samples: int) -> int:
    """Which acknowledgements to sample: all of a paced run; spread over a
    volume-bound one; every E2E_EVERY-th of a timed one (its count is unknown)."""
    if rate:
        return 1
    return E2E_EVERY if duration_s else max(1, min(count // max(samples, 1), 1 << 30))


def producer_process(settings: dict, topic: str, size: int, count: int, duration_s: float, rate: float,
                     samples: int, warmup: int, progress, results) -> None:
    """Write `count` records (or for `duration_s` when set), paced at `rate` when set."""
    cpu, started = _cpu_seconds(), time.perf_counter()
    try:
        run = loadgen.produce(settings, topic, size, count, duration_s, rate, samples=samples,
                              every=_every(count, duration_s, rate, samples), progress=progress)
    except Exception as error:
        results.put({"role": "producer", "error": str(error)})
        return
    results.put(_report("producer", run, _cpu_seconds() - cpu, time.perf_counter() - started, warmup))


def consumer_process(settings: dict, topic: str, partitions: list[int], target, timeout_s: float, samples: int,
                     every: int, warmup: int, consumed, progress, results) -> None:
    """Read the partitions from offset 0 until all consumers together (the
    shared `consumed` count) have read what the producers wrote (`target`)."""
    cpu, started = _cpu_seconds(), time.perf_counter()
    try:
        run = loadgen.consume(settings, topic, partitions, target, consumed, timeout_s, samples=samples,
                              every=every, progress=progress)
    except Exception as error:
        results.put({"role": "consumer", "error": str(error)})
        return
    results.put(_report("consumer", run, _cpu_seconds() - cpu, time.perf_counter() - started, warmup))


# ---- one workload --------------------------------------------------------------------

UNKNOWN_TOTAL = 2**62   # what consumers aim at until timed producers say how much they wrote


class Workload:
    """Runs producer and/or consumer processes and collects what they report.
    Producers write `count` records between them, or as many as they can in
    `duration_s`, paced at `rate` msgs/s in all when set; consumers read
    until all of them together have read what the producers wrote (`target`,
    known once the producers are done)."""

    def __init__(self, args: argparse.Namespace, bootstrap: str, topic: str, size: int, count: int,
                 duration_s: float | None = None, rate: float = 0.0, linger_ms: int = 5, samples: int = 0,
                 warmup: int = 0) -> None:
        self.args, self.bootstrap, self.topic, self.size = args, bootstrap, topic, size
        self.count, self.duration_s, self.rate, self.linger_ms = count, duration_s, rate, linger_ms
        self.samples, self.warmup = samples, warmup
        self.context = multiprocessing.get_context("spawn")
        self.progress = self.context.Value("q", 0)      # bytes written or read so far
        self.consumed = self.context.Value("q", 0)      # records read by all consumers
        self.target = self.context.Value("q", UNKNOWN_TOTAL if duration_s else self.total)
        self.results = self.context.Queue()
        self.processes: list = []
        self.producers = 0
        self.cpu: dict | None = None                   # set by _run (CpuMeter)

    @property
    def total(self) -> int:
        """Records a volume-bound run writes: `count` rounded down to a multiple of producers."""
        return (self.count // self.args.producers) * self.args.producers

    def start_producers(self) -> None:
        n = self.args.producers
        per = UNKNOWN_TOTAL if self.duration_s else self.count // n
        settings = producer_settings(self.bootstrap, self.args.acks, self.linger_ms)
        samples = self.samples or 20_000
        for _ in range(n):
            self._start(producer_process, (settings, self.topic, self.size, per, self.duration_s or 0.0,
                                           self.rate / n, samples // n + self.warmup, self.warmup))
        self.producers = n

    def start_consumers(self, timeout_s: float) -> None:
        n = self.args.consumers
        for i in range(n):
            partitions = list(range(i, self.args.partitions, n))
            every, samples = (1, self.samples // n + self.warmup) if self.samples else (E2E_EVERY, 20_000)
            self._start(consumer_process, (consumer_settings(self.bootstrap), self.topic, partitions, self.target,
                                           timeout_s, samples, every, self.warmup, self.consumed))

    def _start(self, target, args: tuple) -> None:
        process = self.context.Process(target=target, args=(*args, self.progress, self.results), daemon=True)
        process.start()
        self.processes.append(process)

    def wait(self, show) -> list[dict]:
        reports: list[dict] = []
        while len(reports) < len(self.processes):
            try:
                report = self.results.get(timeout=0.2)
            except Exception:   # queue.Empty: show progress, check the children
                if all(not p.is_alive() for p in self.processes) and self.results.empty():
                    raise RuntimeError(f"{len(self.processes) - len(reports)} load generator(s) died") from None
            else:
                if "error" in report:
                    raise RuntimeError(f"a {report['role']} failed: {report['error']}")
                reports.append(report)
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


def verdict(per_client_mb_s: float, target_mb_s: float, generator_bound: bool) -> str:
    """PASS/MISS against the classic figure; a saturated generator says nothing
    about the broker, so it is GEN-BOUND rather than MISS."""
    if per_client_mb_s >= target_mb_s:
        return "PASS"
    return "GEN-BOUND" if generator_bound else "MISS"


def summarise(reports: list[dict], role: str, target_mb_s: float, total: int) -> dict | None:
    """The role's figures together; RuntimeError if a record was not delivered,
    or not read back exactly once."""
    mine = [r for r in reports if r["role"] == role]
    if not mine:
        return None
    total_bytes = sum(r["bytes"] for r in mine)
    seconds = max(r["seconds"] for r in mine)
    per_client = [mb_s(r["bytes"], r["seconds"]) for r in mine]
    failed = sum(r["failed"] for r in mine)
    handled = sum(r["messages"] for r in mine)
    if failed or handled != total:
        errors = sorted({r["first_error"] for r in mine if r["first_error"]})
        raise RuntimeError(f"{role}s handled {handled} of {total} records; {failed} failed (librdkafka errors {errors})")
    median_per_client = statistics.median(per_client)
    bound = max(r["thread_cores"] for r in mine) >= GENERATOR_BOUND_CORES
    latency = max((r["latency_ms"] for r in mine if r["latency_ms"]), key=lambda lat: lat["p99"], default={})
    return {"clients": len(mine), "mb_s": mb_s(total_bytes, seconds), "msgs_s": handled / seconds,
            "per_client_mb_s": median_per_client, "latency_ms": latency,
            "generator_thread_cores": max(r["thread_cores"] for r in mine),
            "generator_cores": max(r["cpu_cores"] for r in mine), "generator_bound": bound,
            "target_mb_s": target_mb_s, "verdict": verdict(median_per_client, target_mb_s, bound)}


def _topic(kind: str, size: int) -> str:
    return f"raftka-bench-{kind}-{size}-{os.getpid()}-{int(time.time() * 1000) % 100000}"


def settle_disk() -> None:
    """Write back the dirty pages earlier workloads left, so each workload
    starts from the same state instead of paying for its predecessors'
    writeback (not timed)."""
    os.sync()


def storage_counters(brokers: LocalBrokers | None) -> tuple[int, float] | None:
    """(bytes written to storage, journal fdatasync calls) summed over the local brokers."""
    if brokers is None:
        return None
    return (sum(brokers.write_bytes(n) for n in brokers.node_ids),
            sum(brokers.metric(n, "raftka_journal_fdatasyncs_total") for n in brokers.node_ids))


def storage_cost(before: tuple[int, float] | None, after: tuple[int, float] | None, acked_bytes: int,
                 replication_factor: int) -> dict | None:
    """What the brokers wrote for the acknowledged bytes: per byte and replica, and fdatasyncs per MB."""
    if before is None or after is None or not acked_bytes:
        return None
    written, syncs = after[0] - before[0], after[1] - before[1]
    return {"written_bytes": written, "acked_bytes": acked_bytes, "fdatasyncs": int(syncs),
            "written_per_acked_byte_per_replica": round(written / acked_bytes / replication_factor, 3),
            "fdatasyncs_per_acked_mb": round(syncs / (acked_bytes / 1e6), 2)}


def run_workload(args: argparse.Namespace, bootstrap: str, kind: str, size: int, volume: int, progress) -> dict:
    settle_disk()
    counters_before = storage_counters(args.brokers)
    topic = _topic(kind, size)
    create_topic(bootstrap, args.replication_factor, topic, args.partitions)
    count = max(volume // size, args.producers)
    label = f"{kind:<8} {size:>6} B"
    task = progress.add_task(label, total=None if args.duration_s else count * size * (2 if kind == "both" else 1))
    show = lambda done: progress.update(task, completed=done)   # noqa: E731
    workload = Workload(args, bootstrap, topic, size, count, args.duration_s)
    if kind in ("produce", "consume"):
        reports = _run(workload, show, producers=True)
        total = produced_by(reports)
        counters_after = storage_counters(args.brokers)
        if kind == "consume":
            workload = Workload(args, bootstrap, topic, size, total)   # what was written, read back
            reports = _run(workload, show, consumers=True)
    else:
        reports = _run(workload, show, producers=True, consumers=True)
        total = produced_by(reports)
        counters_after = storage_counters(args.brokers)
    progress.update(task, total=progress.tasks[task].completed or 1, completed=progress.tasks[task].completed or 1)
    consumed = summarise(reports, "consumer", CONSUMER_TARGET_MB_S, total)
    if consumed is not None and kind == "consume":   # records written earlier: their age is no latency
        consumed["latency_ms"] = {}
    return {"workload": kind, "message_bytes": size, "messages": total,
            "produce": summarise(reports, "producer", PRODUCER_TARGET_MB_S, total), "consume": consumed,
            "storage": storage_cost(counters_before, counters_after, total * size, args.replication_factor),
            "cpu": workload.cpu}


def run_latency(args: argparse.Namespace, bootstrap: str, size: int, peak_msgs_s: float, load: float,
                progress, linger_ms: int = LATENCY_LINGER_MS) -> dict:
    """A producer paced at `load` x the peak with a consumer reading along:
    acknowledgement and end-to-end latency percentiles. The targets apply
    at 50% and LATENCY_LINGER_MS only."""
    settle_disk()
    rate = load * peak_msgs_s
    warmup = int(rate * LATENCY_WARMUP_S)
    count = max(LATENCY_SAMPLES, int(rate * LATENCY_MIN_S)) + warmup
    suffix = "" if linger_ms == LATENCY_LINGER_MS else f"linger{linger_ms}"
    topic = _topic(f"latency{int(load * 100)}{suffix}", size)
    create_topic(bootstrap, args.replication_factor, topic, args.partitions)
    task = progress.add_task(f"latency  {int(load * 100):>3}% of peak, linger.ms={linger_ms}", total=count * size * 2)
    show = lambda done: progress.update(task, completed=done)   # noqa: E731
    workload = Workload(args, bootstrap, topic, size, count, rate=rate, linger_ms=linger_ms,
                        samples=count - warmup, warmup=warmup)
    reports = _run(workload, show, producers=True, consumers=True)
    produced = summarise(reports, "producer", PRODUCER_TARGET_MB_S, workload.total)
    consumed = summarise(reports, "consumer", CONSUMER_TARGET_MB_S, workload.total)
    assert produced is not None and consumed is not None
    samples = sum(r["samples"] for r in reports if r["role"] == "producer")
    row = {"load": load, "message_bytes": size, "rate_msgs_s": rate, "achieved_msgs_s": produced["msgs_s"],
           "linger_ms": linger_ms, "samples": samples, "ack_ms": produced["latency_ms"],
           "e2e_ms": consumed["latency_ms"], "generator_bound": produced["generator_bound"], "cpu": workload.cpu}
    if load == 0.5 and linger_ms == LATENCY_LINGER_MS:
        row["targets_ms"] = LATENCY_TARGETS_MS
        row["verdict"] = "PASS" if all(row["ack_ms"].get(k, 1e9) <= v for k, v in LATENCY_TARGETS_MS.items()) else "MISS"
    return row


def _run(workload: Workload, show, producers: bool = False, consumers: bool = False) -> list[dict]:
    """Run the workload's clients to the end; `workload.cpu` is then what the
    machine and the brokers spent from the first record on (CpuMeter)."""
    try:
        if consumers:
            workload.start_consumers(timeout_s=600 + (workload.duration_s or 0))
            if producers:
                time.sleep(1.0)             # consumers connected before the first record
        meter = CpuMeter(workload.args.brokers)
        if producers:
            workload.start_producers()
        reports = workload.wait(show)
        workload.cpu = meter.stop()
        return reports
    finally:
        workload.stop()


# ---- CPU: the limit the latency rows run into on a small machine ---------------------

def machine_ticks() -> tuple[int, int]:
    """(busy, total) clock ticks of all CPUs since boot (/proc/stat; idle and
    iowait count as free, steal as busy: the hypervisor gave it away)."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    total = sum(fields)
    return total - fields[3] - fields[4], total


class CpuMeter:
    """CPU used between its creation and `stop()`: how busy the whole machine
    was (brokers, load generators and anything else on it) and, for brokers
    this run started, how many cores they used together. A latency row taken
    on a saturated machine measures queueing for a core, and says so."""

    def __init__(self, brokers: LocalBrokers | None) -> None:
        self._brokers = brokers
        self._started = time.perf_counter()
        self._ticks = machine_ticks()
        self._broker_s = self._broker_seconds()

    def _broker_seconds(self) -> float | None:
        if self._brokers is None:
            return None
        return sum(self._brokers.cpu_seconds(n) for n in self._brokers.node_ids)

    def stop(self) -> dict:
        wall = max(time.perf_counter() - self._started, 1e-9)
        busy, total = (after - before for after, before in zip(machine_ticks(), self._ticks))
        broker_s = self._broker_seconds()
        return {"cores": os.cpu_count(), "machine_busy": round(busy / max(total, 1), 3),
                "brokers_cores": None if broker_s is None or self._broker_s is None
                else round((broker_s - self._broker_s) / wall, 3)}


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


def durable_write_mb_s(path: Path, volume: int) -> float:
    """Sequential 1 MiB writes of `volume` bytes, then fdatasync (dd's
    conv=fdatasync): the rate this machine puts bytes on its disk."""
    chunk = os.urandom(1 << 20)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        started = time.perf_counter()
        for _ in range(max(volume >> 20, 1)):
            os.write(fd, chunk)
        os.fdatasync(fd)
        seconds = time.perf_counter() - started
    finally:
        os.close(fd)
        path.unlink()
    return mb_s(max(volume >> 20, 1) << 20, seconds)


def measure_reference(workdir: Path, volume: int, replication_factor: int) -> dict:
    durable = durable_write_mb_s(workdir / "raw", min(max(volume, 64 << 20), 256 << 20))
    return {"durable_write_mb_s": durable, "replication_factor": replication_factor,
            "durable_write_per_replica_mb_s": durable / replication_factor,
            "loopback_mb_s": loopback_mb_s(min(max(volume, 64 << 20), 512 << 20))}


# ---- report ------------------------------------------------------------------------------

def print_table(result: dict) -> None:
    ref = result["reference"]
    print(f"\nRaftka: {result['setup']}; {result['partitions']} partitions, {result['producers']} producer(s), "
          f"{result['consumers']} consumer(s), " + (f"{result['duration_s']:g} s" if result.get("duration_s")
                                                     else f"{result['volume_bytes'] >> 20} MiB") + " per workload; "
          "native librdkafka load generators (linger.ms=5, 1 MB batches, no compression)")
    print(f"reference on this machine: durable (fdatasync'd) sequential write {ref['durable_write_mb_s']:.0f} MB/s, "
          f"/ RF {ref['replication_factor']} = {ref['durable_write_per_replica_mb_s']:.0f} MB/s; "
          f"loopback TCP {ref['loopback_mb_s']:.0f} MB/s\n")
    print("| workload | msg | side | MB/s | msgs/s | per client MB/s | p50 / p99 ms | vs reference | target | result "
          "| generator thread / process CPU |")
    print("|---|---:|---|---:|---:|---:|---:|---:|---:|---|---|")
    for row in result["rows"]:
        for side, reference in (("produce", ref["durable_write_per_replica_mb_s"]), ("consume", ref["loopback_mb_s"])):
            s = row[side]
            if s is None:
                continue
            bound = " (generator-bound)" if s["generator_bound"] else ""
            print(f"| {row['workload']} | {row['message_bytes']} B | {side} | {s['mb_s']:.1f} | {s['msgs_s']:,.0f} | "
                  f"{s['per_client_mb_s']:.1f} | {_latency(s['latency_ms'])} | {s['mb_s'] / reference:.2f} | "
                  f"{s['target_mb_s']:.0f} | {s['verdict']} | {s['generator_thread_cores']:.2f} / "
                  f"{s['generator_cores']:.2f} cores{bound} |")
    for row in result["rows"]:
        cost = row.get("storage")
        if cost is not None and row["workload"] != "consume":
            print(f"storage, {row['workload']} {row['message_bytes']} B: {cost['written_per_acked_byte_per_replica']:.2f} "
                  f"bytes written per acknowledged byte per replica, {cost['fdatasyncs_per_acked_mb']:.1f} "
                  f"fdatasyncs per acknowledged MB (all brokers)")
    for row in result["rows"]:
        if row.get("cpu"):
            print(f"cpu, {row['workload']} {row['message_bytes']} B: {_cpu(row['cpu'])}")
    print("\nlatency: produce = librdkafka's send-to-acknowledgement at full load (time queued in the client);"
          " consume (in 'both') = send time to receipt."
          "\nvs reference: produce against durable write / RF, consume against loopback TCP.")
    if result["latency"]:
        print(f"\nlatency at fixed load ({result['latency'][0]['message_bytes']} B, linger.ms={LATENCY_LINGER_MS}, "
              f"acks={result['acks']}); targets at 50%: p50 <= {LATENCY_TARGETS_MS['p50']:g} ms, "
              f"p99 <= {LATENCY_TARGETS_MS['p99']:g} ms, p99.9 <= {LATENCY_TARGETS_MS['p99.9']:g} ms\n")
        print("| load | msgs/s asked / done | samples | ack p50 / p99 / p99.9 / max ms | end-to-end p50 / p99 / p99.9 ms "
              "| result | CPU |")
        print("|---|---:|---:|---:|---:|---|---|")
        for row in result["latency"] + result.get("latency_default_linger", []):
            ack, e2e = row["ack_ms"], row["e2e_ms"]
            linger = "" if row["linger_ms"] == LATENCY_LINGER_MS else f", linger.ms={row['linger_ms']} (default)"
            print(f"| {row['load']:.0%} of peak{linger} | {row['rate_msgs_s']:,.0f} / {row['achieved_msgs_s']:,.0f} | "
                  f"{row['samples']:,} | {ack['p50']:.1f} / {ack['p99']:.1f} / {ack['p99.9']:.1f} / {ack['max']:.1f} | "
                  f"{e2e['p50']:.1f} / {e2e['p99']:.1f} / {e2e['p99.9']:.1f} | {row.get('verdict', '-')} | "
                  f"{_cpu(row.get('cpu'))} |")
        print("\nCPU: how busy the whole machine was during the row (brokers, load generators, anything else) and "
              "the cores the brokers used together; a latency taken on a saturated machine is mostly queueing "
              "for a core (bench/README.md, \"Why it misses\").")


def _cpu(cpu: dict | None) -> str:
    if not cpu:
        return "-"
    brokers = "" if cpu["brokers_cores"] is None else f"brokers {cpu['brokers_cores']:.2f} cores, "
    return f"{brokers}machine {cpu['machine_busy']:.0%} busy of {cpu['cores']} cores"


def _latency(latency: dict) -> str:
    return "-" if not latency else f"{latency['p50']:.1f} / {latency['p99']:.1f}"


def write_chart(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = result["rows"]
    labels = [f"{r['workload']}\n{r['message_bytes']} B" for r in rows]
    produce = [r["produce"]["mb_s"] if r["produce"] else 0 for r in rows]
    consume = [r["consume"]["mb_s"] if r["consume"] else 0 for r in rows]
    x = range(len(rows))
    latency = result["latency"]
    fig, axes = plt.subplots(1, 2 if latency else 1, figsize=(max(6, len(rows) * 1.2) + (5 if latency else 0), 4),
                             squeeze=False, gridspec_kw={"width_ratios": [max(2, len(rows)), 2][:2 if latency else 1]})
    ax = axes[0][0]
    ax.bar([i - 0.2 for i in x], produce, 0.4, label="produce")
    ax.bar([i + 0.2 for i in x], consume, 0.4, label="consume")
    ax.axhline(PRODUCER_TARGET_MB_S * result["producers"], color="C0", linestyle="--", linewidth=1,
               label="50 MB/s per producer")
    ax.axhline(CONSUMER_TARGET_MB_S * result["consumers"], color="C1", linestyle="--", linewidth=1,
               label="100 MB/s per consumer")
    ax.axhline(result["reference"]["durable_write_per_replica_mb_s"], color="C0", linestyle=":", linewidth=1,
               label="durable write / RF")
    ax.set_xticks(list(x), labels)
    ax.set_ylabel("MB/s")
    ax.set_title(f"raftka bench: {result['setup']}", fontsize=9)
    ax.legend(fontsize=7)
    if latency:
        ax = axes[0][1]
        points = ("p50", "p99", "p99.9")
        shown = latency + result.get("latency_default_linger", [])
        width = 0.8 / len(shown)
        for j, row in enumerate(shown):
            ax.bar([i + (j - (len(shown) - 1) / 2) * width for i in range(len(points))],
                   [row["ack_ms"][p] for p in points], width,
                   label=f"ack at {row['load']:.0%} of peak, linger.ms={row['linger_ms']}")
        ax.set_xticks(range(len(points)), points)
        ax.set_yscale("log")
        ax.set_ylabel("ms")
        ax.set_title("latency at fixed load", fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# ---- main ---------------------------------------------------------------------------------

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="raftka bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="1 KiB messages, 32 MiB per workload (under a minute)")
    parser.add_argument("--nodes", type=int, default=3, help="brokers to start (default 3; RF = min(nodes, 3))")
    parser.add_argument("--bootstrap", help="benchmark a running cluster instead (host:port[,...])")
    parser.add_argument("--workloads", default=",".join(WORKLOADS), help="comma-separated of produce,consume,both")
    parser.add_argument("--sizes", default="100,1024,16384", help="message sizes in bytes, comma-separated")
    parser.add_argument("--partitions", type=int, default=6)
    parser.add_argument("--producers", type=int, default=1, help="producer processes per workload")
    parser.add_argument("--consumers", type=int, default=1, help="consumer processes per workload")
    amount = parser.add_mutually_exclusive_group()
    amount.add_argument("--volume-mib", type=int, help="data per workload (default 256, --quick 64)")
    amount.add_argument("--duration-s", type=float, help="produce for this long per workload instead of a volume")
    parser.add_argument("--acks", choices=("all", "1", "0"), default="all")
    parser.add_argument("--fsync", choices=("always", "interval", "never"), default="always",
                        help="the brokers' fsync policy (default always: acks=all means fdatasync'd on a majority; "
                             "never: acknowledged from the page cache)")
    parser.add_argument("--replication-factor", type=int, help="default min(brokers, 3)")
    parser.add_argument("--no-latency", action="store_true", help="skip the latency-at-fixed-load phase")
    parser.add_argument("--out", type=Path, default=Path("bench/results"), help="where cluster.json and .png go")
    args = parser.parse_args(argv)
    if args.quick:
        args.sizes = "1024" if args.sizes == parser.get_default("sizes") else args.sizes
    args.volume_mib = args.volume_mib or (64 if args.quick else 256)
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


def latency_size(args: argparse.Namespace) -> int:
    """Latency at fixed load is measured at 1 KiB, or the listed size nearest to it."""
    return min(args.size_list, key=lambda s: abs(s - 1024))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeElapsedColumn, TransferSpeedColumn
    volume = args.volume_mib << 20
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="raftka-bench-") as tmp, ExitStack() as stack:
        workdir = Path(tmp)
        args.brokers = None
        if args.bootstrap:
            bootstrap = args.bootstrap
            args.replication_factor = args.replication_factor or min(brokers_in(bootstrap), 3)
            setup = f"cluster at {args.bootstrap}, RF={args.replication_factor}, acks={args.acks}"
        else:
            print(f"starting {args.nodes} broker process(es)...", flush=True)
            brokers = stack.enter_context(LocalBrokers(workdir / "cluster", args.nodes, settings={"fsync": args.fsync},
                                                       metrics=True))
            args.brokers = brokers
            bootstrap = brokers.bootstrap()
            setup = (f"{args.nodes} broker{'s' if args.nodes > 1 else ''}, RF={args.replication_factor}, "
                     f"acks={args.acks}, fsync={args.fsync}")
        print("measuring this machine's reference (durable write, loopback TCP)...", flush=True)
        reference = measure_reference(workdir, volume, args.replication_factor)
        rows, latency, at_default_linger = [], [], []
        columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                   TimeElapsedColumn())
        with Progress(*columns) as progress:
            for size in args.size_list:
                for kind in args.workload_list:
                    rows.append(run_workload(args, bootstrap, kind, size, volume, progress))
            peak = next((r["produce"]["msgs_s"] for r in rows if r["workload"] == "produce"
                         and r["message_bytes"] == latency_size(args)), None)
            if peak and not args.no_latency:
                for load in LATENCY_LOADS:
                    latency.append(run_latency(args, bootstrap, latency_size(args), peak, load, progress))
                at_default_linger.append(run_latency(args, bootstrap, latency_size(args), peak, 0.5, progress,
                                                     linger_ms=DEFAULT_LINGER_MS))
    result = {"setup": setup, "nodes": None if args.bootstrap else args.nodes, "acks": args.acks,
              "fsync": None if args.bootstrap else args.fsync,
              "partitions": args.partitions, "producers": args.producers, "consumers": args.consumers,
              "volume_bytes": volume, "duration_s": args.duration_s, "quick": args.quick, "reference": reference,
              "generator": {"kind": "native (C loop over librdkafka)", "librdkafka": _librdkafka_version(),
                            "producer_settings": producer_settings("", args.acks),
                            "latency_linger_ms": LATENCY_LINGER_MS},
              "rows": rows, "latency": latency, "latency_default_linger": at_default_linger}
    (args.out / "cluster.json").write_text(json.dumps(result, indent=1))
    print_table(result)
    write_chart(result, args.out / "cluster.png")
    print(f"\nwrote {args.out / 'cluster.json'} and {args.out / 'cluster.png'}")
    return 0


def _librdkafka_version() -> str:
    import confluent_kafka
    return confluent_kafka.libversion()[0]


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
