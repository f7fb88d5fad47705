"""Kafka-specific replication on top of raft/ (the generic multi-Raft library):
the partition replica (appends, idempotent producer state, catch-up). The
broker (raftka.broker) runs it; raftka.cluster keeps the replicated cluster
metadata.
"""
from raftka.replication.partition import PartitionReplica
from raftka.raft.group import NotLeaderError, ReplicationError

__all__ = ["NotLeaderError", "PartitionReplica", "ReplicationError"]
