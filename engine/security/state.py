"""Users and ACLs: the security part of the cluster metadata state machine.

ClusterState (raftka.cluster.metadata) holds one SecurityState and hands it
the commands below; they are applied in commit order on every broker, so
every broker authenticates and authorizes from the same copy. Commands are
raft.codec maps (no pickle) and are validated here like any other metadata
command: a malformed one is refused alike everywhere.

  scram_upsert  user, mechanism, salt, iterations, stored_key, server_key,
                if_absent (the bootstrap admin: never overwrites a password)
  scram_delete  user, mechanism
  acls_create   bindings: [[resource type, name, pattern type, principal, host,
                operation, permission], ...]
  acls_delete   filters: the same shape, with Kafka's ANY (1) / MATCH (2) wildcards

Only SCRAM's stored form is held (raftka.security.scram); never a password.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

from raftka.errors import ErrorCode
from raftka.raft import codec
from raftka.security import scram

# Kafka's enums (org.apache.kafka.common.resource / acl)
ANY, MATCH = 1, 2
RESOURCE_TOPIC, RESOURCE_GROUP, RESOURCE_CLUSTER, RESOURCE_TRANSACTIONAL_ID = 2, 3, 4, 5
RESOURCE_TYPES = {RESOURCE_TOPIC: "TOPIC", RESOURCE_GROUP: "GROUP", RESOURCE_CLUSTER: "CLUSTER",
                  RESOURCE_TRANSACTIONAL_ID: "TRANSACTIONAL_ID"}
LITERAL, PREFIXED = 3, 4
PATTERN_TYPES = {LITERAL: "LITERAL", PREFIXED: "PREFIXED"}
OP_ALL, OP_READ, OP_WRITE, OP_CREATE, OP_DELETE, OP_ALTER, OP_DESCRIBE = 2, 3, 4, 5, 6, 7, 8
OP_CLUSTER_ACTION, OP_DESCRIBE_CONFIGS, OP_ALTER_CONFIGS, OP_IDEMPOTENT_WRITE = 9, 10, 11, 12
OPERATIONS = {OP_ALL: "ALL", OP_READ: "READ", OP_WRITE: "WRITE", OP_CREATE: "CREATE", OP_DELETE: "DELETE",
              OP_ALTER: "ALTER", OP_DESCRIBE: "DESCRIBE", OP_CLUSTER_ACTION: "CLUSTER_ACTION",
              OP_DESCRIBE_CONFIGS: "DESCRIBE_CONFIGS", OP_ALTER_CONFIGS: "ALTER_CONFIGS",
              OP_IDEMPOTENT_WRITE: "IDEMPOTENT_WRITE"}
DENY, ALLOW = 2, 3
PERMISSIONS = {DENY: "DENY", ALLOW: "ALLOW"}
CLUSTER_NAME = "kafka-cluster"
WILDCARD = "*"
MAX_ACLS = 100_000
MAX_USERS = 100_000


@dataclass(frozen=True, order=True)
class AclBinding:
    resource_type: int
    resource_name: str
    pattern_type: int
    principal: str
    host: str
    operation: int
    permission: int

    def as_list(self) -> list[Any]:
        return [self.resource_type, self.resource_name, self.pattern_type, self.principal, self.host,
                self.operation, self.permission]

    def describe(self) -> str:
        return (f"{RESOURCE_TYPES.get(self.resource_type, self.resource_type)}:"
                f"{PATTERN_TYPES.get(self.pattern_type, self.pattern_type)}:{self.resource_name} "
                f"{self.principal} from {self.host}: {PERMISSIONS.get(self.permission)} "
                f"{OPERATIONS.get(self.operation, self.operation)}")


def binding_problem(b: AclBinding) -> str | None:
    """Why `b` cannot be stored (Kafka's CreateAcls checks), or None."""
    if b.resource_type not in RESOURCE_TYPES:
        return f"resource type {b.resource_type} is not one of {sorted(RESOURCE_TYPES)}"
    if b.pattern_type not in PATTERN_TYPES:
        return f"pattern type {b.pattern_type} is not LITERAL (3) or PREFIXED (4)"
    if b.operation not in OPERATIONS or b.permission not in PERMISSIONS:
        return f"operation {b.operation} / permission {b.permission} is not a concrete value"
    if not b.resource_name:
        return "empty resource name"
    if b.resource_type == RESOURCE_CLUSTER and b.resource_name != CLUSTER_NAME:
        return f"the cluster resource is named {CLUSTER_NAME!r}"
    if not b.principal.startswith("User:") or len(b.principal) <= len("User:"):
        return f"principal {b.principal!r} is not User:<name>"
    if not b.host:
        return "empty host (use '*')"
    return None


def filter_matches(f: AclBinding, b: AclBinding) -> bool:
    """Whether ACL filter `f` (ANY = 1 wildcards; None strings for any) selects binding `b`."""
    if f.resource_type not in (ANY, b.resource_type):
        return False
    if f.pattern_type == MATCH:
        if f.resource_name is not None and not resource_matches(b, f.resource_name):
            return False
    else:
        if f.pattern_type not in (ANY, b.pattern_type):
            return False
        if f.resource_name is not None and f.resource_name != b.resource_name:
            return False
    return ((f.principal is None or f.principal == b.principal) and (f.host is None or f.host == b.host)
            and f.operation in (ANY, b.operation) and f.permission in (ANY, b.permission))


def resource_matches(b: AclBinding, name: str) -> bool:
    """Whether binding `b`'s resource pattern covers the resource called `name`."""
    if b.pattern_type == LITERAL:
        return b.resource_name in (name, WILDCARD)
    return name.startswith(b.resource_name)


def scram_upsert(credential: scram.ScramCredential, user: str, if_absent: bool = False) -> bytes:
    return codec.encode({"op": "scram_upsert", "user": user, "mechanism": credential.mechanism,
                         "salt": credential.salt, "iterations": credential.iterations,
                         "stored_key": credential.stored_key, "server_key": credential.server_key,
                         "if_absent": if_absent})


def scram_delete(user: str, mechanism: str) -> bytes:
    return codec.encode({"op": "scram_delete", "user": user, "mechanism": mechanism})


def acls_create(bindings: Iterable[AclBinding]) -> bytes:
    return codec.encode({"op": "acls_create", "bindings": [b.as_list() for b in bindings]})


def acls_delete(filters: Iterable[AclBinding]) -> bytes:
    return codec.encode({"op": "acls_delete", "filters": [f.as_list() for f in filters]})


class SecurityState:
    """Users' SCRAM credentials and the ACLs; see the module docstring."""

    def __init__(self) -> None:
        self.credentials: dict[tuple[str, str], scram.ScramCredential] = {}   # (user, mechanism) ->
        self.acls: set[AclBinding] = set()

    def credential(self, user: str, mechanism: str) -> scram.ScramCredential | None:
        return self.credentials.get((user, mechanism))

    def users(self) -> dict[str, list[scram.ScramCredential]]:
        out: dict[str, list[scram.ScramCredential]] = {}
        for (user, _), credential in sorted(self.credentials.items()):
            out.setdefault(user, []).append(credential)
        return out

    # ---- commands (called by ClusterState.apply) ----------------------------

    def apply_scram_upsert(self, c: dict) -> ErrorCode:
        user, mechanism = _str(c["user"]), _str(c["mechanism"])
        iterations = c["iterations"]
        if not user or mechanism not in scram.HASHES or not isinstance(iterations, int) \
                or not scram.MIN_ITERATIONS <= iterations <= scram.MAX_ITERATIONS:
            return ErrorCode.UNACCEPTABLE_CREDENTIAL
        if (user, mechanism) in self.credentials and c.get("if_absent"):
            return ErrorCode.NONE
        if (user, mechanism) not in self.credentials and len(self.credentials) >= MAX_USERS:
            return ErrorCode.UNACCEPTABLE_CREDENTIAL
        keys = [c["salt"], c["stored_key"], c["server_key"]]
        if not all(isinstance(k, bytes) and 0 < len(k) <= 128 for k in keys):
            return ErrorCode.UNACCEPTABLE_CREDENTIAL
        self.credentials[(user, mechanism)] = scram.ScramCredential(mechanism, keys[0], iterations, keys[1], keys[2])
        return ErrorCode.NONE

    def apply_scram_delete(self, c: dict) -> ErrorCode:
        if self.credentials.pop((_str(c["user"]), _str(c["mechanism"])), None) is None:
            return ErrorCode.RESOURCE_NOT_FOUND
        return ErrorCode.NONE

    def apply_acls_create(self, c: dict) -> ErrorCode:
        bindings = [_binding(item) for item in c["bindings"]]
        if any(binding_problem(b) for b in bindings) or len(self.acls | set(bindings)) > MAX_ACLS:
            return ErrorCode.INVALID_REQUEST
        self.acls = self.acls | set(bindings)    # a new set: the authorizer caches per set
        return ErrorCode.NONE

    def apply_acls_delete(self, c: dict) -> ErrorCode:
        filters = [_binding(item, filtering=True) for item in c["filters"]]
        self.acls = {b for b in self.acls if not any(filter_matches(f, b) for f in filters)}
        return ErrorCode.NONE

    # ---- snapshots -------------------------------------------------------

    def snapshot_data(self) -> dict[str, Any]:
        return {"credentials": [[user, cr.mechanism, cr.salt, cr.iterations, cr.stored_key, cr.server_key]
                                for (user, _), cr in sorted(self.credentials.items())],
                "acls": [b.as_list() for b in sorted(self.acls)]}

    def restore_data(self, data: dict[str, Any] | None) -> None:
        data = data or {}
        self.credentials = {(user, mechanism): scram.ScramCredential(mechanism, salt, iterations, stored, server)
                            for user, mechanism, salt, iterations, stored, server in data.get("credentials", [])}
        self.acls = {_binding(item) for item in data.get("acls", [])}


COMMANDS = {"scram_upsert": SecurityState.apply_scram_upsert, "scram_delete": SecurityState.apply_scram_delete,
            "acls_create": SecurityState.apply_acls_create, "acls_delete": SecurityState.apply_acls_delete}


def _binding(item: Any, filtering: bool = False) -> AclBinding:
    if not isinstance(item, list) or len(item) != 7:
        raise TypeError(f"an ACL is 7 fields, got {item!r}")
    rt, name, pt, principal, host, op, perm = item
    strings = (name, principal, host)
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (rt, pt, op, perm)):
        raise TypeError(f"ACL enums must be integers: {item!r}")
    if not all(isinstance(s, str) or (filtering and s is None) for s in strings):
        raise TypeError(f"ACL names must be strings: {item!r}")
    return AclBinding(rt, name, pt, principal, host, op, perm)


def _str(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError(f"expected a string, got {value!r}")
    return value
