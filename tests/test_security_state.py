"""Users and ACLs in the metadata state machine, and Kafka's authorization
rules over them: commands apply alike on every replica (and survive a
snapshot), malformed ones are refused, DENY beats ALLOW, READ/WRITE imply
DESCRIBE, PREFIXED and `*` patterns match as Kafka's."""
from __future__ import annotations

import pytest

from raftka.cluster.metadata import ClusterState
from raftka.errors import ErrorCode
from raftka.raft import codec
from raftka.security import scram, state as acl
from raftka.security.authorizer import Authorizer
from raftka.security.state import AclBinding


def binding(name: str, op: int, *, principal: str = "User:alice", rt: int = acl.RESOURCE_TOPIC,
            pattern: int = acl.LITERAL, permission: int = acl.ALLOW, host: str = "*") -> AclBinding:
    return AclBinding(rt, name, pattern, principal, host, op, permission)


def test_users_and_acls_survive_a_snapshot_and_apply_alike_on_every_replica() -> None:
    credential = scram.make_credential(scram.SCRAM_SHA_512, "pw", iterations=4096, salt=b"s" * 16)
    commands = [acl.scram_upsert(credential, "alice"), acl.acls_create([binding("orders", acl.OP_READ)]),
                acl.acls_create([binding("ord", acl.OP_WRITE, pattern=acl.PREFIXED)])]
    replicas = [ClusterState(), ClusterState()]
    for state in replicas:
        assert [state.apply(c) for c in commands] == [ErrorCode.NONE] * 3
    restored = ClusterState()
    restored.restore(replicas[0].snapshot())
    for state in (*replicas, restored):
        assert state.security.credential("alice", scram.SCRAM_SHA_512) == credential
        assert state.security.acls == {binding("orders", acl.OP_READ),
                                       binding("ord", acl.OP_WRITE, pattern=acl.PREFIXED)}


def test_bootstrap_upsert_never_overwrites_a_changed_password() -> None:
    state = ClusterState()
    first = scram.make_credential(scram.SCRAM_SHA_256, "one", iterations=4096)
    second = scram.make_credential(scram.SCRAM_SHA_256, "two", iterations=4096)
    state.apply(acl.scram_upsert(first, "admin"))
    assert state.apply(acl.scram_upsert(second, "admin", if_absent=True)) == ErrorCode.NONE
    assert state.security.credential("admin", scram.SCRAM_SHA_256) == first


@pytest.mark.parametrize("command", [
    {"op": "scram_upsert", "user": "x", "mechanism": "SCRAM-SHA-1", "salt": b"s", "iterations": 4096,
     "stored_key": b"k", "server_key": b"k"},
    {"op": "scram_upsert", "user": "x", "mechanism": "SCRAM-SHA-256", "salt": b"s", "iterations": 10,
     "stored_key": b"k", "server_key": b"k"},
    {"op": "acls_create", "bindings": [[2, "t", 3, "alice", "*", 3, 3]]},           # principal without User:
    {"op": "acls_create", "bindings": [[4, "other-cluster", 3, "User:a", "*", 3, 3]]},
    {"op": "acls_create", "bindings": [[2, "t", 1, "User:a", "*", 3, 3]]},          # ANY is a filter, not a pattern
    {"op": "acls_create", "bindings": [[2, "t", 3, "User:a", "*", 3]]},
])
def test_malformed_security_commands_are_refused_and_change_nothing(command: dict) -> None:
    state = ClusterState()
    assert state.apply(codec.encode(command)) != ErrorCode.NONE
    assert not state.security.credentials and not state.security.acls


def authorizer_over(*bindings: AclBinding, super_users: frozenset[str] = frozenset()) -> Authorizer:
    state = ClusterState()
    state.apply(acl.acls_create(bindings))
    return Authorizer(lambda: state.security, super_users)


def test_nothing_is_allowed_without_an_acl_except_to_super_users() -> None:
    authorizer = authorizer_over(super_users=frozenset({"User:root"}))
    assert not authorizer.allowed("User:alice", "10.0.0.1", acl.OP_READ, acl.RESOURCE_TOPIC, "t")
    assert authorizer.allowed("User:root", "10.0.0.1", acl.OP_DELETE, acl.RESOURCE_TOPIC, "t")


def test_deny_beats_allow_and_read_implies_describe() -> None:
    authorizer = authorizer_over(binding("t", acl.OP_READ), binding("t", acl.OP_WRITE, principal="User:*"),
                                 binding("t", acl.OP_WRITE, permission=acl.DENY))
    assert authorizer.allowed("User:alice", "h", acl.OP_DESCRIBE, acl.RESOURCE_TOPIC, "t")
    assert not authorizer.allowed("User:alice", "h", acl.OP_WRITE, acl.RESOURCE_TOPIC, "t")
    assert authorizer.allowed("User:bob", "h", acl.OP_WRITE, acl.RESOURCE_TOPIC, "t")
    assert not authorizer.allowed("User:bob", "h", acl.OP_READ, acl.RESOURCE_TOPIC, "t")


def test_prefixed_wildcard_and_host_patterns_match_as_kafkas() -> None:
    authorizer = authorizer_over(binding("logs-", acl.OP_READ, pattern=acl.PREFIXED),
                                 binding("*", acl.OP_READ, rt=acl.RESOURCE_GROUP),
                                 binding("pinned", acl.OP_READ, host="10.0.0.9"))
    assert authorizer.allowed("User:alice", "h", acl.OP_READ, acl.RESOURCE_TOPIC, "logs-app")
    assert not authorizer.allowed("User:alice", "h", acl.OP_READ, acl.RESOURCE_TOPIC, "log")
    assert authorizer.allowed("User:alice", "h", acl.OP_READ, acl.RESOURCE_GROUP, "any-group")
    assert authorizer.allowed("User:alice", "10.0.0.9", acl.OP_READ, acl.RESOURCE_TOPIC, "pinned")
    assert not authorizer.allowed("User:alice", "10.0.0.8", acl.OP_READ, acl.RESOURCE_TOPIC, "pinned")


def test_a_new_acl_takes_effect_at_once_despite_the_cache() -> None:
    state = ClusterState()
    authorizer = Authorizer(lambda: state.security, frozenset())
    assert not authorizer.allowed("User:alice", "h", acl.OP_READ, acl.RESOURCE_TOPIC, "t")
    state.apply(acl.acls_create([binding("t", acl.OP_READ)]))
    assert authorizer.allowed("User:alice", "h", acl.OP_READ, acl.RESOURCE_TOPIC, "t")
    state.apply(acl.acls_delete([AclBinding(acl.ANY, None, acl.ANY, "User:alice", None, acl.ANY, acl.ANY)]))
    assert not authorizer.allowed("User:alice", "h", acl.OP_READ, acl.RESOURCE_TOPIC, "t")
