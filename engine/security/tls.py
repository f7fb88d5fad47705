"""TLS on the Kafka listener, with the standard library's `ssl`.

`raftka serve --tls-cert FILE --tls-key FILE [--tls-ca FILE]` (or the
`tls_cert`, `tls_key`, `tls_ca` config keys): PEM files. The listener then
speaks only TLS (1.2 or newer); a plaintext client fails the handshake and is
disconnected. With `tls_ca`, every client must present a certificate that
CA signed, valid now (mutual TLS); without it, clients are not asked for one.

Between brokers: `--peer-tls-cert/--peer-tls-key/--peer-tls-ca` (`peer_tls_*`)
turn on TLS 1.3 with per-node certificates (raft/peer_tls.py; `peer_tls`).
"""
from __future__ import annotations

import ssl

from raftka.config import Config, ConfigError
from raftka.raft.peer_tls import PeerTls
from raftka.raft.peer_tls import peer_tls as peer_tls_contexts


def server_context(config: Config) -> ssl.SSLContext | None:
    """The listener's TLS context, or None when TLS is off (no tls_cert)."""
    if not config.tls_cert:
        return None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(config.tls_cert, config.tls_key or None)
        if config.tls_ca:
            context.load_verify_locations(cafile=config.tls_ca)
            context.verify_mode = ssl.CERT_REQUIRED
    except (OSError, ssl.SSLError) as error:
        raise ConfigError(f"TLS files (tls_cert={config.tls_cert!r}, tls_key={config.tls_key!r}, "
                          f"tls_ca={config.tls_ca!r}) cannot be used: {error}") from None
    return context


def peer_tls(config: Config) -> PeerTls | None:
    """The peer network's TLS contexts, or None when peer TLS is off (no peer_tls_cert)."""
    if not config.peer_tls_cert:
        return None
    try:
        return peer_tls_contexts(config.peer_tls_cert, config.peer_tls_key or None, config.peer_tls_ca)
    except (OSError, ssl.SSLError) as error:
        raise ConfigError(f"peer TLS files (peer_tls_cert={config.peer_tls_cert!r}, "
                          f"peer_tls_key={config.peer_tls_key!r}, peer_tls_ca={config.peer_tls_ca!r}) "
                          f"cannot be used: {error}") from None
