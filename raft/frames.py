"""Framing of the broker-to-broker stream: one TCP connection per broker pair,
shared by every Raft group.

After the handshake (handshake.py) the stream is a sequence of frames:

  offset  size  field
       0     4  frame_length   u32, bytes after this field (>= 5, <= cap)
       4     4  group_id       u32, which Raft group the payload is for
       8     1  kind           u8, FrameKind
       9     .  payload        frame_length - 5 bytes

The length is checked against the cap before any payload is buffered, so an
oversized or garbage length costs nothing but the connection. Sans-IO: the
transport feeds received bytes in and writes encoded frames out.
"""
from __future__ import annotations

import enum
import struct
from typing import NamedTuple

HEADER = struct.Struct(">IIB")
HEADER_SIZE = HEADER.size            # 9
_AFTER_LENGTH = HEADER_SIZE - 4      # group_id + kind
DEFAULT_MAX_FRAME_BYTES = 64 * 1024 * 1024


class FrameKind(enum.IntEnum):
    RAFT_MESSAGE = 1   # a pysyncobj message, raft/codec.py encoded


class FrameError(ValueError):
    """The peer sent something that is not a valid frame; drop the connection."""


class Frame(NamedTuple):
    group_id: int
    kind: FrameKind
    payload: bytes


def encode_frame(group_id: int, kind: FrameKind, payload: bytes | bytearray | memoryview) -> bytes:
    return HEADER.pack(len(payload) + _AFTER_LENGTH, group_id, kind) + bytes(payload)


def new_frame() -> bytearray:
    """A frame under construction: room for the header, payload appended after
    it, then `seal_frame`. Saves encode_frame's copy of the payload."""
    return bytearray(HEADER_SIZE)


def seal_frame(frame: bytearray, group_id: int, kind: FrameKind) -> bytearray:
    """Fill in the header of a frame made with new_frame."""
    HEADER.pack_into(frame, 0, len(frame) - 4, group_id, kind)
    return frame


class FrameDecoder:
    """Turns a byte stream into frames; raises FrameError on the first bad one."""

    def __init__(self, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES) -> None:
        self.max_frame_bytes = max_frame_bytes
        self._buffer = bytearray()

    @property
    def buffered_bytes(self) -> int:
        return len(self._buffer)

    def feed(self, data: bytes | bytearray | memoryview) -> list[Frame]:
        """Add received bytes; return every frame they complete, in order."""
        self._buffer += data
        frames = []
        position = 0
        view = memoryview(self._buffer)   # payloads are copied once, out of the view
        try:
            while len(view) - position >= HEADER_SIZE:
                length, group_id, kind = HEADER.unpack_from(view, position)
                if not _AFTER_LENGTH <= length <= self.max_frame_bytes:
                    raise FrameError(f"frame length {length} outside [{_AFTER_LENGTH}, {self.max_frame_bytes}]")
                if kind not in FrameKind._value2member_map_:
                    raise FrameError(f"unknown frame kind {kind}")
                end = position + 4 + length
                if end > len(view):
                    break
                frames.append(Frame(group_id, FrameKind(kind), view[position + HEADER_SIZE:end].tobytes()))
                position = end
        finally:
            view.release()
        del self._buffer[:position]
        return frames
