"""Kafka-specific replication on top of raft/ (the generic multi-Raft library):
the partition replica (appends, idempotent producer state, catch-up), and the
bare replication node process with its local launcher (control_node.py,
local_nodes.py) that the real-process tests and the replication benchmark use.
"""
from raftka.replication.partition import PartitionReplica
from raftka.raft.group import NotLeaderError, ReplicationError

__all__ = ["NotLeaderError", "PartitionReplica", "ReplicationError"]
