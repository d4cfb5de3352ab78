"""Which methods get a registered call slot in grpc (`codec.register_guarded(registered=)`):
only the MX path's hot ones; every other method is served by the generic handler alone,
and answers exactly as before (docs/performance.md, "Report vs echo")."""

from __future__ import annotations

from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from penalty.v1 import penalty_pb2 as pb
from penalty.v1 import penalty_pb2_grpc
from penaltyd.api import PenaltyService, Replies
from penaltyd.engine import Engine
from penaltyd.server import HOT_METHODS
from penaltyd.settings import Settings
from penaltyd.store.memory import MemoryStore
from penaltyd.validation import Validator
from serving import codec
from tests.harness.inprocess import ServeFactory


class _Server:
    """Collects what a service adds to a server."""

    def __init__(self) -> None:
        self.generic: list[Any] = []
        self.registered: dict[str, dict[str, Any]] = {}

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        self.generic.extend(handlers)

    def add_registered_method_handlers(self, service: str, handlers: dict[str, Any]) -> None:
        self.registered[service] = handlers


def _servicer() -> PenaltyService:
    settings = Settings()
    return PenaltyService(
        Engine(settings, MemoryStore()), Validator(settings), Replies(settings.smtp_reply)
    )


def test_register_guarded_registers_only_the_methods_named() -> None:
    server = _Server()
    add = penalty_pb2_grpc.add_PenaltyServiceServicer_to_server
    codec.register_guarded(add, _servicer(), server, 1024, registered=("Report",))
    assert list(server.registered["penalty.v1.PenaltyService"]) == ["Report"]
    (generic,) = server.generic  # the generic handler still serves every method
    for method in ("Check", "Report", "Session", "WatchPenalties"):
        details = _Details(f"/penalty.v1.PenaltyService/{method}")
        assert generic.service(details) is not None
    none = _Server()
    codec.register_guarded(add, _servicer(), none, 1024, registered=())
    assert none.registered == {}
    assert len(none.generic) == 1
    every = _Server()
    codec.register_guarded(add, _servicer(), every, 1024)
    assert set(every.registered["penalty.v1.PenaltyService"]) == {
        "Check",
        "Report",
        "Session",
        "WatchPenalties",
    }


class _Details:
    """What grpc hands a generic handler to look a method up."""

    def __init__(self, method: str) -> None:
        self.method = method
        self.invocation_metadata = ()


async def test_penaltyd_registers_the_hot_methods_and_serves_the_rest_generically(
    serve: ServeFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    registered: list[tuple[str, list[str]]] = []
    original = grpc.aio._server.Server.add_registered_method_handlers

    def spy(self: Any, service: str, handlers: dict[str, Any]) -> None:
        registered.append((service, sorted(handlers)))
        original(self, service, handlers)

    monkeypatch.setattr(grpc.aio._server.Server, "add_registered_method_handlers", spy)
    pd = await serve()
    assert registered == [("penalty.v1.PenaltyService", sorted(HOT_METHODS))]
    # the hot methods answer
    client = pb.Client(ip="198.51.100.10")
    report = pb.ReportRequest(
        client=client, counts=[pb.OutcomeCount(outcome=pb.OUTCOME_ACCEPTED, n=1)]
    )
    assert (await pd.service.Report(report)).identity == "198.51.100.10"
    assert not (await pd.service.Check(pb.CheckRequest(client=client))).tempfail
    # and so do those served by the generic handler only: admin, health, reflection
    assert (await pd.admin.Stats(pb.StatsRequest())).store == "memory"
    health = health_pb2_grpc.HealthStub(pd.channel)
    status = await health.Check(health_pb2.HealthCheckRequest(service=""))
    assert status.status == health_pb2.HealthCheckResponse.SERVING
    stub = reflection_pb2_grpc.ServerReflectionStub(pd.channel)

    async def ask() -> Any:
        yield reflection_pb2.ServerReflectionRequest(list_services="")

    async for answer in stub.ServerReflectionInfo(ask()):
        names = {s.name for s in answer.list_services_response.service}
        assert {"penalty.v1.PenaltyService", "penalty.v1.PenaltyAdmin"} <= names
        break
    with pytest.raises(grpc.aio.AioRpcError) as bad:  # validation as ever
        await pd.service.Report(pb.ReportRequest(client=client))
    assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "counts" in (bad.value.details() or "")
