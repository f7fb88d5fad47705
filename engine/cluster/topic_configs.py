"""Topic configs: which Kafka topic configs Raftka takes, what values it
accepts, and how a topic's effective settings are layered.

A topic's setting is, first found: the topic's own value (set at creation,
AlterConfigs or IncrementalAlterConfigs), the dynamic value for this broker
(broker resource "<node id>"), the dynamic cluster-wide default (broker
resource ""), this broker's static configuration (its TOML file, RAFTKA_*
variables), Kafka's default. The dynamic values live in the metadata state
machine, so every broker applies a change at the same point of the metadata
log. Kafka's names for the topic configs and their broker-level synonyms
are raftka.config's TOPIC_CONFIGS and BROKER_CONFIGS.

Only values Raftka implements are accepted; everything else is refused with
INVALID_CONFIG saying why, never stored and ignored:
- cleanup.policy: `delete`, `compact` or both (`compact,delete`, in either
  order; engine/storage/cleaner.py is the log cleaner).
- compression.type: `producer` only (batches are stored as the producer
  compressed them; the broker does not recompress).
- message.timestamp.type: `CreateTime` only (no LogAppendTime stamping).

min.insync.replicas takes Kafka's range (>= 1, above the replication factor
too, as Kafka does): an acks=all produce is refused with NOT_ENOUGH_REPLICAS
while the partition's ISR is smaller (engine/broker/handlers.py); the Raft
majority is needed for the commit either way.
"""
from __future__ import annotations

import re
from typing import Iterable

from raftka.config import BROKER_CONFIGS, TOPIC_CONFIGS, Config
from raftka.errors import InvalidConfigError

# IncrementalAlterConfigs operations
SET, DELETE, APPEND, SUBTRACT = 0, 1, 2, 3
LIST_CONFIGS = frozenset({"cleanup.policy"})     # the list-valued ones, which APPEND and SUBTRACT apply to

# values accepted where not every value of Kafka's is implemented: name -> (accepted, why the rest are refused)
_ONLY: dict[str, tuple[frozenset[str], str]] = {
    "cleanup.policy": (frozenset({"delete", "compact", "compact,delete", "delete,compact"}),
                       "cleanup.policy takes delete, compact, or both (compact,delete)"),
    "compression.type": (frozenset({"producer"}),
                         "batches are stored as the producer compressed them; the broker does not recompress"),
    "message.timestamp.type": (frozenset({"CreateTime"}), "LogAppendTime stamping is not implemented"),
}
# lower bounds of the integer configs
_MINIMUM: dict[str, int] = {
    "retention.ms": -1, "retention.bytes": -1, "segment.bytes": 1, "segment.ms": 1, "max.message.bytes": 1,
    "min.compaction.lag.ms": 0, "delete.retention.ms": 0, "min.insync.replicas": 1,
}
# Kafka's DescribeConfigs config_type of each
CONFIG_TYPES: dict[str, int] = {
    "cleanup.policy": 7, "compression.type": 2, "message.timestamp.type": 2,   # LIST, STRING
    "segment.bytes": 3, "max.message.bytes": 3, "min.insync.replicas": 3,      # INT
    "min.cleanable.dirty.ratio": 6, "log.cleaner.min.cleanable.ratio": 6,     # DOUBLE
    "log.cleaner.io.max.bytes.per.second": 6,
}
TYPE_BOOLEAN, TYPE_STRING, TYPE_INT, TYPE_LONG = 1, 2, 3, 5
_INT_MAX, _LONG_MAX = 2**31 - 1, 2**63 - 1     # Kafka's INT and LONG configs
_INTEGER = re.compile(r"-?[0-9]+", re.ASCII)    # as Java's Long.parseLong of the trimmed text: no "--5", no "٣"

# the broker configs that may change at runtime: the broker-level defaults of topic configs
DYNAMIC_BROKER_CONFIGS: dict[str, str] = {name: field for name, field in BROKER_CONFIGS.items()
                                          if field in set(TOPIC_CONFIGS.values())}


def config_type(name: str) -> int:
    """Kafka's config_type of a topic or broker config by its name: those
    listed, else a boolean, string, LONG for times and sizes, INT otherwise."""
    if name in CONFIG_TYPES:
        return CONFIG_TYPES[name]
    field = TOPIC_CONFIGS.get(name) or BROKER_CONFIGS.get(name)
    default = getattr(Config(), field) if field else ""
    if isinstance(default, bool):
        return TYPE_BOOLEAN
    if isinstance(default, str):
        return TYPE_STRING
    return TYPE_LONG if name.endswith((".ms", ".bytes")) else TYPE_INT


def validate(configs: dict[str, str | None], names: dict[str, str] = TOPIC_CONFIGS) -> None:
    """InvalidConfigError naming the first config Raftka does not take, or
    whose value it does not implement; `names` maps the allowed names to
    Config fields (topic configs, or the dynamic broker configs)."""
    for name, value in configs.items():
        if name not in names:
            raise InvalidConfigError(f"unknown or read-only config {name!r}; supported: {', '.join(sorted(names))}")
        topic_name = _topic_name(names[name])
        if value is None:
            raise InvalidConfigError(f"config {name} needs a value")
        if topic_name in _ONLY:
            accepted, why = _ONLY[topic_name]
            if value not in accepted:
                raise InvalidConfigError(f"{name}={value!r} refused: {why}")
            continue
        if isinstance(getattr(Config(), names[name]), float):
            _check_ratio(name, value)
            continue
        if isinstance(getattr(Config(), names[name]), int):
            if not _INTEGER.fullmatch(value.strip()):
                raise InvalidConfigError(f"{name}={value!r} is not an integer")
            if int(value) < _MINIMUM.get(topic_name, 0):
                raise InvalidConfigError(f"{name}={value} is below its minimum {_MINIMUM.get(topic_name, 0)}")
            maximum = _INT_MAX if config_type(topic_name) == TYPE_INT else _LONG_MAX
            if int(value) > maximum:
                raise InvalidConfigError(f"{name}={value} is above its maximum {maximum}")


def _check_ratio(name: str, value: str) -> None:
    """A DOUBLE config in [0, 1] (min.cleanable.dirty.ratio)."""
    try:
        number = float(value)
    except ValueError:
        raise InvalidConfigError(f"{name}={value!r} is not a number") from None
    if not 0.0 <= number <= 1.0:
        raise InvalidConfigError(f"{name}={value} is outside [0, 1]")


def _topic_name(field: str) -> str:
    return next(name for name, f in TOPIC_CONFIGS.items() if f == field)


def overrides(configs: dict[str, str], names: dict[str, str] = TOPIC_CONFIGS) -> dict[str, object]:
    """Config field -> typed value of validated configs (unknown names skipped)."""
    defaults = Config()
    typed: dict[str, object] = {}
    for name, value in configs.items():
        field = names.get(name)
        if field is None:
            continue
        default = getattr(defaults, field)
        typed[field] = float(value) if isinstance(default, float) else int(value) if isinstance(default, int) else value
    return typed


def effective(base: Config, layers: Iterable[tuple[dict[str, str], dict[str, str]]]) -> Config:
    """`base` with each (configs, their names) layer applied in order, the last winning."""
    changes: dict[str, object] = {}
    for configs, names in layers:
        changes.update(overrides(configs, names))
    return base.replace(**changes) if changes else base


def incremental(current: dict[str, str], operations: Iterable[tuple[str, int, str | None]]) -> tuple[dict[str, str], list[str]]:
    """(values to set, names to delete) of IncrementalAlterConfigs
    operations (name, op, value) on `current`: SET, DELETE, and APPEND /
    SUBTRACT on list configs (comma-separated); InvalidConfigError for an
    unknown operation or APPEND / SUBTRACT on a config that is not a list."""
    values, deleted = dict(current), []
    for name, op, value in operations:
        if op == SET:
            values[name] = value if value is not None else ""
        elif op == DELETE:
            values.pop(name, None)
            deleted.append(name)
        elif op in (APPEND, SUBTRACT):
            if name not in LIST_CONFIGS:
                raise InvalidConfigError(f"{name} is not a list config: APPEND and SUBTRACT need one")
            items = [i for i in values.get(name, _default_text(name)).split(",") if i]
            given = [i for i in (value or "").split(",") if i]
            items = items + [i for i in given if i not in items] if op == APPEND else [i for i in items if i not in given]
            values[name] = ",".join(items)
        else:
            raise InvalidConfigError(f"unknown config operation {op} for {name}")
    changed = {k: v for k, v in values.items() if current.get(k) != v}
    return changed, [name for name in deleted if name not in values]


def _default_text(name: str) -> str:
    field = TOPIC_CONFIGS.get(name) or BROKER_CONFIGS.get(name)
    return str(getattr(Config(), field)) if field else ""
