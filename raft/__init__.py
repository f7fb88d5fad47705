"""A generic multi-Raft library: pysyncobj groups (group.py, state_machine.py)
ticked by one node (node.py) over one peer transport (transport.py).

It imports only the standard library, pysyncobj and native/ (for CRC32C),
never engine/: the Kafka-specific partition replica is engine/replication/.
"""
