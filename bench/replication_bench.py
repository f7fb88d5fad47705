"""Replication benchmark: committed throughput of a 3-broker RF=3 cluster on
this machine, next to the references measured in the same run.

  ours     3 `raftka serve` processes (LocalBrokers), one partition RF=3; a
           client keeps `in_flight` Produce requests (acks=all, one batch of
           the workload's size each) outstanding to the leader; MB/s of
           batches acknowledged as committed
  stock    pysyncobj 0.3.17 as shipped (pickle+zlib TCP transport, FileJournal,
           its tick thread) on the same workload, load driven inside the leader
  storage  single-node PartitionLog.append of the same batches (no replication)
  raw      sequential os.write of the same volume, three files at once (what
           three replicas' logs cost the disk)
Also: peak RSS (VmHWM) of every broker after the largest run; the time from
SIGKILL of a partition leader to the first Produce a survivor acknowledges;
and an idle cluster of many partitions: CPU per broker and the time until
every partition has a live leader again after SIGKILL of one broker.

Writes a table to stdout and JSON + PNG under --out (bench/results/).
Run: python -m raftka.bench.replication_bench [--quick] [--volume-mib N] [--groups N]
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import datetime
import itertools
import json
import os
import shutil
import signal
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from kio.index import load_request_schema
from kio.static.primitive import i16, i32

from raftka.bench.storage_bench import batch_of_size, mb_s, open_log
from raftka.broker.local_cluster import LocalBrokers
from raftka.errors import ErrorCode
from raftka.ports import free_ports
from raftka.protocol import kafka

MIB = 1024 * 1024
TOPIC = "replication-bench"
PRODUCE_VERSION = 3
METADATA_VERSION = 4
CLIENT_ID = "replication-bench"


def drop_dirty_pages() -> None:
    os.sync()


def produce_request(batch: bytes, correlation_id: int, topic: str = TOPIC, partition_index: int = 0) -> bytes:
    """A Produce v3 frame, acks=all, carrying `batch` to one partition of `topic`."""
    schema = load_request_schema(0, PRODUCE_VERSION)
    partition = kafka.nested(schema, "PartitionProduceData")(index=i32(partition_index), records=batch)
    topic_data = kafka.nested(schema, "TopicProduceData")(name=topic, partition_data=(partition,))
    body = schema(transactional_id=None, acks=i16(-1), timeout=datetime.timedelta(seconds=30),
                  topic_data=(topic_data,))
    return kafka.encode_request(0, PRODUCE_VERSION, correlation_id, body, client_id=CLIENT_ID)


class Connection:
    """One pipelined Kafka connection: requests go out at once, answers come back in order."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self._ids = itertools.count(1)
        self._pending: collections.deque[tuple[asyncio.Future, int, int]] = collections.deque()
        self._reading = asyncio.get_running_loop().create_task(self._read_forever())

    @classmethod
    async def open(cls, port: int) -> "Connection":
        reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 5)
        return cls(reader, writer)

    async def _read_forever(self) -> None:
        try:
            while True:
                size = struct.unpack(">i", await self.reader.readexactly(4))[0]
                data = await self.reader.readexactly(size)
                future, api_key, version = self._pending.popleft()
                body = kafka.decode_response(api_key, version, data)
                if not future.done():
                    future.set_result(body)
        except (asyncio.IncompleteReadError, OSError) as error:
            while self._pending:
                future = self._pending.popleft()[0]
                if not future.done():
                    future.set_exception(ConnectionError(f"broker closed the connection: {error}"))

    async def request(self, frame_of, api_key: int, version: int):
        """Send frame_of(correlation_id); the decoded response body."""
        future = asyncio.get_running_loop().create_future()
        self._pending.append((future, api_key, version))
        self.writer.write(frame_of(next(self._ids)))
        await self.writer.drain()
        return await future

    async def produce(self, batch: bytes, partition: int = 0) -> int:
        """The error code of one acks=all Produce of `batch`."""
        body = await self.request(lambda cid: produce_request(batch, cid, partition_index=partition), 0,
                                  PRODUCE_VERSION)
        return int(body.responses[0].partition_responses[0].error_code)

    async def metadata(self, topic: str = TOPIC) -> tuple[dict[int, int], int]:
        """(partition -> leader id (-1: none) of `topic`, the controller: the metadata group's
        leader), as this broker's metadata has them."""
        schema = load_request_schema(3, METADATA_VERSION)
        body = schema(topics=(kafka.nested(schema, "MetadataRequestTopic")(name=topic),),
                      allow_auto_topic_creation=False)
        response = await self.request(
            lambda cid: kafka.encode_request(3, METADATA_VERSION, cid, body, client_id=CLIENT_ID), 3, METADATA_VERSION)
        found = [t for t in response.topics if t.name == topic and int(t.error_code) == 0]
        return ({int(p.partition_index): int(p.leader_id) for t in found for p in t.partitions},
                int(response.controller_id))

    async def leaders(self, topic: str = TOPIC) -> dict[int, int]:
        return (await self.metadata(topic))[0]

    async def close(self) -> None:
        self._reading.cancel()
        self.writer.close()
        try:
            await self.writer.wait_closed()
        except OSError:
            pass


def start_brokers(directory: Path, partitions: int, settings: dict[str, object] | None = None) -> LocalBrokers:
    """Three brokers and TOPIC with `partitions` partitions, RF=3, created and led."""
    from confluent_kafka.admin import AdminClient, NewTopic
    brokers = LocalBrokers(directory, nodes=3, settings=settings).start()
    admin = AdminClient({"bootstrap.servers": brokers.bootstrap()})
    admin.create_topics([NewTopic(TOPIC, partitions, 3)], operation_timeout=300)[TOPIC].result(330)
    return brokers


async def _leaders(brokers: LocalBrokers, alive: list[int]) -> dict[int, int] | None:
    """partition -> leader, from the first live broker that answers; None if none does."""
    for node_id in alive:
        try:
            connection = await Connection.open(brokers.port(node_id))
        except (OSError, asyncio.TimeoutError):
            continue
        try:
            return await asyncio.wait_for(connection.leaders(), 5)
        except (ConnectionError, asyncio.TimeoutError):
            continue
        finally:
            await connection.close()
    return None


async def _wait_led(brokers: LocalBrokers, alive: list[int], partitions: int, timeout_s: float) -> None:
    """Until every partition has a leader among `alive`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        leaders = await _leaders(brokers, alive)
        if leaders and len(leaders) == partitions and all(leader in alive for leader in leaders.values()):
            return
        await asyncio.sleep(0.05)
    raise TimeoutError(f"not every partition had a live leader within {timeout_s} s")


async def _drive(brokers: LocalBrokers, batch: bytes, volume_bytes: int, in_flight: int) -> dict:
    await _wait_led(brokers, brokers.node_ids, 1, 60)
    leader = (await _leaders(brokers, brokers.node_ids))[0]
    connection = await Connection.open(brokers.port(leader))
    try:
        count = max(1, volume_bytes // len(batch))
        slots = asyncio.Semaphore(in_flight)
        errors = 0

        async def one() -> None:
            nonlocal errors
            async with slots:
                errors += await connection.produce(batch) != ErrorCode.NONE
        started = time.perf_counter()
        await asyncio.gather(*(one() for _ in range(count)))
        seconds = time.perf_counter() - started
        return {"seconds": seconds, "bytes": (count - errors) * len(batch), "errors": errors}
    finally:
        await connection.close()


def run_ours(workdir: Path, batch: bytes, volume_bytes: int, in_flight: int) -> dict:
    drop_dirty_pages()
    brokers = start_brokers(workdir / "ours", 1, {"max_batch_bytes": len(batch) + 1024})
    try:
        result = asyncio.run(_drive(brokers, batch, volume_bytes, in_flight))
        result["peak_rss_bytes"] = {n: brokers.peak_rss_bytes(n) for n in brokers.node_ids}
        result["cpu_seconds"] = {n: brokers.cpu_seconds(n) for n in brokers.node_ids}
    finally:
        brokers.stop()
        shutil.rmtree(workdir / "ours", ignore_errors=True)
    result["mb_s"] = mb_s(result["bytes"], result["seconds"])
    return result


def run_stock(workdir: Path, batch_bytes: int, volume_bytes: int, in_flight: int) -> dict:
    drop_dirty_pages()
    ports = free_ports(3)
    addresses = [f"127.0.0.1:{p}" for p in ports]
    result_path = workdir / "stock-result.json"
    processes = []
    try:
        for i, address in enumerate(addresses):
            directory = workdir / f"stock-{i}"
            directory.mkdir(parents=True)
            others = ",".join(a for a in addresses if a != address)
            processes.append(subprocess.Popen(
                [sys.executable, "-m", "raftka.bench.stock_pysyncobj_node", "--self", address, "--others", others,
                 "--dir", str(directory), "--result", str(result_path), "--batch-bytes", str(batch_bytes),
                 "--volume-bytes", str(volume_bytes), "--in-flight", str(in_flight)],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        deadline = time.monotonic() + 900
        while not result_path.exists() and time.monotonic() < deadline:
            if any(p.poll() is not None for p in processes):
                raise RuntimeError("a stock pysyncobj node exited")
            time.sleep(0.2)
        time.sleep(0.1)
        result = json.loads(result_path.read_text())
    finally:
        for p in processes:
            if p.poll() is None:
                os.kill(p.pid, signal.SIGKILL)
                p.wait()
        for i in range(3):
            shutil.rmtree(workdir / f"stock-{i}", ignore_errors=True)
        result_path.unlink(missing_ok=True)
    result["mb_s"] = mb_s(result["bytes"], result["seconds"])
    return result


def run_storage(workdir: Path, batch: bytes, volume_bytes: int) -> float:
    drop_dirty_pages()
    index, log = open_log(workdir / "storage")
    count = max(1, volume_bytes // len(batch))
    started = time.perf_counter()
    for _ in range(count):
        log.append(batch)
    seconds = time.perf_counter() - started
    log.close()
    index.close()
    shutil.rmtree(workdir / "storage", ignore_errors=True)
    return mb_s(count * len(batch), seconds)


def run_raw(workdir: Path, batch: bytes, volume_bytes: int) -> float:
    """Three writers of `volume_bytes` each at once; MB/s of one of them."""
    drop_dirty_pages()
    count = max(1, volume_bytes // len(batch))

    def write(path: Path) -> None:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        for _ in range(count):
            os.write(fd, batch)
        os.close(fd)
    threads = [threading.Thread(target=write, args=(workdir / f"raw-{i}",)) for i in range(3)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - started
    for i in range(3):
        (workdir / f"raw-{i}").unlink()
    return mb_s(count * len(batch), seconds)


def run_idle_groups(workdir: Path, groups: int, idle_s: float) -> dict:
    """CPU of idle brokers holding `groups` partitions RF=3, and re-election after SIGKILL of one."""
    drop_dirty_pages()
    started = time.monotonic()
    brokers = start_brokers(workdir / "idle", groups)

    async def scenario() -> dict:
        alive = brokers.node_ids
        await _wait_led(brokers, alive, groups, 300)
        ready_s = time.monotonic() - started
        await asyncio.sleep(2.0)
        before = {n: brokers.cpu_seconds(n) for n in alive}
        await asyncio.sleep(idle_s)
        cpu = {n: (brokers.cpu_seconds(n) - before[n]) / idle_s * 100 for n in alive}
        leaders = await _leaders(brokers, alive)
        led_by_victim = sum(1 for leader in leaders.values() if leader == 1)
        brokers.kill(1)
        killed = time.monotonic()
        await _wait_led(brokers, [2, 3], groups, 120)
        return {"groups": groups, "ready_s": ready_s, "idle_cpu_percent": cpu,
                "groups_led_by_killed_node": led_by_victim, "all_groups_led_again_s": time.monotonic() - killed}
    try:
        return asyncio.run(scenario())
    finally:
        brokers.stop()
        shutil.rmtree(workdir / "idle", ignore_errors=True)


async def _failover_once(brokers: LocalBrokers, partitions: int, kill_controller: bool) -> float | None:
    """Seconds from SIGKILL of a partition's leader to the first Produce to that partition a
    survivor acknowledges. `kill_controller`: the victim is the metadata group's leader too
    (None when it leads no partition this round)."""
    batch = batch_of_size(1024)
    await _wait_led(brokers, brokers.node_ids, partitions, 60)
    probe = await Connection.open(brokers.port(brokers.node_ids[0]))
    try:
        leaders, controller = await probe.metadata()
    finally:
        await probe.close()
    victim = controller if kill_controller else leaders[0]
    led = [p for p, leader in leaders.items() if leader == victim]
    if not led:   # the controller leads no partition now: move things around for the next round
        brokers.kill(victim)
        return None
    partition = led[0]
    survivors = [n for n in brokers.node_ids if n != victim]
    connections = {n: await Connection.open(brokers.port(n)) for n in survivors}
    try:
        brokers.kill(victim)
        killed = time.monotonic()
        while time.monotonic() - killed < 60:
            for connection in connections.values():   # whichever survivor leads now says NONE
                try:
                    if await asyncio.wait_for(connection.produce(batch, partition), 10) == ErrorCode.NONE:
                        return time.monotonic() - killed
                except (ConnectionError, asyncio.TimeoutError):
                    pass
            await asyncio.sleep(0.01)
        raise TimeoutError("no Produce acknowledged within 60 s of the kill")
    finally:
        for connection in connections.values():
            await connection.close()


def run_failover(workdir: Path, rounds: int, kill_controller: bool = False) -> list[float]:
    """Failover time per round; the killed broker restarts and rejoins between rounds."""
    partitions = 3 if kill_controller else 1
    brokers = start_brokers(workdir / "failover", partitions)
    times: list[float] = []
    try:
        for _ in range(rounds * 3):
            if len(times) == rounds:
                break
            seconds = asyncio.run(_failover_once(brokers, partitions, kill_controller))
            if seconds is not None:
                times.append(seconds)
            for node_id in brokers.node_ids:
                if not brokers.alive(node_id):
                    brokers.restart(node_id)
            time.sleep(3)
    finally:
        brokers.stop()
        shutil.rmtree(workdir / "failover", ignore_errors=True)
    return times


def write_chart(rows: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    labels = [row["workload"] for row in rows]
    series = [("raftka RF=3", "ours_mb_s"), ("stock pysyncobj RF=3", "stock_mb_s"),
              ("single-node append", "storage_mb_s"), ("raw write (x3 at once)", "raw_mb_s")]
    figure, axis = plt.subplots(figsize=(9, 4.5))
    width = 0.2
    for k, (name, key) in enumerate(series):
        axis.bar([i + k * width for i in range(len(rows))], [row[key] for row in rows], width, label=name)
    axis.set_xticks([i + 1.5 * width for i in range(len(rows))], labels)
    axis.set_ylabel("MB/s")
    axis.set_yscale("log")
    axis.set_title("Committed replication throughput, 3 processes on one 2-core machine")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m raftka.bench.replication_bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--quick", action="store_true", help="small volumes, 100 idle groups")
    parser.add_argument("--volume-mib", type=int, default=None, help="replicated volume per workload")
    parser.add_argument("--stock-volume-mib", type=int, default=None)
    parser.add_argument("--in-flight", type=int, default=16)
    parser.add_argument("--sizes-kib", type=lambda t: [int(x) for x in t.split(",")], default=[1024, 64],
                        help="append sizes in KiB, comma separated")
    parser.add_argument("--groups", type=int, default=None, help="idle partition groups")
    parser.add_argument("--rounds", type=int, default=None, help="leader-kill rounds")
    args = parser.parse_args(argv)
    volume = (args.volume_mib or (256 if args.quick else 2048)) * MIB
    stock_volume = (args.stock_volume_mib or (2 if args.quick else 4)) * MIB  # stock runs at ~0.1 MB/s
    groups = args.groups or (100 if args.quick else 1000)
    rounds = args.rounds or (3 if args.quick else 5)
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="raftka-repl-bench-") as scratch:
        workdir = Path(scratch)
        for size in (kib * 1024 for kib in args.sizes_kib):
            batch = batch_of_size(size)
            ours = run_ours(workdir, batch, volume, args.in_flight)
            stock = run_stock(workdir, size, stock_volume, args.in_flight)
            storage = run_storage(workdir, batch, volume)
            raw = run_raw(workdir, batch, volume)
            rows.append({"workload": f"{size // 1024} KiB appends", "batch_bytes": size, "volume_bytes": volume,
                         "ours_mb_s": ours["mb_s"], "stock_mb_s": stock["mb_s"], "storage_mb_s": storage,
                         "raw_mb_s": raw, "ours": ours, "stock": stock})
            print(f"{size // 1024:>5} KiB: ours {ours['mb_s']:.1f} MB/s, stock {stock['mb_s']:.1f} MB/s, "
                  f"storage {storage:.0f} MB/s, raw x3 {raw:.0f} MB/s", flush=True)
        failover = run_failover(workdir, rounds)
        failover_controller = run_failover(workdir, rounds, kill_controller=True)
        idle = run_idle_groups(workdir, groups, idle_s=10.0)
    result = {"rows": rows, "failover_s": failover, "failover_median_s": statistics.median(failover),
              "failover_with_controller_s": failover_controller,
              "failover_with_controller_median_s": statistics.median(failover_controller),
              "idle": idle, "in_flight": args.in_flight, "quick": args.quick}
    print_table(result)
    (args.out / "replication.json").write_text(json.dumps(result, indent=2))
    write_chart(rows, args.out / "replication.png")
    print(f"\nwrote {args.out / 'replication.json'} and {args.out / 'replication.png'}")
    return 0


def print_table(result: dict) -> None:
    print("\n| workload | raftka MB/s | stock pysyncobj MB/s | vs stock | single-node append MB/s | raw x3 MB/s | "
          "vs raw | peak RSS per node |")
    print("|---|---:|---:|---:|---:|---:|---:|---|")
    for row in result["rows"]:
        rss = "/".join(f"{v / 1e6:.0f}" for v in row["ours"]["peak_rss_bytes"].values())
        print(f"| {row['workload']} | {row['ours_mb_s']:.1f} | {row['stock_mb_s']:.1f} | "
              f"{row['ours_mb_s'] / row['stock_mb_s']:.1f}x | {row['storage_mb_s']:.0f} | {row['raw_mb_s']:.0f} | "
              f"{row['ours_mb_s'] / row['raw_mb_s']:.2f} | {rss} MB |")
    idle = result["idle"]
    cpu = ", ".join(f"node {n}: {v:.1f}%" for n, v in idle["idle_cpu_percent"].items())
    print(f"\nleader SIGKILL -> first Produce acknowledged by a survivor: median {result['failover_median_s']:.2f} s "
          f"({', '.join(f'{s:.2f}' for s in result['failover_s'])})")
    print(f"the same with the metadata leader as the victim: median {result['failover_with_controller_median_s']:.2f} s "
          f"({', '.join(f'{s:.2f}' for s in result['failover_with_controller_s'])})")
    print(f"{idle['groups']} idle groups RF=3: CPU of one core {cpu}; all led {idle['ready_s']:.1f} s after start; "
          f"after SIGKILL of node 1 ({idle['groups_led_by_killed_node']} groups led by it) every group had a live "
          f"leader again in {idle['all_groups_led_again_s']:.2f} s")


if __name__ == "__main__":
    sys.exit(main())
