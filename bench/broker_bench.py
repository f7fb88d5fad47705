"""Broker benchmark: confluent-kafka (librdkafka) against real Raftka broker
processes on this machine, compression off.

Setups: (a) one broker, acks=1; (b) three brokers (LocalBrokers, as `raftka cluster`), RF=3,
acks=all. Messages of 1 KiB and 100 B to a 3-partition topic. For each:
producer MB/s and msgs/s (first produce to the last delivery report), one
consumer reading it all back (assigned partitions, from offset 0), and the
produce latency (librdkafka's per-message latency) p50/p99 at half the
measured peak message rate, measured after a warm-up so that connecting and
InitProducerId are not counted. The CPU the client and the brokers used in
each phase says which side was the limit. The physical limit measured in the same run: a
raw sequential write of the same volume (in (b) every byte is written on
three nodes, twice each: Raft journal and log).

Run: python -m raftka.bench.broker_bench [--quick] [--volume-mib N] [--out DIR]
Writes broker.json and broker.png. The Python client's per-message produce()
call is part of what is measured, as for any Python producer.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

from raftka.bench.storage_bench import measure_raw_write, mb_s
from raftka.broker.local_cluster import LocalBrokers

PARTITIONS = 3
TOPIC = "bench"
WARMUP_MESSAGES = 300


def _brokers_cpu_s(brokers: LocalBrokers) -> float:
    """CPU seconds the brokers still running have used so far."""
    total = 0.0
    for node_id in brokers.node_ids:
        try:
            total += brokers.cpu_seconds(node_id)
        except OSError:
            continue   # exited
    return total


class CpuMeter:
    """CPU used during a phase, in cores: this client process (librdkafka's
    threads included) and the brokers. On 2 cores, client + brokers near 2
    means the machine, not one side, was the limit; a client near 1 core
    (the Python thread) means the load generator was."""

    def __init__(self, brokers: LocalBrokers) -> None:
        self._brokers_of = brokers

    def __enter__(self) -> "CpuMeter":
        usage = resource.getrusage(resource.RUSAGE_SELF)
        self._client = usage.ru_utime + usage.ru_stime
        self._brokers = _brokers_cpu_s(self._brokers_of)
        self._wall = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        wall = time.perf_counter() - self._wall
        usage = resource.getrusage(resource.RUSAGE_SELF)
        self.client_cores = (usage.ru_utime + usage.ru_stime - self._client) / wall
        self.broker_cores = (_brokers_cpu_s(self._brokers_of) - self._brokers) / wall

    def record(self, into: dict) -> dict:
        into.update(client_cores=round(self.client_cores, 2), broker_cores=round(self.broker_cores, 2))
        return into


def create_topic(bootstrap: str, replication_factor: int, topic: str = TOPIC, partitions: int = PARTITIONS) -> None:
    """Create the topic and wait until every partition has a leader."""
    from confluent_kafka.admin import AdminClient, NewTopic
    admin = AdminClient({"bootstrap.servers": bootstrap})
    admin.create_topics([NewTopic(topic, partitions, replication_factor)])[topic].result(60)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        found = admin.list_topics(topic, timeout=10).topics[topic].partitions
        if len(found) == partitions and all(p.leader >= 0 for p in found.values()):
            return
        time.sleep(0.1)
    raise TimeoutError("topic partitions have no leaders")


def producer(bootstrap: str, acks: str):
    from confluent_kafka import Producer
    return Producer({"bootstrap.servers": bootstrap, "acks": acks, "linger.ms": 5, "batch.size": 1_000_000,
                     "queue.buffering.max.kbytes": 512 * 1024, "queue.buffering.max.messages": 2_000_000,
                     "compression.type": "none", "enable.idempotence": acks == "all"})


def produce_waiting(client, topic: str, value: bytes, key: bytes, on_delivery=None) -> None:
    """produce(), waiting for room when librdkafka's queue is full."""
    while True:
        try:
            client.produce(topic, value=value, key=key, on_delivery=on_delivery)
            return
        except BufferError:
            client.poll(0.005)


def produce_peak(bootstrap: str, acks: str, size: int, count: int) -> dict:
    client = producer(bootstrap, acks)
    value = os.urandom(size)
    errors = []

    def delivered(error, _message) -> None:
        if error is not None:
            errors.append(error)
    started = time.perf_counter()
    for i in range(count):
        produce_waiting(client, TOPIC, value, b"%d" % (i % 1000), delivered)
        if i % 1000 == 0:
            client.poll(0)
    client.flush(300)
    seconds = time.perf_counter() - started
    if errors:
        raise RuntimeError(f"{len(errors)} produce errors, first: {errors[0]}")
    return {"seconds": seconds, "mb_s": mb_s(size * count, seconds), "msgs_s": count / seconds}


def produce_latency(bootstrap: str, acks: str, size: int, rate: float, seconds: float) -> dict:
    """Per-message latency at a steady `rate` messages per second, once the
    producer is connected and has its producer id (a cold start would put
    the first connections and InitProducerId into the tail)."""
    client = producer(bootstrap, acks)
    value = os.urandom(size)
    for i in range(WARMUP_MESSAGES):
        client.produce(TOPIC, value=value, partition=i % PARTITIONS)   # a connection to every leader
    client.flush(60)
    latencies: list[float] = []

    def delivered(error, message) -> None:
        if error is None:
            latencies.append(message.latency())
    count = int(rate * seconds)
    started = time.perf_counter()
    for i in range(count):
        due = started + i / rate
        delay = due - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        client.produce(TOPIC, value=value, on_delivery=delivered)
        client.poll(0)
    client.flush(120)
    latencies.sort()
    return {"rate_msgs_s": rate, "p50_ms": 1000 * latencies[len(latencies) // 2],
            "p99_ms": 1000 * latencies[int(len(latencies) * 0.99)], "messages": len(latencies)}


def consume_all(bootstrap: str, expected: int) -> dict:
    from confluent_kafka import Consumer, TopicPartition
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "bench", "enable.auto.commit": False,
                         "fetch.max.bytes": 64 * 1024 * 1024, "max.partition.fetch.bytes": 16 * 1024 * 1024,
                         "fetch.wait.max.ms": 100})
    consumer.assign([TopicPartition(TOPIC, p, 0) for p in range(PARTITIONS)])
    got = size = 0
    started = time.perf_counter()
    deadline = started + 300
    while got < expected and time.perf_counter() < deadline:
        for message in consumer.consume(10000, 0.5):
            if message.error() is None:
                got += 1
                size += len(message.value())
    seconds = time.perf_counter() - started
    consumer.close()
    if got < expected:
        raise RuntimeError(f"consumed {got} of {expected}")
    return {"seconds": seconds, "mb_s": mb_s(size, seconds), "msgs_s": got / seconds}


def run_setup(workdir: Path, nodes: int, size: int, volume_bytes: int, latency_s: float) -> dict:
    acks = "1" if nodes == 1 else "all"
    count = volume_bytes // size
    shutil.rmtree(workdir, ignore_errors=True)
    with LocalBrokers(workdir, nodes) as brokers:
        bootstrap = brokers.bootstrap()
        create_topic(bootstrap, min(nodes, 3))
        with CpuMeter(brokers) as cpu:
            produce = produce_peak(bootstrap, acks, size, count)
        cpu.record(produce)
        with CpuMeter(brokers) as cpu:
            consume = consume_all(bootstrap, count)
        cpu.record(consume)
        latency = produce_latency(bootstrap, acks, size, produce["msgs_s"] / 2, latency_s)
    shutil.rmtree(workdir, ignore_errors=True)
    return {"setup": f"{nodes} broker{'s' if nodes > 1 else ''}, acks={acks}", "nodes": nodes,
            "message_bytes": size, "messages": count, "produce": produce, "consume": consume, "latency": latency}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m raftka.bench.broker_bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--volume-mib", type=int, default=None)
    args = parser.parse_args(argv)
    volume = (args.volume_mib or (16 if args.quick else 256)) * 1024 * 1024
    latency_s = 3.0 if args.quick else 10.0
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="raftka-broker-bench-") as tmp:
        workdir = Path(tmp)
        raw = measure_raw_write(workdir / "raw", bytearray(os.urandom(1024 * 1024)), volume // (1024 * 1024))
        (workdir / "raw").unlink(missing_ok=True)
        for nodes in (1, 3):
            for size in (1024, 100):
                row = run_setup(workdir / "brokers", nodes, size, volume if size > 100 else volume // 4, latency_s)
                rows.append(row)
                print(f"{row['setup']:<22} {size:>5} B: produce {row['produce']['mb_s']:7.1f} MB/s "
                      f"{row['produce']['msgs_s']:9.0f} msg/s | consume {row['consume']['mb_s']:7.1f} MB/s "
                      f"{row['consume']['msgs_s']:9.0f} msg/s | p99 {row['latency']['p99_ms']:.1f} ms "
                      f"at {row['latency']['rate_msgs_s']:.0f} msg/s", flush=True)
    result = {"volume_bytes": volume, "raw_write_mb_s": raw, "rows": rows, "quick": args.quick}
    (args.out / "broker.json").write_text(json.dumps(result, indent=1))
    print_table(result)
    write_chart(rows, args.out / "broker.png")
    print(f"\nwrote {args.out / 'broker.json'} and {args.out / 'broker.png'}")
    return 0


def print_table(result: dict) -> None:
    print(f"\nraw sequential write of the same volume: {result['raw_write_mb_s']:.0f} MB/s\n")
    print("| setup | message | produce MB/s | produce msg/s | consume MB/s | consume msg/s "
          "| p50 / p99 ms at half peak | CPU cores client/brokers: produce, consume |")
    print("|---|---:|---:|---:|---:|---:|---:|---|")
    for r in result["rows"]:
        p, c = r["produce"], r["consume"]
        print(f"| {r['setup']} | {r['message_bytes']} B | {p['mb_s']:.1f} | {p['msgs_s']:.0f} "
              f"| {c['mb_s']:.1f} | {c['msgs_s']:.0f} "
              f"| {r['latency']['p50_ms']:.1f} / {r['latency']['p99_ms']:.1f} "
              f"| {p['client_cores']:.2f}/{p['broker_cores']:.2f}, {c['client_cores']:.2f}/{c['broker_cores']:.2f} |")


def write_chart(rows: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    labels = [f"{r['nodes']}n {r['message_bytes']}B" for r in rows]
    x = range(len(rows))
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.bar([i - 0.2 for i in x], [r["produce"]["mb_s"] for r in rows], 0.4, label="produce")
    ax.bar([i + 0.2 for i in x], [r["consume"]["mb_s"] for r in rows], 0.4, label="consume")
    ax.set_xticks(list(x), labels)
    ax.set_ylabel("MB/s")
    ax.set_title("Raftka broker, confluent-kafka clients")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
