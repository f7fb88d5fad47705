"""PeerNetwork over real sockets on 127.0.0.1: authenticated brokers exchange
group messages; every kind of bad input closes only the offending connection."""
from __future__ import annotations

import asyncio
import logging
import os
import pickle
import struct

import pytest

from raftka.raft import handshake
from raftka.raft.frames import FrameKind, FrameSealer
from raftka.raft.transport import PeerNetwork, PeerNetworkConfig
from tests.conftest import wait_for

SECRET = b"cluster-secret-for-tests"
GROUP = 7


async def two_brokers(**settings):
    """Broker 2 accepts, broker 1 dials it; both record what group 7 receives."""
    received = {1: [], 2: []}
    acceptor = PeerNetwork(PeerNetworkConfig(node_id=2, secret=SECRET, peers={1: ("127.0.0.1", 0)}, **settings))
    await acceptor.start()
    dialer = PeerNetwork(PeerNetworkConfig(node_id=1, secret=SECRET, peers={2: acceptor.address}, **settings))
    await dialer.start()
    acceptor.register_group(GROUP, lambda peer, message: received[2].append((peer, message)))
    dialer.register_group(GROUP, lambda peer, message: received[1].append((peer, message)))
    await wait_for(lambda: dialer.connected_peers == {2} and acceptor.connected_peers == {1})
    return dialer, acceptor, received


async def still_serving(dialer, acceptor, received) -> None:
    """The legitimate peer connection keeps working after an attack."""
    before = len(received[2])
    assert dialer.send(2, GROUP, {"type": "ping", "n": before})
    await wait_for(lambda: len(received[2]) > before)
    assert received[2][-1] == (1, {"type": "ping", "n": before})


async def closed_by_peer(reader: asyncio.StreamReader) -> bool:
    try:
        return await asyncio.wait_for(reader.read(), timeout=5) is not None
    except (ConnectionResetError, asyncio.IncompleteReadError):
        return True


def test_brokers_authenticate_and_exchange_messages_per_group_both_ways():
    async def scenario():
        dialer, acceptor, received = await two_brokers()
        entries = {"type": "append_entries", "term": 3, "entries": [(b"\x01batch", 5, 3)]}
        assert dialer.send(2, GROUP, entries)
        assert acceptor.send(1, GROUP, {"type": "response", "success": True})
        assert not dialer.send(3, GROUP, {"type": "nobody"})  # not a connected peer
        await wait_for(lambda: received[1] and received[2])
        assert received[2] == [(1, entries)] and received[1] == [(2, {"type": "response", "success": True})]
        await dialer.close()
        await wait_for(lambda: acceptor.connected_peers == set())
        await acceptor.close()
    asyncio.run(scenario())


def test_many_sends_in_one_tick_leave_in_one_write_per_peer():
    async def scenario():
        dialer, acceptor, received = await two_brokers()
        link = dialer._links[2]
        writes = []
        real_write = link._transport.write
        link._transport.write = lambda data: (writes.append(len(data)), real_write(data))
        for n in range(100):
            dialer.send(2, GROUP, {"n": n})
        await wait_for(lambda: len(received[2]) == 100)
        assert len(writes) == 1
        assert [m["n"] for _, m in received[2]] == list(range(100))
        await dialer.close(); await acceptor.close()
    asyncio.run(scenario())


async def attack(acceptor, payload_after_hello) -> bool:
    host, port = acceptor.address
    reader, writer = await asyncio.open_connection(host, port)
    hello = await reader.readexactly(handshake.HELLO_SIZE)
    writer.write(payload_after_hello(hello))
    await writer.drain()
    closed = await closed_by_peer(reader)
    writer.close()
    return closed


@pytest.mark.parametrize("name, payload", [
    ("garbage", lambda hello: os.urandom(handshake.AUTH_SIZE)),
    ("pickle", lambda hello: pickle.dumps({"type": "append_entries"}) * 4),
    ("wrong secret", lambda hello: handshake.Dialer(b"a-guessed-secret-16+", 1).receive_hello(hello)),
    ("unknown node", lambda hello: handshake.Dialer(SECRET, 99).receive_hello(hello)),
])
def test_bad_handshakes_close_that_connection_and_log_why(caplog, name, payload):
    async def scenario():
        dialer, acceptor, received = await two_brokers()
        with caplog.at_level(logging.WARNING, logger="raftka.raft.transport"):
            assert await attack(acceptor, payload)
        assert "closing peer connection" in caplog.text
        await still_serving(dialer, acceptor, received)
        await dialer.close(); await acceptor.close()
    asyncio.run(scenario())


async def after_valid_handshake(acceptor, node_id: int, then) -> bool:
    """Authenticate as `node_id`, send `then(sealer)` (the sealer of this connection's frames)."""
    host, port = acceptor.address
    reader, writer = await asyncio.open_connection(host, port)
    me = handshake.Dialer(SECRET, node_id)
    writer.write(me.receive_hello(await reader.readexactly(handshake.HELLO_SIZE)))
    me.receive_ok(await reader.readexactly(handshake.OK_SIZE))
    writer.write(then(FrameSealer(me.keys.send)))
    await writer.drain()
    closed = await closed_by_peer(reader)
    writer.close()
    return closed


@pytest.mark.parametrize("name, frames, reason", [
    ("oversized frame", lambda sealer: struct.pack(">IIB", 2**31, GROUP, 1), "FrameError"),
    ("unknown frame kind", lambda sealer: sealer.encode(GROUP, 200, b"x"), "FrameError: unknown frame kind"),
    ("pickle payload", lambda sealer: sealer.encode(GROUP, FrameKind.RAFT_MESSAGE, pickle.dumps({"type": "x"})),
     "CodecError"),
    ("garbage", lambda sealer: b"\xff" * 64, "FrameError"),
    ("unsealed frame", lambda sealer: struct.pack(">IIB", 5 + 16, GROUP, 1) + bytes(16), "FrameAuthError"),
])
def test_bad_frames_from_an_authenticated_peer_close_only_that_connection(caplog, name, frames, reason):
    async def scenario():
        # a third broker (id 3) is configured on the acceptor, so it may authenticate
        received = []
        acceptor = PeerNetwork(PeerNetworkConfig(node_id=2, secret=SECRET, max_frame_bytes=1 << 20,
                                                 peers={1: ("127.0.0.1", 0), 3: ("127.0.0.1", 0)}))
        await acceptor.start()
        acceptor.register_group(GROUP, lambda peer, message: received.append((peer, message)))
        dialer = PeerNetwork(PeerNetworkConfig(node_id=1, secret=SECRET, peers={2: acceptor.address}))
        await dialer.start()
        await wait_for(lambda: acceptor.connected_peers == {1})
        with caplog.at_level(logging.WARNING, logger="raftka.raft.transport"):
            assert await after_valid_handshake(acceptor, 3, frames)
        assert reason in caplog.text
        assert received == []
        dialer.send(2, GROUP, {"still": "here"})
        await wait_for(lambda: received == [(1, {"still": "here"})])
        assert acceptor.connected_peers == {1}
        await dialer.close(); await acceptor.close()
    asyncio.run(scenario())


def test_a_silent_connection_is_dropped_after_the_handshake_timeout(caplog):
    async def scenario():
        acceptor = PeerNetwork(PeerNetworkConfig(node_id=2, secret=SECRET, peers={1: ("127.0.0.1", 0)},
                                                 handshake_timeout_s=0.3))
        await acceptor.start()
        host, port = acceptor.address
        reader, writer = await asyncio.open_connection(host, port)
        await reader.readexactly(handshake.HELLO_SIZE)
        with caplog.at_level(logging.WARNING, logger="raftka.raft.transport"):
            assert await closed_by_peer(reader)
        assert "no handshake within 0.3 s" in caplog.text
        writer.close()
        await acceptor.close()
    asyncio.run(scenario())


def test_a_peer_that_reconnects_replaces_its_old_connection():
    async def scenario():
        dialer, acceptor, received = await two_brokers()
        dialer._links[2]._transport.abort()
        await wait_for(lambda: 2 not in dialer.connected_peers)
        await wait_for(lambda: dialer.connected_peers == {2} and acceptor.connected_peers == {1})
        await still_serving(dialer, acceptor, received)
        await dialer.close(); await acceptor.close()
    asyncio.run(scenario())


def test_a_dial_in_flight_when_the_network_closes_does_not_register():
    async def scenario():
        acceptor = PeerNetwork(PeerNetworkConfig(node_id=2, secret=SECRET, peers={1: ("127.0.0.1", 0)}))
        await acceptor.start()
        dialer = PeerNetwork(PeerNetworkConfig(node_id=1, secret=SECRET, peers={2: acceptor.address},
                                               reconnect_interval_s=60))
        await dialer.start()
        await wait_for(lambda: dialer.connected_peers == {2})
        dialer._links[2]._transport.abort()
        await wait_for(lambda: dialer.connected_peers == set())
        in_flight = asyncio.get_running_loop().create_task(dialer._dial(2, *acceptor.address))
        await dialer.close()
        await in_flight
        await asyncio.sleep(0.2)
        assert dialer.connected_peers == set()
        await acceptor.close()
    asyncio.run(scenario())


def test_peer_connections_ask_the_kernel_to_drop_a_dead_link_within_the_timeout():
    import socket

    async def scenario():
        dialer, acceptor, _received = await two_brokers(dead_link_timeout_s=3.0)
        try:
            for network in (dialer, acceptor):
                for link in network._links.values():
                    sock = link._transport.get_extra_info("socket")
                    assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
                    assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == 3000
                    assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == 1
                    assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT) == 3
        finally:
            await dialer.close()
            await acceptor.close()
    asyncio.run(scenario())


def test_a_secret_under_128_bits_is_refused_and_the_secret_stays_out_of_reprs_and_logs(caplog):
    with pytest.raises(ValueError, match="15 bytes, at least 16"):
        PeerNetworkConfig(node_id=1, secret=b"fifteen-bytes!!", peers={2: ("127.0.0.1", 1)})
    assert SECRET not in repr(PeerNetworkConfig(node_id=1, secret=SECRET, peers={})).encode()

    async def scenario():
        with caplog.at_level(logging.DEBUG):
            dialer, acceptor, received = await two_brokers()
            assert await attack(acceptor, lambda hello: handshake.Dialer(b"a-guessed-secret-16+", 1).receive_hello(hello))
            dialer._links[2]._transport.abort()   # a redial: the handshake's debug lines too
            await wait_for(lambda: 2 not in dialer.connected_peers)
            await wait_for(lambda: dialer.connected_peers == {2} and acceptor.connected_peers == {1})
            await still_serving(dialer, acceptor, received)
            await dialer.close(); await acceptor.close()
        assert "closing peer connection" in caplog.text and SECRET.decode() not in caplog.text
    asyncio.run(scenario())
