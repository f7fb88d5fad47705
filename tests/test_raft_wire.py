"""raft/ wire layer: the message codec, framing and the peer handshake refuse
anything but well-formed, authenticated traffic, without executing any of it."""
from __future__ import annotations

import os
import pickle

import pytest
from hypothesis import given, strategies as st

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from raftka.raft.codec import MAX_DEPTH, CodecError, decode, encode
from raftka.raft.frames import TAG_SIZE, FrameAuthError, FrameDecoder, FrameError, FrameKind, FrameSealer
from raftka.raft.handshake import AUTH_SIZE, MAGIC, Acceptor, AuthError, Dialer, hkdf_sha256

scalars = (st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1)
           | st.floats(allow_nan=False) | st.binary(max_size=64) | st.text(max_size=16))
messages = st.recursive(
    scalars,
    lambda inner: (st.lists(inner, max_size=4) | st.lists(inner, max_size=4).map(tuple)
                   | st.dictionaries(st.text(max_size=8) | st.integers(0, 9), inner, max_size=4)),
    max_leaves=30)


@given(messages)
def test_any_message_round_trips_with_its_types(message):
    assert decode(encode(message)) == message
    assert type(decode(encode(message))) is type(message)


def test_a_pysyncobj_append_entries_message_round_trips():
    message = {"type": "append_entries", "term": 7, "commit_index": 41, "prevLogIdx": 40,
               "prevLogTerm": 6, "entries": [(b"\x01batch", 41, 7), (b"\x01more", 42, 7)]}
    assert decode(encode(message)) == message


@given(st.binary(max_size=200))
def test_random_bytes_decode_to_a_value_or_a_codec_error_never_anything_else(data):
    try:
        decode(data)
    except CodecError:
        pass


def test_a_pickle_payload_is_refused_not_executed():
    class Boom:
        def __reduce__(self):
            return (os.system, ("touch /tmp/raftka-pwned",))
    with pytest.raises(CodecError, match="unknown tag 0x80"):
        decode(pickle.dumps(Boom()))
    assert not os.path.exists("/tmp/raftka-pwned")


@pytest.mark.parametrize("data, reason", [
    (b"\x05\xff\xff\x03", "length"),           # bytes longer than what is left
    (b"\x07\x10", "length"),                  # 8 items claimed, none present
    (b"\x03" + b"\xff" * 11, "varint"),
    (b"\x00\x00", "trailing"),
    (b"\x06\x02\xff\xfe", "utf-8"),
    (b"\x09\x02\x07\x00\x00", "unhashable"),   # a list as a dict key
    (b"\x07\x02" * (MAX_DEPTH + 2), "deeper"),
])
def test_malformed_messages_are_refused_with_the_reason(data, reason):
    with pytest.raises(CodecError, match=reason):
        decode(data)


KEY = bytes(range(32))


def test_frames_split_across_reads_are_reassembled_in_order():
    sealer = FrameSealer(KEY)
    stream = sealer.encode(3, FrameKind.RAFT_MESSAGE, b"first") + sealer.encode(9, FrameKind.RAFT_MESSAGE, b"")
    decoder = FrameDecoder(KEY)
    frames = []
    for i in range(len(stream)):
        frames += decoder.feed(stream[i:i + 1])
    assert [(f.group_id, f.payload) for f in frames] == [(3, b"first"), (9, b"")]
    assert decoder.buffered_bytes == 0


def test_an_oversized_frame_is_refused_from_its_header_alone():
    decoder = FrameDecoder(KEY, max_frame_bytes=1024)
    header_only = FrameSealer(KEY).encode(1, FrameKind.RAFT_MESSAGE, b"x" * 2000)[:9]
    with pytest.raises(FrameError, match="outside"):
        decoder.feed(header_only)


@pytest.mark.parametrize("garbage", [b"\x00\x00\x00\x00" + b"\x00" * 5, b"GET / HTTP/1.1\r\n\r\n",
                                     b"\x00\x00\x00\x05\x00\x00\x00\x01\x63", b"\x00\x00\x00\x15" + bytes(21)])
def test_garbage_streams_are_refused(garbage):
    with pytest.raises(FrameError):
        FrameDecoder(KEY, max_frame_bytes=1 << 20).feed(garbage)


def handshake(acceptor_secret: bytes, dialer_secret: bytes) -> tuple[int, int]:
    acceptor, dialer = Acceptor(acceptor_secret, node_id=1), Dialer(dialer_secret, node_id=2)
    auth = dialer.receive_hello(acceptor.hello())
    seen_dialer, ok = acceptor.receive_auth(auth)
    return seen_dialer, dialer.receive_ok(ok)


def test_peers_with_the_same_secret_learn_each_others_node_ids():
    assert handshake(b"s3cret-s3cret-s3cret", b"s3cret-s3cret-s3cret") == (2, 1)


def test_a_peer_with_the_wrong_secret_is_refused():
    with pytest.raises(AuthError, match="does not hold the cluster secret"):
        handshake(b"s3cret-s3cret-s3cret", b"a-guessed-secret-16+")


def test_a_recorded_auth_cannot_be_replayed_to_a_new_connection():
    acceptor, dialer = Acceptor(b"s3cret-s3cret-s3cret", 1), Dialer(b"s3cret-s3cret-s3cret", 2)
    recorded = dialer.receive_hello(acceptor.hello())
    acceptor.receive_auth(recorded)
    with pytest.raises(AuthError):
        Acceptor(b"s3cret-s3cret-s3cret", 1).receive_auth(recorded)  # fresh nonce


def test_an_acceptor_without_the_secret_is_detected_by_the_dialer():
    impostor, dialer = Acceptor(b"another-secret-16+", 1), Dialer(b"s3cret-s3cret-s3cret", 2)
    dialer.receive_hello(impostor.hello())
    forged_ok = MAGIC + (1).to_bytes(4, "big") + os.urandom(32)
    with pytest.raises(AuthError, match="acceptor does not hold the cluster secret"):
        dialer.receive_ok(forged_ok)


@pytest.mark.parametrize("message", [b"", b"RKP1", b"XXXX" + bytes(AUTH_SIZE - 4), pickle.dumps({"type": "x"})])
def test_wrong_sized_or_foreign_handshake_messages_are_refused(message):
    with pytest.raises(AuthError):
        Acceptor(b"s3cret-s3cret-s3cret", 1).receive_auth(message)


def test_a_peer_of_the_previous_wire_version_is_refused_at_its_hello():
    """RKP1 brokers tagged frames with HMAC-SHA256: one of them must fail the
    handshake with a clear error, not every frame after it."""
    old_hello = b"RKP1" + os.urandom(32)
    with pytest.raises(AuthError):
        Dialer(b"s3cret-s3cret-s3cret", 2).receive_hello(old_hello)


# ---- session keys and frame tags ---------------------------------------------

def test_hkdf_sha256_matches_rfc_5869_test_case_1():
    okm = hkdf_sha256(bytes([0x0b] * 22), bytes(range(13)), bytes(range(0xf0, 0xfa)), 42)
    assert okm.hex() == ("3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf"
                         "34007208d5b887185865")


def authenticated_pair(secret: bytes = b"s3cret-s3cret-s3cret") -> tuple[Acceptor, Dialer]:
    acceptor, dialer = Acceptor(secret, node_id=1), Dialer(secret, node_id=2)
    _, ok = acceptor.receive_auth(dialer.receive_hello(acceptor.hello()))
    dialer.receive_ok(ok)
    return acceptor, dialer


def test_each_direction_of_each_connection_has_its_own_key_and_both_ends_agree():
    acceptor, dialer = authenticated_pair()
    assert dialer.keys.send == acceptor.keys.receive and acceptor.keys.send == dialer.keys.receive
    assert dialer.keys.send != dialer.keys.receive
    again, _ = authenticated_pair()
    assert {again.keys.send, again.keys.receive}.isdisjoint({acceptor.keys.send, acceptor.keys.receive})
    assert acceptor.keys.send.hex() not in repr(acceptor.keys)


def sealed(key: bytes, count: int) -> list[bytes]:
    sealer = FrameSealer(key)
    return [bytes(sealer.encode(7, FrameKind.RAFT_MESSAGE, b"message %d" % n)) for n in range(count)]


def test_sealed_frames_carry_a_16_byte_tag_and_decode_in_order():
    frames = sealed(KEY, 3)
    assert len(frames[0]) == 9 + len(b"message 0") + TAG_SIZE
    assert [f.payload for f in FrameDecoder(KEY).feed(b"".join(frames))] == [b"message %d" % n for n in range(3)]


def test_a_frame_tag_is_the_gmac_of_its_bytes_under_its_sequence_number_as_nonce():
    """Pins the construction (frames.py): AES-256-GCM, no plaintext, the frame
    as associated data, nonce 0 u32 | sequence u64. A frame tagged under any
    other nonce, the sequence a nonce must never repeat with, is refused."""
    first, second = sealed(KEY, 2)
    for sequence, frame in enumerate((first, second)):
        expected = AESGCM(KEY).encrypt(bytes(4) + sequence.to_bytes(8, "big"), b"", frame[:-TAG_SIZE])
        assert frame[-TAG_SIZE:] == expected
    retagged = second[:-TAG_SIZE] + AESGCM(KEY).encrypt(bytes(12), b"", second[:-TAG_SIZE])
    decoder = FrameDecoder(KEY)
    decoder.feed(first)
    with pytest.raises(FrameAuthError):
        decoder.feed(retagged)


@given(st.data())
def test_any_flipped_bit_is_refused_never_decoded(data):
    frames = sealed(KEY, 3)
    stream = bytearray(b"".join(frames))
    position = data.draw(st.integers(0, len(frames[0]) - 1))
    stream[position] ^= 1 << data.draw(st.integers(0, 7))
    try:
        assert FrameDecoder(KEY, max_frame_bytes=1 << 20).feed(stream) == []   # a longer length: still waiting
    except FrameError:
        pass


@pytest.mark.parametrize("name, order", [("replayed", [0, 1, 0]), ("reordered", [1, 0]), ("one dropped", [0, 2])])
def test_a_replayed_reordered_or_missing_frame_is_refused(name, order):
    frames = sealed(KEY, 3)
    decoder = FrameDecoder(KEY)
    with pytest.raises(FrameAuthError, match="does not verify"):
        for n in order:
            decoder.feed(frames[n])


def test_a_frame_sealed_for_the_other_direction_or_another_connection_is_refused():
    acceptor, dialer = authenticated_pair()
    other, _ = authenticated_pair()
    frame = FrameSealer(dialer.keys.send).encode(7, FrameKind.RAFT_MESSAGE, b"x")
    assert FrameDecoder(acceptor.keys.receive).feed(frame)[0].payload == b"x"
    for wrong_key in (dialer.keys.receive, other.keys.receive):
        with pytest.raises(FrameAuthError):
            FrameDecoder(wrong_key).feed(frame)
