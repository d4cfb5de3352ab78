"""Metrics every service exports, and `/metrics` over HTTP in bounded resources.

`ServiceMetrics` is the base of each service's metrics: process, platform and garbage
collector collectors, a `<service>_build_info`, store latency by operation *including
the calls that timed out* (observed at their deadline and counted in
`<service>_store_timeouts_total{op}`), and per-RPC gRPC server metrics
(`<service>_grpc_requests_total{method,code}`, `<service>_grpc_request_seconds{method}`).
Label sets are created at start, so every series exists before its first event, and no
`*_created` series are exported (prometheus-client's `disable_created_metrics`).

prometheus-client's `start_http_server` runs a thread per connection and keeps it while
the connection is idle: 900 idle connections to the metrics port made 909 threads. This
server answers on the event loop instead: one request per connection (`Connection:
close`), a bounded request head read within a deadline, at most `max_connections` at
once (more are closed at once), so whatever a scraper or a port scanner does costs a
bounded amount of memory and no threads. The exposition itself is prometheus-client's
(`generate_latest`).
"""

from __future__ import annotations

import asyncio
import contextlib
import platform
import time
from collections.abc import Iterable
from types import TracebackType
from typing import Any

import grpc
import structlog
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    Info,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

log = structlog.get_logger("serving.metrics")

# `*_created` series double every counter and histogram for a value nobody alerts on.
disable_created_metrics()  # type: ignore[no-untyped-call]  # prometheus-client leaves it unannotated

#: gRPC request latency buckets: from an in-process answer to the longest deadline.
RPC_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
               0.5, 1.0, 2.5, 5.0)  # fmt: skip

MAX_HEAD = 8192  # bytes of request line + headers; Prometheus sends a few hundred

#: Latency buckets (seconds) of store round trips: from a pipelined Redis reply up to
#: the longest deadline of any call (admin calls, 2 s), so timeouts land in a bucket.
STORE_BUCKETS = (0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.5, 1.0, 2.0, 5.0)


class ServiceMetrics:
    """What every service's metrics start from (see the module docstring).

    `store_ops` names the store operations (label values created at start); `methods`
    the gRPC methods ("Service/Method"), each created with code OK.
    """

    def __init__(
        self,
        service: str,
        version: str,
        *,
        store_what: str,
        store_ops: Iterable[str],
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.registry = r = registry or CollectorRegistry()
        self.service = service
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        GCCollector(registry=r)
        Info(f"{service}_build", f"{service}'s version and runtime", registry=r).info(
            {
                "version": version,
                "python": platform.python_version(),
                "grpc": grpc.__version__,
            }
        )
        self.store_latency = Histogram(
            f"{service}_store_latency_seconds",
            f"{store_what} round trips by operation; a call that timed out counts at its deadline",
            ["op"],
            buckets=STORE_BUCKETS,
            registry=r,
        )
        self.store_timeouts = Counter(
            f"{service}_store_timeouts",
            f"{store_what} calls that missed their deadline, by operation",
            ["op"],
            registry=r,
        )
        for op in store_ops:
            self.store_latency.labels(op)
            self.store_timeouts.labels(op)
        self.rpc_requests = Counter(
            f"{service}_grpc_requests",
            "gRPC requests answered, by method and status code",
            ["method", "code"],
            registry=r,
        )
        self.rpc_seconds = Histogram(
            f"{service}_grpc_request_seconds",
            "gRPC request handling time, by method (streams: their whole life)",
            ["method"],
            buckets=RPC_BUCKETS,
            registry=r,
        )
        self._rpc_children: dict[tuple[str, grpc.StatusCode | None], tuple[Any, Any]] = {}
        self._store_children: dict[str, tuple[Any, Any]] = {}

    def methods(self, names: Iterable[str]) -> None:
        """Create the per-RPC series of `names` ("Service/Method") with code OK."""
        for name in names:
            self.rpc_requests.labels(name, "OK")
            self.rpc_seconds.labels(name)

    def rpc_done(self, method: str, code: grpc.StatusCode | None, seconds: float) -> None:
        # Labelled children are looked up once per (method, code): prometheus-client's
        # `labels()` takes a lock and builds a tuple each time, ~2 µs, on every call.
        children = self._rpc_children.get((method, code))
        if children is None:
            children = self._rpc_children[(method, code)] = (
                self.rpc_requests.labels(method, (code or grpc.StatusCode.OK).name),
                self.rpc_seconds.labels(method),
            )
        children[0].inc()
        children[1].observe(seconds)

    def store_call(self, op: str, deadline_s: float) -> StoreTimer:
        """Time one store call (`with metrics.store_call(op, deadline):`). A `TimeoutError`
        (its deadline) is observed at the deadline and counted: a stalled store shows in
        the latency metrics instead of vanishing."""
        children = self._store_children.get(op)
        if children is None:
            children = self._store_children[op] = (
                self.store_latency.labels(op),
                self.store_timeouts.labels(op),
            )
        return StoreTimer(children, deadline_s)

    async def serve(self, listen: str) -> MetricsServer:
        """`/metrics` on `listen`, on the event loop."""
        server = MetricsServer(self.registry, listen)
        await server.start()
        return server


class StoreTimer:
    """The context manager `ServiceMetrics.store_call` returns: a class rather than a
    generator-based `contextmanager`, which costs a generator and two extra calls on
    every store call of the hot path."""

    __slots__ = ("_children", "_deadline_s", "_t0")

    def __init__(self, children: tuple[Any, Any], deadline_s: float) -> None:
        self._children = children
        self._deadline_s = deadline_s
        self._t0 = 0.0

    def __enter__(self) -> None:
        self._t0 = time.perf_counter()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        seconds = time.perf_counter() - self._t0
        if exc_type is not None and issubclass(exc_type, TimeoutError):
            self._children[0].observe(max(self._deadline_s, seconds))
            self._children[1].inc()
        elif exc_type is None:
            self._children[0].observe(seconds)


def _response(status: str, body: bytes, content_type: str = "text/plain; charset=utf-8") -> bytes:
    head = (
        f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    return head.encode() + body


class MetricsServer:
    """Serves one registry; `start()` binds, `close()` stops and drops open connections."""

    def __init__(
        self,
        registry: CollectorRegistry,
        listen: str,
        *,
        max_connections: int = 64,
        timeout: float = 5.0,
    ) -> None:
        self.registry = registry
        host, _, port = listen.rpartition(":")
        self.host, self.port = host.strip("[]"), int(port)
        self.max_connections = max_connections
        self.timeout = timeout
        self.open = 0
        self.refused = 0
        self._server: asyncio.Server | None = None

    async def start(self) -> int:
        """Bind; returns the bound port. Raises OSError naming the address if it is taken."""
        try:
            self._server = await asyncio.start_server(
                self._handle, self.host or None, self.port, limit=MAX_HEAD
            )
        except OSError as exc:
            raise OSError(
                exc.errno, f"metrics_listen {self.host}:{self.port}: {exc.strerror}"
            ) from exc
        return int(self._server.sockets[0].getsockname()[1])

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.open >= self.max_connections:
            self.refused += 1
            writer.close()
            return
        self.open += 1
        try:
            async with asyncio.timeout(self.timeout):
                head = await reader.readuntil(b"\r\n\r\n")
                method, _, rest = head.partition(b" ")
                path = rest.partition(b" ")[0].partition(b"?")[0]
                if method not in (b"GET", b"HEAD"):
                    reply = _response("405 Method Not Allowed", b"GET /metrics\n")
                elif path not in (b"/metrics", b"/"):
                    reply = _response("404 Not Found", b"GET /metrics\n")
                else:
                    body = generate_latest(self.registry)
                    reply = _response(
                        "200 OK", b"" if method == b"HEAD" else body, CONTENT_TYPE_LATEST
                    )
                writer.write(reply)
                await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass  # idle, truncated or oversized request: just close
        except ConnectionError:
            pass
        finally:
            self.open -= 1
            writer.close()
            with contextlib.suppress(ConnectionError, TimeoutError):
                async with asyncio.timeout(1.0):
                    await writer.wait_closed()
