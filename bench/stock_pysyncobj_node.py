"""One node of the comparison cluster: pysyncobj 0.3.17 as shipped (its TCP
transport with pickle + zlib, FileJournal, its own tick thread), whose
replicated method appends the batches to a PartitionLog as ours does.

The node that is leader once all three are up drives the load itself (so the
stock side pays no client hop, which favours it) and writes its result as
JSON to --result. Run by bench/replication_bench.py; stopped by PID.
"""
from __future__ import annotations

import argparse
import json
import threading
import time
from pathlib import Path

from pysyncobj import SyncObj, SyncObjConf, replicated

from raftka.bench.storage_bench import batch_of_size, open_log


class StockReplica(SyncObj):
    def __init__(self, self_address: str, others: list[str], directory: Path) -> None:
        self.index, self.log = open_log(directory / "log")
        conf = SyncObjConf(journalFile=str(directory / "journal"), fullDumpFile=str(directory / "dump"),
                           raftMinTimeout=1.0, raftMaxTimeout=2.0)
        super().__init__(self_address, others, conf)

    @replicated
    def append(self, batches: bytes) -> int:
        result = self.log.append(batches)
        self.log.set_high_watermark(self.log.log_end_offset)
        return result.base_offset


def drive(node: StockReplica, batch: bytes, volume_bytes: int, in_flight: int) -> dict:
    slots = threading.Semaphore(in_flight)
    done = threading.Event()
    count = max(1, volume_bytes // len(batch))
    state = {"acked": 0, "failed": 0}
    lock = threading.Lock()

    def acknowledged(result: object, error: int) -> None:
        with lock:
            state["acked" if error == 0 else "failed"] += 1
            if state["acked"] + state["failed"] == count:
                done.set()
        slots.release()
    start = time.perf_counter()
    for _ in range(count):
        slots.acquire()
        node.append(batch, callback=acknowledged)
    done.wait(600)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "bytes": state["acked"] * len(batch), **state}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--self", required=True)
    parser.add_argument("--others", required=True)
    parser.add_argument("--dir", type=Path, required=True)
    parser.add_argument("--result", type=Path, required=True)
    parser.add_argument("--batch-bytes", type=int, required=True)
    parser.add_argument("--volume-bytes", type=int, required=True)
    parser.add_argument("--in-flight", type=int, default=16)
    args = parser.parse_args()
    node = StockReplica(args.self, args.others.split(","), args.dir)
    deadline = time.monotonic() + 60
    while node.getStatus()["leader"] is None and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(1.0)
    if node.getStatus()["leader"] == node.selfNode:   # stock pysyncobj: no adapter, no patches
        result = drive(node, batch_of_size(args.batch_bytes), args.volume_bytes, args.in_flight)
        args.result.write_text(json.dumps(result))
    while True:
        time.sleep(1)


if __name__ == "__main__":
    main()
