"""grpc.aio wiring: services, health, reflection, metrics, graceful shutdown.

`start_server` returns a `Running` handle whose `port` is the bound one, so tests bind
port 0. Health is built from components (DESIGN.md s. 13): the overall service ("") is
SERVING as soon as we answer (fail-open answers are answers), while `penaltyd.store`
reflects whether the store answered its last ping, for alerting and dashboards.
"""

from __future__ import annotations

import asyncio
import os
import stat
from collections.abc import Callable

import structlog

from penalty.v1 import penalty_pb2, penalty_pb2_grpc
from penaltyd import __version__
from penaltyd.api import PenaltyAdmin, PenaltyService, Replies
from penaltyd.engine import Engine
from penaltyd.metrics import Metrics
from penaltyd.settings import Settings
from penaltyd.store.base import Store, StoreError
from penaltyd.store.memory import MemoryStore
from penaltyd.store.redis import RedisStore
from penaltyd.validation import Validator
from serving import codec, gates
from serving import server as wiring
from serving.cli import tune_gc

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
            reputation_half_life_seconds=settings.reputation_half_life_seconds,
            reputation_ttl_seconds=settings.reputation_ttl_seconds,
            worst_keep=settings.neighbourhood_worst_keep,
        )
    return MemoryStore(
        window_seconds=settings.window_seconds,
        bucket_seconds=settings.bucket_seconds,
        shared_min_sub_identities=settings.shared_min_sub_identities,
        shared_ttl_seconds=settings.shared_ttl_seconds,
        max_identities=settings.memory_max_identities,
        max_penalties=settings.memory_max_penalties,
        reputation_half_life_seconds=settings.reputation_half_life_seconds,
        reputation_ttl_seconds=settings.reputation_ttl_seconds,
    )


Running = wiring.Running[Engine]

#: The methods the MX path calls at high rates get a registered call slot in grpc; the
#: rest (admin, WatchPenalties, health, reflection) are served by the generic handler:
#: grpc.aio accepts every call with an `asyncio.wait` over one future per registered
#: method (18 of them before, plus the generic one; docs/performance.md).
HOT_METHODS = ("Check", "Report", "Session")


def _caller_gate(settings: Settings) -> gates.CallerGate | None:
    """Who may report (and check): service tokens (the admin token counts too) or mTLS."""
    if settings.service_auth == "none":
        return None
    tokens = settings.caller_tokens()
    admin = settings.admin_token.get_secret_value()
    if admin:
        tokens.setdefault("admin", admin)
    return gates.CallerGate(tokens, mtls=bool(settings.tls_client_ca_file))


def _store_failed(engine: Engine) -> Callable[[BaseException | None], None]:
    """A failed ping is a store failure like any other (degraded mode, rate-limited log)."""

    def on_result(exc: BaseException | None) -> None:
        if exc is not None:
            engine.failed("ping", exc)
        else:
            engine.answered()

    return on_result


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
            target=engine.settings.redacted()["redis_url"],
            error=str(exc) or "no answer within 2 s",
            hint="answering fail-open (no penalty, degraded) until the store answers",
        )


async def start_server(
    settings: Settings, *, store: Store | None = None, metrics: Metrics | None = None
) -> Running:
    metrics = metrics or Metrics()
    engine = Engine(settings, store or make_store(settings), metrics)
    validator = Validator(settings)
    replies = Replies(settings.smtp_reply, engine.keying.client_marks)
    server = wiring.grpc_server(settings)
    codec.register_guarded(
        penalty_pb2_grpc.add_PenaltyServiceServicer_to_server,
        PenaltyService(engine, validator, replies, _caller_gate(settings)),
        server,
        settings.max_message_bytes,
        raw_responses=("WatchPenalties",),
        metrics=metrics,
        registered=HOT_METHODS,
    )
    codec.register_guarded(
        penalty_pb2_grpc.add_PenaltyAdminServicer_to_server,
        PenaltyAdmin(engine, validator, replies),
        server,
        settings.max_message_bytes,
        metrics=metrics,
        registered=(),
    )
    running = await wiring.launch(
        server,
        settings,
        engine,
        metrics,
        service_names=_SERVICE_NAMES,
        store_health=STORE_HEALTH,
        ping=engine.ping,
        on_ping=_store_failed(engine),
        after_start=lambda: _first_ping(engine),
    )
    port = running.port
    log.info(
        "penaltyd_started",
        version=__version__,
        listen=settings.listen,
        port=port,
        store=engine.store.kind,
        metrics=settings.metrics_listen or None,
        tls=bool(settings.tls_cert_file),
        mtls=bool(settings.tls_client_ca_file),
        admin="token" if settings.admin_token.get_secret_value() else "loopback-only",
        identity_key=engine.keying.keyed,
    )
    for path in (settings.identity_key_file, settings.identity_key_previous_file):
        mode = _mode(path)
        if mode is not None and mode & 0o077:
            log.warning(
                "identity_key_file_readable",
                path=path,
                mode=f"{mode:04o}",
                note="readable beyond its owner: anyone who reads it can open every seal "
                "in Redis; chmod 0400 (Kubernetes: defaultMode: 0400 on the Secret volume)",
            )
    if engine.keying.keyed and settings.service_auth != "all":
        # Keys and seals keep addresses out of Redis; WatchPenalties still names every
        # penalized address to whoever reaches this port (the live replicas need them).
        log.warning(
            "watch_names_addresses_unauthenticated",
            service_auth=settings.service_auth,
            note='with identity_key, set service_auth = "all" (a token per MX) or keep '
            "the port reachable by the MX nodes only: WatchPenalties and Check answers "
            "name penalized addresses to any caller",
        )
    return running


def _mode(path: str) -> int | None:
    """The permission bits of a key file, None when there is none to look at."""
    if not path:
        return None
    try:
        return stat.S_IMODE(os.stat(path).st_mode)
    except OSError:
        return None


async def serve(settings: Settings) -> None:
    """Run until SIGTERM or SIGINT, then drain in-flight calls and exit cleanly."""
    running = await start_server(settings)
    tune_gc()  # after start-up, so what start-up built is frozen too
    await wiring.serve_until_signalled(running, log, "penaltyd")
