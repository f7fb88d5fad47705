"""Three replication node processes on 127.0.0.1 (engine/replication/control_node.py): acknowledged
appends survive SIGKILL of the leader, a new leader takes appends and is
recorded in every survivor's cluster metadata, and the killed node rejoins
with segment files byte-identical to the others'."""
from __future__ import annotations

import asyncio
import time

from raftka.errors import ErrorCode
from raftka.records.batch import Record, build_batch, iter_batches, parse_records
from raftka.replication.control_node import ControlClient
from raftka.replication.local_nodes import LocalCluster

PARTITIONS = 3
DEADLINE_S = 30.0


class Appender:
    """Appends unique records to one partition through whichever node leads it."""

    def __init__(self, cluster: LocalCluster, partition: int) -> None:
        self.cluster, self.partition = cluster, partition
        self.acked: dict[int, bytes] = {}     # base offset -> payload
        self.count = 0
        self._clients: dict[int, ControlClient] = {}

    async def client(self, node_id: int) -> ControlClient | None:
        if node_id not in self._clients:
            if not self.cluster.members[node_id].alive:
                return None
            try:
                self._clients[node_id] = await ControlClient.connect(self.cluster.members[node_id].control_port)
            except OSError:
                return None
        return self._clients[node_id]

    async def leader(self) -> int | None:
        for node_id, member in self.cluster.members.items():
            client = await self.client(node_id)
            if client is None:
                continue
            try:
                status = await asyncio.wait_for(client.status(), 2)
            except (ConnectionError, asyncio.TimeoutError):
                self._clients.pop(node_id, None)
                continue
            leader = status["partitions"][str(self.partition)]["leader"]
            if leader is not None and self.cluster.members[leader].alive:
                return leader
        return None

    async def append_one(self, timeout_s: float = DEADLINE_S) -> float:
        """Append until acknowledged; returns when (monotonic) it was."""
        self.count += 1
        payload = f"p{self.partition}-{self.count}".encode()
        batch = build_batch([Record(payload, b"k")])
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            leader = await self.leader()
            client = await self.client(leader) if leader else None
            if client is None:
                await asyncio.sleep(0.05)
                continue
            try:
                error, base_offset, _ = await asyncio.wait_for(client.append(self.partition, batch), 12)
            except (ConnectionError, asyncio.TimeoutError):
                self._clients.pop(leader, None)
                continue
            if error == ErrorCode.NONE:
                self.acked[base_offset] = payload
                return time.monotonic()
            await asyncio.sleep(0.05)
        raise AssertionError(f"partition {self.partition}: no append acknowledged within {timeout_s} s")

    async def close(self) -> None:
        for client in self._clients.values():
            await client.close()


def records_on_disk(cluster: LocalCluster, node_id: int, partition: int) -> dict[int, bytes]:
    data = b"".join(cluster.segment_files(node_id, partition).values())
    return {r.offset: r.value for r in parse_records(data)}


async def wait_converged(appenders: list[Appender], cluster: LocalCluster) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while time.monotonic() < deadline:
        ends = set()
        for node_id in cluster.members:
            client = await appenders[0].client(node_id)
            status = await client.status()
            ends |= {(p, v["high_watermark"], v["log_end_offset"]) for p, v in status["partitions"].items()}
        if len(ends) == PARTITIONS:
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"replicas did not converge: {ends}")


async def recorded_leader(appender: Appender, node_id: int, wanted, timeout_s: float = 10.0) -> tuple[int, int]:
    """(leader, epoch) of the appender's partition in node_id's metadata, once `wanted(leader, epoch)`."""
    deadline = time.monotonic() + timeout_s
    client = await appender.client(node_id)
    while True:
        record = (await client.status())["metadata"]["topics"]["replicated"][appender.partition]
        if wanted(record["leader"], record["epoch"]):
            return record["leader"], record["epoch"]
        assert time.monotonic() < deadline, f"node {node_id} metadata still records {record}"
        await asyncio.sleep(0.05)


def test_leader_sigkill_loses_no_acknowledged_append_and_the_node_rejoins_byte_identical(tmp_path):
    cluster = LocalCluster(tmp_path, nodes=3, partitions=PARTITIONS)
    cluster.start()
    try:
        asyncio.run(_scenario(cluster))
        cluster.stop()
        for partition in range(PARTITIONS):
            files = [cluster.segment_files(n, partition) for n in cluster.members]
            assert files[0] and files[0] == files[1] == files[2], f"partition {partition} differs"
    finally:
        cluster.stop()


async def _scenario(cluster: LocalCluster) -> None:
    appenders = [Appender(cluster, p) for p in range(PARTITIONS)]
    try:
        for _ in range(20):
            await asyncio.gather(*(a.append_one() for a in appenders))
        victim = await appenders[0].leader()
        assert victim is not None
        before = await recorded_leader(appenders[0], victim, lambda leader, epoch: leader == victim)

        keep_going = True

        async def continuous(appender: Appender) -> None:
            while keep_going:
                await appender.append_one()
        background = [asyncio.create_task(continuous(a)) for a in appenders[1:]]
        cluster.kill(victim)
        killed_at = time.monotonic()
        acked_at = await appenders[0].append_one()
        failover_s = acked_at - killed_at
        for _ in range(20):
            await appenders[0].append_one()
        keep_going = False
        await asyncio.gather(*background)
        assert failover_s < DEADLINE_S
        # every survivor's metadata (the metadata group, replicated) names the new leader
        for node_id in cluster.members:
            if node_id != victim:
                await recorded_leader(appenders[0], node_id,
                                      lambda leader, epoch: leader not in (victim, -1) and epoch > before[1])

        cluster.restart(victim)
        await wait_converged(appenders, cluster)
        for appender in appenders:
            for node_id in cluster.members:
                on_disk = records_on_disk(cluster, node_id, appender.partition)
                missing = {o: p for o, p in appender.acked.items() if on_disk.get(o) != p}
                assert not missing, f"node {node_id} partition {appender.partition} lacks acked {missing}"
    finally:
        for appender in appenders:
            await appender.close()
