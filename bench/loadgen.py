"""The native load generator from Python: producers and consumers whose
per-message loop is C (native/loadgen.c) driving librdkafka, so a benchmark
measures the broker, not a Python produce() loop.

It drives the librdkafka that confluent-kafka loaded (the wheel's bundled
copy, or the system library it was built against): the same client library
as every Python client here, at native speed. Each call blocks its thread
(cffi releases the GIL), so run one per process for load.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import math
import os
from dataclasses import dataclass, field

from raftka.native._loadgen import ffi, lib

ERROR_BYTES = 256


class LoadGenError(RuntimeError):
    """librdkafka could not be loaded, or a client could not be created or run."""


@dataclass
class Run:
    """What one producer or consumer did."""
    messages: int
    bytes: int
    failed: int
    first_error: int
    seconds: float
    thread_cpu_s: float
    latencies_us: list[int] = field(default_factory=list)

    @property
    def thread_cores(self) -> float:
        """CPU of the producing/polling thread per second of the run: near 1.0,
        the generator (not the broker) was the limit."""
        return self.thread_cpu_s / self.seconds if self.seconds > 0 else 0.0


def librdkafka_path() -> str:
    """The librdkafka confluent-kafka uses: the file it has mapped into this
    process, else the system's."""
    import confluent_kafka  # noqa: F401  (maps its librdkafka)
    with open("/proc/self/maps") as maps:
        for line in maps:
            path = line.split(maxsplit=5)[-1].strip()
            if os.path.basename(path).startswith("librdkafka") and ".so" in path:
                return path
    found = ctypes.util.find_library("rdkafka")
    if not found:
        raise LoadGenError("no librdkafka found (confluent-kafka is not loaded and none is installed)")
    return found


_loaded = False


def _load() -> None:
    global _loaded
    if not _loaded:
        error = ffi.new("char[]", ERROR_BYTES)
        if lib.rk_lg_load(librdkafka_path().encode(), error, ERROR_BYTES) != 0:
            raise LoadGenError(ffi.string(error).decode())
        _loaded = True


def _conf(settings: dict[str, object]) -> tuple[list, object]:
    """librdkafka settings as the C array of key, value strings (kept alive by the list)."""
    strings = [ffi.new("char[]", str(v).encode() if not isinstance(v, bool) else str(v).lower().encode())
               for pair in settings.items() for v in pair]
    return strings, ffi.new("const char *[]", strings)


def shared_counter(value) -> object:
    """A C pointer to a multiprocessing.Value("q") in shared memory, for the
    C loop to add to atomically (no lock, no Python call per message)."""
    return ffi.cast("int64_t *", ctypes.addressof(value.get_obj()))


def _sampler(samples: int, every: int) -> tuple[object, object]:
    values = ffi.new("uint32_t[]", max(samples, 1))
    sampler = ffi.new("rk_lg_sampler *", {"values": values, "capacity": samples, "every": max(every, 1)})
    return sampler, values


def _run(result, sampler, values) -> Run:
    kept = int(sampler.kept) if sampler is not None else 0
    return Run(int(result.messages), int(result.bytes), int(result.failed), int(result.first_error),
               float(result.seconds), float(result.thread_cpu_s), list(ffi.unpack(values, kept)) if kept else [])


def produce(settings: dict[str, object], topic: str, size: int, count: int, duration_s: float = 0.0,
            rate: float = 0.0, samples: int = 0, every: int = 1, progress=None) -> Run:
    """Produce `count` messages of `size` bytes (or for `duration_s` when > 0),
    paced at `rate` msgs/s when > 0; keep up to `samples` acknowledgement
    latencies (every `every`-th). Messages carry their send time (first 8
    bytes) for end-to-end latency. Raises LoadGenError if the client fails."""
    _load()
    keep, conf = _conf(settings)
    sampler, values = _sampler(samples, every) if samples else (ffi.NULL, None)
    result = ffi.new("rk_lg_result *")
    rc = lib.rk_lg_produce(conf, len(settings), topic.encode(), size, count, duration_s, rate, sampler,
                           shared_counter(progress) if progress is not None else ffi.NULL, ffi.NULL, result)
    del keep
    if rc != 0:
        raise LoadGenError(ffi.string(result.error).decode())
    return _run(result, sampler if samples else None, values)


def consume(settings: dict[str, object], topic: str, partitions: list[int], target, consumed, timeout_s: float,
            samples: int = 0, every: int = 1, progress=None) -> Run:
    """Read `partitions` from offset 0 until all consumers sharing `consumed`
    (a multiprocessing.Value("q")) have read `target.value` messages, or
    `timeout_s` passes; keep up to `samples` end-to-end latencies."""
    _load()
    keep, conf = _conf(settings)
    sampler, values = _sampler(samples, every) if samples else (ffi.NULL, None)
    result = ffi.new("rk_lg_result *")
    wanted = ffi.new("int32_t[]", partitions)
    rc = lib.rk_lg_consume(conf, len(settings), topic.encode(), wanted, len(partitions), shared_counter(target),
                           shared_counter(consumed), timeout_s, sampler,
                           shared_counter(progress) if progress is not None else ffi.NULL, result)
    del keep
    if rc != 0:
        raise LoadGenError(ffi.string(result.error).decode())
    return _run(result, sampler if samples else None, values)


def percentiles(samples_us: list[int], points: tuple[float, ...] = (50, 99, 99.9)) -> dict[str, float]:
    """Nearest-rank percentiles of microsecond samples, in milliseconds, keyed
    "p50", "p99", "p99.9" (and "max"); empty dict for no samples."""
    if not samples_us:
        return {}
    ordered = sorted(samples_us)
    n = len(ordered)
    out = {f"p{p:g}": ordered[max(0, min(n - 1, math.ceil(n * p / 100) - 1))] / 1000 for p in points}
    out["max"] = ordered[-1] / 1000
    return out
