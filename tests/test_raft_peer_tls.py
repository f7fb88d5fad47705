"""Peer TLS over real sockets: brokers speak TLS 1.3 with certificates naming
their node ids; a plaintext peer, a certificate from another CA, and a node
holding the cluster secret but another node's certificate are all refused,
and the legitimate link keeps working."""
from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import tomllib
from pathlib import Path

import pytest

from raftka.broker.local_cluster import LocalBrokers
from raftka.raft import handshake
from raftka.raft.peer_tls import node_id_of, peer_tls
from raftka.raft.transport import PeerNetwork, PeerNetworkConfig
from tests.certs import make_node_certs
from tests.conftest import wait_for
from tests.test_raft_transport import GROUP, SECRET, closed_by_peer, still_serving
from tests.test_tls import confluent_round_trip


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    return make_node_certs(tmp_path_factory.mktemp("peer-certs"), [1, 2, 3])


def tls_of(certs, node_id: int, rogue: bool = False):
    pair = (certs.rogue if rogue else certs.nodes)[node_id]
    return peer_tls(pair.cert, pair.key, certs.ca)


async def tls_brokers(certs):
    """Broker 2 accepts (nodes 1 and 3 may connect), broker 1 dials it; over TLS."""
    received = {1: [], 2: []}
    acceptor = PeerNetwork(PeerNetworkConfig(node_id=2, secret=SECRET, tls=tls_of(certs, 2),
                                             peers={1: ("127.0.0.1", 0), 3: ("127.0.0.1", 0)}))
    await acceptor.start()
    dialer = PeerNetwork(PeerNetworkConfig(node_id=1, secret=SECRET, tls=tls_of(certs, 1),
                                           peers={2: acceptor.address}))
    await dialer.start()
    acceptor.register_group(GROUP, lambda peer, message: received[2].append((peer, message)))
    dialer.register_group(GROUP, lambda peer, message: received[1].append((peer, message)))
    await wait_for(lambda: dialer.connected_peers == {2} and acceptor.connected_peers == {1})
    return dialer, acceptor, received


def test_peers_speak_tls_1_3_and_exchange_messages(certs):
    async def scenario():
        dialer, acceptor, received = await tls_brokers(certs)
        await still_serving(dialer, acceptor, received)
        for network in (dialer, acceptor):
            link = next(iter(network._links.values()))
            assert link._transport.get_extra_info("ssl_object").version() == "TLSv1.3"
        await dialer.close(); await acceptor.close()
    asyncio.run(scenario())


async def dial_as(acceptor, node_id: int, context: ssl.SSLContext | None) -> bool:
    """Connect (TLS with `context`, or plaintext), authenticate as `node_id`; True if the acceptor closes it."""
    host, port = acceptor.address
    try:
        reader, writer = await asyncio.open_connection(host, port, ssl=context)
        if context is None:   # a plaintext peer: the acceptor speaks first only after TLS, so talk first
            writer.write(bytes(handshake.AUTH_SIZE))
        me = handshake.Dialer(SECRET, node_id)
        writer.write(me.receive_hello(await asyncio.wait_for(reader.readexactly(handshake.HELLO_SIZE), 5)))
        await writer.drain()
    except (ssl.SSLError, ConnectionError, asyncio.IncompleteReadError):
        return True
    closed = await closed_by_peer(reader)
    writer.close()
    return closed


@pytest.mark.parametrize("name, node_id, credentials, reason", [
    ("plaintext", 1, None, ""),
    ("another CA's certificate", 1, ("rogue", 1), ""),
    ("node 3's certificate, authenticating as node 1", 1, ("node", 3), "a node speaks only for itself"),
])
def test_a_peer_without_its_own_certificate_is_refused(certs, caplog, name, node_id, credentials, reason):
    async def scenario():
        dialer, acceptor, received = await tls_brokers(certs)
        context = None
        if credentials is not None:
            context = tls_of(certs, credentials[1], rogue=credentials[0] == "rogue").client
        with caplog.at_level(logging.DEBUG):
            assert await dial_as(acceptor, node_id, context)
        assert reason in caplog.text
        assert acceptor.connected_peers == {1}
        await still_serving(dialer, acceptor, received)
        await dialer.close(); await acceptor.close()
    asyncio.run(scenario())


def test_a_dialer_refuses_an_acceptor_with_another_nodes_certificate(certs, caplog):
    async def scenario():
        impostor = PeerNetwork(PeerNetworkConfig(node_id=2, secret=SECRET, tls=tls_of(certs, 3),
                                                 peers={1: ("127.0.0.1", 0)}))
        await impostor.start()
        dialer = PeerNetwork(PeerNetworkConfig(node_id=1, secret=SECRET, tls=tls_of(certs, 1),
                                               peers={2: impostor.address}))
        with caplog.at_level(logging.WARNING, logger="raftka.raft.transport"):
            await dialer.start()
            await wait_for(lambda: "dialed node 2 but the certificate is node 3's" in caplog.text)
        assert dialer.connected_peers == set()
        await dialer.close(); await impostor.close()
    asyncio.run(scenario())


@pytest.mark.parametrize("subject, node_id", [
    (((("commonName", "raftka-node-7"),),), 7),
    (((("commonName", "raftka-node-7x"),),), None),
    (((("commonName", "node-7"),),), None),
    (((("commonName", "raftka-node-7"),), (("commonName", "raftka-node-8"),)), None),
])
def test_a_certificate_names_exactly_one_node(subject, node_id):
    assert node_id_of({"subject": subject}) == node_id


def test_a_local_cluster_with_peer_tls_replicates_and_its_peer_ports_speak_only_tls(tmp_path, certs):
    brokers = LocalBrokers(tmp_path, nodes=3, peer_tls_dir=Path(certs.ca).parent).start()
    try:
        got = confluent_round_trip(brokers.bootstrap(), "over-peer-tls", {"topic.metadata.refresh.interval.ms": "500"},
                                   count=50)
        assert got == [b"secret-%d" % i for i in range(50)]
        peer_port = tomllib.loads(brokers.configs[1].read_text())["peer_port"]
        with socket.create_connection(("127.0.0.1", peer_port), timeout=1) as plaintext:
            with pytest.raises(socket.timeout):
                plaintext.recv(64)    # no plaintext HELLO: the port waits for a TLS ClientHello
    finally:
        brokers.stop()


def test_unusable_peer_tls_files_are_a_config_error(tmp_path):
    from raftka.config import Config, ConfigError
    from raftka.security.tls import peer_tls as peer_tls_of_config
    config = Config(peer_tls_cert=str(tmp_path / "missing.pem"), peer_tls_ca=str(tmp_path / "ca.pem"))
    with pytest.raises(ConfigError, match="peer TLS files .* cannot be used"):
        peer_tls_of_config(config)
    assert peer_tls_of_config(Config()) is None
