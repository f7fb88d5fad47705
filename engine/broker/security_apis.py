"""The Kafka APIs of authentication and authorization.

SASL (SaslHandshake v1; v0 is advertised for librdkafka and refused,
engine/protocol/kafka.py; SaslAuthenticate v0-2) runs per connection in a
SaslSession the listener (server.py) keeps: with SASL on, a connection may
send only ApiVersions, SaslHandshake and SaslAuthenticate until it has
authenticated; any other request closes it, and so does a failed
authentication (after its SASL_AUTHENTICATION_FAILED answer). PLAIN is
offered only on a TLS connection unless `sasl_plain_without_tls` is set: it
sends the password itself.

SecurityHandlers serve the admin APIs over the replicated users and ACLs
(raftka.security.state): DescribeUserScramCredentials / AlterUserScramCredentials
(v0, flexible; CLUSTER DESCRIBE / ALTER) and DescribeAcls / CreateAcls /
DeleteAcls (v1; CLUSTER DESCRIBE / ALTER). With SASL off they answer
SECURITY_DISABLED, as Kafka without an authorizer does.
"""
from __future__ import annotations

import datetime
import logging
import os
from typing import Any, Awaitable, Callable

from raftka.cluster.controller import ClusterController
from raftka.config import Config, ConfigError
from raftka.errors import ErrorCode, RaftkaError
from raftka.protocol import kafka
from raftka.protocol.kafka import (ALTER_USER_SCRAM_CREDENTIALS, CREATE_ACLS, DELETE_ACLS, DESCRIBE_ACLS,
                                   DESCRIBE_USER_SCRAM_CREDENTIALS, SASL_AUTHENTICATE, SASL_HANDSHAKE, Request,
                                   build, nested, response_schema)
from raftka.security import scram, state as acl
from raftka.security.authorizer import Authorizer
from raftka.security.state import AclBinding, SecurityState, binding_problem

log = logging.getLogger(__name__)

SASL_APIS = frozenset({SASL_HANDSHAKE, SASL_AUTHENTICATE})
# Kafka's ScramMechanism ids in the SCRAM admin APIs
SCRAM_IDS = {1: scram.SCRAM_SHA_256, 2: scram.SCRAM_SHA_512}
SCRAM_ID_OF = {name: i for i, name in SCRAM_IDS.items()}
ADMIN_USER_ENV, ADMIN_PASSWORD_ENV = "RAFTKA_ADMIN_USER", "RAFTKA_ADMIN_PASSWORD"
ADMIN_TIMEOUT_S = 10.0


def enabled_mechanisms(config: Config) -> tuple[str, ...]:
    """The SASL mechanisms `sasl_mechanisms` names (empty: SASL off); ConfigError for one we do not serve."""
    names = tuple(m.strip().upper() for m in config.sasl_mechanisms.split(",") if m.strip())
    unknown = [m for m in names if m not in scram.MECHANISMS]
    if unknown:
        raise ConfigError(f"sasl_mechanisms: {unknown} not among {list(scram.MECHANISMS)}")
    return names


def super_users(config: Config, environ: dict[str, str] | None = None) -> frozenset[str]:
    """`super_users` ("User:a,User:b" or ';'-separated) plus the bootstrap admin of RAFTKA_ADMIN_USER."""
    names = {p.strip() for p in config.super_users.replace(";", ",").split(",") if p.strip()}
    admin = (os.environ if environ is None else environ).get(ADMIN_USER_ENV)
    if admin:
        names.add(f"User:{admin}")
    return frozenset(names)


def sasl_disabled_answer(request: Request) -> bytes:
    """SaslHandshake / SaslAuthenticate on a listener without SASL."""
    if request.api_key == SASL_HANDSHAKE:
        return kafka.answer(request, error_code=ErrorCode.UNSUPPORTED_SASL_MECHANISM, mechanisms=())
    return SaslSession._auth_answer(request, ErrorCode.ILLEGAL_SASL_STATE, "SASL is not enabled on this listener")


class SaslSession:
    """One connection's authentication state."""

    def __init__(self, mechanisms: tuple[str, ...], lookup: scram.Lookup, tls: bool, plain_without_tls: bool) -> None:
        self.offered = tuple(m for m in mechanisms if m != scram.PLAIN or tls or plain_without_tls)
        self._lookup = lookup
        self._mechanism: str | None = None
        self._exchange: scram.ScramExchange | None = None
        self.principal: str | None = None
        self.failed = False     # the connection is closed once the answer is sent

    @property
    def authenticated(self) -> bool:
        return self.principal is not None

    def answer(self, request: Request) -> bytes:
        if request.api_key == SASL_HANDSHAKE:
            return self._handshake(request)
        return self._authenticate(request)

    def _handshake(self, request: Request) -> bytes:
        mechanism = request.body.mechanism
        if self._mechanism is not None or self.authenticated:
            self.failed = True
            return kafka.answer(request, error_code=ErrorCode.ILLEGAL_SASL_STATE, mechanisms=self.offered)
        if mechanism not in self.offered:
            return kafka.answer(request, error_code=ErrorCode.UNSUPPORTED_SASL_MECHANISM, mechanisms=self.offered)
        self._mechanism = mechanism
        if mechanism in scram.HASHES:
            self._exchange = scram.ScramExchange(mechanism, self._lookup)
        return kafka.answer(request, error_code=ErrorCode.NONE, mechanisms=self.offered)

    def _authenticate(self, request: Request) -> bytes:
        if self._mechanism is None or self.authenticated:
            self.failed = True
            return self._auth_answer(request, ErrorCode.ILLEGAL_SASL_STATE, "SaslAuthenticate before SaslHandshake")
        try:
            if self._exchange is not None:
                reply = self._exchange.step(bytes(request.body.auth_bytes))
                if self._exchange.done:
                    self.principal = f"User:{self._exchange.user}"
            else:
                self.principal = f"User:{scram.check_plain(bytes(request.body.auth_bytes), self._lookup)}"
                reply = b""
        except scram.AuthenticationFailed as failed:
            self.failed = True
            return self._auth_answer(request, ErrorCode.SASL_AUTHENTICATION_FAILED,
                                     f"Authentication failed: {failed}")
        return self._auth_answer(request, ErrorCode.NONE, None, reply)

    @staticmethod
    def _auth_answer(request: Request, code: int, message: str | None, auth_bytes: bytes = b"") -> bytes:
        return kafka.answer(request, error_code=code, error_message=message, auth_bytes=auth_bytes,
                            session_lifetime=datetime.timedelta(0))


class Security:
    """One broker's authentication and authorization settings and state."""

    def __init__(self, config: Config, controller: ClusterController) -> None:
        self.config = config
        self.controller = controller
        self.mechanisms = enabled_mechanisms(config)
        self.authorizer = Authorizer(lambda: controller.state.security, super_users(config)) \
            if self.mechanisms else None

    @property
    def enabled(self) -> bool:
        return bool(self.mechanisms)

    @property
    def state(self) -> SecurityState:
        return self.controller.state.security

    def session(self, tls: bool) -> SaslSession | None:
        if not self.mechanisms:
            return None
        return SaslSession(self.mechanisms, self.state.credential, tls, self.config.sasl_plain_without_tls)

    def allowed(self, request: Request, operation: int, resource_type: int, name: str) -> bool:
        """Whether the request's principal may; always with SASL off."""
        if self.authorizer is None:
            return True
        return self.authorizer.allowed(request.principal, request.client_host.lstrip("/"), operation,
                                       resource_type, name)

    def may_write_idempotently(self, request: Request) -> bool:
        """InitProducerId: IDEMPOTENT_WRITE on the cluster, or (KIP-679) WRITE on some topic."""
        if self.allowed(request, acl.OP_IDEMPOTENT_WRITE, acl.RESOURCE_CLUSTER, acl.CLUSTER_NAME):
            return True
        return any(b.resource_type == acl.RESOURCE_TOPIC and b.permission == acl.ALLOW
                   and b.operation in (acl.OP_WRITE, acl.OP_ALL) and b.principal in (request.principal, "User:*")
                   for b in self.state.acls)

    async def bootstrap_admin(self, environ: dict[str, str] | None = None) -> None:
        """At start: give RAFTKA_ADMIN_USER SCRAM-SHA-512 and -256 credentials
        from RAFTKA_ADMIN_PASSWORD unless that user already has them (a later
        start never resets a changed password)."""
        env = os.environ if environ is None else environ
        user, password = env.get(ADMIN_USER_ENV), env.get(ADMIN_PASSWORD_ENV)
        if not user or not password:
            return
        for mechanism in (scram.SCRAM_SHA_512, scram.SCRAM_SHA_256):
            if self.state.credential(user, mechanism) is None:
                await self.controller.propose(
                    acl.scram_upsert(scram.make_credential(mechanism, password), user, if_absent=True),
                    f"bootstrap admin {user!r} ({mechanism})", ADMIN_TIMEOUT_S)
        log.info("admin user %r has SCRAM credentials", user)


class SecurityHandlers:
    """The users and ACL admin APIs; `table()` goes into Handlers' dispatch table."""

    def __init__(self, security: Security) -> None:
        self.security = security

    def table(self) -> dict[int, Callable[[Request], Awaitable[Any]]]:
        return {DESCRIBE_USER_SCRAM_CREDENTIALS: self.describe_user_scram_credentials,
                ALTER_USER_SCRAM_CREDENTIALS: self.alter_user_scram_credentials,
                DESCRIBE_ACLS: self.describe_acls, CREATE_ACLS: self.create_acls, DELETE_ACLS: self.delete_acls}

    def _refusal(self, request: Request, operation: int) -> int:
        if not self.security.enabled:
            return ErrorCode.SECURITY_DISABLED
        if not self.security.allowed(request, operation, acl.RESOURCE_CLUSTER, acl.CLUSTER_NAME):
            return ErrorCode.CLUSTER_AUTHORIZATION_FAILED
        return ErrorCode.NONE

    async def _propose(self, command: bytes, what: str) -> tuple[int, str | None]:
        try:
            await self.security.controller.propose(command, what, ADMIN_TIMEOUT_S)
        except RaftkaError as error:
            return error.error_code, str(error)
        return ErrorCode.NONE, None

    # ---- users ------------------------------------------------------------

    async def describe_user_scram_credentials(self, request: Request) -> bytes:
        schema = response_schema(request)
        result_cls, info_cls = nested(schema, "DescribeUserScramCredentialsResult"), nested(schema, "CredentialInfo")
        code = self._refusal(request, acl.OP_DESCRIBE)
        if code != ErrorCode.NONE:
            return kafka.answer(request, error_code=code, error_message=None, results=())
        users = self.security.state.users()
        wanted = [u.name for u in request.body.users] if request.body.users else sorted(users)   # none or empty: all
        results = []
        for user in wanted:
            credentials = users.get(user, [])
            infos = tuple(build(info_cls, mechanism=SCRAM_ID_OF[c.mechanism], iterations=c.iterations)
                          for c in credentials)
            missing = ErrorCode.NONE if credentials else ErrorCode.RESOURCE_NOT_FOUND
            results.append(build(result_cls, user=user, error_code=missing,
                                 error_message=None if credentials else f"no credentials for user {user!r}",
                                 credential_infos=infos))
        return kafka.answer(request, error_code=ErrorCode.NONE, error_message=None, results=tuple(results))

    async def alter_user_scram_credentials(self, request: Request) -> bytes:
        result_cls = nested(response_schema(request), "AlterUserScramCredentialsResult")
        refusal = self._refusal(request, acl.OP_ALTER)
        outcomes: dict[str, tuple[int, str | None]] = {}
        for deletion in request.body.deletions:
            outcomes[deletion.name] = (refusal, None) if refusal else await self._delete_user(deletion)
        for upsertion in request.body.upsertions:
            if outcomes.get(upsertion.name, (ErrorCode.NONE,))[0] != ErrorCode.NONE:
                continue
            outcomes[upsertion.name] = (refusal, None) if refusal else await self._upsert_user(upsertion)
        return kafka.answer(request, results=tuple(build(result_cls, user=user, error_code=code, error_message=message)
                                                   for user, (code, message) in outcomes.items()))

    async def _delete_user(self, deletion: Any) -> tuple[int, str | None]:
        mechanism = SCRAM_IDS.get(int(deletion.mechanism))
        if mechanism is None:
            return ErrorCode.UNSUPPORTED_SASL_MECHANISM, f"mechanism id {deletion.mechanism}"
        return await self._propose(acl.scram_delete(deletion.name, mechanism), f"delete user {deletion.name!r}")

    async def _upsert_user(self, upsertion: Any) -> tuple[int, str | None]:
        mechanism = SCRAM_IDS.get(int(upsertion.mechanism))
        if mechanism is None:
            return ErrorCode.UNSUPPORTED_SASL_MECHANISM, f"mechanism id {upsertion.mechanism}"
        if not upsertion.name or not scram.MIN_ITERATIONS <= upsertion.iterations <= scram.MAX_ITERATIONS \
                or not upsertion.salt or not upsertion.salted_password:
            return ErrorCode.UNACCEPTABLE_CREDENTIAL, (f"needs a user name, a salt and iterations in "
                                                       f"[{scram.MIN_ITERATIONS}, {scram.MAX_ITERATIONS}]")
        credential = scram.credential_from_salted(mechanism, bytes(upsertion.salt), int(upsertion.iterations),
                                                  bytes(upsertion.salted_password))
        return await self._propose(acl.scram_upsert(credential, upsertion.name), f"set user {upsertion.name!r}")

    # ---- ACLs -------------------------------------------------------------

    async def describe_acls(self, request: Request) -> bytes:
        schema = response_schema(request)
        resource_cls, description_cls = nested(schema, "DescribeAclsResource"), nested(schema, "AclDescription")
        code = self._refusal(request, acl.OP_DESCRIBE)
        if code != ErrorCode.NONE:
            return kafka.answer(request, error_code=code, error_message=None, resources=())
        wanted = _acl_filter(request.body)
        grouped: dict[tuple[int, str, int], list[AclBinding]] = {}
        for binding in sorted(self.security.state.acls):
            if acl.filter_matches(wanted, binding):
                grouped.setdefault((binding.resource_type, binding.resource_name, binding.pattern_type), []).append(binding)
        resources = tuple(build(resource_cls, resource_type=rt, resource_name=name, pattern_type=pt,
                                acls=tuple(build(description_cls, principal=b.principal, host=b.host,
                                                 operation=b.operation, permission_type=b.permission)
                                           for b in bindings))
                          for (rt, name, pt), bindings in grouped.items())
        return kafka.answer(request, error_code=ErrorCode.NONE, error_message=None, resources=resources)

    async def create_acls(self, request: Request) -> bytes:
        result_cls = nested(response_schema(request), "AclCreationResult")
        refusal = self._refusal(request, acl.OP_ALTER)
        results = []
        for creation in request.body.creations:
            binding = AclBinding(int(creation.resource_type), creation.resource_name,
                                 int(creation.resource_pattern_type), creation.principal, creation.host,
                                 int(creation.operation), int(creation.permission_type))
            code, message = refusal, None
            if code == ErrorCode.NONE:
                message = binding_problem(binding)
                code = ErrorCode.INVALID_REQUEST if message else ErrorCode.NONE
            if code == ErrorCode.NONE:
                code, message = await self._propose(acl.acls_create([binding]), f"create ACL {binding.describe()}")
            results.append(build(result_cls, error_code=code, error_message=message))
        return kafka.answer(request, results=tuple(results))

    async def delete_acls(self, request: Request) -> bytes:
        schema = response_schema(request)
        result_cls, matching_cls = nested(schema, "DeleteAclsFilterResult"), nested(schema, "DeleteAclsMatchingAcl")
        refusal = self._refusal(request, acl.OP_ALTER)
        results = []
        for f in request.body.filters:
            wanted = _acl_filter(f)
            matching: list[AclBinding] = []
            code, message = refusal, None
            if code == ErrorCode.NONE:
                matching = [b for b in sorted(self.security.state.acls) if acl.filter_matches(wanted, b)]
                code, message = await self._propose(acl.acls_delete([wanted]), "delete ACLs")
            results.append(build(result_cls, error_code=code, error_message=message, matching_acls=tuple(
                build(matching_cls, error_code=ErrorCode.NONE, error_message=None, resource_type=b.resource_type,
                      resource_name=b.resource_name, pattern_type=b.pattern_type, principal=b.principal,
                      host=b.host, operation=b.operation, permission_type=b.permission) for b in matching)))
        return kafka.answer(request, filter_results=tuple(results))


def _acl_filter(f: Any) -> AclBinding:
    """The filter of a DescribeAcls request or a DeleteAcls filter entry."""
    return AclBinding(int(f.resource_type_filter), f.resource_name_filter, int(f.pattern_type_filter),
                      f.principal_filter, f.host_filter, int(f.operation), int(f.permission_type))
