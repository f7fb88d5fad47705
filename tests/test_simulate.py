"""`raftka simulate` as a user runs it: a subprocess, its exit status, its
lines and its JSON; a planted bug fails with a replay command that fails
again; an unknown fault is refused."""
from __future__ import annotations

import json
import os
import shlex
import subprocess

from raftka import simulate_cli
from raftka.broker.local_cluster import raftka_command
from raftka.replication import simulation

TIMEOUT_S = 300


def simulate(*args: str, tmp_path) -> subprocess.CompletedProcess:
    env = dict(os.environ, TMPDIR=str(tmp_path))   # the runs' scratch directories
    return subprocess.run(raftka_command("simulate", *args), capture_output=True, text=True, timeout=TIMEOUT_S,
                          env=env)


def test_a_clean_sweep_exits_0_with_one_json_object_whose_hashes_replay_in_process(tmp_path):
    done = simulate("--seeds", "3", "--steps", "100", "--json", tmp_path=tmp_path)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["ok"] is True and report["failures"] == [] and report["seeds_run"] == 3
    assert report["seeds"] == [0, 2] and report["steps"] == 100 and report["nodes"] == 3
    assert report["faults"] == list(simulation.FAULT_NAMES) and report["plant"] is None
    assert set(report["trace_hashes"]) == {"0", "1", "2"} and report["elapsed_s"] > 0
    # another process, another hash seed: the same schedule, the same trace
    assert report["trace_hashes"]["0"] == simulation.run_seed(0, 100, root=tmp_path).trace_hash
    assert list(tmp_path.iterdir()) == []   # scratch removed


def test_a_planted_bug_exits_1_with_the_failing_seed_and_a_replay_command_that_fails_again(tmp_path):
    done = simulate("--seeds", "2", "--steps", "200", "--plant", "drop-foreign-silently", tmp_path=tmp_path)
    assert done.returncode == 1, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("FAILED seed 0, step ") and "foreign" in lines[0].lower()
    assert lines[1].startswith("shortest failing run found: ")
    replay = next(line for line in lines if line.startswith("replay: "))[len("replay: "):]
    words = shlex.split(replay)
    assert words[:4] == ["raftka", "simulate", "--seed", "0"] and words[-2:] == ["--plant", "drop-foreign-silently"]
    again = simulate(*words[2:], "--json", tmp_path=tmp_path)
    assert again.returncode == 1
    failure = json.loads(again.stdout)["failures"][0]
    assert failure["seed"] == 0 and "foreign" in failure["message"].lower()
    assert failure["replay"] == replay   # already the shortest found


def test_disk_full_and_clock_faults_run_and_an_unknown_fault_is_refused_with_one_line(tmp_path):
    done = simulate("--faults", "kill,disk-full,clock", "--seeds", "3", "--json", tmp_path=tmp_path)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["faults"] == ["kill", "disk-full", "clock"]
    bad = simulate("--faults", "gremlins", tmp_path=tmp_path)
    assert bad.returncode == 2 and "invalid fault 'gremlins'" in bad.stderr


def test_help_lists_the_plants_and_faults_as_choices(tmp_path):
    done = simulate("--help", tmp_path=tmp_path)
    assert done.returncode == 0
    assert ("--plant {forget-vote,no-prevote,drop-foreign-silently,no-fsync,dedupe-from-partial-window,"
            "retention-by-own-clock,count-vote-messages,stock-snapshot,heartbeat-refusals-accepted}") in done.stdout
    assert "{kill,partition,oneway,reorder,duplicate,drop,foreign,power,disk-full,clock}" in done.stdout
    assert "--nodes {3,5}" in done.stdout


def test_the_cli_names_agree_with_the_simulation():
    assert simulate_cli.FAULT_NAMES == simulation.FAULT_NAMES
    assert simulate_cli.PLANT_NAMES == tuple(simulation.PLANTS)
    assert simulate_cli.DEFAULT_STEPS == simulation.DEFAULT_STEPS
