"""penaltyd over TLS and mutual TLS (throwaway certificates from tests.harness.tls)."""

from __future__ import annotations

import shutil
from pathlib import Path

import grpc
import pytest

from penalty.v1 import penalty_pb2 as pb
from penalty.v1 import penalty_pb2_grpc as pbg
from penaltyd.store.memory import MemoryStore
from tests.harness.builders import UNKNOWN, check, report
from tests.harness.inprocess import ServeFactory
from tests.harness.tls import pki, self_signed

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl")


async def test_tls_listener(serve: ServeFactory, tmp_path: Path) -> None:
    key, cert = self_signed(tmp_path)
    pd = await serve(MemoryStore(), tls_cert_file=str(cert), tls_key_file=str(key))
    creds = grpc.ssl_channel_credentials(root_certificates=cert.read_bytes())
    async with grpc.aio.secure_channel(pd.address, creds) as ch:
        v = await pbg.PenaltyServiceStub(ch).Check(check("192.0.2.9"))
        assert v.identity == "192.0.2.9"
    with pytest.raises(grpc.aio.AioRpcError):
        await pd.service.Check(check("192.0.2.9"), timeout=2)  # plaintext is refused


async def test_mutual_tls_needs_a_client_certificate(serve: ServeFactory, tmp_path: Path) -> None:
    certs = pki(tmp_path, client_cn="mx1.example")
    pd = await serve(
        MemoryStore(),
        tls_cert_file=str(certs.server_cert),
        tls_key_file=str(certs.server_key),
        tls_client_ca_file=str(certs.ca),
        service_auth="reports",
    )
    ca = certs.ca.read_bytes()
    key, chain = certs.client_pair()
    mutual = grpc.ssl_channel_credentials(ca, key, chain)
    async with grpc.aio.secure_channel(pd.address, mutual) as ch:
        stub = pbg.PenaltyServiceStub(ch)
        for _ in range(40):  # reports pass: the certificate authenticates the MX
            await stub.Report(report("203.0.113.7", UNKNOWN))
        assert (await stub.Check(check("203.0.113.7"))).tempfail
    async with grpc.aio.secure_channel(pd.address, grpc.ssl_channel_credentials(ca)) as ch:
        with pytest.raises(grpc.aio.AioRpcError) as info:  # no client certificate
            await pbg.PenaltyServiceStub(ch).Check(check("203.0.113.7"), timeout=2)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_mutual_tls_refuses_a_certificate_of_another_ca(
    serve: ServeFactory, tmp_path: Path
) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    ours, theirs = pki(tmp_path / "a"), pki(tmp_path / "b")
    pd = await serve(
        MemoryStore(),
        tls_cert_file=str(ours.server_cert),
        tls_key_file=str(ours.server_key),
        tls_client_ca_file=str(ours.ca),
    )
    key, chain = theirs.client_pair()
    creds = grpc.ssl_channel_credentials(ours.ca.read_bytes(), key, chain)
    async with grpc.aio.secure_channel(pd.address, creds) as ch:
        with pytest.raises(grpc.aio.AioRpcError):
            await pbg.PenaltyServiceStub(ch).Check(
                pb.CheckRequest(client=pb.Client(ip="192.0.2.1")), timeout=2
            )
