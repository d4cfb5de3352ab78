"""grpc.aio wiring: services, health, reflection, metrics, graceful shutdown.

`start_server` returns a `Running` handle whose `port` is the bound one, so tests bind
port 0. Health is built from components (DESIGN.md s. 13): the overall service ("") is
SERVING as soon as we answer (fail-open answers are answers), while `penaltyd.store`
reflects whether the store answered its last ping, for alerting and dashboards.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
import structlog
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from penalty.v1 import penalty_pb2, penalty_pb2_grpc
from penaltyd import __version__
from penaltyd.api import PenaltyAdmin, PenaltyService, Replies
from penaltyd.engine import Engine
from penaltyd.metrics import Metrics
from penaltyd.settings import Settings
from penaltyd.store.base import Store, StoreError
from penaltyd.store.memory import MemoryStore
from penaltyd.store.redis import RedisStore
from penaltyd.validation import Validator, guarded_deserializer

log = structlog.get_logger("penaltyd.server")

STORE_HEALTH = "penaltyd.store"
_SERVICE_NAMES = (
    penalty_pb2.DESCRIPTOR.services_by_name["PenaltyService"].full_name,
    penalty_pb2.DESCRIPTOR.services_by_name["PenaltyAdmin"].full_name,
)


def make_store(settings: Settings) -> Store:
    if settings.redis_url:
        return RedisStore(
            settings.redis_url,
            key_prefix=settings.key_prefix,
            index_shards=settings.index_shards,
            window_seconds=settings.window_seconds,
            bucket_seconds=settings.bucket_seconds,
            shared_min_sub_identities=settings.shared_min_sub_identities,
            shared_ttl_seconds=settings.shared_ttl_seconds,
            max_connections=settings.redis_max_connections,
            use_view=settings.use_penalty_view,
        )
    return MemoryStore(
        window_seconds=settings.window_seconds,
        bucket_seconds=settings.bucket_seconds,
        shared_min_sub_identities=settings.shared_min_sub_identities,
        shared_ttl_seconds=settings.shared_ttl_seconds,
    )


def _credentials(settings: Settings) -> grpc.ServerCredentials | None:
    """TLS (and mutual TLS with a client CA) when configured; None for plaintext."""
    if not settings.tls_cert_file:
        return None
    with open(settings.tls_key_file, "rb") as key, open(settings.tls_cert_file, "rb") as cert:
        pair = (key.read(), cert.read())
    ca = None
    if settings.tls_client_ca_file:
        with open(settings.tls_client_ca_file, "rb") as fh:
            ca = fh.read()
    return grpc.ssl_server_credentials(
        [pair], root_certificates=ca, require_client_auth=ca is not None
    )


class _Capture:
    """Stands in for a server to collect the generated code's method handlers."""

    def __init__(self) -> None:
        self.service = ""
        self.handlers: dict[str, Any] = {}

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        return None

    def add_registered_method_handlers(self, service: str, handlers: dict[str, Any]) -> None:
        self.service, self.handlers = service, handlers


def _register(
    add: Callable[[Any, Any], None], servicer: Any, server: grpc.aio.Server, max_bytes: int
) -> None:
    """Register generated handlers with deserializers that never raise on garbage.

    grpc answers a request its deserializer cannot parse with INTERNAL; bad input must
    get INVALID_ARGUMENT (DESIGN.md s. 6), so the servicer receives a `BadMessage`.
    """
    cap = _Capture()
    add(servicer, cap)
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
    """Keep the store's health component current (a ping a second)."""
    serving = health_pb2.HealthCheckResponse.SERVING
    not_serving = health_pb2.HealthCheckResponse.NOT_SERVING
    while True:
        try:
            async with asyncio.timeout(1.0):
                await engine.store.ping()
            await health.set(STORE_HEALTH, serving)
        except (StoreError, TimeoutError) as exc:
            await health.set(STORE_HEALTH, not_serving)
            engine.failed("ping", exc)
        await asyncio.sleep(1.0)


async def _first_ping(engine: Engine) -> None:
    """Say at start-up, in one log line naming the problem, if the store cannot serve.

    penaltyd starts anyway and answers fail-open: a crash loop would take checks down with
    it, while a degraded replica keeps mail flowing and recovers when the store does.
    """
    try:
        async with asyncio.timeout(2.0):
            await engine.store.ping()
    except (StoreError, TimeoutError) as exc:
        engine.failed("startup", exc)
        log.error(
            "store_unreachable_at_startup",
            store=engine.store.kind,
            error=str(exc) or type(exc).__name__,
            hint="answering fail-open (no penalty, degraded) until the store answers",
        )


async def start_server(
    settings: Settings, *, store: Store | None = None, metrics: Metrics | None = None
) -> Running:
    metrics = metrics or Metrics()
    engine = Engine(settings, store or make_store(settings), metrics)
    validator = Validator(settings)
    replies = Replies(settings.smtp_reply)
    server = grpc.aio.server(
        options=[
            # Above this grpc itself answers RESOURCE_EXHAUSTED; between max_message_bytes
            # and this, we answer INVALID_ARGUMENT naming the limit.
            ("grpc.max_receive_message_length", 2 * settings.max_message_bytes + 1024),
            ("grpc.so_reuseport", 0),
            ("grpc.keepalive_permit_without_calls", 1),
            # Clients re-resolve DNS only when a connection ends: recycling connections
            # lets replicas added by the autoscaler take their share of calls.
            ("grpc.max_connection_age_ms", 300_000),
            ("grpc.max_connection_age_grace_ms", 30_000),
            ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        ]
    )
    _register(
        penalty_pb2_grpc.add_PenaltyServiceServicer_to_server,
        PenaltyService(engine, validator, replies),
        server,
        settings.max_message_bytes,
    )
    _register(
        penalty_pb2_grpc.add_PenaltyAdminServicer_to_server,
        PenaltyAdmin(engine, validator, replies),
        server,
        settings.max_message_bytes,
    )
    health = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    reflection.enable_server_reflection(
        (
            *_SERVICE_NAMES,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        ),
        server,
    )
    credentials = _credentials(settings)
    if credentials is None:
        port = server.add_insecure_port(settings.listen)
    else:
        port = server.add_secure_port(settings.listen, credentials)
    await engine.start()
    await health.set(STORE_HEALTH, health_pb2.HealthCheckResponse.NOT_SERVING)
    for name in _SERVICE_NAMES:
        await health.set(name, health_pb2.HealthCheckResponse.SERVING)
    await server.start()
    await _first_ping(engine)
    running = Running(server, port, engine, health, settings)
    running._tasks.append(asyncio.create_task(_watch_store(engine, health), name="store-health"))
    if settings.metrics_listen:
        metrics.serve(settings.metrics_listen)
    log.info(
        "penaltyd_started",
        version=__version__,
        listen=settings.listen,
        port=port,
        store=engine.store.kind,
        metrics=settings.metrics_listen or None,
        tls=credentials is not None,
        admin="token" if settings.admin_token.get_secret_value() else "loopback-only",
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
    log.info("penaltyd_stopping", grace_seconds=settings.grace_seconds)
    await running.stop()
    log.info("penaltyd_stopped")
