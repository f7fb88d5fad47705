"""Consumer groups in the embedded API: members of one group (in separate
threads) split the partitions and read every record once, separate groups
each read everything, committed offsets survive the consumer and a reopen of
the data directory, and a member that stops polling loses its partitions."""
from __future__ import annotations

import gc
import subprocess
import sys
import threading
import time
import warnings

import pytest

import raftka
from raftka.client.group_consumer import EmbeddedGroups
from raftka.errors import ClosedError, UnknownTopicOrPartitionError

PARTITIONS = 4
SETTINGS = {"group_initial_rebalance_delay_ms": 300, "group_min_session_timeout_ms": 500}


@pytest.fixture
def rk(tmp_path):
    handle = raftka.open(tmp_path / "data", **SETTINGS)
    handle.create_topic("events", partitions=PARTITIONS)
    yield handle
    handle.close()


def fill(rk, count: int, start: int = 0) -> list[bytes]:
    values = [b"v%d" % i for i in range(start, start + count)]
    rk.produce_batch("events", [raftka.Record(v, key=b"k%d" % (i % 9)) for i, v in enumerate(values)])
    return values


def drain(consumer, expected: int, timeout_s: float = 20.0) -> list:
    got, deadline = [], time.monotonic() + timeout_s
    while len(got) < expected and time.monotonic() < deadline:
        got.extend(consumer.poll(timeout_s=0.2))
    return got


def test_members_in_threads_split_the_partitions_and_read_every_record_once(rk):
    results: dict[int, tuple[list, list]] = {}
    joined, filled, done = threading.Barrier(3), threading.Event(), threading.Barrier(2)
    total = []

    def member(n: int) -> None:
        consumer = rk.consumer("queue", ["events"], session_timeout_s=6)
        deadline = time.monotonic() + 20
        while len(consumer.assignment()) != PARTITIONS // 2 and time.monotonic() < deadline:
            consumer.poll(timeout_s=0.1)
        joined.wait()
        filled.wait(20)
        got = []
        while len(total) < 400 and time.monotonic() < deadline + 20:
            batch = consumer.poll(timeout_s=0.2)
            got.extend(batch)
            total.extend(batch)
        owned = consumer.assignment()
        done.wait()                                      # nobody leaves before both have read
        results[n] = (got, owned)
        consumer.close()
    threads = [threading.Thread(target=member, args=(n,)) for n in range(2)]
    for t in threads:
        t.start()
    joined.wait(30)
    values = fill(rk, 400)
    filled.set()
    for t in threads:
        t.join(60)
    (got_a, owned_a), (got_b, owned_b) = results[0], results[1]
    assert len(owned_a) == len(owned_b) == PARTITIONS // 2
    assert not set(owned_a) & set(owned_b)
    assert sorted(r.value for r in got_a + got_b) == sorted(values)     # each record once
    assert {(r.topic, r.partition) for r in got_a} <= set(owned_a)


def test_two_groups_each_read_every_record(rk):
    values = fill(rk, 100)
    for group in ("audit", "billing"):
        consumer = rk.consumer(group, ["events"])
        assert sorted(r.value for r in drain(consumer, len(values))) == sorted(values)
        consumer.close()


def test_poll_with_no_timeout_returns_at_once_when_there_is_nothing(rk):
    consumer = rk.consumer("idle", ["events"])
    consumer.assignment()
    started = time.monotonic()
    assert consumer.poll(timeout_s=0) == []
    assert time.monotonic() - started < 0.5
    consumer.close()


def test_a_manual_commit_is_where_the_next_member_and_a_reopened_directory_resume(tmp_path):
    with raftka.open(tmp_path / "data", **SETTINGS) as rk:
        rk.create_topic("events", partitions=PARTITIONS)
        values = fill(rk, 200)
        first = rk.consumer("resume", ["events"], auto_commit=False)
        seen = drain(first, 200)
        first.commit()
        assert sum(first.committed().values()) == 200
        first.close()
        more = fill(rk, 50, start=200)
        second = rk.consumer("resume", ["events"], auto_commit=False)
        assert sorted(r.value for r in drain(second, 50)) == sorted(more)
        second.close()          # no commit: the next reader starts at 200 again
    with raftka.open(tmp_path / "data", **SETTINGS) as rk:
        third = rk.consumer("resume", ["events"])
        assert sorted(r.value for r in drain(third, 50)) == sorted(more)
        third.close()           # auto-commit on close
        assert sum(rk.consumer("resume", ["events"]).committed().values()) == 250
    assert sorted(r.value for r in seen) == sorted(values)


def test_a_member_that_stops_polling_loses_its_partitions_to_the_others(rk):
    fill(rk, 40)
    quiet = rk.consumer("liveness", ["events"], session_timeout_s=1)
    active_result: list = []

    def active_member() -> None:
        consumer = rk.consumer("liveness", ["events"], session_timeout_s=1)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and len(consumer.assignment()) < PARTITIONS:
            consumer.poll(timeout_s=0.1)
        active_result.append(consumer.assignment())
        consumer.close()
    quiet.poll(timeout_s=0)                # joins, then goes silent
    thread = threading.Thread(target=active_member)
    thread.start()
    thread.join(30)
    assert len(active_result[0]) == PARTITIONS


def test_a_subscription_to_an_unknown_topic_is_refused_at_once(rk):
    with pytest.raises(UnknownTopicOrPartitionError):
        rk.consumer("g", ["no-such-topic"])


def run_in_dev_mode(script: str, data_dir) -> subprocess.CompletedProcess:
    """Run script in a fresh interpreter in development mode (asyncio debug, every
    warning shown; ResourceWarning an error), data_dir as its argument."""
    return subprocess.run([sys.executable, "-X", "dev", "-W", "error::ResourceWarning", "-c", script, str(data_dir)],
                          capture_output=True, text=True, timeout=120)


SHUTDOWN_SCRIPT = """
import gc, sys, threading, raftka
with raftka.open(sys.argv[1], group_initial_rebalance_delay_ms=0) as rk:
    rk.create_topic("events", partitions=2)
    rk.produce_batch("events", [raftka.Record(b"v%d" % i, key=b"k%d" % i) for i in range(50)])
    first = rk.consumer("billing", ["events"], auto_commit_interval_s=0.05)
    got = []
    while len(got) < 50:
        got += first.poll(timeout_s=1)
    second = rk.consumer("audit", ["events"])       # left open: the handle closes it
    second.poll(timeout_s=0.5)
gc.collect()
print(len(got), sorted(t.name for t in threading.enumerate()))
with raftka.open(sys.argv[1]) as rk:
    committed = rk.consumer("billing", ["events"]).committed()
    print(sum(committed.values()))
"""


def test_closing_a_handle_with_consumers_stops_every_thread_and_task_without_warnings(tmp_path):
    result = run_in_dev_mode(SHUTDOWN_SCRIPT, tmp_path / "data")
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    records, committed = result.stdout.splitlines()
    assert records.split(" ", 1) == ["50", "['MainThread']"]
    assert int(committed) == 50  # the consumer the handle closed committed its positions


ITERATING_SHUTDOWN_SCRIPT = """
import gc, sys, threading, time, raftka
outcome = []
with raftka.open(sys.argv[1], group_initial_rebalance_delay_ms=0) as rk:
    rk.create_topic("events", partitions=2)
    rk.produce_batch("events", [raftka.Record(b"v%d" % i, key=b"k%d" % i) for i in range(50)])
    consumer = rk.consumer("billing", ["events"], auto_commit_interval_s=0.05)
    got, all_read = [], threading.Event()
    def iterate():
        try:
            for record in consumer:                 # the README's blocking loop
                got.append(record)
                if len(got) == 50:
                    all_read.set()
            outcome.append("ended")
        except BaseException as error:
            outcome.append(repr(error))
    worker = threading.Thread(target=iterate)
    worker.start()
    all_read.wait(30)
    time.sleep(0.3)                                 # an auto-commit is due when the worker wakes
worker.join(10)
gc.collect()
print(len(got), outcome, sorted(t.name for t in threading.enumerate()))
"""


def test_closing_a_handle_under_a_thread_iterating_a_consumer_ends_its_loop_without_errors_or_warnings(tmp_path):
    result = run_in_dev_mode(ITERATING_SHUTDOWN_SCRIPT, tmp_path / "data")
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert result.stdout.strip() == "50 ['ended'] ['MainThread']"


def test_a_consumer_used_after_its_handle_closed_raises_closed_error(tmp_path):
    with raftka.open(tmp_path / "data", **SETTINGS) as rk:
        rk.create_topic("events", partitions=PARTITIONS)
        consumer = rk.consumer("late", ["events"])
        consumer.assignment()
    with pytest.raises(ClosedError):
        consumer.poll()
    with pytest.raises(ClosedError):
        consumer.commit()
    with pytest.raises(ClosedError):
        rk.consumer("later", ["events"])


def test_a_groups_call_after_close_raises_closed_error_and_leaves_no_coroutine_unawaited(tmp_path):
    with raftka.open(tmp_path / "data", **SETTINGS) as rk:
        groups = EmbeddedGroups(rk)
        groups.close()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with pytest.raises(ClosedError):
                groups.call(groups.coordinator.tick)
            with pytest.raises(ClosedError):
                groups.run(groups.coordinator.join("g", "", "client", "/embedded", 1000, 1000, "consumer", ()))
            gc.collect()
        assert [str(w.message) for w in caught] == []
