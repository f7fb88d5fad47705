"""Which committed offsets have expired: Kafka's rule (KIP-211) for
`offsets.retention.minutes`.

- A group with members keeps every offset.
- An empty group that has used the group protocol (it has a stored group
  record) loses all its offsets once the retention has passed since it
  became empty (the record's state timestamp).
- Offsets committed without the group protocol (no group record: a
  consumer that assigns itself partitions) expire one by one, retention
  after their own commit.
A group left with no offsets and no members is deleted as well.

Only the coordinator decides, from its own clock, and writes the decision
into the group's `__consumer_offsets` partition as tombstones; every
replica applies those records. So what expired is a fact of the replicated
log, identical on every replica, never a per-replica wall-clock judgement.
"""
from __future__ import annotations

from dataclasses import dataclass

from raftka.groups.offsets_topic import CommittedOffset, GroupRecord


@dataclass(frozen=True)
class Expiry:
    offsets: tuple[tuple[str, int], ...]   # (topic, partition) of each expired offset
    group: bool                            # the group record goes too (nothing left)


def expired(record: GroupRecord | None, committed: dict[tuple[str, int], CommittedOffset],
            now_ms: int, retention_ms: int) -> Expiry:
    """What of one group has expired at `now_ms`."""
    if record is not None and record.members:
        return Expiry((), False)
    if record is not None:
        gone = tuple(sorted(committed)) if now_ms - record.state_timestamp_ms >= retention_ms else ()
    else:
        gone = tuple(sorted(tp for tp, value in committed.items()
                            if now_ms - value.commit_timestamp_ms >= retention_ms))
    return Expiry(gone, record is not None and len(gone) == len(committed))
