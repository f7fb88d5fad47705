"""Peer authentication: both ends prove they hold the cluster secret before
either decodes a single frame.

Mutual HMAC-SHA256 challenge-response over fixed-size messages, so nothing
of variable length is parsed from an unauthenticated peer:

  acceptor  -> dialer    HELLO  magic(4) | acceptor nonce(32)
  dialer    -> acceptor  AUTH   magic(4) | dialer node id u32 | dialer nonce(32)
                                | HMAC(secret, "dial" | acceptor nonce | dialer nonce | node id)
  acceptor  -> dialer    OK     magic(4) | acceptor node id u32
                                | HMAC(secret, "accept" | dialer nonce | acceptor nonce | node id)

Fresh random nonces on both sides mean a recorded exchange cannot be
replayed, and the dialer learns that the acceptor holds the secret too.

Then each side derives the connection's two frame keys (`session_keys`,
HKDF-SHA256 of RFC 5869 with the standard library's hmac):

  key(direction) = HKDF(ikm = secret, salt = acceptor nonce | dialer nonce,
                       info = "raftka frames " | direction | dialer id u32 | acceptor id u32), 32 bytes
  direction      = "dialer->acceptor" or "acceptor->dialer"

Both nonces and both ids are covered by the handshake's MACs, so both ends
agree on them or the handshake failed; the keys are fresh per connection and
differ per direction, so no frame can be replayed into another connection or
reflected back to its sender (frames.py MACs every frame with them).

The secret is at least SECRET_BYTES_MIN bytes (128 bits; the broker's
config asks more of secrets written as text, engine/config.py) and never
appears in an error message. Sans-IO: the transport moves the bytes and
closes the connection on AuthError.
"""
from __future__ import annotations

import hashlib
import hmac
import os
import struct
from dataclasses import dataclass, field

MAGIC = b"RKP2"                     # 2: frames tagged with GMAC (frames.py); RKP1 peers (HMAC frames) are refused here
NONCE_SIZE = 32
MAC_SIZE = 32
SECRET_BYTES_MIN = 16
_NODE = struct.Struct(">I")
HELLO_SIZE = len(MAGIC) + NONCE_SIZE
AUTH_SIZE = len(MAGIC) + _NODE.size + NONCE_SIZE + MAC_SIZE
OK_SIZE = len(MAGIC) + _NODE.size + MAC_SIZE


class AuthError(Exception):
    """The peer failed authentication or spoke something else."""


@dataclass(frozen=True)
class SessionKeys:
    """One side's frame keys for one connection (never in reprs)."""

    send: bytes = field(repr=False)
    receive: bytes = field(repr=False)


def hkdf_sha256(ikm: bytes, salt: bytes, info: bytes, length: int = 32) -> bytes:
    """HKDF (RFC 5869) with SHA-256: extract with `salt`, expand to `length` bytes."""
    assert 0 < length <= 255 * 32, f"HKDF-SHA256 length({length}) outside [1, {255 * 32}]"
    prk = hmac.new(salt, ikm, hashlib.sha256).digest()
    output, block = b"", b""
    for counter in range(1, -(-length // 32) + 1):
        block = hmac.new(prk, block + info + bytes([counter]), hashlib.sha256).digest()
        output += block
    return output[:length]


def session_keys(secret: bytes, acceptor_nonce: bytes, dialer_nonce: bytes,
                 dialer_id: int, acceptor_id: int) -> tuple[bytes, bytes]:
    """(dialer->acceptor key, acceptor->dialer key); see the module docstring."""
    salt, ids = acceptor_nonce + dialer_nonce, _NODE.pack(dialer_id) + _NODE.pack(acceptor_id)
    return (hkdf_sha256(secret, salt, b"raftka frames dialer->acceptor" + ids),
            hkdf_sha256(secret, salt, b"raftka frames acceptor->dialer" + ids))


def check_secret(secret: bytes) -> None:
    """Refuse a secret too short to key the peer links (ValueError, without the secret)."""
    if len(secret) < SECRET_BYTES_MIN:
        raise ValueError(f"the cluster secret is {len(secret)} bytes, at least {SECRET_BYTES_MIN} are needed")


def _mac(secret: bytes, label: bytes, *parts: bytes) -> bytes:
    return hmac.new(secret, label + b"".join(parts), hashlib.sha256).digest()


def _check_magic(message: bytes, size: int, what: str) -> None:
    if len(message) != size:
        raise AuthError(f"{what} is {len(message)} bytes, expected {size}")
    if message[:len(MAGIC)] != MAGIC:
        raise AuthError(f"{what} does not start with the peer protocol magic {MAGIC!r} but {message[:len(MAGIC)]!r}: "
                        "a broker of another Raftka wire version, or not a Raftka broker")


class Acceptor:
    """The listening side of one connection."""

    def __init__(self, secret: bytes, node_id: int) -> None:
        check_secret(secret)
        self._secret = secret
        self._node_id = node_id
        self._nonce = os.urandom(NONCE_SIZE)
        self.keys: SessionKeys | None = None   # this side's frame keys, once the peer authenticated

    def hello(self) -> bytes:
        return MAGIC + self._nonce

    def receive_auth(self, message: bytes) -> tuple[int, bytes]:
        """Verify the dialer's AUTH; return (its node id, the OK to send back)."""
        _check_magic(message, AUTH_SIZE, "AUTH")
        offset = len(MAGIC)
        node = message[offset:offset + _NODE.size]
        dialer_nonce = message[offset + _NODE.size:offset + _NODE.size + NONCE_SIZE]
        mac = message[-MAC_SIZE:]
        if not hmac.compare_digest(mac, _mac(self._secret, b"dial", self._nonce, dialer_nonce, node)):
            raise AuthError("peer does not hold the cluster secret")
        node_bytes = _NODE.pack(self._node_id)
        reply = MAGIC + node_bytes + _mac(self._secret, b"accept", dialer_nonce, self._nonce, node_bytes)
        dialer_id = _NODE.unpack(node)[0]
        to_acceptor, to_dialer = session_keys(self._secret, self._nonce, dialer_nonce, dialer_id, self._node_id)
        self.keys = SessionKeys(send=to_dialer, receive=to_acceptor)
        return dialer_id, reply


class Dialer:
    """The connecting side of one connection."""

    def __init__(self, secret: bytes, node_id: int) -> None:
        check_secret(secret)
        self._secret = secret
        self._node = _NODE.pack(node_id)
        self._nonce = os.urandom(NONCE_SIZE)
        self._acceptor_nonce: bytes | None = None
        self.keys: SessionKeys | None = None   # this side's frame keys, once the acceptor authenticated

    def receive_hello(self, message: bytes) -> bytes:
        """Answer the acceptor's HELLO with AUTH."""
        _check_magic(message, HELLO_SIZE, "HELLO")
        self._acceptor_nonce = message[len(MAGIC):]
        mac = _mac(self._secret, b"dial", self._acceptor_nonce, self._nonce, self._node)
        return MAGIC + self._node + self._nonce + mac

    def receive_ok(self, message: bytes) -> int:
        """Verify the acceptor's OK; return its node id."""
        if self._acceptor_nonce is None:
            raise AuthError("OK before HELLO")
        _check_magic(message, OK_SIZE, "OK")
        node = message[len(MAGIC):len(MAGIC) + _NODE.size]
        expected = _mac(self._secret, b"accept", self._nonce, self._acceptor_nonce, node)
        if not hmac.compare_digest(message[-MAC_SIZE:], expected):
            raise AuthError("acceptor does not hold the cluster secret")
        acceptor_id = _NODE.unpack(node)[0]
        to_acceptor, to_dialer = session_keys(self._secret, self._acceptor_nonce, self._nonce,
                                              _NODE.unpack(self._node)[0], acceptor_id)
        self.keys = SessionKeys(send=to_acceptor, receive=to_dialer)
        return acceptor_id
