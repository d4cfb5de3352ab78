"""relaycheck over gRPC on the embedded store: customers, Classify, errors, health, auth.

A real in-process grpc.aio server bound to port 0 (`relaycheck.testing.serving`); bad
input must be INVALID_ARGUMENT naming the field and never INTERNAL, even for bytes that
are no protobuf at all or a megabyte of folded header lines (hypothesis).
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
import time
from collections.abc import AsyncIterator

import grpc
import pydantic
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import generate_latest
from structlog.testing import capture_logs

from bench.relaycheck_hostile import mix_1m
from relaycheck.cli import main as cli_main
from relaycheck.customers import build_customer
from relaycheck.probe import TEST_NAMES
from relaycheck.settings import Settings, load_settings
from relaycheck.store.base import (
    CustomerStore,
    NetworkConflict,
    StoreUnavailable,
    candidate_networks,
)
from relaycheck.store.memory import MemoryStore
from relaycheck.v1 import relaycheck_pb2 as pb
from tests.contracts.customer_store import CustomerStoreContract
from tests.harness.inprocess import RelaycheckServed, relaycheck_serving
from tests.harness.paths import REPO
from tests.harness.ports import free_port
from tests.harness.processes import RelaycheckProcess

ACME = pb.Customer(
    id="acme",
    relay_networks=["198.51.100.8/29", "2001:db8:ac::/48"],
    internal_networks=["192.0.2.96/28"],
    domains=["ACME.example.", "acme-shop.example"],
    note="Postfix 3.7",
)
SPAM = (
    b"Received: from spam.example.net (unknown [203.0.113.66])\r\n"
    b"\tby mail.acme.example (Postfix) with ESMTP id 1 for <v@example.org>; date\r\n"
    b"From: ceo@acme.example\r\n\r\nbody\r\n"
)


@pytest.fixture
async def rc() -> AsyncIterator[RelaycheckServed]:
    async with relaycheck_serving(MemoryStore()) as served:
        await served.stub.UpsertCustomer(ACME)
        yield served


async def test_upsert_normalises_and_get_finds_by_id_and_address(rc: RelaycheckServed) -> None:
    got = await rc.stub.GetCustomer(pb.GetCustomerRequest(id="acme"))
    assert list(got.domains) == ["acme.example", "acme-shop.example"]
    assert got.note == "Postfix 3.7"
    assert got.expires_at_unix_ms - got.updated_at_unix_ms == 400 * 86_400_000
    by_ip = await rc.stub.GetCustomer(pb.GetCustomerRequest(ip="2001:db8:ac:1::5"))
    assert by_ip.id == "acme"
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await rc.stub.GetCustomer(pb.GetCustomerRequest(ip="203.0.113.1"))
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


async def test_a_relay_network_has_one_owner(rc: RelaycheckServed) -> None:
    other = pb.Customer(id="other", relay_networks=["192.0.2.0/29", "198.51.100.8/29"])
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await rc.stub.UpsertCustomer(other)
    assert info.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert info.value.details().startswith("relay_networks[1]: 198.51.100.8/29 ")
    # A more specific network inside another's is a different network: longest match wins.
    await rc.stub.UpsertCustomer(pb.Customer(id="tenant", relay_networks=["198.51.100.12/32"]))
    assert (await rc.stub.GetCustomer(pb.GetCustomerRequest(ip="198.51.100.12"))).id == "tenant"
    assert (await rc.stub.GetCustomer(pb.GetCustomerRequest(ip="198.51.100.11"))).id == "acme"


async def test_upsert_replaces_and_delete_releases(rc: RelaycheckServed) -> None:
    await rc.stub.UpsertCustomer(pb.Customer(id="acme", relay_networks=["192.0.2.8/29"]))
    with pytest.raises(grpc.aio.AioRpcError):
        await rc.stub.GetCustomer(pb.GetCustomerRequest(ip="198.51.100.10"))
    deleted = await rc.stub.DeleteCustomer(pb.DeleteCustomerRequest(id="acme"))
    assert deleted.deleted
    assert not (await rc.stub.DeleteCustomer(pb.DeleteCustomerRequest(id="acme"))).deleted
    await rc.stub.UpsertCustomer(pb.Customer(id="new", relay_networks=["192.0.2.8/29"]))


async def test_classify_relayed_and_not_a_customer(rc: RelaycheckServed) -> None:
    answer = await rc.stub.Classify(
        pb.ClassifyRequest(client_ip="198.51.100.10", headers=SPAM, rcpt_to=["v@example.org"])
    )
    assert answer.verdict == pb.VERDICT_RELAYED_THIRD_PARTY
    assert (answer.origin_ip, answer.customer_id) == ("203.0.113.66", "acme")
    assert answer.entry_hop.by_host == "mail.acme.example"
    assert not answer.reported  # no penaltyd configured
    assert any(e.weak and e.rule == "weak_own_domain" for e in answer.evidence)
    stranger = await rc.stub.Classify(pb.ClassifyRequest(client_ip="203.0.113.1", headers=SPAM))
    assert stranger.verdict == pb.VERDICT_NOT_A_CUSTOMER
    unknown = await rc.stub.Classify(pb.ClassifyRequest(customer_id="nobody", headers=SPAM))
    assert unknown.verdict == pb.VERDICT_NOT_A_CUSTOMER
    metrics = generate_latest(rc.metrics.registry).decode()
    labels = 'rule="foreign_recipient",verdict="relayed_third_party"'
    assert f"relaycheck_classifications_total{{{labels}}} 1.0" in metrics
    assert 'relaycheck_penaltyd_reports_total{result="off"} 1.0' in metrics


async def test_named_customer_outside_its_relay_networks_is_noted(rc: RelaycheckServed) -> None:
    answer = await rc.stub.Classify(
        pb.ClassifyRequest(customer_id="acme", client_ip="203.0.113.210", headers=SPAM)
    )
    assert answer.verdict == pb.VERDICT_RELAYED_THIRD_PARTY
    assert answer.evidence[0].rule == "named_customer"


BAD_CLASSIFY = [
    (pb.ClassifyRequest(), "client_ip"),
    (pb.ClassifyRequest(client_ip="1.2.3"), "client_ip"),
    (pb.ClassifyRequest(client_ip="fe80::1%eth0"), "client_ip"),
    (pb.ClassifyRequest(customer_id="a b"), "customer_id"),
    (pb.ClassifyRequest(client_ip="192.0.2.1", helo="h" * 256), "helo"),
    (pb.ClassifyRequest(client_ip="192.0.2.1", mail_from="m" * 513), "mail_from"),
    (pb.ClassifyRequest(client_ip="192.0.2.1", rcpt_to=["ok@x", "r" * 513]), "rcpt_to[1]"),
    (pb.ClassifyRequest(client_ip="192.0.2.1", rcpt_to=["r@x"] * 1001), "rcpt_to"),
    (pb.ClassifyRequest(client_ip="192.0.2.1", headers=b"x" * (1 << 20 | 1)), "headers"),
]


@pytest.mark.parametrize(("request_", "field"), BAD_CLASSIFY)
async def test_bad_classify_names_the_field(
    rc: RelaycheckServed, request_: pb.ClassifyRequest, field: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await rc.stub.Classify(request_)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details().startswith(f"{field}: ")


BAD_CUSTOMERS = [
    (pb.Customer(), "id"),
    (pb.Customer(id="x" * 129), "id"),
    (pb.Customer(id="c", relay_networks=["192.0.2.1/24"]), "relay_networks[0]"),
    (pb.Customer(id="c", relay_networks=["192.0.2.0/24", "10.0.0.0/8"]), "relay_networks[1]"),
    (pb.Customer(id="c", relay_networks=["2001:db8::/16"]), "relay_networks[0]"),
    (pb.Customer(id="c", internal_networks=["nope"]), "internal_networks[0]"),
    (pb.Customer(id="c", domains=["ok.example", "bad domain"]), "domains[1]"),
    (pb.Customer(id="c", domains=["-x.example"]), "domains[0]"),
    (pb.Customer(id="c", note="n" * 1025), "note"),
]


@pytest.mark.parametrize(("request_", "field"), BAD_CUSTOMERS)
async def test_bad_customer_names_the_field_and_stores_nothing(
    rc: RelaycheckServed, request_: pb.Customer, field: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await rc.stub.UpsertCustomer(request_)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details().startswith(f"{field}: ")
    with pytest.raises(grpc.aio.AioRpcError):
        await rc.stub.GetCustomer(pb.GetCustomerRequest(id=request_.id or "c"))


@pytest.mark.parametrize(
    ("request_", "field"),
    [
        (pb.ProbeRequest(), "host"),
        (pb.ProbeRequest(host="a b"), "host"),
        (pb.ProbeRequest(host="127.0.0.1", port=70000), "port"),
        (pb.ProbeRequest(host="127.0.0.1", budget_ms=10), "budget_ms"),
        (pb.ProbeRequest(host="127.0.0.1", step_timeout_ms=5), "step_timeout_ms"),
        (pb.ProbeRequest(host="127.0.0.1", tests=["plain", "nope"]), "tests[1]"),
        (pb.ProbeRequest(host="127.0.0.1", helo="not a name"), "helo"),
        (pb.GetCustomerRequest(), "id"),
        (pb.GetCustomerRequest(id="a", ip="192.0.2.1"), "id"),
        (pb.GetCustomerRequest(ip="x"), "ip"),
    ],
)
async def test_bad_operator_requests(rc: RelaycheckServed, request_: object, field: str) -> None:
    method = rc.stub.Probe if isinstance(request_, pb.ProbeRequest) else rc.stub.GetCustomer
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await method(request_)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details().startswith(f"{field}: ")


@pytest.mark.parametrize("method", ["Classify", "UpsertCustomer", "GetCustomer", "Probe"])
async def test_undecodable_bytes_are_invalid_argument(rc: RelaycheckServed, method: str) -> None:
    call = rc.channel.unary_unary(
        f"/relaycheck.v1.RelayCheck/{method}",
        request_serializer=lambda b: b,
        response_deserializer=lambda b: b,
    )
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call(b"\xff\xff\xff\xff garbage")
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details().startswith("message: ")


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    junk=st.binary(max_size=512),
    folds=st.integers(min_value=0, max_value=270_000),
)
def test_hostile_headers_are_answered_quickly(junk: bytes, folds: int) -> None:
    """Binary junk, up to a megabyte of folded lines, or nothing: a verdict, never an error."""
    headers = (b"Received: from a (a [203.0.113.9])\r\n\t" + junk + b"\r\n\tx" * folds)[: 1 << 20]

    async def go() -> None:
        async with relaycheck_serving(MemoryStore()) as served:
            await served.stub.UpsertCustomer(ACME)
            t0 = time.perf_counter()
            answer = await served.stub.Classify(
                pb.ClassifyRequest(client_ip="198.51.100.10", headers=headers, rcpt_to=["v@x.org"])
            )
            assert time.perf_counter() - t0 < 2.0
            assert answer.verdict in (
                pb.VERDICT_RELAYED_THIRD_PARTY,
                pb.VERDICT_UNDETERMINED,
                pb.VERDICT_ORIGINATED_BY_CUSTOMER,
            )

    asyncio.run(go())


@pytest.mark.parametrize("inside", [False, True], ids=["relayed", "inside"])
async def test_a_forged_megabyte_chain_through_classify(rc: RelaycheckServed, inside: bool) -> None:
    """1 MiB of hostile Received lines (bench.relaycheck_hostile): below the open
    relay's own line they are never read and the answer is RELAYED from the entry's
    client; claiming private clients all the way down they are read to a bound, and the
    answer is UNDETERMINED (too_many_hops), never ORIGINATED."""
    answer = await rc.stub.Classify(
        pb.ClassifyRequest(
            client_ip="198.51.100.10",
            headers=mix_1m(inside),
            rcpt_to=["victim@example.org"],
            no_report=True,
        )
    )
    rules = [e.rule for e in answer.evidence]
    assert rules[:1] == ["truncated"]
    assert answer.hops == 64
    if inside:
        assert answer.verdict == pb.VERDICT_UNDETERMINED
        assert "too_many_hops" in rules
    else:
        assert answer.verdict == pb.VERDICT_RELAYED_THIRD_PARTY
        assert answer.origin_ip == answer.entry_hop.from_ip == "203.0.113.66"
        assert "foreign_recipient" in rules


class _DeadStore(MemoryStore):
    async def find_by_ip(self, addr: object) -> None:
        raise StoreUnavailable("redis unavailable: connection refused")

    async def get(self, customer_id: str) -> None:
        await asyncio.Event().wait()  # hangs: the deadline must cut it


async def test_store_trouble_fails_open() -> None:
    async with relaycheck_serving(
        _DeadStore(), store_timeout_ms=50, admin_timeout_ms=100
    ) as served:
        with capture_logs() as logs:
            down = await served.stub.Classify(
                pb.ClassifyRequest(client_ip="198.51.100.10", headers=SPAM)
            )
            t0 = time.perf_counter()
            hung = await served.stub.Classify(pb.ClassifyRequest(customer_id="acme", headers=SPAM))
            assert time.perf_counter() - t0 < 1.0
        for answer in (down, hung):
            assert answer.verdict == pb.VERDICT_UNDETERMINED
            assert answer.degraded
        assert [e["event"] for e in logs].count("classify_degraded") == 1  # rate-limited
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await served.stub.GetCustomer(pb.GetCustomerRequest(id="acme"))
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED


async def test_health_and_reflection(rc: RelaycheckServed) -> None:
    health = health_pb2_grpc.HealthStub(rc.channel)
    for service in ("", "relaycheck.v1.RelayCheck"):
        got = await health.Check(health_pb2.HealthCheckRequest(service=service))
        assert got.status == health_pb2.HealthCheckResponse.SERVING
    reflection = reflection_pb2_grpc.ServerReflectionStub(rc.channel)

    async def ask() -> AsyncIterator[reflection_pb2.ServerReflectionRequest]:
        yield reflection_pb2.ServerReflectionRequest(list_services="")

    async for response in reflection.ServerReflectionInfo(ask()):
        names = {s.name for s in response.list_services_response.service}
        assert "relaycheck.v1.RelayCheck" in names
        break


async def test_operator_calls_need_the_token() -> None:
    async with relaycheck_serving(MemoryStore(), admin_token="s3cret") as served:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await served.stub.UpsertCustomer(ACME)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        auth = (("authorization", "Bearer s3cret"),)
        await served.stub.UpsertCustomer(ACME, metadata=auth)
        # Classify is on the mail path: no token.
        answer = await served.stub.Classify(pb.ClassifyRequest(client_ip="198.51.100.9"))
        assert answer.verdict == pb.VERDICT_UNDETERMINED


async def test_memory_store_expiry_and_candidates() -> None:
    now = [1_000_000]
    store = MemoryStore(ttl_ms=1000, clock=lambda: now[0])
    acme = build_customer("acme", ["198.51.100.8/29"])
    await store.upsert(acme)
    now[0] += 999
    assert await store.get("acme") is not None
    now[0] += 1
    assert await store.get("acme") is None
    await store.upsert(build_customer("other", ["198.51.100.8/29"]))  # the expired owner lost it
    with pytest.raises(NetworkConflict):
        await store.upsert(acme)
    import ipaddress

    cands = candidate_networks(ipaddress.ip_address("198.51.100.10"), 28)
    assert cands == [
        "198.51.100.10/32",
        "198.51.100.10/31",
        "198.51.100.8/30",
        "198.51.100.8/29",
        "198.51.100.0/28",
    ]


def test_settings_refuse_nonsense(monkeypatch: pytest.MonkeyPatch) -> None:
    for bad in (
        {"listen": "nope"},
        {"report_outcome": "accepted"},
        {"report_outcome": "bogus"},
        {"private_networks": ["10.0.0.1/8"]},
        {"probe_budget_ms": 400_000},
        {"redis_url": "http://x"},
        {"unknown_knob": 1},
    ):
        with pytest.raises(pydantic.ValidationError):
            Settings(**bad)
    monkeypatch.setenv("RELAYCHECK_REPORT_OUTCOME", "OUTCOME_DNSBL_LISTED")
    assert load_settings().report_outcome == "dnsbl_listed"
    assert load_settings(report_outcome="relay_denied").report_outcome == "relay_denied"


def test_print_config_masks_secrets(capsys: pytest.CaptureFixture[str]) -> None:
    code = cli_main(["serve", "--redis-url", "redis://:pw@127.0.0.1:6379/0", "--print-config"])
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    assert out["redis_url"] == "redis://:***@127.0.0.1:6379/0"
    assert cli_main(["serve", "--listen", "nope", "--print-config"]) == 2


def test_serve_drains_on_sigterm_and_logs_json() -> None:
    port = free_port()
    with RelaycheckProcess(port=port) as proc:
        channel = grpc.insecure_channel(proc.address)
        from relaycheck.v1 import relaycheck_pb2_grpc as pbg

        stub = pbg.RelayCheckStub(channel)
        answer = stub.Classify(pb.ClassifyRequest(client_ip="198.51.100.10"), timeout=5)
        assert answer.verdict == pb.VERDICT_NOT_A_CUSTOMER
        channel.close()
        assert proc.proc is not None
        proc.proc.send_signal(signal.SIGTERM)
        assert proc.proc.wait(10) == 0
        events = [json.loads(line)["event"] for line in proc.output().splitlines() if line]
    assert events[0] == "relaycheck_started"
    assert events[-2:] == ["relaycheck_stopping", "relaycheck_stopped"]


def test_docs_list_every_setting_probe_test_and_rule() -> None:
    doc = (REPO / "docs" / "relaycheck.md").read_text()
    rows = set(re.findall(r"^\| `([a-z_0-9]+)` \|", doc, re.M))
    assert set(Settings.model_fields) <= rows
    assert rows >= TEST_NAMES
    deciding = {
        "authenticated_submission",
        "local_submission",
        "forwarded",
        "internal_client",
        "own_recipient",
        "delivered_to_own",
        "foreign_recipient",
        "own_recipient_above",
        "srs_rewritten",
        "foreign_envelope",
    }
    assert deciding <= rows


class TestMemoryCustomerStore(CustomerStoreContract):
    """The customer store contract on the embedded store (Redis topologies: integration)."""

    async def make(self, ttl_ms: int = 400 * 86_400_000) -> CustomerStore:
        return MemoryStore(ttl_ms=ttl_ms)
