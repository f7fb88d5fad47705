"""`raftka simulate`: the deterministic Raft simulation (raftka.replication.simulation)
over many seeds, as a command.

  raftka simulate [--seed N | --seeds N [--first-seed S]] [--steps N] [--nodes 3|5]
                  [--partitions N] [--faults F,F,...] [--plant BUG] [--json] [-v]

Exit status 0 when every seed held every invariant; 1 when one failed (the
sweep stops there, shrinks its step count by bisection and prints the
command that replays the shortest failing run); 2 for bad usage.

The names below are repeated from the simulation module (tests check they
agree) so that every other `raftka` command starts without importing it.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Any

FAULT_NAMES = ("kill", "partition", "oneway", "reorder", "duplicate", "drop", "foreign", "power", "disk-full",
               "clock")
PLANT_NAMES = ("forget-vote", "no-prevote", "drop-foreign-silently", "no-fsync", "dedupe-from-partial-window",
               "retention-by-own-clock", "count-vote-messages", "stock-snapshot", "heartbeat-refusals-accepted")
DEFAULT_STEPS = 400

DESCRIPTION = """\
Run the deterministic simulation: every node's real RaftNode (its scheduler,
coalesced heartbeats and journal syncs), partition replicas, metadata group,
Raft journals, segment files, LMDB index and vote store, under a fake clock
and an in-memory network with faults, all drawn from one seed. Invariants are checked after
every step (one leader per term, committed logs agree byte for byte,
acknowledged appends stay at their offsets, dense offsets, nothing readable
past the high watermark, foreign commands refused, no leader deposed by a
node cut off one way, acknowledged appends survive power losses); after healing, every node must hold every
acknowledged append in identical segment files. Same seed, same trace hash.

faults:
  kill       crash a node (SIGKILL: nothing in memory kept) and restart it from disk
  partition  cut a link both ways, heal it later
  oneway     for a stretch, a node receives nothing but its messages still go out
  reorder    random delays, so messages overtake each other
  duplicate  deliver a message twice
  drop       lose a message
  foreign    a peer sends append_entries holding a command the group does not declare
  power      one node, a minority or every node at once loses every byte it had
             not fdatasync'd (journal tails, segment bytes past the recovery
             point), then restarts
  disk-full  a node's disk fills: its segment writes fail with ENOSPC, it takes
             itself out of service (as a broker does) and restarts once freed
  clock      a node's wall clock jumps by up to a day either way, for a while:
             its retention decisions and its clients' batch timestamps follow it

plants (known bugs put in for the run, to show the checker catches them):
  forget-vote            a restarted node forgets its vote (PreVote off, elections racing)
  no-prevote             PreVote and leader stickiness off
  drop-foreign-silently  foreign entries from a peer accepted instead of refused
  no-fsync               a replica acknowledges journal entries before they are fdatasync'd
  dedupe-from-partial-window
                         idempotent producer state rebuilt from the log's last two segments only
  retention-by-own-clock every replica deletes segments by its own wall clock
  count-vote-messages    every response_vote message counted as a vote (as stock
                         pysyncobj does): needs --nodes 5 to show
  stock-snapshot         stock pysyncobj's commit on a snapshot chunk that installs nothing
  heartbeat-refusals-accepted
                         RaftNode takes a follower's refusal of a coalesced heartbeat for
                         an acceptance (its leader never falls back to append_entries)
"""


def _fault_list(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in FAULT_NAMES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"invalid fault {unknown[0] if unknown else text!r} (choose from {', '.join(FAULT_NAMES)})")
    return names


def add_command(commands: Any) -> None:
    parser = commands.add_parser("simulate", help="run the deterministic Raft simulation over many seeds",
                                 description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    seeds = parser.add_mutually_exclusive_group()
    seeds.add_argument("--seed", type=int, help="run this one seed (default 0)")
    seeds.add_argument("--seeds", type=int, metavar="N", help="run seeds 0..N-1 (from --first-seed)")
    parser.add_argument("--first-seed", type=int, default=0, metavar="S", help="with --seeds: start at S (default 0)")
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS,
                        help=f"fault steps of 10 ms fake time per seed, before healing (default {DEFAULT_STEPS})")
    parser.add_argument("--nodes", type=int, choices=(3, 5), default=3, help="nodes per group (default 3)")
    parser.add_argument("--partitions", type=int, default=1, metavar="N",
                        help="independent partition groups on the same nodes (default 1)")
    parser.add_argument("--faults", type=_fault_list, default=list(FAULT_NAMES),
                        metavar="{" + ",".join(FAULT_NAMES) + "}[,...]",
                        help="comma-separated (default: all)")
    parser.add_argument("--plant", choices=PLANT_NAMES, help="inject a known bug for the run")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of lines")
    parser.add_argument("-v", "--verbose", action="store_true", help="a line per seed, and the code's warnings")
    parser.set_defaults(simulate=run)


def _seeds(args: argparse.Namespace) -> range:
    if args.seeds is not None:
        return range(args.first_seed, args.first_seed + args.seeds)
    seed = 0 if args.seed is None else args.seed
    return range(seed, seed + 1)


def run(args: argparse.Namespace) -> int:
    problems = [text for bad, text in ((args.steps < 1, "--steps must be at least 1"),
                                       (args.partitions < 1, "--partitions must be at least 1"),
                                       (args.seeds is not None and args.seeds < 1, "--seeds must be at least 1"))
                if bad]
    if problems:
        print(f"raftka simulate: {problems[0]}", file=sys.stderr)
        return 2
    # quiet unless asked: the faults make the code log errors on purpose (a full disk fails a node)
    logging.basicConfig(level=logging.WARNING if args.verbose else logging.CRITICAL,
                        format="%(levelname)s %(name)s: %(message)s")
    from raftka.replication import simulation

    seeds = _seeds(args)
    faults = [name for name in FAULT_NAMES if name in set(args.faults)]
    single = len(seeds) == 1

    def report(result: Any) -> None:
        if args.json or not (single or args.verbose) or not result.ok:
            return
        print(f"seed {result.seed}: ok, trace {result.trace_hash}, {_count(result.acks, 'ack')}, "
              f"{_count(result.leader_changes, 'term')} led, {_count(result.one_way_episodes, 'one-way episode')}, "
              f"{result.foreign_refused} of {_count(result.foreign_injected, 'foreign entry', 'foreign entries')} "
              f"refused (the rest lost), {result.elapsed_s:.1f} s", flush=True)

    outcome = simulation.sweep(seeds, args.steps, args.nodes, faults, args.plant, args.partitions,
                               on_result=report)
    replay = None
    if outcome.failure is not None:
        shortest = outcome.shortest or outcome.failure
        replay = simulation.replay_command(shortest.seed, shortest.steps, args.nodes, args.partitions, faults,
                                           args.plant)
    if args.json:
        print(json.dumps(_as_json(args, seeds, faults, outcome, replay)))
        return 0 if outcome.ok else 1
    what = (f"{len(seeds)} seed{'s' if len(seeds) > 1 else ''} ({seeds.start}"
            f"{'-' + str(seeds.stop - 1) if len(seeds) > 1 else ''}) x {args.steps} steps, {args.nodes} nodes, "
            f"{args.partitions} partition{'s' if args.partitions > 1 else ''}, faults {','.join(faults)}"
            f"{', plant ' + args.plant if args.plant else ''}")
    if outcome.ok:
        print(f"raftka simulate: {what}: every invariant held ({outcome.elapsed_s:.1f} s)")
        return 0
    failure, shortest = outcome.failure, outcome.shortest or outcome.failure
    print(f"FAILED {failure.failure}")
    print(f"shortest failing run found: {shortest.steps} steps (bisection, {outcome.reruns} reruns): "
          f"{shortest.failure}")
    print(f"replay: {replay}")
    print(f"raftka simulate: {what}: seed {failure.seed} failed after {len(outcome.results) - 1} "
          f"passed ({outcome.elapsed_s:.1f} s)")
    return 1


def _count(number: int, one: str, many: str | None = None) -> str:
    return f"{number} {one if number == 1 else many or one + 's'}"


def _as_json(args: argparse.Namespace, seeds: range, faults: list[str], outcome: Any,
             replay: str | None) -> dict[str, Any]:
    failures = []
    if outcome.failure is not None:
        shortest = outcome.shortest or outcome.failure
        failures.append({"seed": outcome.failure.seed, "step": outcome.failure.failed_step,
                         "message": outcome.failure.failure, "shortest_steps": shortest.steps,
                         "shortest_message": shortest.failure, "reruns": outcome.reruns, "replay": replay})
    return {"ok": outcome.ok, "seeds": [seeds.start, seeds.stop - 1], "seeds_run": len(outcome.results),
            "steps": args.steps, "nodes": args.nodes, "partitions": args.partitions, "faults": faults,
            "plant": args.plant, "failures": failures,
            "trace_hashes": {str(r.seed): r.trace_hash for r in outcome.results},
            "results": [r.as_dict() for r in outcome.results], "elapsed_s": outcome.elapsed_s}
