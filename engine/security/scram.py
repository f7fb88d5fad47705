"""SASL mechanisms of the Kafka listener: SCRAM-SHA-256, SCRAM-SHA-512 (RFC
5802 / 7677, as Kafka's KIP-84) and PLAIN (RFC 4616).

Only SCRAM credentials are stored (replicated in the cluster metadata, see
raftka.security.state): salt, iteration count, StoredKey = H(ClientKey) and
ServerKey, never a password. PLAIN is checked against the same credential:
the password is salted and hashed as SCRAM would, and its StoredKey compared.

A SCRAM exchange in SaslAuthenticate requests:
  client-first  "n,," ["a=" authzid] "n=" user ",r=" client nonce
  server-first  "r=" client nonce + server nonce ",s=" base64 salt ",i=" iterations
  client-final  "c=biws,r=" nonce ",p=" base64 ClientProof
  server-final  "v=" base64 ServerSignature
with AuthMessage = client-first-bare "," server-first "," client-final-without-proof,
ClientProof = ClientKey XOR HMAC(StoredKey, AuthMessage), checked as
H(ClientProof XOR HMAC(StoredKey, AuthMessage)) == StoredKey.
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import os
from dataclasses import dataclass
from typing import Callable

SCRAM_SHA_256, SCRAM_SHA_512, PLAIN = "SCRAM-SHA-256", "SCRAM-SHA-512", "PLAIN"
HASHES: dict[str, str] = {SCRAM_SHA_256: "sha256", SCRAM_SHA_512: "sha512"}
MECHANISMS = (SCRAM_SHA_512, SCRAM_SHA_256, PLAIN)
# Kafka's bounds on a SCRAM credential's iterations
MIN_ITERATIONS, MAX_ITERATIONS = 4096, 16384
DEFAULT_ITERATIONS = 8192
SALT_BYTES = 32
NONCE_BYTES = 24


class AuthenticationFailed(Exception):
    """Wrong credentials or a malformed exchange: the connection is refused.
    The message goes to the client; it never says which part was wrong."""


@dataclass(frozen=True)
class ScramCredential:
    mechanism: str
    salt: bytes
    iterations: int
    stored_key: bytes
    server_key: bytes

    def __repr__(self) -> str:   # keys are secrets too: they let a thief impersonate the server
        return f"ScramCredential({self.mechanism}, iterations={self.iterations})"


def make_credential(mechanism: str, password: str, iterations: int = DEFAULT_ITERATIONS,
                    salt: bytes | None = None) -> ScramCredential:
    """The stored form of `password` for `mechanism`."""
    if mechanism not in HASHES:
        raise ValueError(f"{mechanism!r} is not a SCRAM mechanism ({sorted(HASHES)})")
    if not MIN_ITERATIONS <= iterations <= MAX_ITERATIONS:
        raise ValueError(f"iterations {iterations} outside [{MIN_ITERATIONS}, {MAX_ITERATIONS}]")
    salt = os.urandom(SALT_BYTES) if salt is None else salt
    return credential_from_salted(mechanism, salt, iterations, _salted_password(mechanism, password, salt, iterations))


def credential_from_salted(mechanism: str, salt: bytes, iterations: int, salted_password: bytes) -> ScramCredential:
    """The stored form from a SaltedPassword (what AlterUserScramCredentials carries)."""
    name = HASHES[mechanism]
    client_key = hmac.digest(salted_password, b"Client Key", name)
    server_key = hmac.digest(salted_password, b"Server Key", name)
    return ScramCredential(mechanism, salt, iterations, hashlib.new(name, client_key).digest(), server_key)


def _salted_password(mechanism: str, password: str, salt: bytes, iterations: int) -> bytes:
    return hashlib.pbkdf2_hmac(HASHES[mechanism], password.encode("utf-8"), salt, iterations)


def password_matches(credential: ScramCredential, password: str) -> bool:
    """Whether `password` is the one `credential` was made from (PLAIN's check)."""
    again = credential_from_salted(credential.mechanism, credential.salt, credential.iterations,
                                   _salted_password(credential.mechanism, password, credential.salt,
                                                    credential.iterations))
    return hmac.compare_digest(again.stored_key, credential.stored_key)


Lookup = Callable[[str, str], "ScramCredential | None"]   # (user, mechanism) -> credential


class ScramExchange:
    """The server side of one SCRAM authentication; `step` takes each client
    message and returns the answer; `user` is set once the proof checked out."""

    def __init__(self, mechanism: str, lookup: Lookup) -> None:
        assert mechanism in HASHES, mechanism
        self.mechanism = mechanism
        self._lookup = lookup
        self._hash = HASHES[mechanism]
        self._state = "first"
        self.user: str | None = None
        self._claimed = ""
        self._credential: ScramCredential | None = None
        self._nonce = ""
        self._gs2_header = ""
        self._auth_prefix = ""

    @property
    def done(self) -> bool:
        return self.user is not None

    def step(self, message: bytes) -> bytes:
        try:
            text = message.decode("utf-8")
        except UnicodeDecodeError:
            raise AuthenticationFailed("SCRAM message is not utf-8") from None
        if self._state == "first":
            return self._first(text)
        if self._state == "final":
            return self._final(text)
        raise AuthenticationFailed("SCRAM exchange already finished")

    def _first(self, text: str) -> bytes:
        parts = text.split(",", 2)
        if len(parts) != 3 or parts[0] not in ("n", "y") or (parts[1] and not parts[1].startswith("a=")):
            raise AuthenticationFailed("malformed SCRAM client-first message")
        self._gs2_header = f"{parts[0]},{parts[1]},"
        bare = parts[2]
        fields = _attributes(bare)
        user, client_nonce = fields.get("n"), fields.get("r")
        if not user or not client_nonce or fields.get("tokenauth") is not None:
            raise AuthenticationFailed("malformed SCRAM client-first message (or a delegation token, not served)")
        self._claimed = _unescape(user)
        authzid = _unescape(parts[1][2:]) if parts[1] else ""
        if authzid and authzid != self._claimed:
            raise AuthenticationFailed("authorization id differs from the user")
        credential = self._lookup(self._claimed, self.mechanism)
        if credential is None:
            raise AuthenticationFailed(f"authentication failed with SASL mechanism {self.mechanism}")
        self._credential = credential
        self._nonce = client_nonce + base64.b64encode(os.urandom(NONCE_BYTES)).decode()
        server_first = (f"r={self._nonce},s={base64.b64encode(credential.salt).decode()},"
                        f"i={credential.iterations}")
        self._auth_prefix = f"{bare},{server_first}"
        self._state = "final"
        return server_first.encode()

    def _final(self, text: str) -> bytes:
        self._state = "finished"
        without_proof, _, proof_part = text.rpartition(",p=")
        fields = _attributes(without_proof)
        expected_binding = base64.b64encode(self._gs2_header.encode()).decode()
        # Kafka's check is "ends with": librdkafka 2.0 sends its own nonce before the server's whole one
        if not without_proof or fields.get("c") != expected_binding or not fields.get("r", "").endswith(self._nonce):
            raise AuthenticationFailed("SCRAM client-final message does not match the exchange")
        try:
            proof = base64.b64decode(proof_part, validate=True)
        except ValueError:
            raise AuthenticationFailed("SCRAM proof is not base64") from None
        credential = self._credential
        assert credential is not None
        auth_message = f"{self._auth_prefix},{without_proof}".encode()
        signature = hmac.digest(credential.stored_key, auth_message, self._hash)
        if len(proof) != len(signature):
            raise AuthenticationFailed(f"authentication failed with SASL mechanism {self.mechanism}")
        client_key = bytes(a ^ b for a, b in zip(proof, signature))
        if not hmac.compare_digest(hashlib.new(self._hash, client_key).digest(), credential.stored_key):
            raise AuthenticationFailed(f"authentication failed with SASL mechanism {self.mechanism}")
        self.user = self._claimed
        server_signature = hmac.digest(credential.server_key, auth_message, self._hash)
        return b"v=" + base64.b64encode(server_signature)


def check_plain(message: bytes, lookup: Lookup) -> str:
    """The user a PLAIN message (authzid NUL user NUL password) proves, or AuthenticationFailed."""
    parts = message.split(b"\0")
    if len(parts) != 3:
        raise AuthenticationFailed("malformed PLAIN message")
    try:
        authzid, user, password = (part.decode("utf-8") for part in parts)
    except UnicodeDecodeError:
        raise AuthenticationFailed("PLAIN message is not utf-8") from None
    if not user or (authzid and authzid != user):
        raise AuthenticationFailed("malformed PLAIN message")
    for mechanism in (SCRAM_SHA_512, SCRAM_SHA_256):
        credential = lookup(user, mechanism)
        if credential is not None:
            if password_matches(credential, password):
                return user
            break
    raise AuthenticationFailed("authentication failed with SASL mechanism PLAIN")


def _attributes(text: str) -> dict[str, str]:
    out = {}
    for item in text.split(","):
        key, sep, value = item.partition("=")
        if sep:
            out[key] = value
    return out


def _unescape(name: str) -> str:
    return name.replace("=2C", ",").replace("=3D", "=")
