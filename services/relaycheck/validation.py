"""Request validation: every bad input is refused with the field named, nothing stored.

`BadField` (`serving.errors`, shared with penaltyd) carries the protobuf field
path (e.g. ``relay_networks[2]``); the API maps it to `INVALID_ARGUMENT` once.
Undecodable requests never get here: the guarded deserializer hands the servicer a
`BadMessage` instead. The header bytes themselves are never refused for
their content (that is the walker's job, which answers UNDETERMINED), only for size.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from penalty.identity import InvalidAddress, IPAddress, parse_ip
from relaycheck.customers import (
    ID_PATTERN,
    BadCustomer,
    Customer,
    NetworkRules,
    build_customer,
    normalise_domain,
)
from relaycheck.probe import TEST_NAMES
from relaycheck.settings import Settings
from relaycheck.v1 import relaycheck_pb2 as pb
from serving.errors import BadField

_LIMITS = {"helo": 255, "mail_from": 512}
_HOST = re.compile(r"[A-Za-z0-9._:\[\]-]{1,253}")


@dataclass(frozen=True, slots=True)
class ClassifyInput:
    customer_id: str
    client_ip: IPAddress | None
    helo: str
    mail_from: str
    rcpt_to: tuple[str, ...]
    headers: bytes
    no_report: bool


@dataclass(frozen=True, slots=True)
class ProbeInput:
    host: str
    port: int
    step_timeout: float
    budget: float
    helo: str
    local_domain: str
    foreign_domain: str
    tests: tuple[str, ...]


class Validator:
    def __init__(self, settings: Settings) -> None:
        self.s = settings
        self.rules = NetworkRules(settings.relay_min_prefix_v4, settings.relay_min_prefix_v6)

    @staticmethod
    def ip(text: str, field: str) -> IPAddress:
        try:
            return parse_ip(text)
        except InvalidAddress as exc:
            raise BadField(field, str(exc)) from exc

    @staticmethod
    def customer_id(text: str, field: str = "id") -> str:
        if not text:
            raise BadField(field, "required")
        if not ID_PATTERN.fullmatch(text):
            raise BadField(field, "must be 1-128 characters of A-Z a-z 0-9 _ . : @ -")
        return text

    def classify(self, request: pb.ClassifyRequest) -> ClassifyInput:
        for name, limit in _LIMITS.items():
            if len(getattr(request, name)) > limit:
                raise BadField(name, f"longer than {limit} characters")
        if request.customer_id:
            self.customer_id(request.customer_id, "customer_id")
        client = self.ip(request.client_ip, "client_ip") if request.client_ip else None
        if client is None and not request.customer_id:
            raise BadField("client_ip", "required when customer_id is not given")
        if len(request.rcpt_to) > self.s.max_rcpt:
            raise BadField("rcpt_to", f"more than {self.s.max_rcpt} recipients")
        for i, rcpt in enumerate(request.rcpt_to):
            if len(rcpt) > 512:
                raise BadField(f"rcpt_to[{i}]", "longer than 512 characters")
        if len(request.headers) > self.s.max_header_bytes:
            raise BadField(
                "headers",
                f"{len(request.headers)} bytes exceeds the limit of {self.s.max_header_bytes}",
            )
        return ClassifyInput(
            request.customer_id,
            client,
            request.helo,
            request.mail_from,
            tuple(request.rcpt_to),
            request.headers,
            request.no_report,
        )

    def customer(self, request: pb.Customer) -> Customer:
        try:
            return build_customer(
                request.id,
                request.relay_networks,
                request.internal_networks,
                request.domains,
                request.note,
                self.rules,
            )
        except BadCustomer as exc:
            raise BadField(exc.field, exc.message) from exc

    def get_customer(self, request: pb.GetCustomerRequest) -> tuple[str, IPAddress | None]:
        if bool(request.id) == bool(request.ip):
            raise BadField("id", "give exactly one of id and ip")
        if request.id:
            return self.customer_id(request.id), None
        return "", self.ip(request.ip, "ip")

    def probe(self, request: pb.ProbeRequest) -> ProbeInput:
        s = self.s
        if not request.host:
            raise BadField("host", "required")
        if not _HOST.fullmatch(request.host):
            raise BadField("host", f"not a host name or address: {request.host[:64]!r}")
        if request.port > 65535:
            raise BadField("port", "must be at most 65535")
        step = request.step_timeout_ms or s.probe_step_timeout_ms
        budget = request.budget_ms or s.probe_budget_ms
        if not 10 <= step <= 120_000:
            raise BadField("step_timeout_ms", "must be between 10 and 120000")
        if not 100 <= budget <= s.probe_max_budget_ms:
            raise BadField("budget_ms", f"must be between 100 and {s.probe_max_budget_ms}")
        names = {}
        for field in ("helo", "local_domain", "foreign_domain"):
            value = getattr(request, field)
            if value:
                try:
                    names[field] = normalise_domain(value)
                except ValueError as exc:
                    raise BadField(field, str(exc)) from exc
        for i, name in enumerate(request.tests):
            if name not in TEST_NAMES:
                raise BadField(f"tests[{i}]", f"unknown test {name!r}; known: {sorted(TEST_NAMES)}")
        return ProbeInput(
            host=request.host.strip("[]"),
            port=request.port or 25,
            step_timeout=step / 1000,
            budget=budget / 1000,
            helo=names.get("helo", s.probe_helo),
            local_domain=names.get("local_domain", ""),
            foreign_domain=names.get("foreign_domain", s.probe_foreign_domain),
            tests=tuple(request.tests),
        )
