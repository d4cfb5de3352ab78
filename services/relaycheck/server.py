"""grpc.aio wiring: the service, health, reflection, metrics, graceful shutdown.

`start_server` returns a `Running` handle whose `port` is the bound one, so tests bind
port 0. Health is built from components as in penaltyd: the service is SERVING as soon
as it answers (a fail-open UNDETERMINED is an answer), while `relaycheck.store` reflects
whether the customer store answered its last ping.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import structlog

from relaycheck import __version__
from relaycheck.api import RelayCheck
from relaycheck.engine import Engine
from relaycheck.metrics import Metrics
from relaycheck.report import PenaltyReporter
from relaycheck.settings import Settings
from relaycheck.store.base import CustomerStore
from relaycheck.store.memory import MemoryStore
from relaycheck.store.redis import RedisStore
from relaycheck.v1 import relaycheck_pb2, relaycheck_pb2_grpc
from relaycheck.validation import Validator
from serving import codec
from serving import server as wiring

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


Running = wiring.Running[Engine]


def _store_gauge(engine: Engine) -> Callable[[BaseException | None], None]:
    """The store-up gauge follows the pings (Classify fails open; operators alert on it)."""

    down_since: list[float] = []

    def on_result(exc: BaseException | None) -> None:
        engine.metrics.store_up.set(0 if exc is not None else 1)
        if exc is not None and not down_since:
            down_since.append(time.monotonic())
            log.warning("store_unavailable", store=engine.store.kind, error=str(exc) or "timeout")
        elif exc is None and down_since:
            down = round(time.monotonic() - down_since.pop(), 1)
            log.info("store_recovered", store=engine.store.kind, down_seconds=down)

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
    server = wiring.grpc_server(settings)
    codec.register_guarded(
        relaycheck_pb2_grpc.add_RelayCheckServicer_to_server,
        RelayCheck(engine, Validator(settings)),
        server,
        settings.max_message_bytes,
        metrics=metrics,
    )
    running = await wiring.launch(
        server,
        settings,
        engine,
        metrics,
        service_names=(SERVICE_NAME,),
        store_health=STORE_HEALTH,
        ping=engine.ping,
        on_ping=_store_gauge(engine),
    )
    port = running.port
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
        tls=bool(settings.tls_cert_file),
        mtls=bool(settings.tls_client_ca_file),
    )
    return running


async def serve(settings: Settings) -> None:
    """Run until SIGTERM or SIGINT, then drain in-flight calls and exit cleanly."""
    await wiring.serve_until_signalled(await start_server(settings), log, "relaycheck")
