"""Consumer-group benchmark: rebalance times and group consumption throughput.

Against 3 broker processes (RF=3; `--nodes 1` for one broker), with
confluent-kafka consumers:
- join: three members subscribe to a 6-partition topic at once; the time
  from the first subscribe to every member holding its partitions (Kafka's
  group.initial.rebalance.delay.ms, 3 s by default, is part of it, as it is
  with Kafka); median of several rounds, each a new group;
- leave: one of the three closes; the time until the other two hold all six
  partitions; median of the same rounds;
- throughput: 1 KiB records read by one group member, then by three members
  in separate processes (no shared GIL), MB/s from the first record to the
  last; the ratio of the two says how a group scales on this machine. The
  physical reference measured in the same run: a raw sequential read of the
  same volume from the page cache.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

from raftka.bench.broker_bench import create_topic, mb_s, produce_waiting, producer
from raftka.broker.local_cluster import LocalBrokers
from raftka.bench.storage_bench import measure_raw_write

TOPIC = "grouped"
PARTITIONS = 6
MESSAGE_BYTES = 1024
SESSION_MS = 10_000


def fill(bootstrap: str, count: int, acks: str) -> None:
    client = producer(bootstrap, acks)
    value = os.urandom(MESSAGE_BYTES)
    for i in range(count):
        produce_waiting(client, TOPIC, value, b"%d" % (i % 1000))
    if client.flush(300):
        raise RuntimeError("produce did not finish")


# ---- rebalance times ---------------------------------------------------------------

class Member:
    """A group member polling on its own thread; `owned` is its assignment."""

    def __init__(self, bootstrap: str, group: str) -> None:
        from confluent_kafka import Consumer
        self.owned: set[int] = set()
        self.consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": group, "session.timeout.ms": SESSION_MS,
                                  "heartbeat.interval.ms": 300, "enable.auto.commit": False})
        self.consumer.subscribe([TOPIC], on_assign=self._assigned, on_revoke=self._revoked)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def _assigned(self, _consumer, partitions) -> None:
        self.owned = {p.partition for p in partitions}

    def _revoked(self, _consumer, _partitions) -> None:
        self.owned = set()

    def _poll(self) -> None:
        while not self._stop.is_set():
            self.consumer.poll(0.05)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(10)
        self.consumer.close()


def covered(members: list[Member]) -> bool:
    owned = [m.owned for m in members]
    return all(owned) and sum(map(len, owned)) == PARTITIONS


def wait_covered(members: list[Member], timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not covered(members):
        if time.monotonic() > deadline:
            raise TimeoutError("the group did not settle")
        time.sleep(0.01)


def rebalance_round(bootstrap: str, group: str) -> tuple[float, float]:
    started = time.perf_counter()
    members = [Member(bootstrap, group) for _ in range(3)]
    try:
        wait_covered(members)
        joined = time.perf_counter() - started
        time.sleep(1.0)
        leaving = members.pop()
        started = time.perf_counter()
        leaving.close()
        wait_covered(members)
        left = time.perf_counter() - started
    finally:
        for m in members:
            m.close()
    return joined, left


# ---- throughput ----------------------------------------------------------------------

def member_process(bootstrap: str, group: str, total: int, consumed, first, last) -> None:
    """One group member in a process of its own: consume until the group as a
    whole (shared counter) has read `total` records."""
    from confluent_kafka import Consumer
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": group, "session.timeout.ms": SESSION_MS,
                         "auto.offset.reset": "earliest", "enable.auto.commit": False,
                         "fetch.max.bytes": 64 * 1024 * 1024, "max.partition.fetch.bytes": 16 * 1024 * 1024,
                         "fetch.wait.max.ms": 100})
    consumer.subscribe([TOPIC])
    deadline = time.monotonic() + 300
    while consumed.value < total and time.monotonic() < deadline:
        messages = [m for m in consumer.consume(10000, 0.2) if m.error() is None]
        if not messages:
            continue
        now = time.time()
        with consumed.get_lock():
            if first.value == 0:
                first.value = now
            consumed.value += len(messages)
            if consumed.value >= total:
                last.value = now
    consumer.close()


def group_throughput(bootstrap: str, group: str, members: int, total: int) -> dict:
    context = multiprocessing.get_context("spawn")
    consumed, first, last = context.Value("q", 0), context.Value("d", 0.0), context.Value("d", 0.0)
    processes = [context.Process(target=member_process, args=(bootstrap, group, total, consumed, first, last))
                 for _ in range(members)]
    for p in processes:
        p.start()
    for p in processes:
        p.join(360)
    if consumed.value < total or not last.value:
        raise RuntimeError(f"{members} member(s) consumed {consumed.value} of {total}")
    seconds = last.value - first.value
    return {"members": members, "seconds": seconds, "mb_s": mb_s(total * MESSAGE_BYTES, seconds),
            "msgs_s": total / seconds}


def measure_raw_read(path: Path, volume_bytes: int) -> float:
    """Sequential read of a file just written (page cache): MB/s."""
    buffer = bytearray(1 << 20)
    with open(path, "rb", buffering=0) as f:
        started = time.perf_counter()
        while f.readinto(buffer):
            pass
        return mb_s(volume_bytes, time.perf_counter() - started)


def run(nodes: int, rounds: int, volume_bytes: int, workdir: Path) -> dict:
    acks = "1" if nodes == 1 else "all"
    count = volume_bytes // MESSAGE_BYTES
    raw_path = workdir / "raw"
    raw_write = measure_raw_write(raw_path, bytearray(os.urandom(1 << 20)), volume_bytes >> 20)
    raw_read = measure_raw_read(raw_path, volume_bytes)
    raw_path.unlink()
    with LocalBrokers(workdir / "brokers", nodes) as brokers:
        bootstrap = brokers.bootstrap()
        create_topic(bootstrap, min(nodes, 3), TOPIC, PARTITIONS)
        times = []
        for i in range(rounds):
            times.append(rebalance_round(bootstrap, f"rebalance-{i}"))
            print(f"round {i + 1}/{rounds}: 3 joined in {times[-1][0]:.2f} s, one left and the rest "
                  f"took over in {times[-1][1]:.2f} s", flush=True)
        fill(bootstrap, count, acks)
        one = group_throughput(bootstrap, "alone", 1, count)
        print(f"1 member: {one['mb_s']:.1f} MB/s", flush=True)
        three = group_throughput(bootstrap, "trio", 3, count)
        print(f"3 members: {three['mb_s']:.1f} MB/s", flush=True)
    return {"nodes": nodes, "volume_bytes": volume_bytes, "raw_write_mb_s": raw_write, "raw_read_mb_s": raw_read,
            "join_s": [t[0] for t in times], "leave_s": [t[1] for t in times],
            "join_median_s": statistics.median(t[0] for t in times),
            "leave_median_s": statistics.median(t[1] for t in times),
            "one_member": one, "three_members": three, "ratio": three["mb_s"] / one["mb_s"]}


def print_table(r: dict) -> None:
    print(f"\n{r['nodes']} broker(s); reference: raw sequential read {r['raw_read_mb_s']:.0f} MB/s, "
          f"write {r['raw_write_mb_s']:.0f} MB/s of the same {r['volume_bytes'] >> 20} MiB\n")
    print("| measure | median | all rounds |")
    print("|---|---:|---|")
    print(f"| 3 members join (incl. 3 s initial delay) | {r['join_median_s']:.2f} s | "
          f"{', '.join(f'{t:.2f}' for t in r['join_s'])} |")
    print(f"| 1 of 3 leaves, the rest take over | {r['leave_median_s']:.2f} s | "
          f"{', '.join(f'{t:.2f}' for t in r['leave_s'])} |")
    print("\n| group | MB/s | msg/s | vs raw read |")
    print("|---|---:|---:|---:|")
    for key in ("one_member", "three_members"):
        t = r[key]
        print(f"| {t['members']} member(s) | {t['mb_s']:.1f} | {t['msgs_s']:.0f} | {t['mb_s'] / r['raw_read_mb_s']:.3f} |")
    print(f"\n3 members / 1 member: {r['ratio']:.2f}x")


def write_chart(r: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 4))
    left.boxplot([r["join_s"], r["leave_s"]], tick_labels=["3 join", "1 leaves"])
    left.set_ylabel("seconds")
    left.set_title("rebalance")
    right.bar(["1 member", "3 members"], [r["one_member"]["mb_s"], r["three_members"]["mb_s"]])
    right.set_ylabel("MB/s")
    right.set_title("group consumption, 1 KiB records")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m raftka.bench.groups_bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--volume-mib", type=int, default=256)
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="raftka-groups-bench-") as tmp:
        result = run(args.nodes, args.rounds, args.volume_mib << 20, Path(tmp))
    (args.out / "groups.json").write_text(json.dumps(result, indent=1))
    print_table(result)
    write_chart(result, args.out / "groups.png")
    print(f"\nwrote {args.out / 'groups.json'} and {args.out / 'groups.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
