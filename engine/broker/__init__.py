"""The Kafka broker: asyncio server, request handlers, the `raftka serve` process."""
