"""Throwaway certificates for TLS and mutual-TLS tests (Debian's `openssl`, installed by
`make test`): a self-signed server certificate, or a CA that signs a server and clients."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

_SAN = "subjectAltName=DNS:localhost,IP:127.0.0.1"
_EC = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


def self_signed(directory: Path, name: str = "server") -> tuple[Path, Path]:
    """(key, certificate) for CN=localhost, valid for 127.0.0.1 and localhost, 1 day."""
    key, cert = directory / f"{name}.key", directory / f"{name}.pem"
    _openssl("req", "-x509", *_EC, "-days", "1", "-subj", "/CN=localhost", "-addext", _SAN,
             "-keyout", str(key), "-out", str(cert))  # fmt: skip
    return key, cert


@dataclass(frozen=True)
class Pki:
    """A CA, a server certificate it signed, and a client certificate it signed."""

    ca: Path
    server_key: Path
    server_cert: Path
    client_key: Path
    client_cert: Path

    def client_pair(self) -> tuple[bytes, bytes]:
        """(private key, certificate chain) as grpc.ssl_channel_credentials wants them."""
        return self.client_key.read_bytes(), self.client_cert.read_bytes()


def _signed(
    directory: Path, ca_key: Path, ca: Path, name: str, cn: str, ext: str
) -> tuple[Path, Path]:
    key, csr, cert = directory / f"{name}.key", directory / f"{name}.csr", directory / f"{name}.pem"
    extfile = directory / f"{name}.ext"
    extfile.write_text(ext + "\n")
    _openssl("req", *_EC, "-subj", f"/CN={cn}", "-keyout", str(key), "-out", str(csr))
    sign = ["-CA", str(ca), "-CAkey", str(ca_key), "-CAcreateserial", "-days", "1"]
    _openssl("x509", "-req", "-in", str(csr), *sign, "-extfile", str(extfile), "-out", str(cert))
    return key, cert


def pki(directory: Path, client_cn: str = "mx1.example") -> Pki:
    """A CA and the server and client certificates it signed (mutual TLS)."""
    ca_key, ca = directory / "ca.key", directory / "ca.pem"
    _openssl("req", "-x509", *_EC, "-days", "1", "-subj", "/CN=test CA",
             "-keyout", str(ca_key), "-out", str(ca))  # fmt: skip
    server_key, server_cert = _signed(directory, ca_key, ca, "server", "localhost", _SAN)
    client_key, client_cert = _signed(
        directory, ca_key, ca, "client", client_cn, "extendedKeyUsage=clientAuth"
    )
    return Pki(ca, server_key, server_cert, client_key, client_cert)
