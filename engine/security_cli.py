"""`raftka users` and `raftka acls`: the users and ACLs of a secured cluster,
managed through Kafka's own APIs (AlterUserScramCredentials, CreateAcls, ...)
with confluent-kafka, like the other operator commands (raftka.admin: same
--bootstrap, --command-config, -X and exit statuses).

  raftka users add NAME --password-stdin [--mechanism M] [--iterations N]
  raftka users list
  raftka users delete NAME [--mechanism M]
  raftka acls add|remove --principal User:NAME --operation OP [--operation OP ...]
                         (--topic T | --group G | --cluster) [--prefixed] [--deny] [--host H]
  raftka acls list [--principal P] [--topic T | --group G | --cluster]

The password is read from stdin (never a flag: flags show in `ps`); users
get SCRAM-SHA-512 and SCRAM-SHA-256 credentials unless --mechanism says one.
"""
from __future__ import annotations

import argparse
import sys
from typing import Any, TextIO

from raftka.admin import DEFAULT_BOOTSTRAP, AdminError, _config, _result, add_connection_arguments
from raftka.security import scram
from raftka.security.state import OPERATIONS

MECHANISM_NAMES = (scram.SCRAM_SHA_512, scram.SCRAM_SHA_256)


def _admin(args: argparse.Namespace) -> Any:
    from confluent_kafka.admin import AdminClient
    return AdminClient(_config(args))


def _mechanisms(args: argparse.Namespace) -> list[Any]:
    from confluent_kafka.admin import ScramMechanism
    names = MECHANISM_NAMES if args.mechanism is None else (args.mechanism,)
    return [ScramMechanism[name.replace("-", "_")] for name in names]


def users_add(args: argparse.Namespace, out: TextIO, stdin: TextIO | None = None) -> None:
    from confluent_kafka.admin import ScramCredentialInfo, UserScramCredentialUpsertion
    password = (stdin or sys.stdin).readline().rstrip("\n")
    if not password:
        raise AdminError("no password on stdin")
    admin = _admin(args)
    for mechanism in _mechanisms(args):
        upsertion = UserScramCredentialUpsertion(args.name, ScramCredentialInfo(mechanism, args.iterations),
                                                 password.encode())
        futures = admin.alter_user_scram_credentials([upsertion])
        _result(futures[args.name], f"user {args.name!r} ({mechanism.name})", args)
    print(f"user {args.name} set", file=out)


def users_list(args: argparse.Namespace, out: TextIO) -> None:
    admin = _admin(args)    # held: librdkafka fails pending futures when the client is collected
    described = _result(admin.describe_user_scram_credentials(), "list users", args)
    for user, description in sorted(described.items()):
        for info in description.scram_credential_infos:
            print(f"{user}\t{info.mechanism.name.replace('_', '-')}\titerations={info.iterations}", file=out)


def users_delete(args: argparse.Namespace, out: TextIO) -> None:
    from confluent_kafka.admin import UserScramCredentialDeletion
    admin = _admin(args)
    for mechanism in _mechanisms(args):
        futures = admin.alter_user_scram_credentials([UserScramCredentialDeletion(args.name, mechanism)])
        try:
            _result(futures[args.name], f"delete user {args.name!r} ({mechanism.name})", args)
        except AdminError:
            if args.mechanism is not None:
                raise      # the one named must exist; with both, either may be missing
    print(f"user {args.name} deleted", file=out)


def _resource(args: argparse.Namespace, filtering: bool) -> tuple[Any, str | None]:
    from confluent_kafka.admin import ResourceType
    if args.topic is not None:
        return ResourceType.TOPIC, args.topic
    if args.group is not None:
        return ResourceType.GROUP, args.group
    if args.cluster:
        return ResourceType.BROKER, "kafka-cluster"
    if filtering:
        return ResourceType.ANY, None
    raise AdminError("name a resource: --topic, --group or --cluster")


def _bindings(args: argparse.Namespace) -> list[Any]:
    from confluent_kafka.admin import AclBinding, AclOperation, AclPermissionType, ResourcePatternType
    resource_type, name = _resource(args, filtering=False)
    pattern = ResourcePatternType.PREFIXED if args.prefixed else ResourcePatternType.LITERAL
    permission = AclPermissionType.DENY if args.deny else AclPermissionType.ALLOW
    return [AclBinding(resource_type, name, pattern, args.principal, args.host, AclOperation[op], permission)
            for op in args.operation]


def acls_add(args: argparse.Namespace, out: TextIO) -> None:
    admin = _admin(args)
    for binding, future in admin.create_acls(_bindings(args)).items():
        _result(future, f"add {binding}", args)
        print(f"added {_text(binding)}", file=out)


def acls_remove(args: argparse.Namespace, out: TextIO) -> None:
    from confluent_kafka.admin import AclBindingFilter
    filters = [AclBindingFilter(b.restype, b.name, b.resource_pattern_type, b.principal, b.host, b.operation,
                                b.permission_type) for b in _bindings(args)]
    admin = _admin(args)
    for _filter, future in admin.delete_acls(filters).items():
        for binding in _result(future, "remove ACLs", args):
            print(f"removed {_text(binding)}", file=out)


def acls_list(args: argparse.Namespace, out: TextIO) -> None:
    from confluent_kafka.admin import AclBindingFilter, AclOperation, AclPermissionType, ResourcePatternType
    resource_type, name = _resource(args, filtering=True)
    wanted = AclBindingFilter(resource_type, name, ResourcePatternType.ANY, args.principal, None,
                              AclOperation.ANY, AclPermissionType.ANY)
    admin = _admin(args)
    for binding in sorted(_result(admin.describe_acls(wanted), "list ACLs", args), key=_text):
        print(_text(binding), file=out)


def _text(binding: Any) -> str:
    return (f"{binding.principal}\t{binding.permission_type.name}\t{binding.operation.name}\t"
            f"{binding.restype.name}:{binding.resource_pattern_type.name}:{binding.name}\thost={binding.host}")


def add_commands(commands: argparse._SubParsersAction) -> None:
    """`raftka users ...` and `raftka acls ...`."""
    def command(parent: argparse._SubParsersAction, name: str, help_text: str) -> argparse.ArgumentParser:
        parser = parent.add_parser(name, help=help_text, description=help_text)
        parser.add_argument("--bootstrap", "-b", default=DEFAULT_BOOTSTRAP,
                            help=f"any broker, host:port[,...] (default {DEFAULT_BOOTSTRAP})")
        add_connection_arguments(parser)
        return parser

    users = commands.add_parser("users", help="add, list or delete SASL/SCRAM users").add_subparsers(
        dest="verb", metavar="VERB", required=True)
    add = command(users, "add", "add a user or change its password (read from stdin)")
    add.add_argument("name")
    add.add_argument("--password-stdin", action="store_true", required=True,
                     help="read the password from the first line of stdin")
    add.add_argument("--mechanism", choices=MECHANISM_NAMES, help="default: both")
    add.add_argument("--iterations", type=int, default=scram.DEFAULT_ITERATIONS,
                     help=f"[{scram.MIN_ITERATIONS}, {scram.MAX_ITERATIONS}] (default {scram.DEFAULT_ITERATIONS})")
    add.set_defaults(run=users_add)
    command(users, "list", "list users and their SCRAM mechanisms").set_defaults(run=users_list)
    delete = command(users, "delete", "delete a user's credentials")
    delete.add_argument("name")
    delete.add_argument("--mechanism", choices=MECHANISM_NAMES, help="default: both")
    delete.set_defaults(run=users_delete)

    acls = commands.add_parser("acls", help="add, list or remove ACLs").add_subparsers(
        dest="verb", metavar="VERB", required=True)
    for verb, run, help_text in (("add", acls_add, "allow (or --deny) operations on a resource"),
                                 ("remove", acls_remove, "remove the ACLs these options describe"),
                                 ("list", acls_list, "list ACLs, all or of one principal/resource")):
        parser = command(acls, verb, help_text)
        parser.add_argument("--principal", required=verb != "list", help="User:NAME, or User:* for everyone")
        if verb != "list":
            parser.add_argument("--operation", action="append", required=True, type=str.upper,
                                choices=[op for op in OPERATIONS.values()], help="repeatable")
            parser.add_argument("--prefixed", action="store_true", help="the name is a prefix (default: literal)")
            parser.add_argument("--deny", action="store_true", help="a DENY ACL (default: ALLOW)")
            parser.add_argument("--host", default="*", help="client address (default: any)")
        resource = parser.add_mutually_exclusive_group()
        resource.add_argument("--topic")
        resource.add_argument("--group")
        resource.add_argument("--cluster", action="store_true")
        parser.set_defaults(run=run)
