"""grpc.aio wiring: the service, health, reflection, metrics, graceful shutdown.

`start_server` returns a `Running` handle whose `port` is the bound one, so tests bind
port 0. Health is built from components as in penaltyd: the service is SERVING as soon
as it answers (a fail-open UNDETERMINED is an answer), while `relaycheck.store` reflects
whether the customer store answered its last ping.
"""

from __future__ import annotations

from collections.abc import Callable

import structlog
from grpc_health.v1 import health_pb2

from penalty import grpc_support
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
from relaycheck.validation import Validator

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


Running = grpc_support.Running[Engine]


def _store_gauge(engine: Engine) -> Callable[[BaseException | None], None]:
    """The store-up gauge follows the pings (Classify fails open; operators alert on it)."""

    def on_result(exc: BaseException | None) -> None:
        engine.metrics.store_up.set(0 if exc is not None else 1)

    return on_result


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
    server = grpc_support.grpc_server(settings.max_message_bytes)
    grpc_support.register_guarded(
        relaycheck_pb2_grpc.add_RelayCheckServicer_to_server,
        RelayCheck(engine, Validator(settings)),
        server,
        settings.max_message_bytes,
    )
    health = grpc_support.add_health_and_reflection(server, (SERVICE_NAME,))
    credentials = grpc_support.server_credentials(settings.tls_cert_file, settings.tls_key_file)
    if credentials is None:
        port = server.add_insecure_port(settings.listen)
    else:
        port = server.add_secure_port(settings.listen, credentials)
    await engine.start()
    await health.set(STORE_HEALTH, health_pb2.HealthCheckResponse.NOT_SERVING)
    await health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
    await server.start()
    running = Running(server, port, engine, health, settings.grace_seconds)
    watch = grpc_support.watch_component(
        health, STORE_HEALTH, engine.store.ping, (StoreError,), _store_gauge(engine)
    )
    running.beside(watch, "store-health")
    if settings.metrics_listen:
        running.on_stop((await metrics.serve(settings.metrics_listen)).close)
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
    await grpc_support.serve_until_signalled(await start_server(settings), log, "relaycheck")
