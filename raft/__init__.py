"""Replication: one pysyncobj Raft group per partition (issue: replication).

Empty until the replication work lands; the storage engine does not depend on it.
"""
