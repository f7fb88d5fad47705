"""Every peer frame is authenticated and sequenced, on real sockets: two brokers
share one partition group (both needed to commit) through a TCP proxy that,
once the link is established, flips a byte of one frame or injects a copy of
an earlier one. The receiver refuses the frame and drops the link, the dialer
redials, and the group keeps committing."""
from __future__ import annotations

import asyncio
import logging
import struct
from typing import Callable

import pytest

from raftka.ports import free_ports
from raftka.raft import handshake
from tests.conftest import make_batch, wait_for
from tests.test_raft_group import Broker, append, leader_of

Attack = Callable[[bytes, list[bytes]], list[bytes]]   # (frame, earlier frames) -> the frames forwarded instead
EARLIER_KEPT = 16


class FrameProxy:
    """Forwards connections to `target`. The dialer-to-acceptor direction is
    cut into frames (after the handshake's AUTH), so `attack`, once armed,
    replaces the next frame with what it returns; it fires once."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.attack: Attack | None = None
        self.connections = 0
        self._server: asyncio.base_events.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        self._server.close()
        for writer in self._writers:
            writer.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        up_reader, up_writer = await asyncio.open_connection(*self.target)
        self._writers += [writer, up_writer]
        pumps = [asyncio.ensure_future(self._pump_frames(reader, up_writer)),
                 asyncio.ensure_future(self._pump_bytes(up_reader, writer))]
        await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        for pump in pumps:
            pump.cancel()
        writer.close()
        up_writer.close()

    @staticmethod
    async def _pump_bytes(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()

    async def _pump_frames(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            writer.write(await reader.readexactly(handshake.AUTH_SIZE))
            earlier: list[bytes] = []
            while True:
                header = await reader.readexactly(4)
                frame = header + await reader.readexactly(struct.unpack(">I", header)[0])
                forwarded = [frame]
                if self.attack is not None and earlier:
                    forwarded, self.attack = self.attack(frame, earlier), None
                if len(earlier) < EARLIER_KEPT:
                    earlier.append(frame)
                writer.write(b"".join(forwarded))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            return


def flip_a_byte(frame: bytes, _earlier: list[bytes]) -> list[bytes]:
    altered = bytearray(frame)
    altered[len(frame) // 2] ^= 0x01    # past the 9-byte header: payload or tag
    return [bytes(altered)]


def replay_an_earlier_frame(frame: bytes, earlier: list[bytes]) -> list[bytes]:
    return [frame, earlier[0]]


@pytest.mark.parametrize("attack", [flip_a_byte, replay_an_earlier_frame])
def test_a_tampered_link_is_dropped_and_the_group_keeps_committing_after_the_redial(tmp_path, caplog, attack):
    async def scenario() -> None:
        port_1, port_2 = free_ports(2)
        proxy = FrameProxy(("127.0.0.1", port_2))
        proxy_port = await proxy.start()
        dialer = Broker(tmp_path, 1, {1: port_1, 2: proxy_port})      # node 1 dials node 2 through the proxy
        acceptor = Broker(tmp_path, 2, {1: port_1, 2: port_2})
        brokers = [dialer, acceptor]
        try:
            for broker in brokers:
                await broker.start()
            await wait_for(lambda: leader_of(brokers) is not None)
            assert await append(leader_of(brokers), make_batch(2, seed=1)) == 0
            await wait_for(lambda: all(b.replica.log.high_watermark == 2 for b in brokers))

            proxy.attack = attack
            await wait_for(lambda: acceptor.node.network.refused_frames.get(1) == 1)
            await wait_for(lambda: proxy.connections == 2 and acceptor.node.network.connected_peers == {1})
            await wait_for(lambda: leader_of(brokers) is not None)
            assert await append(leader_of(brokers), make_batch(3, seed=2)) == 2
            await wait_for(lambda: all(b.replica.log.high_watermark == 5 for b in brokers))
            assert len({b.readable_bytes() for b in brokers}) == 1
            assert dialer.node.network.refused_frames == {} and acceptor.node.network.refused_frames == {1: 1}
        finally:
            for broker in brokers:
                await broker.stop()
            await proxy.close()

    with caplog.at_level(logging.WARNING, logger="raftka.raft.transport"):
        asyncio.run(scenario())
    assert "FrameAuthError: frame" in caplog.text and "does not verify" in caplog.text
