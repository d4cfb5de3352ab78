"""gRPC server plumbing shared by penaltyd and relaycheck: one implementation of each rule.

Both services answer bad input the same way (DESIGN.md s. 6), guard their operator calls
the same way and shut down the same way; services must not import each other (DESIGN.md
s. 2), so what they share lives here, beside the contract:

- `BadField` / `BadMessage` and `guarded_deserializer`: a request that cannot (or must
  not) be decoded reaches the servicer as a `BadMessage`, never as an exception grpc
  would answer with `INTERNAL`; `register_guarded` installs generated handlers with it.
- `abort_invalid`, `abort_store_error`: the status codes both services map errors to.
- `AdminGate`: `authorization: Bearer <admin_token>`, or loopback-only without a token.
- `grpc_server`, `server_credentials`, `add_health_and_reflection`, `watch_component`,
  `Running` and `serve_until_signalled`: wiring, health, TLS and the SIGTERM drain.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import ipaddress
import os
import signal
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, NoReturn, Protocol, TypeVar

import grpc
from google.protobuf.message import DecodeError
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection


class BadField(ValueError):
    """A request field that fails validation; the API answers INVALID_ARGUMENT naming it."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


@dataclass(frozen=True, slots=True)
class BadMessage:
    """What the guarded deserializer returns instead of raising.

    `id` is field 1 of the undecodable message when it could be read (a stream's request
    id, so a stream can answer that one message and go on)."""

    field: str
    message: str
    id: int = 0


def leading_varint_field(raw: bytes, number: int = 1, scan: int = 64) -> int:
    """The value of varint field `number` if it is among the first fields of `raw`.

    Reads protobuf wire format by hand, only far enough to find it (at most `scan`
    fields, each skipped in O(1)): linear, and safe on any bytes. 0 when not found.
    """
    pos, end = 0, len(raw)

    def varint() -> int:
        nonlocal pos
        value = shift = 0
        while pos < end and shift < 64:
            byte = raw[pos]
            pos += 1
            value |= (byte & 0x7F) << shift
            if byte < 0x80:
                return value
            shift += 7
        raise ValueError("truncated varint")

    try:
        for _ in range(scan):
            if pos >= end:
                return 0
            key = varint()
            field, wire = key >> 3, key & 7
            if wire == 0:
                value = varint()
                if field == number:
                    return value
            elif wire == 1:
                pos += 8
            elif wire == 2:
                pos += varint()
            elif wire == 5:
                pos += 4
            else:
                return 0
    except ValueError:
        return 0
    return 0


def guarded_deserializer(
    deserialize: Callable[[bytes], Any], type_name: str, max_bytes: int
) -> Callable[[bytes], Any]:
    """Wrap a generated deserializer so oversized or undecodable bytes become a `BadMessage`."""

    def guarded(raw: bytes) -> Any:
        if len(raw) > max_bytes:
            return BadMessage("message", f"{len(raw)} bytes exceeds the limit of {max_bytes}")
        try:
            return deserialize(raw)
        except DecodeError as exc:
            # Invalid UTF-8 in a string field is the usual cause; say so plainly.
            return BadMessage(
                "message", f"not a valid {type_name}: {exc}", leading_varint_field(raw)
            )

    return guarded


def _bytes_or(serialize: Callable[[Any], bytes]) -> Callable[[Any], bytes]:
    """A response serializer that passes bytes through (events serialized once, shared)."""

    def serializer(message: Any) -> bytes:
        return message if type(message) is bytes else serialize(message)

    return serializer


class _Capture:
    """Stands in for a server to collect the generated code's method handlers."""

    def __init__(self) -> None:
        self.service = ""
        self.handlers: dict[str, Any] = {}

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        return None

    def add_registered_method_handlers(self, service: str, handlers: dict[str, Any]) -> None:
        self.service, self.handlers = service, handlers


def register_guarded(
    add: Callable[[Any, Any], None],
    servicer: Any,
    server: grpc.aio.Server,
    max_bytes: int,
    raw_responses: Sequence[str] = (),
) -> None:
    """Register generated handlers (`add_XServicer_to_server`) with guarded deserializers.

    grpc answers a request its deserializer cannot parse with INTERNAL; bad input must
    get INVALID_ARGUMENT (DESIGN.md s. 6), so the servicer receives a `BadMessage`.
    Methods named in `raw_responses` may also answer with already serialized bytes.
    """
    cap = _Capture()
    add(servicer, cap)
    wrapped = {
        name: h._replace(
            request_deserializer=guarded_deserializer(h.request_deserializer, name, max_bytes),
            response_serializer=(
                _bytes_or(h.response_serializer) if name in raw_responses else h.response_serializer
            ),
        )
        for name, h in cap.handlers.items()
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(cap.service, wrapped),))
    server.add_registered_method_handlers(cap.service, wrapped)


class _Counter(Protocol):
    def inc(self, amount: float = 1) -> None: ...


async def abort_invalid(
    context: grpc.aio.ServicerContext, err: BadField | BadMessage, counter: _Counter
) -> NoReturn:
    """End the call with INVALID_ARGUMENT naming the field, counted in `counter`."""
    counter.inc()
    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{err.field}: {err.message}")
    raise AssertionError("abort returned")  # pragma: no cover - abort always raises


async def abort_store_error(context: grpc.aio.ServicerContext, exc: Exception) -> NoReturn:
    """Operator calls fail when the store does not answer: an operator wants to know.

    A store deadline is DEADLINE_EXCEEDED, any other store error UNAVAILABLE.
    """
    code = (
        grpc.StatusCode.DEADLINE_EXCEEDED
        if isinstance(exc, TimeoutError)
        else grpc.StatusCode.UNAVAILABLE
    )
    await context.abort(code, f"store: {exc or type(exc).__name__}")
    raise AssertionError("abort returned")  # pragma: no cover - abort always raises


class AdminGate:
    """Operator calls need `authorization: Bearer <admin_token>` (UNAUTHENTICATED otherwise).

    Without a configured token they answer only on a loopback listener, for a single
    node's operator; elsewhere they are PERMISSION_DENIED, so a forgotten token never
    opens the operator API to the network. `api` names it in the messages ("admin",
    "operator") and `env_var` says how to set the token.
    """

    def __init__(self, token: str, listen: str, *, api: str, env_var: str) -> None:
        self._expected = f"Bearer {token}".encode() if token else None
        self._api = api
        self._env_var = env_var
        host = listen.rpartition(":")[0].strip("[]")
        try:
            self._loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
        except ValueError:
            self._loopback = False

    async def authorize(self, context: grpc.aio.ServicerContext) -> None:
        if self._expected is None:
            if not self._loopback:
                await context.abort(
                    grpc.StatusCode.PERMISSION_DENIED,
                    f"{self._api} API disabled: set admin_token ({self._env_var}) to enable it",
                )
            return
        for key, value in context.invocation_metadata() or ():
            if key == "authorization":
                got = value.encode() if isinstance(value, str) else value
                if hmac.compare_digest(got, self._expected):
                    return
        await context.abort(
            grpc.StatusCode.UNAUTHENTICATED,
            f"{self._api} calls need authorization: Bearer <admin_token>",
        )


class CallerGate:
    """Who may use a service API: bearer tokens per caller (an MX each) and/or mTLS.

    `tokens` maps a caller's name to its token. A presented token is looked up by its
    keyed digest (HMAC with a per-process random key), so the lookup reveals nothing
    about tokens through timing, however many there are. With `mtls`, the TLS layer has
    already demanded a certificate from the configured CA: every caller is authenticated
    and named by its certificate's common name.
    """

    def __init__(self, tokens: dict[str, str], *, mtls: bool = False) -> None:
        self._key = os.urandom(32)
        self._names = {self._digest(f"Bearer {t}".encode()): n for n, t in tokens.items() if t}
        self._mtls = mtls

    @property
    def enabled(self) -> bool:
        return bool(self._names) or self._mtls

    def _digest(self, presented: bytes) -> bytes:
        return hmac.new(self._key, presented, "sha256").digest()

    def caller(self, context: grpc.aio.ServicerContext) -> str | None:
        """The authenticated caller's name, or None."""
        for key, value in context.invocation_metadata() or ():
            if key == "authorization":
                got = value.encode() if isinstance(value, str) else value
                name = self._names.get(self._digest(got))
                if name is not None:
                    return name
        if self._mtls:
            names = (context.auth_context() or {}).get("x509_common_name") or [b"mtls"]
            return bytes(names[0]).decode("utf-8", "replace")
        return None

    async def authorize(self, context: grpc.aio.ServicerContext, what: str) -> str:
        """The caller's name, or end the call with UNAUTHENTICATED."""
        name = self.caller(context)
        if name is None:
            await context.abort(
                grpc.StatusCode.UNAUTHENTICATED,
                f"{what} needs authorization: Bearer <token> (a service token of this MX)",
            )
            raise AssertionError("abort returned")  # pragma: no cover
        return name


def grpc_server(max_message_bytes: int, *options: tuple[str, Any]) -> grpc.aio.Server:
    """A grpc.aio server whose receive limit leaves room to answer oversize ourselves."""
    return grpc.aio.server(
        options=[
            # Above this grpc itself answers RESOURCE_EXHAUSTED; between max_message_bytes
            # and this, we answer INVALID_ARGUMENT naming the limit.
            ("grpc.max_receive_message_length", 2 * max_message_bytes + 1024),
            ("grpc.so_reuseport", 0),
            *options,
        ]
    )


def server_credentials(
    cert_file: str, key_file: str, client_ca_file: str = ""
) -> grpc.ServerCredentials | None:
    """TLS (and mutual TLS with a client CA) when a certificate is configured, else None.

    Read once at start-up: a renewed certificate takes a restart (a rolling one in a fleet).
    """
    if not cert_file:
        return None
    with open(key_file, "rb") as key, open(cert_file, "rb") as cert:
        pair = (key.read(), cert.read())
    ca = None
    if client_ca_file:
        with open(client_ca_file, "rb") as fh:
            ca = fh.read()
    return grpc.ssl_server_credentials(
        [pair], root_certificates=ca, require_client_auth=ca is not None
    )


def add_health_and_reflection(
    server: grpc.aio.Server, service_names: Sequence[str]
) -> HealthServicer:
    """The asyncio health servicer and reflection for `service_names` (plus Health itself)."""
    health = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    reflection.enable_server_reflection(
        (
            *service_names,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        ),
        server,
    )
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
