"""Go's Kafka clients as Debian packages them (golang-github-shopify-sarama-dev,
golang-github-segmentio-kafka-go-dev; built offline in GOPATH mode with
golang-go), a protocol implementation that is neither librdkafka's nor
Python's, against a `raftka serve` process: sarama creates a topic, alters
its config (AlterConfigs v0), produces zstd batches (Produce v7, stored
compressed), consumes them (Fetch v10) and as a consumer group; kafka-go
reads partition metadata. (kafka-go 0.2's producer and fetcher speak
Produce v2 and message sets v1, which Kafka 4.0 removed and Raftka does not
serve either.)"""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from raftka.records.batch import iter_batches
from raftka.records.compression import Compression
from tests.broker_process import BrokerProcess

GO_SOURCE = Path(__file__).parent / "go"
DEBIAN_GOCODE = Path("/usr/share/gocode")
BUILD_TIMEOUT_S = 300
RUN_TIMEOUT_S = 120


@pytest.fixture(scope="module")
def go_check(tmp_path_factory) -> Path:
    """The raftkacheck program, built offline against the Debian packages."""
    assert shutil.which("go") and (DEBIAN_GOCODE / "src/github.com/Shopify/sarama").is_dir(), \
        "needs golang-go, golang-github-shopify-sarama-dev and golang-github-segmentio-kafka-go-dev (README's test command)"
    build = tmp_path_factory.mktemp("go")
    binary = build / "raftkacheck"
    env = {**os.environ, "GOPATH": f"{GO_SOURCE}:{DEBIAN_GOCODE}", "GO111MODULE": "off", "GOFLAGS": "",
           "GOCACHE": str(build / "cache"), "GOPROXY": "off"}
    built = subprocess.run(["go", "build", "-o", str(binary), "raftkacheck"], cwd=GO_SOURCE, env=env,
                           capture_output=True, text=True, timeout=BUILD_TIMEOUT_S)
    assert built.returncode == 0, built.stderr[-3000:]
    return binary


@pytest.fixture(scope="module")
def broker(tmp_path_factory):
    process = BrokerProcess(tmp_path_factory.mktemp("go-broker") / "data").start()
    yield process
    process.stop()


def test_sarama_admin_zstd_produce_consume_and_group_and_kafka_go_metadata(go_check, broker):
    run = subprocess.run([str(go_check), broker.bootstrap, "go-topic"], capture_output=True, text=True,
                         timeout=RUN_TIMEOUT_S)
    assert run.returncode == 0, run.stdout + run.stderr[-3000:]
    assert run.stdout.splitlines() == ["create: ok", "alter: ok", "produce: ok", "consume: 10", "group: 20",
                                       "kafka-go partitions: 2"]
    from confluent_kafka.admin import AdminClient, ConfigResource, ResourceType
    admin = AdminClient({"bootstrap.servers": broker.bootstrap})
    resource = ConfigResource(ResourceType.TOPIC, "go-topic")
    assert admin.describe_configs([resource])[resource].result(30)["retention.ms"].value == "3600000"
    stored = [header for data in broker.brokers.segment_files(1, "go-topic", 0).values()
              for header, _ in iter_batches(data)]
    assert stored and {h.compression for h in stored} == {Compression.ZSTD}
