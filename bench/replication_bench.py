"""Replication benchmark: committed throughput of a 3-process RF=3 cluster on
this machine, next to the references measured in the same run.

  ours     3 engine/replication/control_node.py processes, one partition, a client process keeping
           `in_flight` appends outstanding through the control port; MB/s of
           appends acknowledged as committed (applied on the leader)
  stock    pysyncobj 0.3.17 as shipped (pickle+zlib TCP transport, FileJournal,
           its tick thread) on the same workload, load driven inside the leader
  storage  single-node PartitionLog.append of the same batches (no replication)
  raw      sequential os.write of the same volume, three files at once (what
           three replicas' logs cost the disk)
Also: peak RSS (VmHWM) of every node after the largest run, and an idle
cluster of many partition groups: CPU per node and the time until every
group has a live leader again after SIGKILL of one node.

Writes a table to stdout and JSON + PNG under --out (bench/results/).
Run: python -m bench.replication_bench [--quick] [--volume-mib N] [--groups N]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from raftka.bench.storage_bench import batch_of_size, mb_s, open_log
from raftka.ports import free_ports
from raftka.replication.control_node import ControlClient
from raftka.replication.local_nodes import LocalCluster

MIB = 1024 * 1024


def drop_dirty_pages() -> None:
    os.sync()


async def _leader(clients: dict[int, ControlClient], partition: int = 0, timeout_s: float = 60) -> int:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for client in clients.values():
            try:
                leader = (await client.status())["partitions"][str(partition)]["leader"]
            except ConnectionError:
                continue
            if leader is not None:
                return leader
        await asyncio.sleep(0.05)
    raise TimeoutError("no leader elected")


async def _drive(cluster: LocalCluster, batch: bytes, volume_bytes: int, in_flight: int) -> dict:
    clients = {n: await ControlClient.connect(m.control_port) for n, m in cluster.members.items()}
    try:
        leader = clients[await _leader(clients)]
        count = max(1, volume_bytes // len(batch))
        slots = asyncio.Semaphore(in_flight)
        errors = 0

        async def one() -> None:
            nonlocal errors
            async with slots:
                error, _, _ = await leader.append(0, batch)
                errors += error != 0
        started = time.perf_counter()
        await asyncio.gather(*(one() for _ in range(count)))
        seconds = time.perf_counter() - started
        return {"seconds": seconds, "bytes": (count - errors) * len(batch), "errors": errors}
    finally:
        for client in clients.values():
            await client.close()


def run_ours(workdir: Path, batch: bytes, volume_bytes: int, in_flight: int) -> dict:
    drop_dirty_pages()
    cluster = LocalCluster(workdir / "ours", nodes=3, partitions=1)
    cluster.start()
    try:
        result = asyncio.run(_drive(cluster, batch, volume_bytes, in_flight))
        result["peak_rss_bytes"] = {n: m.peak_rss_bytes() for n, m in cluster.members.items()}
        result["cpu_seconds"] = {n: m.cpu_seconds() for n, m in cluster.members.items()}
    finally:
        cluster.stop()
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


async def _all_led(clients: dict[int, ControlClient], alive: set[int], groups: int) -> bool:
    for node_id in sorted(alive):
        try:
            status = await clients[node_id].status()
        except ConnectionError:
            continue
        leaders = [v["leader"] for v in status["partitions"].values()]
        return len(leaders) == groups and all(leader in alive for leader in leaders)
    return False


def run_idle_groups(workdir: Path, groups: int, idle_s: float) -> dict:
    drop_dirty_pages()
    cluster = LocalCluster(workdir / "idle", nodes=3, partitions=groups)
    started = time.monotonic()
    cluster.start()

    async def scenario() -> dict:
        clients = {n: await ControlClient.connect(m.control_port) for n, m in cluster.members.items()}
        alive = set(cluster.members)
        while not await _all_led(clients, alive, groups):
            if time.monotonic() - started > 300:
                raise TimeoutError("groups not all led after 300 s")
            await asyncio.sleep(0.5)
        ready_s = time.monotonic() - started
        await asyncio.sleep(2.0)
        before = {n: m.cpu_seconds() for n, m in cluster.members.items()}
        await asyncio.sleep(idle_s)
        cpu = {n: (m.cpu_seconds() - before[n]) / idle_s * 100 for n, m in cluster.members.items()}
        status = await clients[1].status()
        led_by_victim = sum(1 for v in status["partitions"].values() if v["leader"] == 1)
        await clients[1].close()
        del clients[1]
        cluster.kill(1)
        killed = time.monotonic()
        alive.discard(1)
        while not await _all_led(clients, alive, groups):
            if time.monotonic() - killed > 120:
                raise TimeoutError("groups not all re-led after 120 s")
            await asyncio.sleep(0.05)
        reelect_s = time.monotonic() - killed
        for client in clients.values():
            await client.close()
        return {"groups": groups, "ready_s": ready_s, "idle_cpu_percent": cpu,
                "groups_led_by_killed_node": led_by_victim, "all_groups_led_again_s": reelect_s}
    try:
        return asyncio.run(scenario())
    finally:
        cluster.stop()
        shutil.rmtree(workdir / "idle", ignore_errors=True)


async def _failover_once(cluster: LocalCluster) -> float:
    clients = {n: await ControlClient.connect(m.control_port) for n, m in cluster.members.items()}
    batch = batch_of_size(1024)
    try:
        victim = await _leader(clients)
        await clients[victim].close()
        del clients[victim]
        cluster.kill(victim)
        killed = time.monotonic()
        while time.monotonic() - killed < 60:
            try:
                leader = await _leader(clients, timeout_s=0.2)
            except TimeoutError:
                continue
            if leader in clients:
                error, _, _ = await clients[leader].append(0, batch)
                if error == 0:
                    return time.monotonic() - killed
            await asyncio.sleep(0.02)
        raise TimeoutError("no append accepted within 60 s of the kill")
    finally:
        for client in clients.values():
            await client.close()


def run_failover(workdir: Path, rounds: int) -> list[float]:
    """Seconds from SIGKILL of the leader to the first append a new leader accepts."""
    cluster = LocalCluster(workdir / "failover", nodes=3, partitions=1)
    cluster.start()
    times = []
    try:
        for _ in range(rounds):
            times.append(asyncio.run(_failover_once(cluster)))
            for node_id, member in cluster.members.items():
                if not member.alive:
                    cluster.restart(node_id)
            time.sleep(3)
    finally:
        cluster.stop()
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
    parser = argparse.ArgumentParser(prog="python -m bench.replication_bench", description=__doc__.split("\n\n")[0])
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
        idle = run_idle_groups(workdir, groups, idle_s=10.0)
    result = {"rows": rows, "failover_s": failover, "failover_median_s": statistics.median(failover),
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
    print(f"\nleader SIGKILL -> first append accepted by the new leader: median {result['failover_median_s']:.2f} s "
          f"({', '.join(f'{s:.2f}' for s in result['failover_s'])})")
    print(f"{idle['groups']} idle groups RF=3: CPU of one core {cpu}; all led {idle['ready_s']:.1f} s after start; "
          f"after SIGKILL of node 1 ({idle['groups_led_by_killed_node']} groups led by it) every group had a live "
          f"leader again in {idle['all_groups_led_again_s']:.2f} s")


if __name__ == "__main__":
    sys.exit(main())
