"""The classify loop: find the customer, walk the chain, report relayed origins.

Failing open (DESIGN.md section 8): the customer lookup runs under `store_timeout_ms`;
if the store is slow or down the answer is UNDETERMINED with `degraded=true` (the smart
relay lets the mail through), a counter increments and a rate-limited line is logged.
The walk itself is pure and bounded; a large header block is walked in a worker thread
so one pathological message cannot stall every other call on the event loop.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import TypeVar

import structlog

from penalty.identity import IPAddress, NetworkSet, parse_network
from relaycheck.chain import (
    Envelope,
    Evidence,
    Judgement,
    Verdict,
    WalkOptions,
    classify_headers,
)
from relaycheck.customers import Customer, PrivateNetworks
from relaycheck.headers import Limits, parse_address
from relaycheck.metrics import Metrics
from relaycheck.probe import ProbeReport, run_battery
from relaycheck.report import PenaltyReporter
from relaycheck.settings import Settings
from relaycheck.store.base import CustomerStore, StoreError
from relaycheck.validation import ClassifyInput, ProbeInput
from serving.logs import RateLimitedLog

log = structlog.get_logger("relaycheck.engine")
T = TypeVar("T")
THREAD_ABOVE = 64 * 1024  # header blocks larger than this are walked off the event loop


@dataclass
class Classified:
    judgement: Judgement
    customer_id: str = ""
    degraded: bool = False
    reported: bool = False


class ProbeRefused(Exception):
    """The target is outside `probe_allowed_networks` (or does not resolve)."""


class Engine:
    def __init__(
        self,
        settings: Settings,
        store: CustomerStore,
        metrics: Metrics,
        reporter: PenaltyReporter | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.metrics = metrics
        self.reporter = reporter
        self.options = WalkOptions(
            private=PrivateNetworks(tuple(settings.private_networks)),
            own_hostnames=tuple(settings.own_hostnames),
            limits=Limits(settings.max_header_bytes, settings.max_received, settings.max_line),
        )
        self._probes = asyncio.Semaphore(settings.probe_max_concurrent)
        self._probe_allowed: NetworkSet[bool] | None = None
        if settings.probe_allowed_networks:
            self._probe_allowed = NetworkSet()
            for cidr in settings.probe_allowed_networks:
                self._probe_allowed.add(parse_network(cidr), True)
        self._warn = RateLimitedLog(log)

    async def start(self) -> None:
        await self.store.start()
        if self.reporter is not None:
            self.reporter.start()

    async def close(self) -> None:
        if self.reporter is not None:
            await self.reporter.close()
        await self.store.close()

    async def _timed(self, op: str, call: Awaitable[T], timeout_ms: int) -> T:
        with self.metrics.store_call(op, timeout_ms / 1000):
            async with asyncio.timeout(timeout_ms / 1000):
                return await call

    async def ping(self) -> None:
        """The store's health probe, timed like every store call."""
        await self._timed("ping", self.store.ping(), 1000)

    # --- the smart relay's path: never an error

    async def _customer(self, req: ClassifyInput) -> tuple[Customer | None, str]:
        """The customer and, when there is none, why."""
        timeout = self.settings.store_timeout_ms
        if req.customer_id:
            c = await self._timed("get", self.store.get(req.customer_id), timeout)
            return c, "" if c else f"no customer with id {req.customer_id}"
        assert req.client_ip is not None
        c = await self._timed("find", self.store.find_by_ip(req.client_ip), timeout)
        return c, "" if c else f"{req.client_ip} is in no customer's relay networks"

    async def classify(self, req: ClassifyInput) -> Classified:
        t0 = time.perf_counter()
        try:
            customer, why = await self._customer(req)
        except (StoreError, TimeoutError) as exc:
            self.metrics.degraded.inc()
            self._warn.warning("classify_degraded", error=str(exc) or type(exc).__name__)
            judgement = Judgement(
                Verdict.UNDETERMINED,
                evidence=[Evidence(-1, "store_unavailable", "the customer store did not answer")],
                rule="store_unavailable",
            )
            return self._done(Classified(judgement, req.customer_id, degraded=True), t0)
        if customer is None:
            judgement = Judgement(
                Verdict.NOT_A_CUSTOMER,
                evidence=[Evidence(-1, "not_a_customer", why)],
                rule="not_a_customer",
            )
            return self._done(Classified(judgement, req.customer_id), t0)
        envelope = Envelope(req.client_ip, req.helo, req.mail_from, req.rcpt_to)
        if len(req.headers) > THREAD_ABOVE:
            judgement = await asyncio.to_thread(
                classify_headers, customer, req.headers, envelope, self.options
            )
        else:
            judgement = classify_headers(customer, req.headers, envelope, self.options)
        if req.client_ip is not None and req.customer_id and not customer.is_relay(req.client_ip):
            judgement.evidence.insert(
                0,
                Evidence(
                    -1,
                    "named_customer",
                    f"{req.client_ip} is outside customer {customer.id}'s relay networks; "
                    "judged as its relay because the caller named the customer",
                ),
            )
        out = Classified(judgement, customer.id)
        if judgement.verdict == Verdict.RELAYED_THIRD_PARTY and judgement.origin_ip is not None:
            out.reported = self._report(req, judgement, judgement.origin_ip)
        return self._done(out, t0)

    def _report(self, req: ClassifyInput, judgement: Judgement, origin: IPAddress) -> bool:
        if req.no_report:
            return False
        if self.reporter is None:
            self.metrics.reports.labels("off").inc()
            return False
        entry = judgement.entry_hop
        queued = self.reporter.report(str(origin), entry.from_helo if entry else "", req.mail_from)
        self.metrics.reports.labels("queued" if queued else "dropped").inc()
        return queued

    def _done(self, out: Classified, t0: float) -> Classified:
        j = out.judgement
        self.metrics.classifications.labels(j.verdict.name.lower(), j.rule or "none").inc()
        self.metrics.classify_seconds.observe(time.perf_counter() - t0)
        log.info(
            "classified",
            customer=out.customer_id or None,
            verdict=j.verdict.name,
            rule=j.rule,
            origin=str(j.origin_ip) if j.origin_ip else None,
            entry_hop=j.entry_hop.index if j.entry_hop else None,
            degraded=out.degraded or None,
            reported=out.reported or None,
        )
        return out

    # --- customers (admin): errors are raised

    async def upsert(self, customer: Customer) -> Customer:
        stored = await self._timed(
            "upsert", self.store.upsert(customer), self.settings.admin_timeout_ms
        )
        log.info(
            "customer_upserted",
            customer=stored.id,
            relay_networks=len(stored.relay_networks),
            internal_networks=len(stored.internal_networks),
            domains=len(stored.domains),
        )
        return stored

    async def get(self, customer_id: str, ip: IPAddress | None) -> Customer | None:
        timeout = self.settings.admin_timeout_ms
        if ip is not None:
            return await self._timed("find", self.store.find_by_ip(ip), timeout)
        return await self._timed("get", self.store.get(customer_id), timeout)

    async def delete(self, customer_id: str) -> bool:
        deleted = await self._timed(
            "delete", self.store.delete(customer_id), self.settings.admin_timeout_ms
        )
        log.info("customer_deleted", customer=customer_id, existed=deleted)
        return deleted

    # --- probes

    async def _probe_target(self, req: ProbeInput) -> str:
        """The address to connect to: resolved once and checked against the allowed
        networks (so a name cannot resolve to one address for the check and another
        for the connection)."""
        if self._probe_allowed is None:
            return req.host
        addr = parse_address(req.host)
        if addr is None:
            try:
                async with asyncio.timeout(req.step_timeout):
                    infos = await asyncio.get_running_loop().getaddrinfo(
                        req.host, req.port, type=socket.SOCK_STREAM
                    )
            except (OSError, TimeoutError) as exc:
                raise ProbeRefused(f"{req.host} does not resolve: {exc}") from exc
            addr = parse_address(str(infos[0][4][0])) if infos else None
        if addr is None or self._probe_allowed.match(addr) is None:
            raise ProbeRefused(f"{req.host} ({addr}) is outside probe_allowed_networks")
        return str(addr)

    async def probe(self, req: ProbeInput) -> ProbeReport:
        target = await self._probe_target(req)
        async with self._probes:
            report = await run_battery(
                target,
                req.port,
                step_timeout=req.step_timeout,
                budget=req.budget,
                helo=req.helo,
                local_domain=req.local_domain,
                foreign_domain=req.foreign_domain,
                tests=req.tests,
            )
        result = "error" if report.error else "relaying" if report.relaying else "closed"
        self.metrics.probes.labels(result).inc()
        log.info(
            "probed",
            host=req.host,
            port=req.port,
            result=result,
            relayed=report.relayed_tests,
            elapsed_ms=report.elapsed_ms,
            error=report.error or None,
        )
        return report
