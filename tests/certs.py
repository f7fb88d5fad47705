"""Test certificates made with the openssl command line: a CA, a server
certificate for 127.0.0.1, client certificates (signed, expired, and one
from a CA the broker does not know); peer certificates naming node ids."""
from __future__ import annotations

import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

EC = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=30)


@dataclass(frozen=True)
class Pair:
    cert: str
    key: str


@dataclass(frozen=True)
class Certs:
    ca: str
    server: Pair
    client: Pair
    expired_client: Pair
    rogue_client: Pair


def _ca(directory: Path, name: str) -> tuple[str, str]:
    _openssl("req", "-x509", *EC, "-keyout", f"{name}.key", "-out", f"{name}.pem", "-days", "2",
             "-subj", f"/CN={name}", cwd=directory)
    return str(directory / f"{name}.pem"), str(directory / f"{name}.key")


def _signed(directory: Path, name: str, ca: tuple[str, str], days: int, serial: int, san: str = "",
            cn: str = "") -> Pair:
    _openssl("req", *EC, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={cn or name}", cwd=directory)
    extra: list[str] = []
    if san:
        (directory / f"{name}.ext").write_text(f"subjectAltName={san}\n")
        extra = ["-extfile", f"{name}.ext"]
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", ca[0], "-CAkey", ca[1], "-set_serial", str(serial),
             "-out", f"{name}.pem", "-days", str(days), *extra, cwd=directory)
    return Pair(str(directory / f"{name}.pem"), str(directory / f"{name}.key"))


def make_certs(directory: Path) -> Certs:
    directory.mkdir(parents=True, exist_ok=True)
    ca, rogue_ca = _ca(directory, "ca"), _ca(directory, "rogue-ca")
    certs = Certs(ca=ca[0],
                  server=_signed(directory, "server", ca, 2, 1, "IP:127.0.0.1,DNS:localhost"),
                  client=_signed(directory, "client", ca, 2, 2),
                  expired_client=_signed(directory, "expired", ca, 0, 3),   # valid until the second it was made
                  rogue_client=_signed(directory, "rogue", rogue_ca, 2, 4))
    time.sleep(1.1)    # so the expired certificate is past its notAfter
    return certs


@dataclass(frozen=True)
class NodeCerts:
    ca: str
    nodes: dict[int, Pair]        # node id -> its certificate, CN=raftka-node-<id>
    rogue: dict[int, Pair]        # the same names, signed by a CA the cluster does not trust


def make_node_certs(directory: Path, node_ids: list[int]) -> NodeCerts:
    """Peer certificates for the brokers of a cluster (raft/peer_tls.py)."""
    directory.mkdir(parents=True, exist_ok=True)
    ca, rogue_ca = _ca(directory, "peer-ca"), _ca(directory, "rogue-peer-ca")
    return NodeCerts(ca[0], {i: _signed(directory, f"raftka-node-{i}", ca, 2, 100 + i) for i in node_ids},
                     {i: _signed(directory, f"rogue-{i}", rogue_ca, 2, 200 + i, cn=f"raftka-node-{i}")
                      for i in node_ids})
