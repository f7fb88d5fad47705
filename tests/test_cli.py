"""The operator CLI (`raftka topics|produce|consume|status`) as a user runs it:
subprocesses against a real broker process, including the error paths
(unknown topic, no broker, bad flags), and the broker's Prometheus endpoint."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from raftka.broker.local_cluster import raftka_command
from raftka.ports import free_ports
from tests.broker_process import BrokerProcess
from tests.test_cluster_startup import lone_broker  # noqa: F401 (a fixture)


def interruptible(argv: list[str], **options) -> subprocess.Popen:
    """A subprocess that Ctrl-C (SIGINT) reaches, as from a terminal, even when
    this test runs under a shell that started it in the background (which
    ignores SIGINT, and an ignored signal stays ignored across exec)."""
    import signal
    return subprocess.Popen(argv, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL), **options)

TIMEOUT_S = 60


@pytest.fixture(scope="module")
def broker(tmp_path_factory):
    process = BrokerProcess(tmp_path_factory.mktemp("cli") / "data", metrics_port=free_ports(1)[0])
    process.start()
    yield process
    process.stop()


def raftka(*args: str, stdin: str = "", bootstrap: str | None = None) -> subprocess.CompletedProcess:
    command = raftka_command(*args)
    if bootstrap is not None:
        command += ["--bootstrap", bootstrap]
    return subprocess.run(command, input=stdin, capture_output=True, text=True, timeout=TIMEOUT_S)


def test_topics_create_list_describe_and_delete(broker):
    created = raftka("topics", "create", "cli-topic", "--partitions", "3", "--config", "retention.ms=60000",
                     bootstrap=broker.bootstrap)
    assert created.returncode == 0, created.stderr
    listed = raftka("topics", "list", bootstrap=broker.bootstrap)
    assert "cli-topic\t3 partitions" in listed.stdout
    described = raftka("topics", "describe", "cli-topic", bootstrap=broker.bootstrap)
    assert described.returncode == 0
    assert len(re.findall(r"partition \d\tleader 1\treplicas 1\tisr 1", described.stdout)) == 3
    again = raftka("topics", "create", "cli-topic", bootstrap=broker.bootstrap)
    assert again.returncode == 1 and "TOPIC_ALREADY_EXISTS" in again.stderr
    deleted = raftka("topics", "delete", "cli-topic", bootstrap=broker.bootstrap)
    assert deleted.returncode == 0
    assert "cli-topic" not in raftka("topics", "list", bootstrap=broker.bootstrap).stdout


def test_produce_lines_with_keys_then_consume_them_back_in_order(broker):
    assert raftka("topics", "create", "lines", "-p", "2", bootstrap=broker.bootstrap).returncode == 0
    lines = [f"user-{i % 3}:event {i}" for i in range(30)]
    produced = raftka("produce", "lines", "--key-separator", ":", stdin="\n".join(lines) + "\n",
                      bootstrap=broker.bootstrap)
    assert produced.returncode == 0, produced.stderr
    assert "produced 30 records" in produced.stderr
    consumed = raftka("consume", "lines", "--from-beginning", "--print-key", "--key-separator", ":",
                      bootstrap=broker.bootstrap)
    assert consumed.returncode == 0, consumed.stderr
    got = consumed.stdout.splitlines()
    assert sorted(got) == sorted(lines)
    for user in ("user-0", "user-1", "user-2"):      # one key's records stay in order
        assert [g for g in got if g.startswith(user)] == [line for line in lines if line.startswith(user)]


def test_consume_from_an_offset_and_with_a_group_that_resumes(broker, tmp_path):
    assert raftka("topics", "create", "offsets", "-p", "1", bootstrap=broker.bootstrap).returncode == 0
    record = tmp_path / "blob.bin"
    record.write_bytes(b"whole file as one record")
    assert raftka("produce", "offsets", "--file", str(record), bootstrap=broker.bootstrap).returncode == 0
    assert raftka("produce", "offsets", stdin="a\nb\nc\n", bootstrap=broker.bootstrap).returncode == 0
    from_two = raftka("consume", "offsets", "--offset", "2", bootstrap=broker.bootstrap)
    assert from_two.stdout.splitlines() == ["b", "c"]
    first = raftka("consume", "offsets", "--group", "cli-group", "--from-beginning", "--max-messages", "2",
                   bootstrap=broker.bootstrap)
    assert first.stdout.splitlines() == ["whole file as one record", "a"]
    time.sleep(1)
    rest = raftka("consume", "offsets", "--group", "cli-group", bootstrap=broker.bootstrap)
    assert rest.stdout.splitlines() == ["b", "c"]


def test_status_shows_brokers_partitions_raft_terms_and_group_lag(broker):
    assert raftka("topics", "create", "watched", "-p", "1", bootstrap=broker.bootstrap).returncode == 0
    assert raftka("produce", "watched", stdin="1\n2\n3\n4\n", bootstrap=broker.bootstrap).returncode == 0
    assert raftka("consume", "watched", "--group", "laggy", "--from-beginning", "--max-messages", "1",
                  bootstrap=broker.bootstrap).returncode == 0
    status = raftka("status", bootstrap=broker.bootstrap)
    assert status.returncode == 0, status.stderr
    assert re.search(r"^  1\t127\.0\.0\.1:\d+  \(controller\)$", status.stdout, re.M)
    # topic, partition, leader, replicas, isr, high watermark, raft term (>= 1)
    assert re.search(r"^  watched\t0\t1\t1\t1\t4\t[1-9]\d*$", status.stdout, re.M), status.stdout
    assert re.search(r"^  laggy\twatched\t0\t1\t3$", status.stdout, re.M), status.stdout
    # broker, partitions it leads, partitions it is the preferred leader of: every one, alone
    leading = re.search(r"^leaders\tbroker\tleading\tpreferred\n  1\t(\d+)\t(\d+)$", status.stdout, re.M)
    assert leading and leading[1] == leading[2] and int(leading[1]) >= 1, status.stdout
    assert f"preferred-leader imbalance 0/{leading[1]}\n" in status.stdout, status.stdout


def test_leader_balance_counts_leaders_preferred_leaders_and_partitions_led_by_another():
    from raftka.admin import leader_balance
    partitions = [(1, [1, 2, 3]), (1, [2, 3, 1]), (3, [3, 1, 2]), (-1, [2, 1, 3])]   # 2 failed over; one leaderless
    counts, imbalanced = leader_balance(partitions, brokers=[1, 2, 3, 4])
    assert counts == {1: (2, 1), 2: (0, 2), 3: (1, 1), 4: (0, 0)}
    assert imbalanced == 2


def test_errors_are_said_plainly_with_exit_codes(broker):
    unknown = raftka("consume", "no-such-topic", bootstrap=broker.bootstrap)
    assert unknown.returncode == 1 and "unknown topic 'no-such-topic'" in unknown.stderr
    bad_name = raftka("topics", "create", "bad/name", bootstrap=broker.bootstrap)
    assert bad_name.returncode == 1 and "bad/name" in bad_name.stderr
    down = raftka("topics", "list", bootstrap=f"127.0.0.1:{free_ports(1)[0]}")
    assert down.returncode == 1 and "no broker answered" in down.stderr
    bad_flag = raftka("topics", "create", "x", "--partitions", "many", bootstrap=broker.bootstrap)
    assert bad_flag.returncode == 2 and "invalid int value" in bad_flag.stderr
    no_verb = raftka("topics")
    assert no_verb.returncode == 2
    bad_config = raftka("topics", "create", "x", "--config", "novalue", bootstrap=broker.bootstrap)
    assert bad_config.returncode == 2 and "key=value" in bad_config.stderr
    assert "--follow" in raftka("consume", "--help").stdout


def said_in_one_line(run: subprocess.CompletedProcess) -> bool:
    return run.returncode == 1 and len(run.stderr.strip().splitlines()) == 1 and "Traceback" not in run.stderr


@pytest.mark.parametrize("command", [["topics", "create", "t"], ["topics", "create", "t", "-p", "1", "-r", "1"],
                                     ["topics", "list"], ["topics", "describe"], ["topics", "describe", "t"],
                                     ["topics", "delete", "t"], ["produce", "t"], ["consume", "t"], ["status"],
                                     ["leaders", "elect"]])
def test_every_command_against_an_unreachable_broker_fails_in_one_line_within_its_timeout(command):
    started = time.monotonic()
    run = raftka(*command, "--timeout-s", "2", stdin="x\n", bootstrap=f"127.0.0.1:{free_ports(1)[0]}")
    assert said_in_one_line(run), run.stderr
    assert f"raftka {command[0]}: no broker answered at the bootstrap address" in run.stderr
    assert time.monotonic() - started < 30


def test_topics_create_times_out_in_one_line_against_a_broker_that_cannot_serve_yet(lone_broker):
    _process, bootstrap = lone_broker
    started = time.monotonic()
    run = raftka("topics", "create", "t", "-p", "1", "-r", "1", "--timeout-s", "3", bootstrap=bootstrap)
    assert said_in_one_line(run), run.stderr
    assert "creating topic 't'" in run.stderr and "elect the metadata leader" in run.stderr
    assert time.monotonic() - started < 30
    with_defaults = raftka("topics", "create", "t", "--timeout-s", "3", bootstrap=bootstrap)
    assert said_in_one_line(with_defaults), with_defaults.stderr
    assert raftka("topics", "create", "t", "--timeout-s", "0").returncode == 2   # not a timeout


def test_serve_on_a_port_already_taken_fails_in_one_line(tmp_path):
    import socket
    with socket.create_server(("127.0.0.1", 0)) as taken:
        run = raftka("serve", "--port", str(taken.getsockname()[1]), "--data-dir", str(tmp_path))
    assert said_in_one_line(run) and "raftka serve: " in run.stderr and "in use" in run.stderr, run.stderr


def test_the_metrics_endpoint_reports_traffic_terms_offsets_and_request_latency(broker):
    assert raftka("topics", "create", "metered", "-p", "1", bootstrap=broker.bootstrap).returncode == 0
    assert raftka("produce", "metered", stdin="x\ny\nz\n", bootstrap=broker.bootstrap).returncode == 0
    assert raftka("consume", "metered", "--from-beginning", bootstrap=broker.bootstrap).returncode == 0
    port = int(re.search(r"metrics on http://[\d.]+:(\d+)/metrics", broker.ready_line).group(1))
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    assert 'raftka_topic_records_in_total{topic="metered"} 3.0' in text
    assert 'raftka_topic_records_out_total{topic="metered"} 3.0' in text
    assert re.search(r'raftka_partition_high_watermark\{partition="0",topic="metered"\} 3\.0', text)
    assert re.search(r'raftka_partition_raft_term\{partition="0",topic="metered"\} [1-9]', text)
    assert 'raftka_request_seconds_count{api="Produce"}' in text
    assert "raftka_commit_seconds_count" in text
    assert "# TYPE raftka_peer_refused_frames_total counter" in text
    with pytest.raises(urllib.error.HTTPError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/other", timeout=10)


def test_raftka_bench_measures_a_running_cluster_and_writes_its_report(broker, tmp_path):
    import json
    run = subprocess.run(raftka_command("bench", "--bootstrap", broker.bootstrap, "--acks", "1",
                          "--sizes", "1024", "--volume-mib", "2", "--partitions", "2", "--consumers", "2",
                          "--out", str(tmp_path)), capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stderr[-2000:]
    report = json.loads((tmp_path / "cluster.json").read_text())
    assert (tmp_path / "cluster.png").stat().st_size > 0
    assert [r["workload"] for r in report["rows"]] == ["produce", "consume", "both"]
    consume = report["rows"][1]["consume"]
    assert consume["clients"] == 2 and consume["mb_s"] > 0 and consume["verdict"] in ("PASS", "MISS", "GEN-BOUND")
    assert "| produce | 1024 B | produce |" in run.stdout
    assert report["generator"]["kind"].startswith("native")
    latency = report["latency"]        # after the throughput phase: 25% and 50% of the measured peak
    peak = report["rows"][0]["produce"]["msgs_s"]
    assert [r["load"] for r in latency] == [0.25, 0.5]
    for row in latency:
        assert row["samples"] >= 100_000 and row["linger_ms"] == 1
        assert abs(row["rate_msgs_s"] - row["load"] * peak) < 1
        assert 0 < row["ack_ms"]["p50"] <= row["ack_ms"]["p99"] <= row["ack_ms"]["p99.9"] <= row["ack_ms"]["max"]
        assert row["e2e_ms"]["p50"] > 0
    for row in report["rows"] + latency:     # how busy the machine was; a --bootstrap cluster's brokers are not ours
        assert 0 < row["cpu"]["machine_busy"] <= 1 and row["cpu"]["brokers_cores"] is None
        assert row["cpu"]["cores"] == os.cpu_count()
    assert "% busy of" in run.stdout
    (default,) = report["latency_default_linger"]     # then 50% again at librdkafka's default linger.ms, no target
    assert default["load"] == 0.5 and default["linger_ms"] == 5 and default["samples"] >= 100_000
    assert "verdict" not in default and default["ack_ms"]["p50"] > 0
    assert "latency at fixed load" in run.stdout and "linger.ms=5 (default)" in run.stdout


def test_the_benchs_cpu_meter_sees_a_busy_core_and_the_brokers_own_work(broker):
    """The CPU column of `raftka bench`: a core kept busy shows in the machine's
    share, and producing to a broker this meter watches shows in its cores."""
    from confluent_kafka import Producer

    from raftka.bench.cluster_bench import CpuMeter
    meter = CpuMeter(broker.brokers)
    spinner = subprocess.Popen([sys.executable, "-c", "import time\nend = time.time() + 1.5\nwhile time.time() < end: pass"])
    producer = Producer({"bootstrap.servers": broker.bootstrap, "linger.ms": 1})
    for i in range(20_000):
        producer.produce("cpu-meter", b"x" * 512)
        if i % 1000 == 0:
            producer.poll(0)
    assert producer.flush(30) == 0
    spinner.wait(10)
    cpu = meter.stop()
    assert cpu["cores"] == os.cpu_count()
    assert cpu["machine_busy"] * cpu["cores"] >= 0.8     # the spinner alone keeps one core busy
    assert 0 < cpu["brokers_cores"] <= cpu["cores"]
    assert CpuMeter(None).stop()["brokers_cores"] is None


def test_raftka_bench_for_a_duration_reads_back_everything_the_producers_wrote(broker, tmp_path):
    import json
    run = subprocess.run(raftka_command("bench", "--bootstrap", broker.bootstrap, "--acks", "1",
                          "--sizes", "512", "--duration-s", "2", "--workloads", "both", "--partitions", "2",
                          "--out", str(tmp_path)), capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stderr[-2000:]
    row = json.loads((tmp_path / "cluster.json").read_text())["rows"][0]
    assert row["messages"] > 1000
    assert row["produce"]["msgs_s"] > 0 and row["consume"]["msgs_s"] > 0
    assert "2 s per workload" in run.stdout


def test_raftka_bench_refuses_bad_flags_and_reports_an_unreachable_cluster(tmp_path):
    bad = subprocess.run(raftka_command("bench", "--sizes", "big"), capture_output=True,
                         text=True, timeout=60)
    assert bad.returncode == 2 and "--sizes must be integers" in bad.stderr
    down = subprocess.run(raftka_command("bench", "--bootstrap", f"127.0.0.1:{free_ports(1)[0]}",
                           "--volume-mib", "1", "--out", str(tmp_path)), capture_output=True, text=True, timeout=180)
    assert down.returncode == 1 and "raftka bench failed" in down.stderr


def descendants(pid: int) -> set[int]:
    found, todo = set(), [pid]
    while todo:
        parent = todo.pop()
        for task in Path(f"/proc/{parent}/task").glob("*"):
            try:
                children = {int(c) for c in (task / "children").read_text().split()}
            except OSError:
                continue
            todo.extend(children - found)
            found |= children
    return found


def test_ctrl_c_stops_the_benchs_brokers_and_load_generators_and_removes_its_data(tmp_path):
    import signal
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    bench = interruptible(raftka_command("bench", "--quick", "--out", str(tmp_path / "out")),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "TMPDIR": str(scratch)})
    deadline = time.monotonic() + 60
    started: set[int] = set()
    while time.monotonic() < deadline and len(started) < 5:     # the cluster, its 3 brokers, a load generator
        started |= descendants(bench.pid)
        time.sleep(0.2)
    assert len(started) >= 5 and list(scratch.iterdir())
    bench.send_signal(signal.SIGINT)
    _out, err = bench.communicate(timeout=60)
    assert bench.returncode == 130 and "interrupted" in err
    time.sleep(1)
    assert not [pid for pid in started if Path(f"/proc/{pid}").exists()
                and "zombie" not in Path(f"/proc/{pid}/status").read_text()]
    assert not list(scratch.iterdir())


def test_consume_follow_prints_records_as_they_arrive_until_stopped(broker):
    import signal
    assert raftka("topics", "create", "followed", "-p", "1", bootstrap=broker.bootstrap).returncode == 0
    follower = interruptible(raftka_command("consume", "followed", "--follow", "--bootstrap", broker.bootstrap),
                             stdout=subprocess.PIPE, text=True)
    try:
        time.sleep(3)                    # subscribed at the end of the (empty) partition
        assert raftka("produce", "followed", stdin="late arrival\n", bootstrap=broker.bootstrap).returncode == 0
        assert follower.stdout.readline() == "late arrival\n"
        assert follower.poll() is None   # still following
    finally:
        follower.send_signal(signal.SIGINT)
        follower.wait(30)
