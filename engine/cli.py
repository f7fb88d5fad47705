"""The `raftka` command line.

  raftka serve [--config F] [--host H] [--port P] [--data-dir D]
               [--tls-cert F --tls-key F [--tls-ca F]] [--sasl MECHANISMS]
               [--peer-tls-cert F --peer-tls-key F --peer-tls-ca F]
                                       a Kafka broker: single node on 127.0.0.1:9092
                                       with ./raftka-data by default; a cluster member
                                       with a TOML config (RAFTKA_* variables override)
  raftka cluster [--nodes N] [--base-port P] [--data-dir D] [--peer-tls-dir D]
                                       a local N-process cluster until Ctrl-C
  raftka bench [--quick] [--nodes N | --bootstrap B] ...
                                       the main job: a local cluster (or a running
                                       one) measured with Kafka clients against this
                                       machine's limits (raftka bench --help)
  raftka topics create|list|describe|delete, raftka produce, raftka consume,
  raftka status                        operator commands against any broker
                                       (--bootstrap, default 127.0.0.1:9092)
  raftka users add|list|delete, raftka acls add|list|remove
                                       users (SCRAM) and ACLs of a secured cluster
  raftka simulate [--seeds N] [--plant BUG] ...
                                       the deterministic Raft simulation over many
                                       seeds (raftka simulate --help)
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from pathlib import Path

from raftka.admin import add_commands as add_admin_commands
from raftka.admin import run as run_admin
from raftka.config import Config, ConfigError, load_config
from raftka.errors import RaftkaError
from raftka.security_cli import add_commands as add_security_commands
from raftka.simulate_cli import add_command as add_simulate_command


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
    cluster.add_argument("--peer-tls-dir", type=Path, help="TLS 1.3 between the nodes: raftka-node-<i>.pem/.key "
                         "and peer-ca.pem in this folder (default: authenticated frames, not encrypted)")
    serve.add_argument("--metrics-port", type=int, help="serve Prometheus metrics on this port (default: off)")
    serve.add_argument("--tls-cert", help="PEM certificate (chain): the Kafka listener speaks TLS only")
    serve.add_argument("--tls-key", help="PEM private key of --tls-cert (if not in that file)")
    serve.add_argument("--tls-ca", help="PEM CA: clients must present a certificate it signed (mutual TLS)")
    serve.add_argument("--peer-tls-cert", help="PEM certificate of this broker, CN=raftka-node-<node_id>: "
                       "TLS 1.3 between brokers (required when a peer address is not loopback)")
    serve.add_argument("--peer-tls-key", help="PEM private key of --peer-tls-cert (if not in that file)")
    serve.add_argument("--peer-tls-ca", help="PEM CA that signed every broker's peer certificate")
    serve.add_argument("--sasl", metavar="MECHANISMS",
                       help="SASL mechanisms, e.g. SCRAM-SHA-512,SCRAM-SHA-256,PLAIN (default: off)")
    add_admin_commands(commands)
    add_security_commands(commands)
    add_simulate_command(commands)
    args, rest = parser.parse_known_args(argv)
    if args.command != "bench" and rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if hasattr(args, "run"):
        return run_admin(args)
    if hasattr(args, "simulate"):
        return args.simulate(args)
    if args.command != "serve":
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.command in ("serve", "cluster"):
        try:
            return _serve(args, parser) if args.command == "serve" else _cluster(args, parser)
        except (OSError, RaftkaError) as error:   # a port taken, a data directory locked or unwritable
            print(f"raftka {args.command}: {error}", file=sys.stderr)
            return 1
    if args.command == "bench":
        from raftka.bench.cluster_bench import run as bench_run
        return bench_run(rest)
    parser.print_help()
    return 2


def _serve(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from raftka.broker.broker import serve as serve_broker
    flags = {k: v for k, v in (("host", args.host), ("port", args.port), ("data_dir", args.data_dir),
                               ("metrics_port", args.metrics_port), ("tls_cert", args.tls_cert),
                               ("tls_key", args.tls_key), ("tls_ca", args.tls_ca),
                               ("peer_tls_cert", args.peer_tls_cert), ("peer_tls_key", args.peer_tls_key),
                               ("peer_tls_ca", args.peer_tls_ca),
                               ("sasl_mechanisms", args.sasl)) if v is not None}
    try:
        config = load_config(args.config, **flags)
    except ConfigError as error:
        parser.error(str(error))
    logging.basicConfig(level=logging.INFO,
                        format=f"%(asctime)s %(levelname)s node {config.node_id} %(name)s: %(message)s")
    try:
        asyncio.run(serve_broker(config))
    except ConfigError as error:   # e.g. TLS files that cannot be loaded
        parser.error(str(error))
    return 0


def _cluster(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from raftka.broker.local_cluster import run_cluster
    if not 1 <= args.nodes <= 9:
        parser.error("--nodes must be in [1, 9]")
    return run_cluster(args.nodes, args.base_port, args.data_dir, args.peer_tls_dir)


if __name__ == "__main__":
    sys.exit(main())
