"""Configuration: a TOML file, then RAFTKA_* variables, then flags; bad
values are refused with a ConfigError naming them."""
from __future__ import annotations

from pathlib import Path

import pytest

from raftka.config import ConfigError, load_config


def test_toml_then_environment_then_overrides(tmp_path):
    path = tmp_path / "broker.toml"
    path.write_text('node_id = 2\nport = 9093\npeer_port = 7002\ncluster_secret = "s"\n'
                    'peers = [{ id = 1, host = "10.0.0.1", port = 7001 }, { id = 3, host = "10.0.0.3", port = 7003 }]\n'
                    'data_dir = "/var/lib/raftka"\nfsync = "interval"\n')
    config = load_config(path, environ={"RAFTKA_PORT": "9999", "RAFTKA_AUTO_CREATE_TOPICS": "false",
                                        "RAFTKA_DATA_DIR": "/srv/raftka", "PATH": "/bin"}, host="0.0.0.0")
    assert (config.node_id, config.port, config.host, config.fsync) == (2, 9999, "0.0.0.0", "interval")
    assert config.peers == ((1, "10.0.0.1", 7001), (3, "10.0.0.3", 7003))
    assert config.data_dir == Path("/srv/raftka") and config.auto_create_topics is False
    assert config.broker_ids == [1, 2, 3]


def test_peers_from_the_environment(tmp_path):
    config = load_config(environ={"RAFTKA_PEERS": "2=h2:7002,3=h3:7003", "RAFTKA_CLUSTER_SECRET": "x",
                                  "RAFTKA_PEER_PORT": "7001"})
    assert config.peers == ((2, "h2", 7002), (3, "h3", 7003))


@pytest.mark.parametrize("toml, environ, complaint", [
    ("nonsense = 1\n", {}, "unknown setting"),
    ("port = \n", {}, "broker.toml"),
    ("", {"RAFTKA_PORT": "ninety"}, "RAFTKA_PORT"),
    ("", {"RAFTKA_AUTO_CREATE_TOPICS": "maybe"}, "RAFTKA_AUTO_CREATE_TOPICS"),
    ('fsync = "sometimes"\n', {}, "fsync"),
    ("", {"RAFTKA_PEERS": "2=nohost"}, "id=host:port"),
    ('peers = "2=h:1"\npeer_port = 5\n', {}, "cluster_secret"),
    ('peers = "2=h:1"\ncluster_secret = "s"\n', {}, "peer_port"),
    ('node_id = 2\npeers = "2=h:1"\ncluster_secret = "s"\npeer_port = 5\n', {}, "itself"),
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
    config = load_config(path, environ={"RAFTKA_CLUSTER_SECRET": "s"})
    assert config.broker_ids == [1, 2, 3] and config.advertised_address == ("kafka-1.example", 9092)
