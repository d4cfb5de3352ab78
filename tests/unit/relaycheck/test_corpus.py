"""The labelled corpus (tests/data/relaycheck): accuracy per class and the confusion matrix.

Done when (issue 5): every RELAYED_THIRD_PARTY case is caught and no customer-originated
case is marked relayed. The matrix printed by `python -m tests.unit.relaycheck.test_corpus`
is the one in docs/relaycheck.md, and a test keeps the two equal. The corpus is judged
twice: by the pure walker, and through a real relaycheck server (Classify over gRPC, the
customers upserted with UpsertCustomer), which must agree.
"""

from __future__ import annotations

import ipaddress
import re
from collections import Counter
from dataclasses import dataclass, field
from functools import cache
from typing import Any

import pytest
import yaml

from relaycheck.chain import Envelope, Verdict, WalkOptions, classify_headers
from relaycheck.customers import (
    DEFAULT_PRIVATE_NETWORKS,
    Customer,
    PrivateNetworks,
    build_customer,
)
from relaycheck.v1 import relaycheck_pb2 as pb
from tests.harness.inprocess import relaycheck_serving
from tests.harness.paths import REPO

ROOT = REPO
DATA = ROOT / "tests" / "data" / "relaycheck"
DOC = ROOT / "docs" / "relaycheck.md"
VERDICTS = ["ORIGINATED_BY_CUSTOMER", "RELAYED_THIRD_PARTY", "NOT_A_CUSTOMER", "UNDETERMINED"]
CLASSES = [
    "authenticated_submission",
    "internal",
    "local_submission",
    "forwarded_list",
    "relayed",
    "not_a_customer",
    "undetermined",
]
CUSTOMER_CLASSES = {"authenticated_submission", "internal", "local_submission", "forwarded_list"}


@dataclass(frozen=True)
class Case:
    file: str
    klass: str
    expected: str
    client_ip: str
    customer: str = ""
    mail_from: str = ""
    rcpt_to: tuple[str, ...] = ()
    why: str = ""

    @property
    def headers(self) -> bytes:
        return (DATA / self.file).read_bytes()


@dataclass
class Corpus:
    customers: dict[str, Customer]
    own_hostnames: tuple[str, ...]
    cases: list[Case] = field(default_factory=list)


@cache
def corpus() -> Corpus:
    meta: dict[str, Any] = yaml.safe_load((DATA / "customers.yaml").read_text())
    customers = {
        cid: build_customer(
            cid,
            spec.get("relay_networks", []),
            spec.get("internal_networks", []),
            spec.get("domains", []),
        )
        for cid, spec in meta["customers"].items()
    }
    out = Corpus(customers, tuple(meta["own_hostnames"]))
    for c in yaml.safe_load((DATA / "index.yaml").read_text())["cases"]:
        out.cases.append(
            Case(
                c["file"],
                c["class"],
                c["expected"],
                str(c["client_ip"]),
                c.get("customer", ""),
                c.get("mail_from", ""),
                tuple(c.get("rcpt_to", ())),
                c.get("why", ""),
            )
        )
    return out


def walk(case: Case, data: Corpus) -> str:
    """The pure walker's verdict, with the service's customer lookup done by hand."""
    client = ipaddress.ip_address(case.client_ip)
    if case.customer:
        customer: Customer | None = data.customers[case.customer]
    else:
        customer = next((c for c in data.customers.values() if c.is_relay(client)), None)
    if customer is None:
        return "NOT_A_CUSTOMER"
    envelope = Envelope(client, "", case.mail_from, case.rcpt_to)
    options = WalkOptions(own_hostnames=data.own_hostnames)
    return classify_headers(customer, case.headers, envelope, options).verdict.name


def confusion(results: list[tuple[Case, str]]) -> Counter[tuple[str, str]]:
    return Counter((case.expected, got) for case, got in results)


def render(results: list[tuple[Case, str]]) -> str:
    """The markdown tables in docs/relaycheck.md: confusion matrix and per-class accuracy."""
    matrix = confusion(results)
    short = {v: v.split("_")[0].lower() for v in VERDICTS}
    lines = [
        "| expected \\ answered | " + " | ".join(short[v] for v in VERDICTS) + " |",
        "|---|" + "---:|" * len(VERDICTS),
    ]
    for row in VERDICTS:
        cells = [str(matrix[(row, col)]) for col in VERDICTS]
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    lines += ["", "| class | cases | correct | accuracy |", "|---|---:|---:|---:|"]
    for klass in CLASSES:
        rows = [(c, got) for c, got in results if c.klass == klass]
        ok = sum(1 for c, got in rows if got == c.expected)
        lines.append(f"| {klass} | {len(rows)} | {ok} | {ok / len(rows):.0%} |")
    total = sum(1 for c, got in results if got == c.expected)
    lines.append(f"| **all** | {len(results)} | {total} | {total / len(results):.0%} |")
    return "\n".join(lines)


def walked() -> list[tuple[Case, str]]:
    data = corpus()
    return [(case, walk(case, data)) for case in data.cases]


def test_corpus_is_big_enough_and_well_formed() -> None:
    data = corpus()
    assert len(data.cases) >= 40
    assert {c.klass for c in data.cases} == set(CLASSES)
    assert len({c.file for c in data.cases}) == len(data.cases)
    on_disk = {p.name for p in DATA.glob("*.eml")}
    assert on_disk == {c.file for c in data.cases}
    for case in data.cases:
        assert case.expected in VERDICTS
        assert case.klass not in CUSTOMER_CLASSES or case.expected == "ORIGINATED_BY_CUSTOMER"


def test_documentation_addresses_only() -> None:
    """Every address in the corpus is a documentation, private or loopback one, and every
    domain is reserved for examples (RFC 2606, RFC 6761)."""
    allowed = [
        ipaddress.ip_network(n)
        for n in ("192.0.2.0/24", "198.51.100.0/24", "203.0.113.0/24", "2001:db8::/32")
    ] + [ipaddress.ip_network(n) for n in DEFAULT_PRIVATE_NETWORKS]
    literal = re.compile(r"[\[(](?:IPv6:)?([0-9a-fA-F:.]{7,})(?:%\w+)?[\])]|@([0-9.]{7,})\)")
    domain = re.compile(r"\b[a-z0-9-]+(?:\.[a-z0-9-]+)*\.([a-z]{2,})\b", re.I)
    tlds = {"example", "com", "net", "org", "invalid", "localhost"}
    for path in [*DATA.glob("*.eml"), *DATA.glob("*.yaml")]:
        text = path.read_text()
        for m in literal.finditer(text):
            try:
                addr = ipaddress.ip_address(m.group(1) or m.group(2))
            except ValueError:
                continue
            assert any(addr in net for net in allowed), (path.name, str(addr))
        for m in domain.finditer(text):
            name = m.group(0).lower()
            if m.group(1).lower() in ("com", "net", "org"):
                assert name.endswith(("example.com", "example.net", "example.org")), (
                    path.name,
                    name,
                )
            elif m.group(1).lower() == "example":
                continue
            else:
                assert m.group(1).lower() not in tlds or name.endswith(".invalid"), name


def test_every_relayed_case_is_caught_and_no_customer_mail_is_marked_relayed() -> None:
    results = walked()
    relayed = [(c.file, got) for c, got in results if c.expected == "RELAYED_THIRD_PARTY"]
    assert all(got == "RELAYED_THIRD_PARTY" for _, got in relayed), relayed
    wrongly = [c.file for c, got in results if c.klass in CUSTOMER_CLASSES and "RELAYED" in got]
    assert wrongly == []


@pytest.mark.parametrize("klass", CLASSES)
def test_accuracy_per_class(klass: str) -> None:
    rows = [(c, got) for c, got in walked() if c.klass == klass]
    wrong = [(c.file, c.expected, got) for c, got in rows if got != c.expected]
    assert not wrong, f"{klass}: {len(rows) - len(wrong)}/{len(rows)} correct; wrong: {wrong}"


def test_the_documented_matrix_is_the_measured_one() -> None:
    assert render(walked()) in DOC.read_text(), (
        "docs/relaycheck.md is stale: paste `python -m tests.unit.relaycheck.test_corpus`"
    )


async def test_the_service_agrees_with_the_walker() -> None:
    data = corpus()
    async with relaycheck_serving(own_hostnames=list(data.own_hostnames)) as served:
        for c in data.customers.values():
            await served.stub.UpsertCustomer(
                pb.Customer(
                    id=c.id,
                    relay_networks=c.relay_networks,
                    internal_networks=c.internal_networks,
                    domains=c.domains,
                )
            )
        for case in data.cases:
            answer = await served.stub.Classify(
                pb.ClassifyRequest(
                    customer_id=case.customer,
                    client_ip=case.client_ip,
                    mail_from=case.mail_from,
                    rcpt_to=case.rcpt_to,
                    headers=case.headers,
                )
            )
            got = pb.Verdict.Name(answer.verdict).removeprefix("VERDICT_")
            assert got == walk(case, data), case.file
            if got == "RELAYED_THIRD_PARTY":
                assert answer.origin_ip
                assert answer.entry_hop.from_ip == answer.origin_ip
                assert PrivateNetworks().match(ipaddress.ip_address(answer.origin_ip)) is None
            assert [e.rule for e in answer.evidence if not e.weak], case.file
    assert Verdict.RELAYED_THIRD_PARTY.value == pb.VERDICT_RELAYED_THIRD_PARTY


if __name__ == "__main__":
    print(render(walked()))
