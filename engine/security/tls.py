"""TLS on the Kafka listener, with the standard library's `ssl`.

`raftka serve --tls-cert FILE --tls-key FILE [--tls-ca FILE]` (or the
`tls_cert`, `tls_key`, `tls_ca` config keys): PEM files. The listener then
speaks only TLS (1.2 or newer); a plaintext client fails the handshake and is
disconnected. With `tls_ca`, every client must present a certificate that
CA signed, valid now (mutual TLS); without it, clients are not asked for one.
"""
from __future__ import annotations

import ssl

from raftka.config import Config, ConfigError


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
