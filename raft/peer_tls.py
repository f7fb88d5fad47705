"""TLS between brokers: TLS 1.3 only, both ends present a certificate signed
by the cluster's CA, and each certificate names one node.

A node's certificate carries its node id in its subject common name:
`CN=raftka-node-<id>` (decimal). Host names are not checked (peers are
configured by address, and an address says nothing about which node answers);
the node id is: the dialer accepts only the certificate of the node it
dialed, the acceptor only one naming the node id the dialer then
authenticates as in the HMAC handshake (transport.py). So a node holding
the cluster secret still cannot pose as another node without that node's
private key.

Neighbours: transport.py wraps its listener and its dials in these contexts;
the HMAC handshake and the per-frame MACs (handshake.py, frames.py) run
inside TLS unchanged.
"""
from __future__ import annotations

import re
import ssl
from dataclasses import dataclass
from typing import Any

COMMON_NAME = re.compile(r"raftka-node-([0-9]{1,10})", re.ASCII)


@dataclass(frozen=True)
class PeerTls:
    """The two contexts of one node: `server` for its listener, `client` for its dials."""

    server: ssl.SSLContext
    client: ssl.SSLContext


def peer_tls(cert: str, key: str | None, ca: str) -> PeerTls:
    """Contexts from PEM files; OSError or ssl.SSLError when they cannot be used."""
    return PeerTls(_context(ssl.PROTOCOL_TLS_SERVER, cert, key, ca), _context(ssl.PROTOCOL_TLS_CLIENT, cert, key, ca))


def _context(protocol: int, cert: str, key: str | None, ca: str) -> ssl.SSLContext:
    context = ssl.SSLContext(protocol)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.check_hostname = False           # the node id is checked instead (node_id_of)
    context.verify_mode = ssl.CERT_REQUIRED  # both ways: mutual TLS
    context.load_cert_chain(cert, key or None)
    context.load_verify_locations(cafile=ca)
    return context


def node_id_of(peer_certificate: dict[str, Any] | None) -> int | None:
    """The node id a verified peer certificate (ssl's getpeercert()) names, or
    None when it names none or several."""
    if not peer_certificate:
        return None
    names = [value for rdn in peer_certificate.get("subject", ()) for key, value in rdn if key == "commonName"]
    ids = {int(match.group(1)) for name in names if (match := COMMON_NAME.fullmatch(name))}
    return ids.pop() if len(ids) == 1 and len(names) == 1 else None
