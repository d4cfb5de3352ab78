"""In-process servers bound to port 0, with stubs: the tests' penaltyd and relaycheck.

Tests talk to the real grpc.aio server (never a mock); `serve_penaltyd` and
`serving_relaycheck` start it with the settings given and clean up after the test, in
the style of httpx's and redis-py's fixtures (the conftests wrap them as fixtures).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc

from penalty.v1 import penalty_pb2_grpc
from penaltyd.server import Running as PenaltydRunning
from penaltyd.server import start_server as start_penaltyd
from penaltyd.settings import Settings as PenaltydSettings
from penaltyd.store.base import Store
from relaycheck.metrics import Metrics
from relaycheck.report import PenaltyReporter
from relaycheck.server import Running, start_server
from relaycheck.settings import Settings
from relaycheck.store.base import CustomerStore
from relaycheck.v1 import relaycheck_pb2_grpc as pbg


class Served:
    """A running in-process penaltyd and stubs bound to it."""

    def __init__(self, running: PenaltydRunning, channel: grpc.aio.Channel) -> None:
        self.running = running
        self.channel = channel
        self.address = f"127.0.0.1:{running.port}"
        self.service = penalty_pb2_grpc.PenaltyServiceStub(channel)
        self.admin = penalty_pb2_grpc.PenaltyAdminStub(channel)

    @property
    def engine(self) -> Any:
        return self.running.engine


ServeFactory = Callable[..., Awaitable[Served]]


@contextlib.asynccontextmanager
async def penaltyd_factory() -> AsyncIterator[ServeFactory]:
    """A factory of in-process penaltyds (on a given store, with settings overrides);
    every one it started is stopped on exit."""
    started: list[Served] = []

    async def factory(store: Store | None = None, **overrides: Any) -> Served:
        settings = PenaltydSettings(**{"listen": "127.0.0.1:0", **overrides})
        running = await start_penaltyd(settings, store=store)
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{running.port}")
        served = Served(running, channel)
        started.append(served)
        return served

    try:
        yield factory
    finally:
        for s in started:
            await s.channel.close()
            await s.running.stop(grace=0)


@dataclass
class RelaycheckServed:
    """A running in-process relaycheck and a stub bound to it."""

    running: Running
    channel: grpc.aio.Channel
    stub: pbg.RelayCheckStub
    address: str

    @property
    def metrics(self) -> Metrics:
        return self.running.engine.metrics


@contextlib.asynccontextmanager
async def relaycheck_serving(
    store: CustomerStore | None = None,
    reporter: PenaltyReporter | None = None,
    **overrides: Any,
) -> AsyncIterator[RelaycheckServed]:
    settings = Settings(**{"listen": "127.0.0.1:0", **overrides})
    running = await start_server(settings, store=store, reporter=reporter)
    address = f"127.0.0.1:{running.port}"
    channel = grpc.aio.insecure_channel(address)
    try:
        yield RelaycheckServed(running, channel, pbg.RelayCheckStub(channel), address)
    finally:
        await channel.close()
        await running.stop(grace=0)
