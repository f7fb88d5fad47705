"""A replication node as a process: one broker's ClusterController (metadata
group, partition groups, storage), which creates the topic "replicated"
(RF = every broker) through the metadata, and a small local control port to
append to and inspect its partitions.

This is how the real-process tests and the replication benchmark drive a
cluster of separate processes (real sockets, real SIGKILL) before the Kafka
broker fronts the same controller; the broker's produce path will call
`PartitionReplica.append` exactly as `_append` does here.

Control protocol (TCP, big-endian, pipelined, answered in request order):
  request:  u32 size | u8 op | u32 correlation_id | body
  response: u32 size | u32 correlation_id | i16 error_code | body
  op 1 APPEND  body: u32 partition | record batches
               response body: i64 base_offset | i32 leader_id (-1 unknown)
  op 2 STATUS  body: empty; response body: JSON (node, partitions: leader,
               term, high_watermark, log_end_offset, catching_up; metadata)
error_code is a Kafka error code (raftka.errors.ErrorCode). The control port
opens once this broker hosts every partition of the topic.

Run: python -m raftka.replication.control_node --node-id 1 --data-dir D --peer-port P1
       --control-port C1 --peers 2=127.0.0.1:P2,3=127.0.0.1:P3 --partitions 1
The cluster secret comes from RAFTKA_CLUSTER_SECRET.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from raftka.cluster.controller import ClusterController, MetadataCommandError
from raftka.config import Config
from raftka.errors import ErrorCode, NoControllerError, NotLeaderOrFollowerError, RaftkaError
from raftka.replication.partition import PartitionReplica

log = logging.getLogger(__name__)

TOPIC = "replicated"
OP_APPEND, OP_STATUS = 1, 2
REQUEST_HEAD = struct.Struct(">IBI")
RESPONSE_HEAD = struct.Struct(">IIh")
APPEND_BODY = struct.Struct(">I")
APPEND_RESULT = struct.Struct(">qi")
MAX_REQUEST_BYTES = 16 * 1024 * 1024
APPEND_TIMEOUT_S = 10.0
HOSTING_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class ServerConfig:
    node_id: int
    data_dir: Path
    peer_port: int
    control_port: int
    peers: dict[int, tuple[str, int]]
    partitions: int
    secret: bytes
    raft_settings: dict[str, Any]


class ReplicationServer:
    """ClusterController + the control port of one broker process."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.controller = ClusterController(Config(
            data_dir=config.data_dir, node_id=config.node_id, peer_port=config.peer_port,
            cluster_secret=config.secret.decode(),
            peers=tuple((i, host, port) for i, (host, port) in config.peers.items())), **config.raft_settings)
        self._server: asyncio.base_events.Server | None = None

    async def start(self) -> None:
        await self.controller.start()
        await self.controller.wait_ready(HOSTING_TIMEOUT_S)
        await self._create_topic()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + HOSTING_TIMEOUT_S
        while any(self.replica(p) is None for p in range(self.config.partitions)):
            if loop.time() > deadline:
                raise TimeoutError(f"node {self.config.node_id}: partitions not hosted in {HOSTING_TIMEOUT_S} s")
            await asyncio.sleep(0.02)
        self._server = await loop.create_server(
            lambda: _ControlProtocol(self), "127.0.0.1", self.config.control_port)

    async def _create_topic(self) -> None:
        """Every node tries once all brokers registered; one succeeds."""
        brokers = len(self.config.peers) + 1
        while TOPIC not in self.controller.state.topics:
            if len(self.controller.state.brokers) < brokers:
                await asyncio.sleep(0.05)
                continue
            try:
                await self.controller.create_topic(TOPIC, self.config.partitions, brokers)
            except MetadataCommandError as error:
                if error.error_code != ErrorCode.TOPIC_ALREADY_EXISTS:
                    raise
            except NoControllerError:
                continue

    async def stop(self) -> None:
        if self._server:
            self._server.close()
        await self.controller.stop()

    def replica(self, partition: int) -> PartitionReplica | None:
        return self.controller.replica(TOPIC, partition)

    def status(self) -> dict[str, Any]:
        partitions = {}
        for partition in range(self.config.partitions):
            r = self.replica(partition)
            if r is not None:
                partitions[partition] = {"leader": r.leader_id, "term": r.leader_epoch,
                                         "high_watermark": r.log.high_watermark,
                                         "log_end_offset": r.log.log_end_offset, "catching_up": r.catching_up}
        return {"node": self.config.node_id, "partitions": partitions, "metadata": self.controller.status()}


class _ControlProtocol(asyncio.Protocol):
    def __init__(self, server: ReplicationServer) -> None:
        self._server = server
        self._buffer = bytearray()
        self._transport: asyncio.Transport | None = None
        self._replies: asyncio.Queue = asyncio.Queue()
        self._writer: asyncio.Task | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]
        self._writer = asyncio.get_running_loop().create_task(self._write_in_order())

    def connection_lost(self, exc: Exception | None) -> None:
        if self._writer:
            self._writer.cancel()

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        while len(self._buffer) >= REQUEST_HEAD.size:
            size, op, correlation = REQUEST_HEAD.unpack_from(self._buffer)
            if not 5 <= size <= MAX_REQUEST_BYTES:
                log.warning("control: request size %d out of range; closing", size)
                self._transport.close()
                return
            if len(self._buffer) < 4 + size:
                return
            body = bytes(self._buffer[REQUEST_HEAD.size:4 + size])
            del self._buffer[:4 + size]
            self._replies.put_nowait(self._handle(op, correlation, body))

    def _handle(self, op: int, correlation: int, body: bytes) -> "asyncio.Future[bytes]":
        loop = asyncio.get_running_loop()
        if op == OP_STATUS:
            future = loop.create_future()
            future.set_result(_response(correlation, ErrorCode.NONE, json.dumps(self._server.status()).encode()))
            return future
        if op == OP_APPEND and len(body) > APPEND_BODY.size:
            return loop.create_task(self._append(correlation, body))
        future = loop.create_future()
        future.set_result(_response(correlation, ErrorCode.INVALID_REQUEST, b""))
        return future

    async def _append(self, correlation: int, body: bytes) -> bytes:
        (partition,) = APPEND_BODY.unpack_from(body)
        if partition >= self._server.config.partitions:
            return _append_response(correlation, ErrorCode.UNKNOWN_TOPIC_OR_PARTITION, -1, -1)
        replica = self._server.replica(partition)
        if replica is None:
            return _append_response(correlation, ErrorCode.UNKNOWN_TOPIC_OR_PARTITION, -1, -1)
        try:
            base_offset = await replica.replicate(memoryview(body)[APPEND_BODY.size:], APPEND_TIMEOUT_S)
        except NotLeaderOrFollowerError as error:
            return _append_response(correlation, error.error_code, -1, -1 if error.leader_id is None else error.leader_id)
        except RaftkaError as error:
            return _append_response(correlation, error.error_code, -1, -1)
        return _append_response(correlation, ErrorCode.NONE, base_offset, self._server.config.node_id)

    async def _write_in_order(self) -> None:
        while True:
            reply = await (await self._replies.get())
            if self._transport and not self._transport.is_closing():
                self._transport.write(reply)


def _response(correlation: int, error: int, body: bytes) -> bytes:
    return RESPONSE_HEAD.pack(len(body) + 6, correlation, error) + body


def _append_response(correlation: int, error: int, base_offset: int, leader_id: int) -> bytes:
    return _response(correlation, error, APPEND_RESULT.pack(base_offset, leader_id))


class ControlClient:
    """Pipelined asyncio client of one node's control port."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader, self._writer = reader, writer
        self._next_correlation = 0
        self._waiting: dict[int, asyncio.Future] = {}
        self._reading = asyncio.get_running_loop().create_task(self._read_forever())

    @classmethod
    async def connect(cls, port: int, host: str = "127.0.0.1") -> "ControlClient":
        reader, writer = await asyncio.open_connection(host, port)
        return cls(reader, writer)

    async def append(self, partition: int, batches: bytes) -> tuple[int, int, int]:
        """(error_code, base_offset, leader_id)."""
        body = await self._request(OP_APPEND, [APPEND_BODY.pack(partition), batches])
        base_offset, leader_id = APPEND_RESULT.unpack(body[1]) if body[1] else (-1, -1)
        return body[0], base_offset, leader_id

    async def status(self) -> dict[str, Any]:
        error, body = await self._request(OP_STATUS, [])
        return json.loads(body)

    async def _request(self, op: int, parts: list[bytes]) -> tuple[int, bytes]:
        self._next_correlation += 1
        correlation = self._next_correlation
        future = asyncio.get_running_loop().create_future()
        self._waiting[correlation] = future
        size = 5 + sum(len(p) for p in parts)
        self._writer.writelines([REQUEST_HEAD.pack(size, op, correlation), *parts])
        return await future

    async def _read_forever(self) -> None:
        try:
            while True:
                size, correlation, error = RESPONSE_HEAD.unpack(await self._reader.readexactly(RESPONSE_HEAD.size))
                body = await self._reader.readexactly(size - 6)
                future = self._waiting.pop(correlation, None)
                if future is not None and not future.done():
                    future.set_result((error, body))
        except (asyncio.IncompleteReadError, ConnectionError) as error:
            for future in self._waiting.values():
                if not future.done():
                    future.set_exception(ConnectionError(f"control connection lost: {error}"))
            self._waiting.clear()

    async def close(self) -> None:
        self._reading.cancel()
        self._writer.close()


def _parse_peers(text: str) -> dict[int, tuple[str, int]]:
    peers = {}
    for item in filter(None, text.split(",")):
        node, address = item.split("=")
        host, port = address.rsplit(":", 1)
        peers[int(node)] = (host, int(port))
    return peers


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m raftka.replication.control_node",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--node-id", type=int, required=True)
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--peer-port", type=int, required=True)
    parser.add_argument("--control-port", type=int, required=True)
    parser.add_argument("--peers", type=_parse_peers, required=True, help="id=host:port,...")
    parser.add_argument("--partitions", type=int, default=1)
    parser.add_argument("--raft", type=json.loads, default={}, help="pysyncobj overrides as JSON")
    args = parser.parse_args(argv)
    secret = os.environ.get("RAFTKA_CLUSTER_SECRET", "").encode()
    if not secret:
        parser.error("RAFTKA_CLUSTER_SECRET must be set")
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s node {args.node_id} %(name)s %(levelname)s %(message)s")
    config = ServerConfig(args.node_id, args.data_dir, args.peer_port, args.control_port, args.peers,
                          args.partitions, secret, args.raft)
    asyncio.run(_serve(config))


async def _serve(config: ServerConfig) -> None:
    server = ReplicationServer(config)
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"ready node={config.node_id} control={config.control_port}", flush=True)
    await stop.wait()
    await server.stop()


if __name__ == "__main__":
    main()
