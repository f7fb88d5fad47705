"""The operator commands of the `raftka` CLI: topics, produce, consume, status.

They talk to any broker of a cluster through the Kafka protocol with
confluent-kafka (librdkafka), as any Kafka tool would; nothing here reaches
into a broker's files. Each returns an exit status: 0 done, 1 the cluster
refused or failed (one line on stderr says why, never a traceback), 2 bad
usage (argparse's own). Every wait is bounded by --timeout-s. Output is plain
text, one line per item, so it pipes.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import sys
import time
from typing import Any, Iterable, TextIO

DEFAULT_BOOTSTRAP = "127.0.0.1:9092"
TIMEOUT_S = 15.0
OPERATION_TIMEOUT_SHARE = 0.8   # of --timeout-s, the broker's: it answers (NOT_CONTROLLER if not done) before we give up
RESULT_GRACE_S = 5.0            # librdkafka fails a request at its timeout; our own wait on the result is a backstop


class AdminError(Exception):
    """The cluster refused a command or did not answer; exit status 1."""


def _config(args: argparse.Namespace, **extra: Any) -> dict[str, Any]:
    return {"bootstrap.servers": args.bootstrap, "socket.timeout.ms": int(args.timeout_s * 1000),
            "logger": _QuietLogger(), **client_properties(args), **extra}


def client_properties(args: argparse.Namespace) -> dict[str, str]:
    """librdkafka properties from --command-config FILE (key=value lines, as Kafka's
    tools take) and -X key=value (kcat's flag; wins): how to reach a TLS/SASL listener."""
    properties: dict[str, str] = {}
    if getattr(args, "command_config", None):
        try:
            lines = open(args.command_config).read().splitlines()
        except OSError as error:
            raise AdminError(f"--command-config: {error}") from None
        for line in lines:
            if line.strip() and not line.lstrip().startswith("#") and "=" in line:
                key, value = line.split("=", 1)
                properties[key.strip()] = value.strip()
    properties.update(getattr(args, "client_property", None) or [])
    return properties


class _QuietLogger:
    """librdkafka's connection chatter stays out of the output; errors surface as results."""

    def log(self, *_args: Any, **_kwargs: Any) -> None:
        pass

    def __getattr__(self, _name: str) -> Any:
        return self.log


def _admin(args: argparse.Namespace):
    from confluent_kafka.admin import AdminClient
    return AdminClient(_config(args))


def _timeouts(args: argparse.Namespace) -> dict[str, float]:
    """An admin request's timeouts: the broker's (operation) and ours (request)."""
    return {"operation_timeout": args.timeout_s * OPERATION_TIMEOUT_SHARE, "request_timeout": args.timeout_s}


def _metadata(admin, args: argparse.Namespace):
    """The whole cluster's metadata (asking for one topic by name would auto-create it)."""
    from confluent_kafka import KafkaException
    try:
        return admin.list_topics(timeout=args.timeout_s)
    except KafkaException as error:
        raise AdminError(f"no broker answered at the bootstrap address: {_message(error)}") from None


def _result(future, what: str, args: argparse.Namespace) -> Any:
    from confluent_kafka import KafkaError, KafkaException
    try:
        return future.result(args.timeout_s + RESULT_GRACE_S)
    except KafkaException as error:
        if error.args and isinstance(error.args[0], KafkaError) and error.args[0].code() == KafkaError.NOT_CONTROLLER:
            raise AdminError(f"{what}: the cluster cannot serve it yet, try again ({_message(error)})") from None
        raise AdminError(f"{what}: {_message(error)}") from None
    except concurrent.futures.TimeoutError:
        raise AdminError(f"{what}: no answer within {args.timeout_s:g} s") from None


def _message(error: BaseException) -> str:
    """librdkafka's message of a KafkaException, else the exception's own, on one line."""
    reason = error.args[0] if error.args else error
    text = reason.str() if hasattr(reason, "str") else str(reason) or type(error).__name__
    return " ".join(text.split())


def _known_topic(metadata, topic: str) -> Any:
    found = metadata.topics.get(topic)
    if found is None or found.error is not None:
        raise AdminError(f"unknown topic {topic!r}")
    return found


# ---- topics -------------------------------------------------------------------

def topics_create(args: argparse.Namespace, out: TextIO) -> None:
    from confluent_kafka.admin import NewTopic
    admin = _admin(args)   # kept referenced until the result is in: librdkafka stops with its handle
    metadata = _metadata(admin, args)
    partitions, replication = args.partitions, args.replication_factor
    if partitions < 0 or replication < 0:    # CreateTopics v4's "broker default" is not served: ask for it
        defaults = _broker_configs(admin, metadata, args)
        partitions = partitions if partitions > 0 else int(defaults["num.partitions"])
        replication = replication if replication > 0 else int(defaults["default.replication.factor"])
    topic = NewTopic(args.name, partitions, replication, config=dict(args.config))
    _result(admin.create_topics([topic], **_timeouts(args))[args.name], f"creating topic {args.name!r}", args)
    print(f"created topic {args.name}", file=out)


def _broker_configs(admin, metadata, args: argparse.Namespace) -> dict[str, str]:
    from confluent_kafka.admin import ConfigResource, ResourceType
    if not metadata.brokers:
        raise AdminError("the cluster lists no brokers yet: try again once it is ready")
    broker = min(metadata.brokers)
    resource = ConfigResource(ResourceType.BROKER, str(broker))
    entries = _result(admin.describe_configs([resource], request_timeout=args.timeout_s)[resource],
                      f"reading broker {broker}'s settings", args)
    return {name: entry.value for name, entry in entries.items()}


def topics_list(args: argparse.Namespace, out: TextIO) -> None:
    metadata = _metadata(_admin(args), args)
    for name in sorted(metadata.topics):
        print(f"{name}\t{len(metadata.topics[name].partitions)} partitions", file=out)


def topics_describe(args: argparse.Namespace, out: TextIO) -> None:
    metadata = _metadata(_admin(args), args)
    names = [args.name] if args.name else sorted(metadata.topics)
    for name in names:
        topic = _known_topic(metadata, name)
        print(f"{name}\tpartitions {len(topic.partitions)}", file=out)
        for p in sorted(topic.partitions.values(), key=lambda p: p.id):
            print(f"  partition {p.id}\tleader {p.leader}\treplicas {_ids(p.replicas)}\tisr {_ids(p.isrs)}", file=out)


def topics_delete(args: argparse.Namespace, out: TextIO) -> None:
    admin = _admin(args)
    _metadata(admin, args)   # a cluster that does not answer is said so, not taken for a slow delete
    _result(admin.delete_topics([args.name], **_timeouts(args))[args.name], f"deleting topic {args.name!r}", args)
    print(f"deleted topic {args.name}", file=out)


def topics_alter(args: argparse.Namespace, out: TextIO) -> None:
    """Set (--config k=v) and remove (--delete-config k) a topic's configs
    with IncrementalAlterConfigs; the rest stay as they are."""
    from confluent_kafka.admin import AlterConfigOpType, ConfigEntry, ConfigResource, ResourceType
    if not args.config and not args.delete_config:
        raise AdminError("nothing to change: give --config key=value or --delete-config key")
    admin = _admin(args)
    _known_topic(_metadata(admin, args), args.name)
    entries = [ConfigEntry(k, v, incremental_operation=AlterConfigOpType.SET) for k, v in args.config]
    entries += [ConfigEntry(k, None, incremental_operation=AlterConfigOpType.DELETE) for k in args.delete_config]
    resource = ConfigResource(ResourceType.TOPIC, args.name, incremental_configs=entries)
    futures = admin.incremental_alter_configs([resource], request_timeout=args.timeout_s)
    _result(futures[resource], f"altering topic {args.name!r}", args)
    changed = [f"{k}={v}" for k, v in args.config] + [f"{k} (default)" for k in args.delete_config]
    print(f"altered topic {args.name}: {', '.join(changed)}", file=out)


def _ids(ids: list[int]) -> str:
    return ",".join(map(str, ids)) or "-"


# ---- produce ------------------------------------------------------------------

def produce(args: argparse.Namespace, out: TextIO, stdin: TextIO | None = None) -> None:
    """Lines from stdin (or whole files with --file) as records; with
    --key-separator, the text before it is the key."""
    from confluent_kafka import Producer
    _known_topic(_metadata(_admin(args), args), args.topic)
    producer = Producer(_config(args, **{"acks": args.acks, "enable.idempotence": args.acks == "all",
                                         "message.timeout.ms": int(args.timeout_s * 2000)}))
    failures: list[str] = []
    sent = 0

    def delivered(error, _message) -> None:
        if error is not None:
            failures.append(error.str())
    for key, value in _records(args, stdin or sys.stdin):
        while True:
            try:
                producer.produce(args.topic, value=value, key=key, partition=args.partition, on_delivery=delivered)
                break
            except BufferError:
                producer.poll(0.05)
        producer.poll(0)
        sent += 1
    if producer.flush(args.timeout_s * 2):
        raise AdminError(f"{len(producer)} records were not acknowledged in time")
    if failures:
        raise AdminError(f"{len(failures)} of {sent} records failed: {failures[0]}")
    print(f"produced {sent} records to {args.topic}", file=sys.stderr)


def _records(args: argparse.Namespace, stdin: TextIO):
    if args.file:
        for path in args.file:
            try:
                with open(path, "rb") as f:
                    yield None, f.read()
            except OSError as error:
                raise AdminError(f"cannot read {path}: {error.strerror}") from None
        return
    for line in stdin:
        line = line.rstrip("\n")
        if args.key_separator and args.key_separator in line:
            key, value = line.split(args.key_separator, 1)
            yield key.encode(), value.encode()
        else:
            yield None, line.encode()


# ---- consume ------------------------------------------------------------------

def consume(args: argparse.Namespace, out: TextIO) -> None:
    """Print records as lines (key, separator, value with --print-key); stop
    at the end of the partitions unless --follow."""
    from confluent_kafka import OFFSET_BEGINNING, OFFSET_END, Consumer, KafkaError, TopicPartition
    topic = _known_topic(_metadata(_admin(args), args), args.topic)
    settings = {"group.id": args.group or "raftka-cli", "enable.auto.commit": bool(args.group),
                "auto.offset.reset": "earliest" if args.from_beginning else "latest",
                "enable.partition.eof": True}
    consumer = Consumer(_config(args, **settings))
    partitions = [args.partition] if args.partition is not None else sorted(topic.partitions)
    if args.group and args.offset is not None:
        raise AdminError("--offset and --group do not go together: a group reads from its committed offsets")
    if args.group:
        consumer.subscribe([args.topic])
    else:
        start = args.offset if args.offset is not None else (OFFSET_BEGINNING if args.from_beginning else OFFSET_END)
        consumer.assign([TopicPartition(args.topic, p, start) for p in partitions])
    at_end: set[int] = set()
    printed = 0
    idle_deadline = time.monotonic() + args.timeout_s
    try:
        while args.max_messages is None or printed < args.max_messages:
            message = consumer.poll(0.5)
            if message is None:
                if not args.follow and time.monotonic() > idle_deadline:
                    break
                continue
            if message.error():
                if message.error().code() == KafkaError._PARTITION_EOF:
                    at_end.add(message.partition())
                    if not args.follow and not args.group and at_end >= set(partitions):
                        break
                    if not args.follow and args.group:
                        idle_deadline = min(idle_deadline, time.monotonic() + 2.0)
                    continue
                raise AdminError(f"consuming {args.topic}: {message.error().str()}")
            at_end.discard(message.partition())
            value = (message.value() or b"").decode(errors="replace")
            if args.print_key:
                value = f"{(message.key() or b'').decode(errors='replace')}{args.key_separator or chr(9)}{value}"
            print(value, file=out, flush=args.follow)
            printed += 1
            idle_deadline = time.monotonic() + args.timeout_s
    finally:
        consumer.close()


# ---- status -------------------------------------------------------------------

def status(args: argparse.Namespace, out: TextIO) -> None:
    """Brokers; each partition's leader, replicas, ISR, high watermark and
    leader epoch (its Raft term); how many partitions each broker leads and
    is the preferred leader of, and how many are led by another; each
    consumer group's lag."""
    from confluent_kafka import TopicPartition
    from confluent_kafka.admin import OffsetSpec
    admin = _admin(args)
    metadata = _metadata(admin, args)
    controller = metadata.controller_id
    print("brokers", file=out)
    for broker in sorted(metadata.brokers.values(), key=lambda b: b.id):
        print(f"  {broker.id}\t{broker.host}:{broker.port}{'  (controller)' if broker.id == controller else ''}", file=out)
    wanted = {TopicPartition(name, p): OffsetSpec.latest()
              for name, topic in metadata.topics.items() for p in topic.partitions}
    latest = _result_map(admin.list_offsets(wanted, request_timeout=args.timeout_s), args) if wanted else {}
    print("partitions\ttopic\tpartition\tleader\treplicas\tisr\thigh watermark\traft term", file=out)
    for name in sorted(metadata.topics):
        for p in sorted(metadata.topics[name].partitions.values(), key=lambda p: p.id):
            info = latest.get((name, p.id))
            hw, term = (info.offset, info.leader_epoch) if info is not None else ("?", "?")
            print(f"  {name}\t{p.id}\t{p.leader}\t{_ids(p.replicas)}\t{_ids(p.isrs)}\t{hw}\t{term if term is not None else '?'}",
                  file=out)
    partitions = [(p.leader, list(p.replicas)) for t in metadata.topics.values() for p in t.partitions.values()]
    counts, imbalanced = leader_balance(partitions, metadata.brokers)
    print("leaders\tbroker\tleading\tpreferred", file=out)
    for broker_id, (leading, preferred) in sorted(counts.items()):
        print(f"  {broker_id}\t{leading}\t{preferred}", file=out)
    print(f"preferred-leader imbalance {imbalanced}/{len(partitions)}", file=out)
    print("consumer groups\tgroup\ttopic\tpartition\tcommitted\tlag", file=out)
    for group, lags in group_lags(admin, latest, args).items():
        for (topic, partition), (committed, lag) in sorted(lags.items()):
            print(f"  {group}\t{topic}\t{partition}\t{committed}\t{lag}", file=out)


def leaders_elect(args: argparse.Namespace, out: TextIO) -> None:
    """Move partitions' leadership to their preferred replica (the first) now,
    with ElectLeaders (type PREFERRED): one partition, a topic's, or every
    partition that needs it. One line per partition with the outcome."""
    from confluent_kafka import ElectionType, KafkaError, TopicPartition
    if args.partition is not None and args.topic is None:
        raise AdminError("--partition needs --topic")
    admin = _admin(args)
    metadata = _metadata(admin, args)
    wanted = None
    if args.topic is not None:
        topic = _known_topic(metadata, args.topic)
        ids = [args.partition] if args.partition is not None else sorted(topic.partitions)
        if any(p not in topic.partitions for p in ids):
            raise AdminError(f"topic {args.topic!r} has no partition {args.partition}")
        wanted = [TopicPartition(args.topic, p) for p in ids]
    # (no keyword arguments: confluent-kafka 2.16's elect_leaders raises SystemError on any)
    results = _result(admin.elect_leaders(ElectionType.PREFERRED, wanted), "electing preferred leaders", args)
    for tp, error in sorted(results.items(), key=lambda item: (item[0].topic, item[0].partition)):
        if error is None:
            outcome = "now led by its preferred replica"
        elif error.code() == KafkaError.ELECTION_NOT_NEEDED:
            outcome = "already led by its preferred replica"
        else:
            outcome = f"not moved: {error.str()}"
        print(f"{tp.topic}\t{tp.partition}\t{outcome}", file=out)
    if not results:
        print("every partition is led by its preferred replica", file=out)


def leader_balance(partitions: list[tuple[int, list[int]]],
                   brokers: Iterable[int]) -> tuple[dict[int, tuple[int, int]], int]:
    """From (leader, replicas) per partition: broker -> (partitions it leads,
    partitions it is the preferred leader of: their first replica), every
    broker listed; and how many partitions are not led by their preferred
    leader (Kafka's leader imbalance; a partition without a leader counts)."""
    counts = {broker_id: [0, 0] for broker_id in brokers}
    imbalanced = 0
    for leader, replicas in partitions:
        preferred = replicas[0] if replicas else -1
        if leader >= 0:
            counts.setdefault(leader, [0, 0])[0] += 1
        if preferred >= 0:
            counts.setdefault(preferred, [0, 0])[1] += 1
        imbalanced += leader != preferred
    return {broker_id: (leading, preferred) for broker_id, (leading, preferred) in counts.items()}, imbalanced


def _result_map(futures: dict, args: argparse.Namespace) -> dict[tuple[str, int], Any]:
    found = {}
    for tp, future in futures.items():
        try:
            found[(tp.topic, tp.partition)] = future.result(args.timeout_s + RESULT_GRACE_S)
        except Exception:   # one partition without a leader right now: shown as "?"
            continue
    return found


def group_lags(admin, latest: dict[tuple[str, int], Any],
               args: argparse.Namespace) -> dict[str, dict[tuple[str, int], tuple[int, int | str]]]:
    """group -> (topic, partition) -> (committed offset, high watermark - committed)."""
    from confluent_kafka import ConsumerGroupTopicPartitions
    listed = _result(admin.list_consumer_groups(request_timeout=args.timeout_s), "listing consumer groups", args)
    lags: dict[str, dict[tuple[str, int], tuple[int, int | str]]] = {}
    for group in sorted(g.group_id for g in listed.valid):
        futures = admin.list_consumer_group_offsets([ConsumerGroupTopicPartitions(group)],
                                                    request_timeout=args.timeout_s)
        committed = _result(futures[group], f"offsets of group {group!r}", args)
        lags[group] = {}
        for tp in committed.topic_partitions:
            if tp.offset < 0:
                continue
            end = latest.get((tp.topic, tp.partition))
            lags[group][(tp.topic, tp.partition)] = (tp.offset, end.offset - tp.offset if end is not None else "?")
    return lags


# ---- argument parsing ------------------------------------------------------------

def add_commands(commands: argparse._SubParsersAction) -> None:
    """The operator subcommands of `raftka`."""
    def command(name: str, help_text: str, parent=commands) -> argparse.ArgumentParser:
        parser = parent.add_parser(name, help=help_text, description=help_text)
        parser.add_argument("--bootstrap", "-b", default=DEFAULT_BOOTSTRAP,
                            help=f"any broker, host:port[,...] (default {DEFAULT_BOOTSTRAP})")
        add_connection_arguments(parser)
        return parser

    topics = commands.add_parser("topics", help="create, list, describe, alter or delete topics",
                                 description="create, list, describe, alter or delete topics")
    verbs = topics.add_subparsers(dest="verb", metavar="VERB", required=True)
    create = command("create", "create a topic", verbs)
    create.add_argument("name")
    create.add_argument("--partitions", "-p", type=int, default=-1, help="default: the broker's num.partitions")
    create.add_argument("--replication-factor", "-r", type=int, default=-1,
                        help="default: the broker's default.replication.factor")
    create.add_argument("--config", "-c", action="append", default=[], type=_key_value,
                        help="topic config key=value (retention.ms, segment.bytes, ...); repeatable")
    create.set_defaults(run=topics_create)
    command("list", "list topics", verbs).set_defaults(run=topics_list)
    describe = command("describe", "partitions of a topic (or all) with leader, replicas, ISR", verbs)
    describe.add_argument("name", nargs="?")
    describe.set_defaults(run=topics_describe)
    alter = command("alter", "change a topic's configs", verbs)
    alter.add_argument("name")
    alter.add_argument("--config", "-c", action="append", default=[], type=_key_value,
                       help="set topic config key=value (retention.ms, segment.bytes, ...); repeatable")
    alter.add_argument("--delete-config", "-d", action="append", default=[],
                       help="remove the topic's own value of this config (back to the broker's); repeatable")
    alter.set_defaults(run=topics_alter)
    delete = command("delete", "delete a topic", verbs)
    delete.add_argument("name")
    delete.set_defaults(run=topics_delete)

    producing = command("produce", "produce lines from stdin (or whole files) to a topic")
    producing.add_argument("topic")
    producing.add_argument("--key-separator", "-K", help="text before this in a line is the record key")
    producing.add_argument("--file", "-f", action="append", help="send this file's content as one record; repeatable")
    producing.add_argument("--partition", "-P", type=int, default=-1, help="default: by key (murmur2) or spread")
    producing.add_argument("--acks", choices=("all", "1", "0"), default="all")
    producing.set_defaults(run=produce)

    consuming = command("consume", "print a topic's records, one per line")
    consuming.add_argument("topic")
    start = consuming.add_mutually_exclusive_group()
    start.add_argument("--from-beginning", action="store_true", help="from the first record (default: new records)")
    start.add_argument("--offset", "-o", type=int, help="from this offset of each partition read")
    consuming.add_argument("--group", "-g", help="as a member of this consumer group, committing as it reads "
                           "(from its committed offsets; with no commit yet, from the end or --from-beginning)")
    consuming.add_argument("--partition", "-P", type=int, help="only this partition")
    consuming.add_argument("--follow", "-F", action="store_true", help="keep waiting for new records")
    consuming.add_argument("--max-messages", "-n", type=int, help="stop after this many")
    consuming.add_argument("--print-key", action="store_true")
    consuming.add_argument("--key-separator", "-K", help="between key and value with --print-key (default tab)")
    consuming.set_defaults(run=consume)

    leaders = commands.add_parser("leaders", help="move partition leadership to the preferred replicas",
                                  description="move partition leadership to the preferred replicas")
    leader_verbs = leaders.add_subparsers(dest="verb", metavar="VERB", required=True)
    elect = command("elect", "ElectLeaders (preferred): hand each partition to its first replica when it is "
                    "caught up (default: every partition that needs it)", leader_verbs)
    elect.add_argument("--topic", "-t", help="only this topic's partitions")
    elect.add_argument("--partition", "-P", type=int, help="only this partition of --topic")
    elect.set_defaults(run=leaders_elect)

    command("status", "brokers, partitions (leader, replicas, ISR, high watermark, Raft term), group lag") \
        .set_defaults(run=status)


def add_connection_arguments(parser: argparse.ArgumentParser) -> None:
    """--bootstrap's companions every operator command takes: timeout, TLS/SASL client properties."""
    parser.add_argument("--timeout-s", type=_positive_seconds, default=TIMEOUT_S,
                        help=f"give up waiting for the cluster after this many seconds (default {TIMEOUT_S:g})")
    parser.add_argument("--command-config", metavar="FILE",
                        help="librdkafka properties, key=value per line (security.protocol, sasl.*, ssl.*)")
    parser.add_argument("-X", dest="client_property", action="append", type=_key_value, default=[],
                        metavar="KEY=VALUE", help="a librdkafka property; repeatable")


def _positive_seconds(text: str) -> float:
    try:
        seconds = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds, got {text!r}") from None
    if not 0.1 <= seconds <= 3600:
        raise argparse.ArgumentTypeError(f"expected seconds in [0.1, 3600], got {text!r}")
    return seconds


def _key_value(text: str) -> tuple[str, str]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected key=value, got {text!r}")
    key, value = text.split("=", 1)
    return key, value


def run(args: argparse.Namespace) -> int:
    """Run an operator command; its failure is one line on stderr and status 1."""
    try:
        args.run(args, sys.stdout)
    except AdminError as error:
        print(f"raftka {args.command}: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except Exception as error:   # librdkafka's or the system's, wherever raised: said, not a traceback
        print(f"raftka {args.command}: {type(error).__name__}: {_message(error)}", file=sys.stderr)
        return 1
    return 0
