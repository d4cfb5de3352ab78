"""grpc.aio wiring: the service, health, reflection, metrics, graceful shutdown.

`start_server` returns a `Running` handle whose `port` is the bound one, so tests bind
port 0. Health is built from components as in penaltyd: the service is SERVING as soon
as it answers (a fail-open UNDETERMINED is an answer), while `relaycheck.store` reflects
whether the customer store answered its last ping.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import structlog
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from relaycheck import __version__
from relaycheck.api import RelayCheck
from relaycheck.engine import Engine
from relaycheck.metrics import Metrics
from relaycheck.report import PenaltyReporter
from relaycheck.settings import Settings
from relaycheck.store.base import CustomerStore, StoreError
from relaycheck.store.memory import MemoryStore
from relaycheck.store.redis import RedisStore
from relaycheck.v1 import relaycheck_pb2, relaycheck_pb2_grpc
from relaycheck.validation import Validator, guarded_deserializer

log = structlog.get_logger("relaycheck.server")

STORE_HEALTH = "relaycheck.store"
SERVICE_NAME = relaycheck_pb2.DESCRIPTOR.services_by_name["RelayCheck"].full_name


def make_store(settings: Settings) -> CustomerStore:
    ttl_ms = settings.customer_ttl_days * 86_400_000
    if settings.redis_url:
        return RedisStore(
            settings.redis_url,
            key_prefix=settings.key_prefix,
            ttl_ms=ttl_ms,
            relay_min_prefix_v4=settings.relay_min_prefix_v4,
            relay_min_prefix_v6=settings.relay_min_prefix_v6,
            max_connections=settings.redis_max_connections,
        )
    return MemoryStore(ttl_ms=ttl_ms)


def make_reporter(settings: Settings) -> PenaltyReporter | None:
    if not settings.penaltyd:
        return None
    return PenaltyReporter(
        settings.penaltyd, settings.report_outcome_value, max_queue=settings.report_queue
    )


def _credentials(settings: Settings) -> grpc.ServerCredentials:
    """TLS for the listener (read once at start-up)."""
    key = Path(settings.tls_key_file).read_bytes()
    cert = Path(settings.tls_cert_file).read_bytes()
    return grpc.ssl_server_credentials([(key, cert)])


class _Capture:
    """Stands in for a server to collect the generated code's method handlers."""

    def __init__(self) -> None:
        self.service = ""
        self.handlers: dict[str, Any] = {}

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        return None

    def add_registered_method_handlers(self, service: str, handlers: dict[str, Any]) -> None:
        self.service, self.handlers = service, handlers


def _register(servicer: RelayCheck, server: grpc.aio.Server, max_bytes: int) -> None:
    """Register the generated handlers with deserializers that never raise on garbage:
    grpc answers a request it cannot parse with INTERNAL, and bad input must get
    INVALID_ARGUMENT (DESIGN.md s. 6), so the servicer receives a `BadMessage`."""
    cap = _Capture()
    relaycheck_pb2_grpc.add_RelayCheckServicer_to_server(servicer, cap)
    wrapped = {
        name: h._replace(
            request_deserializer=guarded_deserializer(h.request_deserializer, name, max_bytes)
        )
        for name, h in cap.handlers.items()
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(cap.service, wrapped),))
    server.add_registered_method_handlers(cap.service, wrapped)


@dataclass
class Running:
    server: grpc.aio.Server
    port: int
    engine: Engine
    health: HealthServicer
    settings: Settings
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)

    async def stop(self, grace: float | None = None) -> None:
        """Stop taking calls, drain in-flight ones for `grace` seconds, release the store."""
        await self.health.enter_graceful_shutdown()
        for t in self._tasks:
            t.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await t
        await self.server.stop(self.settings.grace_seconds if grace is None else grace)
        await self.engine.close()


async def _watch_store(engine: Engine, health: HealthServicer) -> None:
    """Keep the store's health component and gauge current (a ping a second)."""
    serving = health_pb2.HealthCheckResponse.SERVING
    not_serving = health_pb2.HealthCheckResponse.NOT_SERVING
    while True:
        try:
            async with asyncio.timeout(1.0):
                await engine.store.ping()
            await health.set(STORE_HEALTH, serving)
            engine.metrics.store_up.set(1)
        except (StoreError, TimeoutError):
            await health.set(STORE_HEALTH, not_serving)
            engine.metrics.store_up.set(0)
        await asyncio.sleep(1.0)


async def start_server(
    settings: Settings,
    *,
    store: CustomerStore | None = None,
    metrics: Metrics | None = None,
    reporter: PenaltyReporter | None = None,
) -> Running:
    metrics = metrics or Metrics()
    engine = Engine(
        settings, store or make_store(settings), metrics, reporter or make_reporter(settings)
    )
    server = grpc.aio.server(
        options=[
            # Above this grpc itself answers RESOURCE_EXHAUSTED; between max_message_bytes
            # and this, we answer INVALID_ARGUMENT naming the limit.
            ("grpc.max_receive_message_length", 2 * settings.max_message_bytes + 1024),
            ("grpc.so_reuseport", 0),
        ]
    )
    _register(RelayCheck(engine, Validator(settings)), server, settings.max_message_bytes)
    health = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    reflection.enable_server_reflection(
        (
            SERVICE_NAME,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        ),
        server,
    )
    if settings.tls_cert_file:
        port = server.add_secure_port(settings.listen, _credentials(settings))
    else:
        port = server.add_insecure_port(settings.listen)
    await engine.start()
    await health.set(STORE_HEALTH, health_pb2.HealthCheckResponse.NOT_SERVING)
    await health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
    await server.start()
    running = Running(server, port, engine, health, settings)
    running._tasks.append(asyncio.create_task(_watch_store(engine, health), name="store-health"))
    if settings.metrics_listen:
        metrics.serve(settings.metrics_listen)
    log.info(
        "relaycheck_started",
        version=__version__,
        listen=settings.listen,
        port=port,
        store=engine.store.kind,
        penaltyd=settings.penaltyd or None,
        report_outcome=settings.report_outcome if settings.penaltyd else None,
        metrics=settings.metrics_listen or None,
        operator_api="token" if settings.admin_token.get_secret_value() else "loopback-only",
    )
    return running


async def serve(settings: Settings) -> None:
    """Run until SIGTERM or SIGINT, then drain in-flight calls and exit cleanly."""
    running = await start_server(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("relaycheck_stopping", grace_seconds=settings.grace_seconds)
    await running.stop()
    log.info("relaycheck_stopped")
