"""LeaderBalancer: Kafka's auto.leader.rebalance.enable, one broker's part.

A partition's preferred leader is its first replica; `assign_replicas` spreads
first replicas round robin, so leaders are even when every partition is led
by its preferred replica. Raft elections give the leadership to whichever
member's timer ran out first, and a broker that restarts leads nothing, so
leadership drifts. Each broker therefore checks the partitions it leads and
hands one to its preferred replica B (RaftGroup.transfer_leadership) when:

- B is caught up: connected, its log matching the leader's up to the commit
  index (RaftGroup.peer_caught_up). A replica that is away or behind is
  never a target, so a transfer neither waits on a catch-up nor aims at a
  dead broker; this, with the backoff, is what keeps leadership from flapping;
- B's imbalance, the share of the partitions preferring B (every topic, from
  the replicated metadata) that B does not lead, is above
  leader.imbalance.per.broker.percentage (Kafka's rule);
- the partition's backoff has passed: after a transfer that did not leave B
  leading, the next one waits BACKOFF_S, doubling each time, up to the check
  interval (a preferred replica that keeps failing is not chased).

When: every leader.imbalance.check.interval.seconds for every partition it
leads, and every WATCH_PERIOD_S (a round that only compares leader epochs and
a few flags) for the partitions on watch: those whose
leadership came here by an election (a new topic, a failover) and those whose
preferred replica was seen away (when it rejoins and catches up, it gets its
partitions back within about a second). A partition leaves the watch when
this broker no longer leads it or its preferred broker is not imbalanced.

Pure logic over what the controller passes in (engine/cluster/controller.py
runs it, at most MAX_TRANSFERS_PER_ROUND transfers per round); no clock or
I/O of its own.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

WATCH_PERIOD_S = 1.0
BACKOFF_S = 5.0
MAX_TRANSFERS_PER_ROUND = 16

PartitionKey = tuple[str, int]


@dataclass(frozen=True)
class LedPartition:
    """A partition this broker leads, as the balancer needs it."""
    key: PartitionKey
    preferred: int              # its first replica
    leader_epoch: int           # the Raft term of our leadership
    preferred_caught_up: bool   # RaftGroup.peer_caught_up(preferred)


def preferred_imbalance(partitions: Iterable[tuple[int, list[int]]]) -> dict[int, float]:
    """From (leader, replicas) per partition: preferred broker -> the share of
    the partitions preferring it that it does not lead, in [0, 1]."""
    preferring: dict[int, int] = {}
    not_led: dict[int, int] = {}
    for leader, replicas in partitions:
        if not replicas:
            continue
        preferred = replicas[0]
        preferring[preferred] = preferring.get(preferred, 0) + 1
        if leader != preferred:
            not_led[preferred] = not_led.get(preferred, 0) + 1
    return {broker: not_led.get(broker, 0) / count for broker, count in preferring.items()}


@dataclass
class _Backoff:
    retry_at: float
    attempts: int


class LeaderBalancer:
    """See the module docstring. `transfers` is called with the time and the
    partitions this broker leads; it answers which to hand to whom now."""

    def __init__(self, node_id: int, check_interval_s: float, imbalance_percentage: int) -> None:
        assert check_interval_s > 0, f"check_interval_s({check_interval_s}) <= 0"
        assert 0 <= imbalance_percentage <= 100, f"imbalance_percentage({imbalance_percentage}) not in [0, 100]"
        self.node_id = node_id
        self.check_interval_s = check_interval_s
        self.imbalance_ratio_max = imbalance_percentage / 100
        self._epochs: dict[PartitionKey, int] = {}     # led partition -> leader epoch last seen
        self._watch: set[PartitionKey] = set()
        self._backoff: dict[PartitionKey, _Backoff] = {}
        self._next_check = 0.0   # the next check of every led partition
        self._next_watch = 0.0

    @property
    def watching(self) -> frozenset[PartitionKey]:
        return frozenset(self._watch)

    def due(self, now: float) -> bool:
        """A round is due (every WATCH_PERIOD_S: it notices new leaderships,
        checks watched partitions, and every partition at the check interval)."""
        return now >= self._next_watch

    def transfers(self, now: float, led: list[LedPartition],
                  imbalance: dict[int, float]) -> list[tuple[PartitionKey, int]]:
        """(partition, preferred broker) to transfer now, at most
        MAX_TRANSFERS_PER_ROUND; `imbalance` is preferred_imbalance of the
        whole cluster."""
        full = now >= self._next_check
        if full:
            self._next_check = now + self.check_interval_s
        self._next_watch = now + WATCH_PERIOD_S
        self._forget_unled(led)
        chosen: list[tuple[PartitionKey, int]] = []
        for partition in sorted(led, key=lambda p: p.key):
            if self._epochs.get(partition.key) != partition.leader_epoch:
                self._epochs[partition.key] = partition.leader_epoch   # an election brought it here
                self._watch.add(partition.key)
            if not (full or partition.key in self._watch):
                continue
            if partition.preferred == self.node_id or imbalance.get(partition.preferred, 0.0) <= self.imbalance_ratio_max:
                self._watch.discard(partition.key)
                continue
            if not partition.preferred_caught_up:
                self._watch.add(partition.key)   # away or behind: check again when it may have rejoined
                continue
            backoff = self._backoff.get(partition.key)
            if backoff is not None and now < backoff.retry_at:
                continue
            if len(chosen) < MAX_TRANSFERS_PER_ROUND:
                attempts = backoff.attempts + 1 if backoff is not None else 1
                delay_s = min(BACKOFF_S * 2 ** (attempts - 1), self.check_interval_s)
                self._backoff[partition.key] = _Backoff(now + delay_s, attempts)
                chosen.append((partition.key, partition.preferred))
        return chosen

    def _forget_unled(self, led: list[LedPartition]) -> None:
        """Partitions we no longer lead leave every table (a successful
        transfer ends here, its backoff with it)."""
        keys = {p.key for p in led}
        for table in (self._epochs, self._backoff):
            for key in [k for k in table if k not in keys]:
                del table[key]
        self._watch &= keys
