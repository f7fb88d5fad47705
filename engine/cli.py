"""The `raftka` command line.

  raftka serve [--host H] [--port P] [--data-dir D]
                                       a single-node Kafka broker (127.0.0.1:9092,
                                       ./raftka-data by default)
  raftka bench [--quick] [--out DIR]   storage engine benchmark (the main job
                                       until the cluster benchmark lands)
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from pathlib import Path

from engine.config import Config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="raftka", description="Raftka: a Raft-replicated, Kafka-compatible event log")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.add_parser("bench", help="run the benchmark (raftka bench --help)", add_help=False)
    serve = commands.add_parser("serve", help="run a Kafka broker")
    serve.add_argument("--host", default=Config.host, help="Kafka listener address (default %(default)s)")
    serve.add_argument("--port", type=int, default=Config.port, help="Kafka listener port, 0 = any (default %(default)s)")
    serve.add_argument("--data-dir", type=Path, default=Config.data_dir, help="(default %(default)s)")
    args, rest = parser.parse_known_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.command == "serve":
        if rest:
            parser.error(f"unrecognized arguments: {' '.join(rest)}")
        from engine.broker.broker import serve as serve_broker
        asyncio.run(serve_broker(Config(host=args.host, port=args.port, data_dir=args.data_dir)))
        return 0
    if args.command == "bench":
        from bench.storage_bench import main as bench_main
        return bench_main(rest)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    parser.print_help()
    return 2


if __name__ == "__main__":
    sys.exit(main())
