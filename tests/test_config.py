"""Configuration: a TOML file, then RAFTKA_* variables, then flags; bad
values are refused with a ConfigError naming them."""
from __future__ import annotations

import base64
import os
import secrets
from pathlib import Path

import pytest

from raftka.broker.local_cluster import LocalBrokers
from raftka.config import ConfigError, WeakSecretError, load_config

SECRET = "0123456789abcdef0123456789abcdef"   # 128 bits of hex


def test_toml_then_environment_then_overrides(tmp_path):
    path = tmp_path / "broker.toml"
    path.write_text('node_id = 2\nport = 9093\npeer_port = 7002\ncluster_secret = "0123456789abcdef0123456789abcdef"\n'
                    'peers = [{ id = 1, host = "10.0.0.1", port = 7001 }, { id = 3, host = "10.0.0.3", port = 7003 }]\n'
                    'data_dir = "/var/lib/raftka"\nfsync = "interval"\n'
                    'peer_tls_cert = "node-2.pem"\npeer_tls_key = "node-2.key"\npeer_tls_ca = "ca.pem"\n')
    config = load_config(path, environ={"RAFTKA_PORT": "9999", "RAFTKA_AUTO_CREATE_TOPICS": "false",
                                        "RAFTKA_DATA_DIR": "/srv/raftka", "PATH": "/bin"}, host="0.0.0.0")
    assert (config.node_id, config.port, config.host, config.fsync) == (2, 9999, "0.0.0.0", "interval")
    assert config.peers == ((1, "10.0.0.1", 7001), (3, "10.0.0.3", 7003))
    assert config.data_dir == Path("/srv/raftka") and config.auto_create_topics is False
    assert config.broker_ids == [1, 2, 3]


def test_peers_from_the_environment(tmp_path):
    config = load_config(environ={"RAFTKA_PEERS": "2=h2:7002,3=h3:7003", "RAFTKA_CLUSTER_SECRET": SECRET,
                                  "RAFTKA_PEER_PORT": "7001", "RAFTKA_PEER_TLS_CERT": "node-1.pem",
                                  "RAFTKA_PEER_TLS_CA": "ca.pem"})
    assert config.peers == ((2, "h2", 7002), (3, "h3", 7003))


@pytest.mark.parametrize("toml, environ, complaint", [
    ("nonsense = 1\n", {}, "unknown setting"),
    ("port = \n", {}, "broker.toml"),
    ("", {"RAFTKA_PORT": "ninety"}, "RAFTKA_PORT"),
    ("", {"RAFTKA_AUTO_CREATE_TOPICS": "maybe"}, "RAFTKA_AUTO_CREATE_TOPICS"),
    ('fsync = "sometimes"\n', {}, "fsync"),
    ("", {"RAFTKA_PEERS": "2=nohost"}, "id=host:port"),
    ('peers = "2=h:1"\npeer_port = 5\n', {}, "cluster_secret"),
    ('peers = "2=h:1"\ncluster_secret = "0123456789abcdef0123456789abcdef"\n', {}, "peer_port"),
    ('node_id = 2\npeers = "2=h:1"\ncluster_secret = "0123456789abcdef0123456789abcdef"\npeer_port = 5\n', {}, "itself"),
])
def test_bad_settings_are_refused_by_name(tmp_path, toml, environ, complaint):
    path = tmp_path / "broker.toml"
    path.write_text(toml)
    with pytest.raises(ConfigError, match=complaint):
        load_config(path, environ=environ)


def test_the_readme_cluster_config_loads(tmp_path):
    readme = (Path(__file__).parent.parent / "engine" / "broker" / "README.md").read_text()
    path = tmp_path / "broker.toml"
    path.write_text(readme.split("```toml\n", 1)[1].split("```", 1)[0])
    config = load_config(path, environ={"RAFTKA_CLUSTER_SECRET": SECRET})
    assert config.broker_ids == [1, 2, 3] and config.advertised_address == ("kafka-1.example", 9092)


CLUSTER = {"RAFTKA_PEERS": "2=127.0.0.1:1", "RAFTKA_PEER_PORT": "5"}


@pytest.mark.parametrize("secret, bits", [
    ("0123456789abcdef", 64),                        # hex digits count 4 bits each
    ("0123456789abcdef0123456789abcde", 124),
    ("correct-horse-battery", 126),                  # any other text 6 bits a character
])
def test_a_cluster_secret_under_128_bits_is_refused_without_showing_it(secret, bits):
    with pytest.raises(WeakSecretError, match=f"counts {bits} bits, at least 128") as refused:
        load_config(environ={**CLUSTER, "RAFTKA_CLUSTER_SECRET": secret})
    assert secret not in str(refused.value)


@pytest.mark.parametrize("secret", [secrets.token_hex(16), secrets.token_urlsafe(16),
                                    base64.b64encode(os.urandom(16)).decode()])
def test_generated_128_bit_secrets_are_accepted(secret):
    assert load_config(environ={**CLUSTER, "RAFTKA_CLUSTER_SECRET": secret}).cluster_secret == secret


def test_the_secret_raftka_cluster_makes_is_accepted(tmp_path):
    brokers = LocalBrokers(tmp_path, nodes=3)
    for path in brokers.configs:
        assert load_config(path, environ=brokers.env).broker_ids == [1, 2, 3]


def test_a_single_broker_needs_no_secret():
    assert load_config(environ={}).cluster_secret == ""


@pytest.mark.parametrize("environ, remote", [
    ({"RAFTKA_PEERS": "2=10.0.0.2:7001"}, "10.0.0.2"),
    ({"RAFTKA_PEERS": "2=kafka-2.example:7001"}, "kafka-2.example"),     # a name may resolve anywhere
    ({"RAFTKA_PEERS": "2=127.0.0.1:7001", "RAFTKA_PEER_HOST": "0.0.0.0"}, "0.0.0.0"),
])
def test_a_peer_address_off_loopback_needs_peer_tls(environ, remote):
    environ = {**CLUSTER, "RAFTKA_CLUSTER_SECRET": SECRET, **environ}
    with pytest.raises(ConfigError, match=f"'{remote}'.* not loopback: set peer_tls_cert"):
        load_config(environ=environ)
    tls = {"RAFTKA_PEER_TLS_CERT": "node-1.pem", "RAFTKA_PEER_TLS_KEY": "node-1.key", "RAFTKA_PEER_TLS_CA": "ca.pem"}
    assert load_config(environ={**environ, **tls}).peer_tls_ca == "ca.pem"


def test_a_loopback_cluster_may_run_without_peer_tls():
    environ = {"RAFTKA_PEERS": "2=127.0.0.1:7002,3=localhost:7003", "RAFTKA_PEER_PORT": "7001",
               "RAFTKA_CLUSTER_SECRET": SECRET, "RAFTKA_PEER_HOST": "::1"}
    assert load_config(environ=environ).peer_tls_cert == ""


@pytest.mark.parametrize("tls", [{"RAFTKA_PEER_TLS_CERT": "n.pem"}, {"RAFTKA_PEER_TLS_CA": "ca.pem"},
                                 {"RAFTKA_PEER_TLS_KEY": "n.key", "RAFTKA_PEER_TLS_CA": "ca.pem"}])
def test_peer_tls_needs_a_certificate_and_a_ca(tls):
    with pytest.raises(ConfigError, match="peer_tls_cert and peer_tls_ca"):
        load_config(environ={**CLUSTER, "RAFTKA_CLUSTER_SECRET": SECRET, **tls})
