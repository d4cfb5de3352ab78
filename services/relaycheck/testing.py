"""Real servers for tests: an in-process relaycheck and a `relaycheck serve` process.

Tests talk to a real grpc.aio server bound to port 0 (never a mock), started and
stopped here so every test file uses one implementation. Free ports, redis-servers and
the child-process mechanics are shared with penaltyd in `penalty.testing`. Nothing here
is imported by the service itself.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import grpc

from penalty.testing import ServiceProcess
from relaycheck.metrics import Metrics
from relaycheck.report import PenaltyReporter
from relaycheck.server import Running, start_server
from relaycheck.settings import Settings
from relaycheck.store.base import CustomerStore
from relaycheck.v1 import relaycheck_pb2_grpc as pbg


@dataclass
class Served:
    """A running in-process relaycheck and a stub bound to it."""

    running: Running
    channel: grpc.aio.Channel
    stub: pbg.RelayCheckStub
    address: str

    @property
    def metrics(self) -> Metrics:
        return self.running.engine.metrics


@contextlib.asynccontextmanager
async def serving(
    store: CustomerStore | None = None,
    reporter: PenaltyReporter | None = None,
    **overrides: Any,
) -> AsyncIterator[Served]:
    settings = Settings(**{"listen": "127.0.0.1:0", **overrides})
    running = await start_server(settings, store=store, reporter=reporter)
    address = f"127.0.0.1:{running.port}"
    channel = grpc.aio.insecure_channel(address)
    try:
        yield Served(running, channel, pbg.RelayCheckStub(channel), address)
    finally:
        await channel.close()
        await running.stop(grace=0)


class RelaycheckProcess(ServiceProcess):
    """`relaycheck serve` as a child process (the real CLI), for signal tests."""

    def __init__(self, *args: str, port: int, env: dict[str, str] | None = None) -> None:
        super().__init__("relaycheck", ["serve", "--listen", f"127.0.0.1:{port}", *args], port, env)
