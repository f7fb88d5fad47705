"""Framing of the broker-to-broker stream: one TCP connection per broker pair,
shared by every Raft group; every frame authenticated and sequenced.

After the handshake (handshake.py) the stream is a sequence of frames:

  offset  size  field
       0     4  frame_length   u32, bytes after this field, tag included (>= 21, <= cap)
       4     4  group_id       u32, which Raft group the payload is for
       8     1  kind           u8, FrameKind
       9     .  payload        frame_length - 21 bytes
       .    16  tag            GMAC: AES-256-GCM(direction key, nonce = 0 u32 | sequence u64)
                               of no plaintext, bytes 0 .. end of payload as associated data

Each direction of a connection has its own key (handshake.session_keys:
fresh per connection, derived from both nonces) and its own sequence number:
0 for the first frame after the handshake, one more for each frame after it.
The sequence number is not sent; the receiver MACs with the one it expects.
So a frame injected, altered (one bit), replayed, reordered, dropped from the
middle of the stream, or carried over from another connection or the other
direction fails its tag. The receiver checks the length against the cap
before buffering a payload (an oversized or garbage length costs nothing but
the connection), then the tag before it reads anything else of the frame;
the first bad tag raises FrameAuthError and the transport drops the link.
Nothing is encrypted: the peer port shows the payloads to anyone on path.

One GMAC per frame (NIST SP 800-38D's GCM with an empty plaintext): with
AES-NI and carry-less multiplication it is several times cheaper than the
HMAC-SHA256 it replaced (measured in raft/README, "Transport"). GCM's one
requirement, a nonce never used twice under a key, holds by construction:
the keys are fresh per connection and direction and the nonce is the frame's
sequence number, which only grows. Frames already carry whole messages, and
a tick's frames to a peer leave in one write. Sans-IO: the transport feeds
received bytes in and writes sealed frames out.
"""
from __future__ import annotations

import enum
import hashlib
import hmac
import struct
from typing import NamedTuple

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

HEADER = struct.Struct(">IIB")
HEADER_SIZE = HEADER.size            # 9
TAG_SIZE = 16                        # GCM's full tag: 128 bits against forgery
KEY_SIZE = 32
_AFTER_LENGTH = HEADER_SIZE - 4      # group_id + kind
_LENGTH_MIN = _AFTER_LENGTH + TAG_SIZE
_NONCE = struct.Struct(">IQ")        # 0, sequence: at 10^7 frames/s it wraps after 58,000 years; pack raises if it did
DEFAULT_MAX_FRAME_BYTES = 64 * 1024 * 1024


class FrameKind(enum.IntEnum):
    RAFT_MESSAGE = 1   # a pysyncobj message, raft/codec.py encoded


class FrameError(ValueError):
    """The peer sent something that is not a valid frame; drop the connection."""


class FrameAuthError(FrameError):
    """A frame's tag does not verify: it was forged, altered, replayed,
    reordered or sent under another key. Drop the connection."""


class Frame(NamedTuple):
    group_id: int
    kind: FrameKind
    payload: bytes


def _mac_state(key: bytes) -> AESGCM:
    if len(key) != KEY_SIZE:
        raise ValueError(f"a frame key is {KEY_SIZE} bytes, got {len(key)}")
    return AESGCM(key)


def _tag(state: AESGCM, sequence: int, frame: bytes | bytearray | memoryview) -> bytes:
    return state.encrypt(_NONCE.pack(0, sequence), b"", frame)


def new_frame() -> bytearray:
    """A frame under construction: room for the header, payload appended after
    it, then `FrameSealer.seal`. Saves a copy of the payload."""
    return bytearray(HEADER_SIZE)


class FrameSealer:
    """The sending side of one direction: fills in headers and appends tags,
    numbering frames in the order they are sealed, which must be the order
    they are sent (a frame sealed and not sent breaks the link)."""

    def __init__(self, key: bytes) -> None:
        self._state = _mac_state(key)
        self.sequence = 0        # of the next frame sealed

    def seal(self, frame: bytearray, group_id: int, kind: FrameKind) -> bytearray:
        """Fill in the header of a frame made with new_frame and append its tag."""
        assert len(frame) >= HEADER_SIZE, f"frame of {len(frame)} bytes has no room for its header"
        HEADER.pack_into(frame, 0, len(frame) - 4 + TAG_SIZE, group_id, kind)
        frame += _tag(self._state, self.sequence, frame)
        self.sequence += 1
        return frame

    def encode(self, group_id: int, kind: FrameKind, payload: bytes | bytearray | memoryview) -> bytearray:
        """A sealed frame holding a copy of `payload`."""
        frame = new_frame()
        frame += payload
        return self.seal(frame, group_id, kind)


class FrameDecoder:
    """Turns the receiving side of one direction into frames; raises
    FrameError (FrameAuthError for a bad tag) on the first bad one."""

    def __init__(self, key: bytes, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES) -> None:
        assert max_frame_bytes >= _LENGTH_MIN, f"max_frame_bytes({max_frame_bytes}) < {_LENGTH_MIN}"
        self.max_frame_bytes = max_frame_bytes
        self.sequence = 0        # of the next frame expected
        self._state = _mac_state(key)
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
                if not _LENGTH_MIN <= length <= self.max_frame_bytes:
                    raise FrameError(f"frame length {length} outside [{_LENGTH_MIN}, {self.max_frame_bytes}]")
                end = position + 4 + length
                if end > len(view):
                    break
                payload_end = end - TAG_SIZE
                if not hmac.compare_digest(_tag(self._state, self.sequence, view[position:payload_end]),
                                           view[payload_end:end]):
                    raise FrameAuthError(f"frame {self.sequence} of this connection: its tag does not verify "
                                         "(forged, altered, replayed or out of order)")
                self.sequence += 1
                if kind not in FrameKind._value2member_map_:
                    raise FrameError(f"unknown frame kind {kind}")
                frames.append(Frame(group_id, FrameKind(kind), view[position + HEADER_SIZE:payload_end].tobytes()))
                position = end
        finally:
            view.release()
        del self._buffer[:position]
        return frames
