"""Kafka's ACL semantics over the replicated ACLs (raftka.security.state).

A request by `principal` from `host` to perform `operation` on a resource is
allowed when the principal is a super user, or when no DENY binding matches
and some ALLOW binding does. A binding matches when its principal is the
principal or `User:*`, its host the client's address or `*`, its operation
the one asked or ALL (or one that implies it: READ, WRITE, DELETE and ALTER
imply DESCRIBE; ALTER_CONFIGS implies DESCRIBE_CONFIGS), and its resource
pattern covers the resource (LITERAL: the same name or `*`; PREFIXED: a
prefix of the name). No matching ACL: denied (Kafka with
allow.everyone.if.no.acl.found=false). Only used when SASL is on; with SASL
off every request is allowed, for a trusted network only.
"""
from __future__ import annotations

from typing import Callable

from raftka.security.state import (ALLOW, DENY, OP_ALL, OP_ALTER, OP_ALTER_CONFIGS, OP_DELETE, OP_DESCRIBE,
                                   OP_DESCRIBE_CONFIGS, OP_READ, OP_WRITE, WILDCARD, SecurityState,
                                   resource_matches)

ANONYMOUS = "User:ANONYMOUS"
_IMPLIED_BY: dict[int, frozenset[int]] = {
    OP_DESCRIBE: frozenset({OP_DESCRIBE, OP_READ, OP_WRITE, OP_DELETE, OP_ALTER, OP_ALL}),
    OP_DESCRIBE_CONFIGS: frozenset({OP_DESCRIBE_CONFIGS, OP_ALTER_CONFIGS, OP_ALL}),
}
_CACHE_MAX = 10_000


class Authorizer:
    """Answers allowed(...) from the current SecurityState (read through `state`)."""

    def __init__(self, state: Callable[[], SecurityState], super_users: frozenset[str]) -> None:
        self._state = state
        self.super_users = super_users
        self._cache: dict[tuple[str, str, int, int, str], bool] = {}
        self._cached_acls: object = None

    def allowed(self, principal: str, host: str, operation: int, resource_type: int, name: str) -> bool:
        if principal in self.super_users:
            return True
        state = self._state()
        if state.acls is not self._cached_acls:     # every ACL change replaces or mutates the set
            self._cache.clear()
            self._cached_acls = state.acls
        key = (principal, host, operation, resource_type, name)
        found = self._cache.get(key)
        if found is None:
            found = self._decide(state, key)
            if len(self._cache) >= _CACHE_MAX:
                self._cache.clear()
            self._cache[key] = found
        return found

    def invalidate(self) -> None:
        self._cache.clear()

    @staticmethod
    def _decide(state: SecurityState, key: tuple[str, str, int, int, str]) -> bool:
        principal, host, operation, resource_type, name = key
        granting = _IMPLIED_BY.get(operation, frozenset({operation, OP_ALL}))
        allowed = False
        for binding in state.acls:
            if binding.resource_type != resource_type or binding.principal not in (principal, "User:*") \
                    or binding.host not in (host, WILDCARD) or not resource_matches(binding, name):
                continue
            if binding.permission == DENY and binding.operation in (operation, OP_ALL):
                return False
            if binding.permission == ALLOW and binding.operation in granting:
                allowed = True
        return allowed
