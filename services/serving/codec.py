"""Requests decoded defensively, responses that may be pre-serialized.

grpc answers a request its deserializer cannot parse with INTERNAL; bad input must get
INVALID_ARGUMENT (DESIGN.md s. 6). `register_guarded` installs a service's generated
handlers with deserializers that turn oversized or undecodable bytes into a
`BadMessage` (with the message's id when it can be read, so a stream can answer that
one message and go on), and, for the methods named, a serializer that passes bytes
through (events serialized once and shared by many streams).
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Callable, Collection, Iterable, Sequence
from typing import Any, Protocol

import grpc
from google.protobuf.message import DecodeError

from serving.errors import BadMessage


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


class _RpcMetrics(Protocol):
    def methods(self, names: Iterable[str]) -> None: ...

    def rpc_done(self, method: str, code: grpc.StatusCode | None, seconds: float) -> None: ...


def _measured(behavior: Any, method: str, metrics: _RpcMetrics) -> Any:
    """`behavior` with its status code and time counted when it ends: returned (OK or
    the code it set), aborted (the abort's code), cancelled by the client, or failed."""

    def code_of(context: grpc.aio.ServicerContext, exc: BaseException | None) -> Any:
        if isinstance(exc, asyncio.CancelledError):
            return grpc.StatusCode.CANCELLED
        code = context.code()
        if code is None and exc is not None and not isinstance(exc, grpc.aio.AbortError):
            return grpc.StatusCode.UNKNOWN
        return code

    if inspect.isasyncgenfunction(behavior):

        async def stream(request: Any, context: grpc.aio.ServicerContext) -> Any:
            t0, failure = time.perf_counter(), None
            try:
                async for item in behavior(request, context):
                    yield item
            except BaseException as exc:
                failure = exc
                raise
            finally:
                metrics.rpc_done(method, code_of(context, failure), time.perf_counter() - t0)

        return stream

    async def call(request: Any, context: grpc.aio.ServicerContext) -> Any:
        t0, failure = time.perf_counter(), None
        try:
            return await behavior(request, context)
        except BaseException as exc:
            failure = exc
            raise
        finally:
            metrics.rpc_done(method, code_of(context, failure), time.perf_counter() - t0)

    return call


def register_guarded(
    add: Callable[[Any, Any], None],
    servicer: Any,
    server: grpc.aio.Server,
    max_bytes: int,
    raw_responses: Sequence[str] = (),
    metrics: _RpcMetrics | None = None,
    registered: Collection[str] | None = None,
) -> None:
    """Register generated handlers (`add_XServicer_to_server`) with guarded deserializers.

    grpc answers a request its deserializer cannot parse with INTERNAL; bad input must
    get INVALID_ARGUMENT (DESIGN.md s. 6), so the servicer receives a `BadMessage`.
    Methods named in `raw_responses` may also answer with already serialized bytes. With
    `metrics`, every call is counted by method and status code, and timed.

    `registered` names the methods that get a registered call slot (None: all of them);
    the others are served by the generic handler alone, which answers them the same way.
    The distinction is one of cost: grpc.aio's server loop (1.85) accepts each call with
    an `asyncio.wait` over one pending future per registered method plus the generic
    one, so every registered method adds to the acceptance of every call
    (`penaltyd.server.HOT_METHODS`).
    """
    cap = _Capture()
    add(servicer, cap)
    service = cap.service.rpartition(".")[2]
    wrapped = {}
    for name, h in cap.handlers.items():
        h = h._replace(
            request_deserializer=guarded_deserializer(h.request_deserializer, name, max_bytes),
            response_serializer=(
                _bytes_or(h.response_serializer) if name in raw_responses else h.response_serializer
            ),
        )
        if metrics is not None:
            kind = next(
                k for k in ("unary_unary", "unary_stream", "stream_unary", "stream_stream")
                if getattr(h, k) is not None
            )  # fmt: skip
            h = h._replace(**{kind: _measured(getattr(h, kind), f"{service}/{name}", metrics)})
        wrapped[name] = h
    if metrics is not None:
        metrics.methods(f"{service}/{name}" for name in wrapped)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(cap.service, wrapped),))
    hot = wrapped if registered is None else {k: h for k, h in wrapped.items() if k in registered}
    if hot:
        server.add_registered_method_handlers(cap.service, hot)


class GenericOnly:
    """Stands in for a server when adding a service whose calls are rare (health,
    reflection): its generic handlers are added, its registered call slots are not (see
    `register_guarded`, `registered`)."""

    def __init__(self, server: grpc.aio.Server) -> None:
        self._server = server

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        self._server.add_generic_rpc_handlers(handlers)

    def add_registered_method_handlers(self, service: str, handlers: dict[str, Any]) -> None:
        return None
