"""Leadership transfer time: from `transfer_leadership(target)` on the leader
to the first append the target acknowledges (committed, fdatasync'd on a
majority), three brokers in one process over real loopback sockets, one
partition group with the production Raft settings (raft_conf: election
timeout 1-2 s, heartbeat 0.25 s) and fsync=always. Each round hands the
leadership to the next member while a producer keeps appending to whoever
leads; median of --rounds.

With --kafka, also through the Kafka protocol on three `raftka serve`
processes (auto.leader.rebalance.enable off, one partition, RF=3): each
round SIGKILLs the preferred replica, restarts it, then sends ElectLeaders
while a confluent-kafka producer (acks=all, idempotent) keeps writing, and
measures the ElectLeaders round trip (answered once the preferred replica
leads) and the producer's longest gap between acknowledgements around it
(the NOT_LEADER_OR_FOLLOWER retry and metadata refresh included).
Writes bench/results/leader_transfer.json.

    python -m raftka.bench.leader_transfer_bench [--rounds 7] [--kafka]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from pathlib import Path

from raftka.config import Config
from raftka.ports import free_ports
from raftka.raft.group import NotLeaderError, ReplicationError
from raftka.raft.node import RaftNode
from raftka.raft.transport import PeerNetwork, PeerNetworkConfig
from raftka.records.batch import Record, build_batch
from raftka.replication import PartitionReplica
from raftka.storage.index import IndexStore
from raftka.storage.partition_log import PartitionLog

SECRET = b"raftka-bench-secret-16+"
GROUP = 1
RESULTS = Path(__file__).parent / "results" / "leader_transfer.json"
TRANSFER_TIMEOUT_S = 10.0


class Member:
    def __init__(self, root: Path, node_id: int, ports: dict[int, int]) -> None:
        self.root, self.node_id, self.ports = root / f"b{node_id}", node_id, ports
        self.index = IndexStore(self.root / "index.lmdb", 1 << 30)
        peers = {i: ("127.0.0.1", p) for i, p in ports.items() if i != node_id}
        self.node = RaftNode(PeerNetwork(PeerNetworkConfig(node_id=node_id, secret=SECRET, peers=peers,
                                                           listen_port=ports[node_id])))
        self.log = None

    async def start(self) -> None:
        await self.node.start()
        self.log = PartitionLog("t-0", self.root / "t-0", 0, self.index, Config(data_dir=self.root))
        self.node.add_group(PartitionReplica(GROUP, self.log, self.node_id, list(self.ports), self.node.network,
                                             self.root / "t-0.raft", journal_fsync=True))

    @property
    def replica(self) -> PartitionReplica:
        return self.node.group(GROUP)

    async def stop(self) -> None:
        await self.node.stop()
        self.log.close()
        self.index.close()


async def acknowledged_by(member: Member, batch: bytes, deadline: float) -> None:
    """Append through `member` until it acknowledges one (retrying while it is not yet leader)."""
    loop = asyncio.get_running_loop()
    while loop.time() < deadline:
        try:
            await asyncio.wait_for(member.replica.append(batch), deadline - loop.time())
            return
        except (NotLeaderError, ReplicationError):
            await asyncio.sleep(0.001)
    raise TimeoutError(f"node {member.node_id} acknowledged nothing in {TRANSFER_TIMEOUT_S} s")


async def measure(rounds: int) -> list[float]:
    batch = build_batch([Record(b"x" * 100, b"k", (), 1_700_000_000_000)])
    with tempfile.TemporaryDirectory() as root:
        ports = dict(zip((1, 2, 3), free_ports(3)))
        members = [Member(Path(root), i, ports) for i in ports]
        for member in members:
            await member.start()
        loop = asyncio.get_running_loop()
        try:
            leader = None
            while leader is None:
                await asyncio.sleep(0.05)
                leader = next((m for m in members if m.replica.leader_ready), None)
            times_s = []
            for _ in range(rounds):
                for _ in range(20):
                    await leader.replica.append(batch)
                target = members[(members.index(leader) + 1) % len(members)]
                started = time.perf_counter()
                leader.replica.transfer_leadership(target.node_id)
                leader.node.mark_active(GROUP)
                await acknowledged_by(target, batch, loop.time() + TRANSFER_TIMEOUT_S)
                times_s.append(time.perf_counter() - started)
                leader = target
            return times_s
        finally:
            for member in members:
                await member.stop()


def elect_leaders(port: int, topic: str) -> int:
    """ElectLeaders v2 (PREFERRED) of partition 0 to the broker on `port`; its error code."""
    import datetime
    import socket
    import struct
    from kio.index import load_request_schema
    from raftka.protocol import kafka
    schema = load_request_schema(kafka.ELECT_LEADERS, 2)
    body = schema(election_type=0, timeout=datetime.timedelta(seconds=10),
                  topic_partitions=(kafka.nested(schema, "TopicPartitions")(topic=topic, partitions=(0,)),))
    with socket.create_connection(("127.0.0.1", port), timeout=15) as sock:
        sock.sendall(kafka.encode_request(kafka.ELECT_LEADERS, 2, 1, body))
        head = sock.recv(4, socket.MSG_WAITALL)
        frame = sock.recv(struct.unpack(">i", head)[0], socket.MSG_WAITALL)
    response = kafka.decode_response(kafka.ELECT_LEADERS, 2, frame)
    return int(response.replica_election_results[0].partition_result[0].error_code)


def measure_kafka(rounds: int) -> list[tuple[float, float]]:
    """(ElectLeaders round trip, longest gap between acknowledgements) per round, seconds."""
    import threading
    from confluent_kafka import Producer
    from confluent_kafka.admin import AdminClient, NewTopic
    from raftka.broker.local_cluster import LocalBrokers
    topic = "transfer"
    with tempfile.TemporaryDirectory() as root:
        brokers = LocalBrokers(Path(root), nodes=3, settings={"auto_leader_rebalance_enable": False}).start()
        try:
            admin = AdminClient({"bootstrap.servers": brokers.bootstrap()})
            admin.create_topics([NewTopic(topic, 1, 3)])[topic].result(30)
            preferred = admin.list_topics(topic, timeout=10).topics[topic].partitions[0].replicas[0]
            producer = Producer({"bootstrap.servers": brokers.bootstrap(), "acks": "all", "linger.ms": 1,
                                 "enable.idempotence": True, "message.timeout.ms": 60_000})
            acks: list[float] = []
            stop = threading.Event()

            def produce() -> None:
                while not stop.is_set():
                    producer.produce(topic, b"x" * 100, partition=0,
                                     on_delivery=lambda e, m: e or acks.append(time.perf_counter()))
                    producer.poll(0.001)
            thread = threading.Thread(target=produce, daemon=True)
            thread.start()
            results = []
            for _ in range(rounds):
                brokers.kill(preferred)
                brokers.restart(preferred)
                deadline = time.monotonic() + 30
                while True:   # PREFERRED_LEADER_NOT_AVAILABLE while it catches up
                    started = time.perf_counter()
                    code = elect_leaders(brokers.port(preferred), topic)
                    answered = time.perf_counter()
                    if code == 0 or time.monotonic() > deadline:
                        break
                    time.sleep(0.05)
                time.sleep(2.0)   # acknowledgements after the transfer, for the gap
                around = [t for t in acks if started - 1.0 <= t <= answered + 2.0]
                gap = max((b - a for a, b in zip(around, around[1:])), default=float("nan"))
                results.append((answered - started, gap))
            stop.set()
            thread.join(10)
            producer.flush(30)
            return results
        finally:
            brokers.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--kafka", action="store_true", help="also measure through three raftka serve processes")
    args = parser.parse_args()
    times_s = asyncio.run(measure(args.rounds))
    result = {"rounds": len(times_s), "median_ms": round(statistics.median(times_s) * 1000, 2),
              "min_ms": round(min(times_s) * 1000, 2), "max_ms": round(max(times_s) * 1000, 2),
              "each_ms": [round(t * 1000, 2) for t in times_s],
              "what": "transfer_leadership() to the target's first acknowledged append, 3 members, fsync=always"}
    if args.kafka:
        kafka_rounds = measure_kafka(max(args.rounds // 2, 3))
        elect_s, gaps_s = [r[0] for r in kafka_rounds], [r[1] for r in kafka_rounds]
        result["kafka"] = {"rounds": len(kafka_rounds),
                           "elect_leaders_median_ms": round(statistics.median(elect_s) * 1000, 1),
                           "elect_leaders_each_ms": [round(t * 1000, 1) for t in elect_s],
                           "producer_ack_gap_median_ms": round(statistics.median(gaps_s) * 1000, 1),
                           "producer_ack_gap_each_ms": [round(t * 1000, 1) for t in gaps_s],
                           "what": "ElectLeaders round trip, and confluent-kafka's longest gap between acks around it"}
        print(f"through Kafka: ElectLeaders answered in {result['kafka']['elect_leaders_median_ms']} ms median, "
              f"longest producer ack gap {result['kafka']['producer_ack_gap_median_ms']} ms median")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(f"leadership transfer to first acknowledged append: median {result['median_ms']} ms "
          f"({result['min_ms']}-{result['max_ms']} ms) over {len(times_s)} rounds")


if __name__ == "__main__":
    main()
