"""`/metrics` over HTTP on the service's own event loop, in bounded resources.

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

import structlog
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Histogram, generate_latest

log = structlog.get_logger("penalty.metrics")

MAX_HEAD = 8192  # bytes of request line + headers; Prometheus sends a few hundred

#: Latency buckets (seconds) of store round trips: from a pipelined Redis reply up to
#: the longest deadline of any call (admin calls, 2 s), so timeouts land in a bucket.
STORE_BUCKETS = (0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.5, 1.0, 2.0, 5.0)


def store_latency(service: str, what: str, registry: CollectorRegistry) -> Histogram:
    """`<service>_store_latency_seconds{op}`: one definition for every service's store."""
    return Histogram(
        f"{service}_store_latency_seconds",
        f"{what} round trips, by operation",
        ["op"],
        buckets=STORE_BUCKETS,
        registry=registry,
    )


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
