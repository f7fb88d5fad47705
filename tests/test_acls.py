"""ACLs on a real SASL broker process, managed with `raftka users` and
`raftka acls`: with SASL on nothing is allowed without an ACL (super users
excepted), Metadata hides topics a principal may not describe, and each API
answers Kafka's authorization error until the ACL that allows it exists."""
from __future__ import annotations

import subprocess
import time

import pytest

from raftka.broker.local_cluster import raftka_command
from raftka.errors import ErrorCode
from tests.broker_process import BrokerProcess

TIMEOUT_S = 30
ADMIN, ADMIN_PASSWORD = "admin", "admin-secret-0123456789"
ALICE_PASSWORD = "alice-password-42"
OPS, OPS_PASSWORD = "ops", "ops-password-0123456789"      # a super user by `super_users`, not by the environment


def sasl(user: str, password: str) -> dict[str, str]:
    return {"security.protocol": "SASL_PLAINTEXT", "sasl.mechanism": "SCRAM-SHA-512",
            "sasl.username": user, "sasl.password": password}


@pytest.fixture(scope="module")
def broker(tmp_path_factory):
    process = BrokerProcess(tmp_path_factory.mktemp("acls") / "data", sasl_mechanisms="SCRAM-SHA-512,SCRAM-SHA-256",
                            super_users=f"User:{OPS}")
    process.brokers.env.update(RAFTKA_ADMIN_USER=ADMIN, RAFTKA_ADMIN_PASSWORD=ADMIN_PASSWORD)
    process.start()
    as_admin = [f"-X{k}={v}" for k, v in sasl(ADMIN, ADMIN_PASSWORD).items()]
    process.admin_flags = ["--bootstrap", process.bootstrap, *as_admin]
    added = raftka(process, "users", "add", "alice", "--password-stdin", stdin=ALICE_PASSWORD + "\n")
    assert added.returncode == 0, added.stderr
    yield process
    process.stop()


def raftka(broker, *args: str, stdin: str = "") -> subprocess.CompletedProcess:
    return subprocess.run([*raftka_command(*args), *getattr(broker, "admin_flags", [])], input=stdin,
                          capture_output=True, text=True, timeout=TIMEOUT_S)


def acl(broker, verb: str, *args: str) -> str:
    done = raftka(broker, "acls", verb, *args)
    assert done.returncode == 0, done.stderr
    return done.stdout


def admin_client(broker, user: str = ADMIN, password: str = ADMIN_PASSWORD):
    from confluent_kafka.admin import AdminClient
    return AdminClient({"bootstrap.servers": broker.bootstrap, **sasl(user, password)})


def create_topic(broker, name: str) -> None:
    from confluent_kafka.admin import NewTopic
    admin = admin_client(broker)
    admin.create_topics([NewTopic(name, 1, 1)])[name].result(TIMEOUT_S)


def produce_error(broker, topic: str, user: str = "alice", password: str = ALICE_PASSWORD) -> int | None:
    """The error code of one produce as `user` (None: delivered)."""
    from confluent_kafka import Producer
    outcome: list = []
    producer = Producer({"bootstrap.servers": broker.bootstrap, **sasl(user, password),
                         "message.timeout.ms": 5000, "retries": 0})
    producer.produce(topic, value=b"v", on_delivery=lambda error, _m: outcome.append(error))
    producer.flush(TIMEOUT_S)
    assert outcome, "no delivery report"
    return None if outcome[0] is None else outcome[0].code()


def consume_as(broker, topic: str, group: str, expected: int, user: str = "alice",
                     password: str = ALICE_PASSWORD) -> tuple[list[bytes], list[int]]:
    from confluent_kafka import Consumer
    consumer = Consumer({"bootstrap.servers": broker.bootstrap, **sasl(user, password), "group.id": group,
                         "auto.offset.reset": "earliest", "enable.auto.commit": False})
    consumer.subscribe([topic])
    got, errors = [], []
    deadline = time.monotonic() + 15
    while len(got) < expected and time.monotonic() < deadline:
        message = consumer.poll(0.5)
        if message is None:
            continue
        if message.error() is not None:
            errors.append(message.error().code())
            if message.error().code() in (ErrorCode.TOPIC_AUTHORIZATION_FAILED, ErrorCode.GROUP_AUTHORIZATION_FAILED):
                break
            continue
        got.append(message.value())
        consumer.commit(message, asynchronous=False)
    consumer.close()
    return got, errors


def test_without_acls_alice_is_authenticated_but_may_do_nothing_and_sees_no_topic(broker):
    create_topic(broker, "secret")
    assert produce_error(broker, "secret") == ErrorCode.TOPIC_AUTHORIZATION_FAILED
    alice, admin = admin_client(broker, "alice", ALICE_PASSWORD), admin_client(broker)
    assert "secret" not in alice.list_topics(timeout=TIMEOUT_S).topics
    assert "secret" in admin.list_topics(timeout=TIMEOUT_S).topics    # the super user sees it


def test_write_then_prefixed_read_and_a_group_let_alice_produce_consume_and_commit(broker):
    create_topic(broker, "orders")
    acl(broker, "add", "--principal", "User:alice", "--operation", "WRITE", "--topic", "orders")
    assert produce_error(broker, "orders") is None
    _got, errors = consume_as(broker, "orders", "billing", 1)
    assert ErrorCode.GROUP_AUTHORIZATION_FAILED in errors or ErrorCode.TOPIC_AUTHORIZATION_FAILED in errors
    acl(broker, "add", "--principal", "User:alice", "--operation", "READ", "--topic", "ord", "--prefixed")
    acl(broker, "add", "--principal", "User:alice", "--operation", "READ", "--group", "billing")
    got, errors = consume_as(broker, "orders", "billing", 1)
    assert got == [b"v"], errors
    listed = acl(broker, "list", "--principal", "User:alice")
    assert "User:alice\tALLOW\tREAD\tTOPIC:PREFIXED:ord" in listed and "GROUP:LITERAL:billing" in listed


def test_a_deny_acl_overrides_an_allow(broker):
    create_topic(broker, "guarded")
    acl(broker, "add", "--principal", "User:*", "--operation", "WRITE", "--topic", "guarded")
    assert produce_error(broker, "guarded") is None
    acl(broker, "add", "--principal", "User:alice", "--operation", "WRITE", "--topic", "guarded", "--deny")
    assert produce_error(broker, "guarded") == ErrorCode.TOPIC_AUTHORIZATION_FAILED
    removed = acl(broker, "remove", "--principal", "User:alice", "--operation", "WRITE", "--topic", "guarded", "--deny")
    assert "removed User:alice\tDENY\tWRITE" in removed
    assert produce_error(broker, "guarded") is None


def test_create_and_delete_topics_need_their_acls(broker):
    from confluent_kafka import KafkaException
    from confluent_kafka.admin import NewTopic
    alice = admin_client(broker, "alice", ALICE_PASSWORD)
    with pytest.raises(KafkaException) as refused:
        alice.create_topics([NewTopic("alices", 1, 1)])["alices"].result(TIMEOUT_S)
    assert refused.value.args[0].code() == ErrorCode.TOPIC_AUTHORIZATION_FAILED
    acl(broker, "add", "--principal", "User:alice", "--operation", "CREATE", "--operation", "DELETE",
        "--operation", "DESCRIBE", "--topic", "alices")
    alice.create_topics([NewTopic("alices", 1, 1)])["alices"].result(TIMEOUT_S)
    with pytest.raises(KafkaException) as refused:
        alice.delete_topics(["secret"])["secret"].result(TIMEOUT_S)
    assert refused.value.args[0].code() == ErrorCode.TOPIC_AUTHORIZATION_FAILED
    alice.delete_topics(["alices"])["alices"].result(TIMEOUT_S)


def test_delete_records_needs_delete_on_the_topic(broker):
    from confluent_kafka import KafkaException, TopicPartition
    create_topic(broker, "trimmed")
    acl(broker, "add", "--principal", "User:alice", "--operation", "WRITE", "--operation", "DESCRIBE",
        "--topic", "trimmed")
    assert produce_error(broker, "trimmed") is None
    alice = admin_client(broker, "alice", ALICE_PASSWORD)

    def delete_below_1():
        futures = alice.delete_records([TopicPartition("trimmed", 0, 1)], request_timeout=TIMEOUT_S)
        return next(iter(futures.values())).result(TIMEOUT_S)
    with pytest.raises(KafkaException) as refused:
        delete_below_1()
    assert refused.value.args[0].code() == ErrorCode.TOPIC_AUTHORIZATION_FAILED
    acl(broker, "add", "--principal", "User:alice", "--operation", "DELETE", "--topic", "trimmed")
    assert delete_below_1().low_watermark == 1


def test_only_a_super_user_manages_users_and_acls(broker):
    done = subprocess.run([*raftka_command("acls", "add", "--principal", "User:alice", "--operation", "ALL",
                                           "--cluster", "--bootstrap", broker.bootstrap),
                           *[f"-X{k}={v}" for k, v in sasl("alice", ALICE_PASSWORD).items()]],
                          capture_output=True, text=True, timeout=TIMEOUT_S)
    assert done.returncode == 1 and "CLUSTER_AUTHORIZATION_FAILED" in done.stderr.upper().replace(" ", "_")
    listed = raftka(broker, "users", "list")
    assert "alice\tSCRAM-SHA-512" in listed.stdout and "admin\tSCRAM-SHA-256" in listed.stdout


def test_a_listed_super_user_passes_every_acl_check_with_no_acls_and_a_normal_user_is_refused(broker):
    """`super_users` names ops: with no ACL for it, and a DENY of everything to
    everyone on its topics, ops creates, grows, lists, describes, produces to,
    consumes from (committing a group's offsets) and deletes a topic, and adds
    an ACL; bob, authenticated alike, is refused each of these."""
    from confluent_kafka import KafkaException
    from confluent_kafka.admin import ConfigResource, NewPartitions, NewTopic
    bob_password = "bob-password-0123456789"
    for user, password in ((OPS, OPS_PASSWORD), ("bob", bob_password)):
        added = raftka(broker, "users", "add", user, "--password-stdin", stdin=password + "\n")
        assert added.returncode == 0, added.stderr
    acl(broker, "add", "--principal", "User:*", "--operation", "ALL", "--topic", "ops-", "--prefixed", "--deny")
    ops, bob = admin_client(broker, OPS, OPS_PASSWORD), admin_client(broker, "bob", bob_password)

    def refusal(future) -> int:
        with pytest.raises(KafkaException) as refused:
            future.result(TIMEOUT_S)
        return refused.value.args[0].code()

    assert refusal(bob.create_topics([NewTopic("ops-a", 1, 1)])["ops-a"]) == ErrorCode.TOPIC_AUTHORIZATION_FAILED
    ops.create_topics([NewTopic("ops-a", 1, 1)])["ops-a"].result(TIMEOUT_S)
    grow = NewPartitions("ops-a", 2)
    assert refusal(bob.create_partitions([grow])["ops-a"]) == ErrorCode.TOPIC_AUTHORIZATION_FAILED
    ops.create_partitions([grow])["ops-a"].result(TIMEOUT_S)
    assert "ops-a" not in bob.list_topics(timeout=TIMEOUT_S).topics
    assert len(ops.list_topics(timeout=TIMEOUT_S).topics["ops-a"].partitions) == 2
    [bob_described] = bob.describe_configs([ConfigResource("topic", "ops-a")]).values()
    assert refusal(bob_described) == ErrorCode.TOPIC_AUTHORIZATION_FAILED
    [ops_described] = ops.describe_configs([ConfigResource("topic", "ops-a")]).values()
    assert "retention.ms" in ops_described.result(TIMEOUT_S)

    assert produce_error(broker, "ops-a", "bob", bob_password) == ErrorCode.TOPIC_AUTHORIZATION_FAILED
    assert produce_error(broker, "ops-a", OPS, OPS_PASSWORD) is None
    got, errors = consume_as(broker, "ops-a", "ops-group", 1, "bob", bob_password)
    assert not got and {ErrorCode.TOPIC_AUTHORIZATION_FAILED, ErrorCode.GROUP_AUTHORIZATION_FAILED} & set(errors)
    got, errors = consume_as(broker, "ops-a", "ops-group", 1, OPS, OPS_PASSWORD)
    assert got == [b"v"], errors

    adding = [*raftka_command("acls", "add", "--principal", "User:carol", "--operation", "READ", "--topic", "t",
                              "--bootstrap", broker.bootstrap)]
    as_bob = subprocess.run([*adding, *[f"-X{k}={v}" for k, v in sasl("bob", bob_password).items()]],
                            capture_output=True, text=True, timeout=TIMEOUT_S)
    assert as_bob.returncode == 1 and "CLUSTER_AUTHORIZATION_FAILED" in as_bob.stderr.upper().replace(" ", "_")
    as_ops = subprocess.run([*adding, *[f"-X{k}={v}" for k, v in sasl(OPS, OPS_PASSWORD).items()]],
                            capture_output=True, text=True, timeout=TIMEOUT_S)
    assert as_ops.returncode == 0, as_ops.stderr
    assert refusal(bob.delete_topics(["ops-a"])["ops-a"]) == ErrorCode.TOPIC_AUTHORIZATION_FAILED
    ops.delete_topics(["ops-a"])["ops-a"].result(TIMEOUT_S)
