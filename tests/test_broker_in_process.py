"""A broker in this process, driven through its replicas and raw sockets.

Fetch responses leave the broker straight from the segment mapping: a large
fetch to a slow reader arrives whole and byte-exact, and the broker allocates
no Python copy of the record bytes while sending it. A single-replica
partition acknowledges appends as soon as they are written, not at its next
heartbeat."""
from __future__ import annotations

import asyncio
import contextlib
import datetime
import socket
import struct
import tracemalloc

from kio.index import load_request_schema
from kio.static.primitive import i32

from raftka.broker.broker import Broker
from raftka.config import Config
from raftka.protocol import kafka
from tests.conftest import make_batch, wait_for
from tests.test_broker_clients import request_frame

FETCH_BYTES = 16 << 20


def fetch_frame(topic: str, max_bytes: int) -> bytes:
    fetch = load_request_schema(kafka.FETCH, 4)
    partition = kafka.nested(fetch, "FetchPartition")(partition=i32(0), fetch_offset=0,
                                                      partition_max_bytes=i32(max_bytes))
    return request_frame(kafka.FETCH, 4, 9, fetch(
        replica_id=i32(-1), max_wait=datetime.timedelta(milliseconds=0), min_bytes=i32(1), max_bytes=i32(max_bytes),
        isolation_level=0, topics=(kafka.nested(fetch, "FetchTopic")(topic=topic, partitions=(partition,)),)))


async def recv_exactly_into(loop: asyncio.AbstractEventLoop, sock: socket.socket, buffer: bytearray) -> None:
    view, got = memoryview(buffer), 0
    while got < len(buffer):
        received = await loop.sock_recv_into(sock, view[got:])
        assert received, "closed by the broker"
        got += received


@contextlib.asynccontextmanager
async def running_broker(tmp_path, **raft_settings):
    """A broker in this process on a free port, stopped on the way out."""
    broker = Broker(Config(data_dir=tmp_path / "data", port=0), **raft_settings)
    await broker.start()
    try:
        yield broker
    finally:
        await broker.stop()


async def leader_of_new_topic(broker: Broker, topic: str):
    """Create a one-partition, one-replica topic and wait for its leader replica."""
    await broker.controller.create_topic(topic, 1, 1)
    await wait_for(lambda: (r := broker.controller.replica(topic, 0)) is not None and r.is_leader)
    return broker.controller.replica(topic, 0)


def test_a_large_fetch_to_a_slow_reader_arrives_whole_without_a_python_copy_of_the_records(tmp_path):
    async def run() -> None:
        async with running_broker(tmp_path) as broker:
            replica = await leader_of_new_topic(broker, "big")
            batch = make_batch(count=64, value_size=8 << 10)   # ~512 KiB per batch
            for _ in range(FETCH_BYTES // len(batch) + 1):
                await replica.append(batch)
            expected = bytes(replica.log.read(0, FETCH_BYTES).buffer)

            loop = asyncio.get_running_loop()
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 << 10)   # the reader is slow: the broker waits on it
            sock.setblocking(False)
            await loop.sock_connect(sock, ("127.0.0.1", broker.port))
            response = bytearray(4 + 4 + 4 + 4 + 2 + len("big") + 4 + 4 + 2 + 8 + 8 + 4 + 4 + len(expected))
            tracemalloc.start()
            try:
                await loop.sock_sendall(sock, fetch_frame("big", FETCH_BYTES))
                await asyncio.sleep(0.5)          # the broker fills the socket and must wait for the reader
                await recv_exactly_into(loop, sock, response)
                _, peak = tracemalloc.get_traced_memory()
            finally:
                tracemalloc.stop()
                sock.close()
            (size,) = struct.unpack_from(">i", response)
            assert size == len(response) - 4
            assert bytes(response[-len(expected):]) == expected
            assert peak < len(expected) // 4, f"{peak} bytes allocated sending {len(expected)} bytes of records"

    asyncio.run(run())


def test_a_single_replica_partition_commits_appends_without_waiting_for_a_heartbeat(tmp_path):
    async def run() -> None:
        # heartbeats every 60 s: an append that waited for one would time out
        slow_heartbeats = {"appendEntriesPeriod": 60.0, "raftMinTimeout": 200.0, "raftMaxTimeout": 400.0,
                           "leaderFallbackTimeout": 400.0, "connectionTimeout": 400.0}
        async with running_broker(tmp_path, **slow_heartbeats) as broker:
            replica = await leader_of_new_topic(broker, "solo")
            offsets = [await asyncio.wait_for(replica.append(make_batch(count=2, seed=i)), 5.0) for i in range(5)]
            assert offsets == [0, 2, 4, 6, 8]

    asyncio.run(asyncio.wait_for(run(), 30))


def test_a_produce_request_larger_than_the_receive_buffer_is_received_whole_and_stored(tmp_path):
    from raftka.broker.server import RECEIVE_BYTES
    from tests.test_broker_clients import produce_frame

    async def run() -> None:
        async with running_broker(tmp_path) as broker:
            replica = await leader_of_new_topic(broker, "large")
            batch = make_batch(count=100, value_size=8 << 10)
            assert len(batch) > RECEIVE_BYTES
            reader, writer = await asyncio.open_connection("127.0.0.1", broker.port)
            writer.write(produce_frame("large", batch, 3))
            await writer.drain()
            head = await reader.readexactly(4)
            response = await reader.readexactly(struct.unpack(">i", head)[0])
            writer.close()
            # correlation id, topics[1], name, partitions[1], index, error code, base offset
            error_at = 4 + 4 + 2 + len("large") + 4 + 4
            assert struct.unpack_from(">hq", response, error_at) == (0, 0)
            assert replica.log.high_watermark == 100

    asyncio.run(asyncio.wait_for(run(), 30))
