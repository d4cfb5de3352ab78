"""gRPC server wiring both services share: one implementation of each rule.

- `grpc_server`: a grpc.aio server whose receive limit leaves room to answer oversize
  requests ourselves, with the options every service wants.
- `server_credentials`: TLS, and mutual TLS with a client CA.
- `add_health_and_reflection`, `watch_component`: standard health (built from
  components, DESIGN.md s. 13) and reflection.
- `Running` and `serve_until_signalled`: a started server with its bound port (tests
  bind port 0), background tasks and closers, and the SIGTERM drain.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar, cast

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection, reflection_pb2_grpc
from grpc_reflection.v1alpha._async import ReflectionServicer

from serving.codec import GenericOnly
from serving.errors import StoreError
from serving.settings import ServingSettings


def grpc_server(settings: ServingSettings, *options: tuple[str, Any]) -> grpc.aio.Server:
    """A grpc.aio server with what every service wants (`options` add to it)."""
    return grpc.aio.server(
        options=[
            # Above this grpc itself answers RESOURCE_EXHAUSTED; between max_message_bytes
            # and this, we answer INVALID_ARGUMENT naming the limit.
            ("grpc.max_receive_message_length", 2 * settings.max_message_bytes + 1024),
            # One process binds the port alone; `workers` share it (serving.workers).
            ("grpc.so_reuseport", 1 if settings.workers > 1 else 0),
            ("grpc.keepalive_permit_without_calls", 1),
            # Clients re-resolve DNS only when a connection ends: recycling connections
            # lets replicas added by the autoscaler take their share of calls.
            ("grpc.max_connection_age_ms", int(settings.max_connection_age_seconds * 1000)),
            ("grpc.max_connection_age_grace_ms", int(settings.connection_age_grace_seconds * 1000)),
            ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
            # Bound what the server buffers per stream: with grpc's default (0) a write
            # completes at once whatever the reader's flow control says, and a stream
            # reader that never reads grew the process without limit (measured: 490 MB
            # for one stalled WatchPenalties). With a bound, a write waits for the
            # reader's window.
            ("grpc.http2.write_buffer_size", 64 * 1024),
            *options,
        ]
    )


class _Engine(Protocol):
    async def start(self) -> None: ...

    async def close(self) -> None: ...


class _MetricsServer(Protocol):
    async def close(self) -> None: ...


class _Metrics(Protocol):
    async def serve(self, listen: str) -> _MetricsServer: ...


Eng = TypeVar("Eng", bound=_Engine)


async def launch(
    server: grpc.aio.Server,
    settings: ServingSettings,
    engine: Eng,
    metrics: _Metrics,
    *,
    service_names: Sequence[str],
    store_health: str,
    ping: Callable[[], Awaitable[Any]],
    on_ping: Callable[[BaseException | None], None],
    after_start: Callable[[], Awaitable[None]] | None = None,
) -> Running[Eng]:
    """Bind (TLS or mutual TLS as configured), start the engine and the server, keep the
    store's health component current, serve /metrics: every service starts this way.

    Health is built from components (DESIGN.md s. 13): the services are SERVING as soon
    as they answer (fail-open answers are answers), `store_health` reflects whether the
    store answered its last ping. Raises OSError naming the address if it is taken.
    """
    health = add_health_and_reflection(server, service_names)
    credentials = server_credentials(
        settings.tls_cert_file, settings.tls_key_file, settings.tls_client_ca_file
    )
    if settings.workers == 1:
        check_bindable(settings.listen)
    if settings.metrics_listen:
        check_bindable(settings.metrics_listen, "metrics_listen")
    try:
        if credentials is None:
            port = server.add_insecure_port(settings.listen)
        else:
            port = server.add_secure_port(settings.listen, credentials)
    except RuntimeError as exc:  # grpc's way of saying the address is taken or invalid
        raise OSError(f"listen {settings.listen}: cannot bind ({exc})") from exc
    await engine.start()
    try:
        await health.set(store_health, health_pb2.HealthCheckResponse.NOT_SERVING)
        for name in service_names:
            await health.set(name, health_pb2.HealthCheckResponse.SERVING)
        await server.start()
        if after_start is not None:
            await after_start()
        running = Running(server, port, engine, health, settings.grace_seconds)
        if settings.metrics_listen:
            running.on_stop((await metrics.serve(settings.metrics_listen)).close)
    except BaseException:  # stop what started, so nothing outlives the event loop
        await server.stop(0)
        await engine.close()
        raise
    running.beside(
        watch_component(health, store_health, ping, (StoreError,), on_ping), "store-health"
    )
    return running


def server_credentials(
    cert_file: str, key_file: str, client_ca_file: str = ""
) -> grpc.ServerCredentials | None:
    """TLS (and mutual TLS with a client CA) when a certificate is configured, else None.

    Read once at start-up: a renewed certificate takes a restart (a rolling one in a fleet).
    """
    if not cert_file:
        return None
    pair = (_read("tls_key_file", key_file), _read("tls_cert_file", cert_file))
    ca = _read("tls_client_ca_file", client_ca_file) if client_ca_file else None
    return grpc.ssl_server_credentials(
        [pair], root_certificates=ca, require_client_auth=ca is not None
    )


def _read(setting: str, path: str) -> bytes:
    """A file a setting names, or OSError saying which setting and why."""
    try:
        with open(path, "rb") as fh:
            return fh.read()
    except OSError as exc:
        raise OSError(f"{setting} {path}: {exc.strerror or exc}") from exc


def check_bindable(listen: str, setting: str = "listen") -> None:
    """Raise OSError naming the address if nothing may listen there (in use, not ours).

    grpc only says "failed to bind" (and logs a C-level line); asking the kernel first
    gives the operator the reason. A port shared by `workers` is not checked."""
    host, _, port = listen.rpartition(":")
    try:
        infos = socket.getaddrinfo(host.strip("[]") or None, int(port), type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise OSError(f"{setting} {listen}: cannot resolve the host ({exc.strerror})") from exc
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as exc:
            raise OSError(f"{setting} {listen}: {exc.strerror or exc}") from exc


def add_health_and_reflection(
    server: grpc.aio.Server, service_names: Sequence[str]
) -> HealthServicer:
    """The asyncio health servicer and reflection for `service_names` (plus Health itself).

    Both through the generic handler only (`codec.GenericOnly`): a probe every few
    seconds does not need a registered call slot, and each slot costs every call."""
    health = HealthServicer()
    rare = cast(grpc.aio.Server, GenericOnly(server))
    health_pb2_grpc.add_HealthServicer_to_server(health, rare)
    names = (
        *service_names,
        health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
        reflection.SERVICE_NAME,
    )
    # What `reflection.enable_server_reflection` does for a grpc.aio server (it tells
    # one by its type, which the stand-in is not).
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(ReflectionServicer(names), rare)
    return health


async def watch_component(
    health: HealthServicer,
    component: str,
    ping: Callable[[], Awaitable[Any]],
    errors: tuple[type[BaseException], ...],
    on_result: Callable[[BaseException | None], None],
) -> None:
    """Keep a health component current with a ping a second (DESIGN.md s. 13: health is
    built from components); `on_result` gets None or the error, for metrics and logs."""
    serving = health_pb2.HealthCheckResponse.SERVING
    not_serving = health_pb2.HealthCheckResponse.NOT_SERVING
    failures: tuple[type[BaseException], ...] = (*errors, TimeoutError)
    while True:
        try:
            async with asyncio.timeout(1.0):
                await ping()
            await health.set(component, serving)
            on_result(None)
        except failures as exc:
            await health.set(component, not_serving)
            on_result(exc)
        await asyncio.sleep(1.0)


class _Closable(Protocol):
    async def close(self) -> None: ...


E = TypeVar("E", bound=_Closable)


@dataclass
class Running(Generic[E]):
    """A started server: `port` is the bound one, so tests bind port 0."""

    server: grpc.aio.Server
    port: int
    engine: E
    health: HealthServicer
    grace_seconds: float
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)
    _closers: list[Callable[[], Awaitable[None]]] = field(default_factory=list)

    def on_stop(self, close: Callable[[], Awaitable[None]]) -> None:
        """Close something (the metrics server) when the server stops."""
        self._closers.append(close)

    def beside(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        """Run a background task (e.g. `watch_component`) until the server stops."""
        self._tasks.append(asyncio.create_task(coro, name=name))

    async def stop(self, grace: float | None = None) -> None:
        """Stop taking calls, drain in-flight ones for `grace` seconds, release the store."""
        await self.health.enter_graceful_shutdown()
        for t in self._tasks:
            t.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await t
        await self.server.stop(self.grace_seconds if grace is None else grace)
        for close in self._closers:
            await close()
        await self.engine.close()


async def serve_until_signalled(running: Running[Any], log: Any, name: str) -> None:
    """Run until SIGTERM or SIGINT, then drain in-flight calls and exit cleanly."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info(f"{name}_stopping", grace_seconds=running.grace_seconds)
    await running.stop()
    log.info(f"{name}_stopped")
