"""A broker whose disk fills while it replicates (a real tmpfs of a few MiB
under one of three real broker processes): it takes itself out of service
with one CRITICAL line instead of hanging or dropping its peer connections
over and over, every produce is answered (acknowledged by the other two, or
an error the client retries), and the other two keep committing: no
acknowledged record is lost."""
from __future__ import annotations

import os
import subprocess

import pytest

from raftka.broker.local_cluster import LocalBrokers
from tests.test_broker_failover import TOPIC, produce, records_on_disk
from tests.test_broker_failover import wait_for as wait_until


@pytest.fixture
def brokers_with_a_small_disk(tmp_path):
    brokers = LocalBrokers(tmp_path, nodes=3, settings={"lmdb_map_size_bytes": 1 << 20, "segment_bytes": 1 << 20})
    data = brokers.node_dir(3) / "data"
    data.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(data)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield brokers.start()
    finally:
        brokers.stop()
        subprocess.run(["umount", "-l", str(data)], check=False)


def test_a_follower_whose_disk_fills_leaves_and_the_others_keep_every_acknowledged_record(brokers_with_a_small_disk):
    from confluent_kafka import Producer
    from confluent_kafka.admin import AdminClient, NewTopic
    brokers = brokers_with_a_small_disk
    admin = AdminClient({"bootstrap.servers": brokers.bootstrap()})
    admin.create_topics([NewTopic(TOPIC, 1, 3)])[TOPIC].result(30)
    producer = Producer({"bootstrap.servers": brokers.bootstrap([1, 2]), "acks": "all", "linger.ms": 5,
                         "enable.idempotence": True, "message.timeout.ms": 120_000})
    acked: dict[tuple[int, int], bytes] = {}
    for round_ in range(12):            # ~12 MiB through a 6 MiB disk
        produce(producer, 0, 1000, acked, f"r{round_}-" + "x" * 1000)
    wait_until(lambda: "out of service" in brokers.log_tail(3, 200), "node 3 to take itself out of service")
    log = brokers.log_tail(3, 400)
    assert "No space left" in log or "ENOSPC" in log, log
    assert brokers.alive(3)             # out of service, not crashed: it answers clients with an error
    produce(producer, 0, 200, acked, "after")
    last = max(offset for _, offset in acked)
    for node_id in (1, 2):
        wait_until(lambda: max(records_on_disk(brokers, node_id, 0), default=-1) >= last,
                   f"node {node_id} to hold every acknowledged record")
        on_disk = records_on_disk(brokers, node_id, 0)
        missing = [o for (_, o), v in acked.items() if on_disk.get(o) != v]
        assert not missing, f"node {node_id} lacks acknowledged records {missing[:5]}"
    assert len(acked) == 12 * 1000 + 200 and os.path.ismount(brokers.node_dir(3) / "data")
