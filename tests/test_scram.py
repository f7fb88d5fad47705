"""SCRAM and PLAIN server logic against a client written from RFC 5802 here:
the right password authenticates and the server proves it knows the
credential; a wrong password, an unknown user, a tampered nonce or channel
binding fail; stored credentials never hold the password."""
from __future__ import annotations

import base64
import hashlib
import hmac
import os

import pytest

from raftka.security import scram
from raftka.security.scram import AuthenticationFailed, ScramExchange, check_plain, make_credential

USERS = {("alice", m): make_credential(m, "correct horse", iterations=4096) for m in scram.HASHES}


def lookup(user: str, mechanism: str):
    return USERS.get((user, mechanism))


def client_exchange(mechanism: str, user: str, password: str, tamper: str = "") -> tuple[ScramExchange, bytes]:
    name = scram.HASHES[mechanism]
    server = ScramExchange(mechanism, lookup)
    client_nonce = base64.b64encode(os.urandom(18)).decode()
    bare = f"n={user},r={client_nonce}"
    server_first = server.step(f"n,,{bare}".encode()).decode()
    fields = dict(item.split("=", 1) for item in server_first.split(","))
    nonce = fields["r"] + ("x" if tamper == "nonce" else "")
    binding = "eSws" if tamper == "binding" else "biws"
    salted = hashlib.pbkdf2_hmac(name, password.encode(), base64.b64decode(fields["s"]), int(fields["i"]))
    client_key = hmac.digest(salted, b"Client Key", name)
    without_proof = f"c={binding},r={nonce}"
    auth_message = f"{bare},{server_first},{without_proof}".encode()
    signature = hmac.digest(hashlib.new(name, client_key).digest(), auth_message, name)
    proof = base64.b64encode(bytes(a ^ b for a, b in zip(client_key, signature))).decode()
    server_final = server.step(f"{without_proof},p={proof}".encode())
    expected = hmac.digest(hmac.digest(salted, b"Server Key", name), auth_message, name)
    assert server_final == b"v=" + base64.b64encode(expected)   # the server proves it holds the credential
    return server, server_final


@pytest.mark.parametrize("mechanism", sorted(scram.HASHES))
def test_right_password_authenticates_and_the_server_proves_itself(mechanism: str) -> None:
    server, _ = client_exchange(mechanism, "alice", "correct horse")
    assert server.done and server.user == "alice"


@pytest.mark.parametrize("mechanism", sorted(scram.HASHES))
@pytest.mark.parametrize("tamper", ["password", "nonce", "binding"])
def test_wrong_password_or_tampered_exchange_fails(mechanism: str, tamper: str) -> None:
    password = "wrong horse" if tamper == "password" else "correct horse"
    with pytest.raises(AuthenticationFailed):
        client_exchange(mechanism, "alice", password, "" if tamper == "password" else tamper)


def test_unknown_user_fails_at_the_first_message() -> None:
    with pytest.raises(AuthenticationFailed):
        ScramExchange(scram.SCRAM_SHA_512, lookup).step(b"n,,n=mallory,r=abc")


def test_plain_checks_the_password_against_the_scram_credential() -> None:
    assert check_plain(b"\0alice\0correct horse", lookup) == "alice"
    for bad in (b"\0alice\0wrong", b"\0bob\0correct horse", b"mallory\0alice\0correct horse", b"alice"):
        with pytest.raises(AuthenticationFailed):
            check_plain(bad, lookup)


def test_stored_credential_holds_no_password_and_hides_its_keys() -> None:
    credential = USERS[("alice", scram.SCRAM_SHA_256)]
    assert b"correct horse" not in credential.salt + credential.stored_key + credential.server_key
    assert "stored_key" not in repr(credential) and repr(credential.stored_key) not in repr(credential)
