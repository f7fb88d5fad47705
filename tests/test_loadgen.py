"""The native load generator of `raftka bench`: its sampler, its pacing, its
percentiles, and real produce/consume runs against a broker process."""
from __future__ import annotations

import multiprocessing
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from raftka.bench import loadgen
from raftka.bench.broker_bench import create_topic
from raftka.native._loadgen import ffi, lib
from tests.broker_process import BrokerProcess


def sampler(capacity: int, every: int):
    values = ffi.new("uint32_t[]", capacity)
    return ffi.new("rk_lg_sampler *", {"values": values, "capacity": capacity, "every": every}), values


def test_sampler_keeps_every_nth_value_until_it_is_full():
    s, values = sampler(capacity=4, every=3)
    for value in range(20):
        lib.rk_lg_sample(s, value)
    assert s.seen == 20 and s.kept == 4
    assert list(ffi.unpack(values, 4)) == [0, 3, 6, 9]


def test_sampler_with_every_one_keeps_everything_it_has_room_for():
    s, values = sampler(capacity=100, every=1)
    for value in range(50):
        lib.rk_lg_sample(s, value * 7)
    assert s.kept == 50 and list(ffi.unpack(values, 50)) == [v * 7 for v in range(50)]


def test_pacing_allows_what_the_rate_has_made_due_and_no_more():
    assert lib.rk_lg_due(1000.0, 0.0, 0, 256) == 0            # nothing due at the start
    assert lib.rk_lg_due(1000.0, 0.0105, 0, 256) == 10         # 10.5 due: 10 whole messages
    assert lib.rk_lg_due(1000.0, 0.0105, 10, 256) == 0         # those already sent
    assert lib.rk_lg_due(1000.0, 0.5, 100, 256) == 256         # behind: catch up, one burst at a time
    assert lib.rk_lg_due(1000.0, 0.5, 600, 256) == 0           # ahead of the rate: wait


def test_unpaced_generators_send_a_full_burst():
    assert lib.rk_lg_due(0.0, 123.0, 10**9, 256) == 256


def test_percentiles_are_nearest_rank_in_milliseconds():
    samples = list(range(1, 1001))                               # 1..1000 us
    got = loadgen.percentiles(samples)
    assert got == {"p50": 0.5, "p99": 0.99, "p99.9": 0.999, "max": 1.0}
    assert loadgen.percentiles([7000]) == {"p50": 7.0, "p99": 7.0, "p99.9": 7.0, "max": 7.0}
    assert loadgen.percentiles([]) == {}


def test_the_generator_drives_the_librdkafka_confluent_kafka_loaded():
    path = loadgen.librdkafka_path()
    assert "librdkafka" in path


@pytest.fixture(scope="module")
def broker(tmp_path_factory):
    process = BrokerProcess(tmp_path_factory.mktemp("loadgen") / "data").start()
    yield process
    process.stop()


def test_native_producer_and_consumers_move_every_record_exactly_once(broker):
    create_topic(broker.bootstrap, 1, "native", 4)
    settings = {"bootstrap.servers": broker.bootstrap, "acks": "all", "linger.ms": 5, "compression.type": "none"}
    progress = multiprocessing.Value("q", 0)
    run = loadgen.produce(settings, "native", 300, 20_000, samples=1000, every=20, progress=progress)
    assert (run.messages, run.bytes, run.failed) == (20_000, 20_000 * 300, 0)
    assert len(run.latencies_us) == 1000 and progress.value == 20_000 * 300
    target, consumed = multiprocessing.Value("q", 20_000), multiprocessing.Value("q", 0)
    reading = {"bootstrap.servers": broker.bootstrap, "group.id": "g", "enable.auto.commit": False}
    with ThreadPoolExecutor(2) as pool:   # together, as bench processes do (the C loop drops the GIL)
        first, second = pool.map(lambda parts: loadgen.consume(reading, "native", parts, target, consumed, 60,
                                                                samples=50_000), ([0, 1], [2, 3]))
    assert first.messages + second.messages == 20_000 == consumed.value
    assert first.bytes + second.bytes == 20_000 * 300
    assert len(first.latencies_us) == first.messages       # every record carried its send time


def test_a_paced_producer_is_no_faster_than_its_rate(broker):
    create_topic(broker.bootstrap, 1, "paced", 1)
    settings = {"bootstrap.servers": broker.bootstrap, "acks": "1", "linger.ms": 1}
    started = time.monotonic()
    run = loadgen.produce(settings, "paced", 1024, 3000, rate=5000.0, samples=3000)
    assert run.messages == 3000 and len(run.latencies_us) == 3000
    assert time.monotonic() - started >= 3000 / 5000 * 0.95


def test_a_bad_setting_is_a_load_gen_error_not_a_crash():
    with pytest.raises(loadgen.LoadGenError, match="no.such.setting"):
        loadgen.produce({"no.such.setting": "1"}, "t", 10, 1)
