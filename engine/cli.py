"""The `raftka` command line.

  raftka serve [--config F] [--host H] [--port P] [--data-dir D]
                                       a Kafka broker: single node on 127.0.0.1:9092
                                       with ./raftka-data by default; a cluster member
                                       with a TOML config (RAFTKA_* variables override)
  raftka cluster [--nodes N] [--base-port P] [--data-dir D]
                                       a local N-process cluster until Ctrl-C
  raftka bench [--quick] [--out DIR]   storage engine benchmark (the main job
                                       until the cluster benchmark lands)
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from pathlib import Path

from engine.config import Config, ConfigError, load_config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="raftka", description="Raftka: a Raft-replicated, Kafka-compatible event log")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.add_parser("bench", help="run the benchmark (raftka bench --help)", add_help=False)
    serve = commands.add_parser("serve", help="run a Kafka broker")
    serve.add_argument("--config", type=Path, help="TOML file of Config settings")
    serve.add_argument("--host", help=f"Kafka listener address (default {Config.host})")
    serve.add_argument("--port", type=int, help=f"Kafka listener port, 0 = any (default {Config.port})")
    serve.add_argument("--data-dir", type=Path, help=f"(default {Config.data_dir})")
    cluster = commands.add_parser("cluster", help="run a local multi-process cluster")
    cluster.add_argument("--nodes", type=int, default=3)
    cluster.add_argument("--base-port", type=int, default=Config.port, help="node i listens on base + i - 1")
    cluster.add_argument("--data-dir", type=Path, default=Path("./raftka-cluster"))
    args, rest = parser.parse_known_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.command in ("serve", "cluster") and rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if args.command == "serve":
        from engine.broker.broker import serve as serve_broker
        flags = {k: v for k, v in (("host", args.host), ("port", args.port), ("data_dir", args.data_dir)) if v is not None}
        try:
            config = load_config(args.config, **flags)
        except ConfigError as error:
            parser.error(str(error))
        asyncio.run(serve_broker(config))
        return 0
    if args.command == "cluster":
        from engine.broker.local_cluster import run_cluster
        if not 1 <= args.nodes <= 9:
            parser.error("--nodes must be in [1, 9]")
        return run_cluster(args.nodes, args.base_port, args.data_dir)
    if args.command == "bench":
        from bench.storage_bench import main as bench_main
        return bench_main(rest)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    parser.print_help()
    return 2


if __name__ == "__main__":
    sys.exit(main())
