"""Shared fixtures: batches built by our builder, fresh data directories."""
from __future__ import annotations

import asyncio
import os
import random
from typing import Callable

import pytest
from hypothesis import HealthCheck, settings

from raftka.records.batch import Record, build_batch
from raftka.replication.simulation import readable_bytes  # noqa: F401  (tests import it from here)

settings.register_profile("ci", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def make_batch(count: int = 3, value_size: int = 16, timestamp_ms: int = 1_700_000_000_000,
               seed: int = 0, key: bytes | None = b"k") -> bytes:
    """A valid uncompressed v2 batch of `count` records."""
    rng = random.Random(seed)
    records = [Record(rng.randbytes(value_size), key, (("h", b"v"),), timestamp_ms + i)
               for i in range(count)]
    return build_batch(records)




@pytest.fixture
def batch_factory():
    return make_batch


async def wait_for(predicate: Callable[[], bool], timeout_s: float = 15.0) -> None:
    """Poll `predicate` on the running loop until true; fail after `timeout_s`."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not predicate():
        assert loop.time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)
