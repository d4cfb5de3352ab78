"""relaycheck over TLS and mutual TLS, through the same serving foundation as penaltyd."""

from __future__ import annotations

import shutil
from pathlib import Path

import grpc
import pytest

from relaycheck.store.memory import MemoryStore
from relaycheck.v1 import relaycheck_pb2 as pb
from relaycheck.v1 import relaycheck_pb2_grpc as pbg
from tests.harness.inprocess import relaycheck_serving
from tests.harness.tls import pki

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl")

ACME = pb.Customer(id="acme", relay_networks=["198.51.100.8/29"], domains=["acme.example"])


async def test_mutual_tls(tmp_path: Path) -> None:
    certs = pki(tmp_path, client_cn="smart-relay.example")
    async with relaycheck_serving(
        MemoryStore(),
        tls_cert_file=str(certs.server_cert),
        tls_key_file=str(certs.server_key),
        tls_client_ca_file=str(certs.ca),
    ) as rc:
        ca = certs.ca.read_bytes()
        key, chain = certs.client_pair()
        async with grpc.aio.secure_channel(
            rc.address, grpc.ssl_channel_credentials(ca, key, chain)
        ) as ch:
            stub = pbg.RelayCheckStub(ch)
            await stub.UpsertCustomer(ACME)
            verdict = await stub.Classify(
                pb.ClassifyRequest(client_ip="198.51.100.9", headers=b"Subject: x\r\n\r\n")
            )
            assert verdict.customer_id == "acme"
        async with grpc.aio.secure_channel(rc.address, grpc.ssl_channel_credentials(ca)) as ch:
            with pytest.raises(grpc.aio.AioRpcError) as info:  # no client certificate
                await pbg.RelayCheckStub(ch).GetCustomer(
                    pb.GetCustomerRequest(id="acme"), timeout=2
                )
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        with pytest.raises(grpc.aio.AioRpcError):  # plaintext is refused
            await rc.stub.GetCustomer(pb.GetCustomerRequest(id="acme"), timeout=2)


def test_client_ca_needs_a_server_certificate() -> None:
    from pydantic import ValidationError

    from relaycheck.settings import Settings

    with pytest.raises(ValidationError, match="tls_client_ca_file needs"):
        Settings(tls_client_ca_file="/nonexistent/ca.pem")
