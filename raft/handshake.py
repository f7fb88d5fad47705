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
The secret is at least SECRET_BYTES_MIN bytes (128 bits; the broker's
config asks more of secrets written as text, engine/config.py); it never
appears in an error message.
Sans-IO: the transport moves the bytes and closes the connection on
AuthError.
"""
from __future__ import annotations

import hashlib
import hmac
import os
import struct

MAGIC = b"RKP1"
NONCE_SIZE = 32
MAC_SIZE = 32
SECRET_BYTES_MIN = 16
_NODE = struct.Struct(">I")
HELLO_SIZE = len(MAGIC) + NONCE_SIZE
AUTH_SIZE = len(MAGIC) + _NODE.size + NONCE_SIZE + MAC_SIZE
OK_SIZE = len(MAGIC) + _NODE.size + MAC_SIZE


class AuthError(Exception):
    """The peer failed authentication or spoke something else."""


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
        raise AuthError(f"{what} does not start with the peer protocol magic")


class Acceptor:
    """The listening side of one connection."""

    def __init__(self, secret: bytes, node_id: int) -> None:
        check_secret(secret)
        self._secret = secret
        self._node_id = node_id
        self._nonce = os.urandom(NONCE_SIZE)

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
        return _NODE.unpack(node)[0], reply


class Dialer:
    """The connecting side of one connection."""

    def __init__(self, secret: bytes, node_id: int) -> None:
        check_secret(secret)
        self._secret = secret
        self._node = _NODE.pack(node_id)
        self._nonce = os.urandom(NONCE_SIZE)
        self._acceptor_nonce: bytes | None = None

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
        return _NODE.unpack(node)[0]
