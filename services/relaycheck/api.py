"""gRPC servicer: validate, call the engine, map answers and errors once.

`Classify` is on the smart relay's mail path: bad input is `INVALID_ARGUMENT` naming the
field, and store trouble is never an error (UNDETERMINED, `degraded=true`). The customer
calls and `Probe` are operator calls: they need `authorization: Bearer <admin_token>`,
or, without a configured token, a loopback listener (as penaltyd's admin API); store
trouble there is `UNAVAILABLE` (an operator wants to know), a relay network that is
another customer's is `ALREADY_EXISTS`, an unknown customer `NOT_FOUND`, a probe target
outside `probe_allowed_networks` `PERMISSION_DENIED`.
"""

from __future__ import annotations

from typing import NoReturn, TypeVar

import grpc

from relaycheck.chain import Judgement
from relaycheck.customers import Customer
from relaycheck.engine import Classified, Engine, ProbeRefused
from relaycheck.headers import Hop
from relaycheck.probe import ProbeReport
from relaycheck.store.base import NetworkConflict
from relaycheck.v1 import relaycheck_pb2 as pb
from relaycheck.v1 import relaycheck_pb2_grpc as pbg
from relaycheck.validation import Validator
from serving.errors import BadField, BadMessage, abort_invalid
from serving.gates import AdminGate, operator_call

R = TypeVar("R")


def hop_message(hop: Hop) -> pb.Hop:
    return pb.Hop(
        index=hop.index,
        from_helo=hop.from_helo,
        from_rdns=hop.from_rdns,
        from_ip=str(hop.from_ip) if hop.from_ip is not None else "",
        by_host=hop.by_host,
        protocol=hop.protocol,
        for_address=hop.for_address,
        authenticated=hop.authenticated,
        local_submission=hop.local_submission or hop.forwarded,
        mta=hop.mta,
        raw=hop.raw,
    )


def classification(c: Classified) -> pb.Classification:
    j: Judgement = c.judgement
    out = pb.Classification(
        verdict=pb.Verdict.ValueType(int(j.verdict)),
        origin_ip=str(j.origin_ip) if j.origin_ip is not None else "",
        evidence=[
            pb.Evidence(hop=e.hop, rule=e.rule, detail=e.detail, weak=e.weak) for e in j.evidence
        ],
        customer_id=c.customer_id,
        degraded=c.degraded,
        leaning=pb.Verdict.ValueType(int(j.leaning)),
        reported=c.reported,
        hops=j.hops,
    )
    if j.entry_hop is not None:
        out.entry_hop.CopyFrom(hop_message(j.entry_hop))
    return out


def customer_message(c: Customer) -> pb.Customer:
    return pb.Customer(
        id=c.id,
        relay_networks=c.relay_networks,
        internal_networks=c.internal_networks,
        domains=c.domains,
        note=c.note,
        updated_at_unix_ms=c.updated_at_ms,
        expires_at_unix_ms=c.expires_at_ms,
    )


def probe_message(r: ProbeReport) -> pb.ProbeResult:
    return pb.ProbeResult(
        host=r.host,
        port=r.port,
        relaying=r.relaying,
        tests=[
            pb.ProbeTest(
                name=t.name,
                mail_from=t.mail_from,
                rcpt_to=t.rcpt_to,
                mail_code=t.mail_code,
                rcpt_code=t.rcpt_code,
                reply=t.reply,
                result=pb.ProbeTest.Result.ValueType(int(t.result)),
                elapsed_ms=t.elapsed_ms,
            )
            for t in r.tests
        ],
        banner=r.banner,
        elapsed_ms=r.elapsed_ms,
        budget_exhausted=r.budget_exhausted,
        error=r.error,
        local_domain=r.local_domain,
    )


async def _invalid(
    context: grpc.aio.ServicerContext, err: BadField | BadMessage, engine: Engine
) -> NoReturn:
    await abort_invalid(context, err, engine.metrics.invalid_requests)


def _conflict(exc: Exception) -> tuple[grpc.StatusCode, str]:
    assert isinstance(exc, NetworkConflict)
    return grpc.StatusCode.ALREADY_EXISTS, f"relay_networks[{exc.index}]: {exc}"


def _refused(exc: Exception) -> tuple[grpc.StatusCode, str]:
    return grpc.StatusCode.PERMISSION_DENIED, f"host: {exc}"


admin = operator_call({NetworkConflict: _conflict, ProbeRefused: _refused})


class RelayCheck(pbg.RelayCheckServicer):
    def __init__(self, engine: Engine, validator: Validator) -> None:
        self.engine = engine
        self.validator = validator
        self.invalid_requests = engine.metrics.invalid_requests
        self.gate = AdminGate.for_settings(
            engine.settings, api="operator", env_var="RELAYCHECK_ADMIN_TOKEN"
        )

    async def Classify(
        self, request: pb.ClassifyRequest | BadMessage, context: grpc.aio.ServicerContext
    ) -> pb.Classification:
        if isinstance(request, BadMessage):
            await _invalid(context, request, self.engine)
        try:
            valid = self.validator.classify(request)
        except BadField as err:
            await _invalid(context, err, self.engine)
        return classification(await self.engine.classify(valid))

    @admin
    async def UpsertCustomer(
        self, request: pb.Customer, context: grpc.aio.ServicerContext
    ) -> pb.Customer:
        return customer_message(await self.engine.upsert(self.validator.customer(request)))

    @admin
    async def GetCustomer(
        self, request: pb.GetCustomerRequest, context: grpc.aio.ServicerContext
    ) -> pb.Customer:
        customer_id, ip = self.validator.get_customer(request)
        found = await self.engine.get(customer_id, ip)
        if found is None:
            what = f"id {customer_id}" if customer_id else f"a relay network containing {ip}"
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no customer with {what}")
        assert found is not None
        return customer_message(found)

    @admin
    async def DeleteCustomer(
        self, request: pb.DeleteCustomerRequest, context: grpc.aio.ServicerContext
    ) -> pb.DeleteCustomerResponse:
        customer_id = self.validator.customer_id(request.id)
        return pb.DeleteCustomerResponse(deleted=await self.engine.delete(customer_id))

    @admin
    async def Probe(
        self, request: pb.ProbeRequest, context: grpc.aio.ServicerContext
    ) -> pb.ProbeResult:
        return probe_message(await self.engine.probe(self.validator.probe(request)))
