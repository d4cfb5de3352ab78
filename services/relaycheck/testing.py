"""Real servers for tests: an in-process relaycheck and a `relaycheck serve` process.

Tests talk to a real grpc.aio server bound to port 0 (never a mock), started and
stopped here so every test file uses one implementation. Nothing here is imported by
the service itself.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from relaycheck.metrics import Metrics
from relaycheck.report import PenaltyReporter
from relaycheck.server import Running, start_server
from relaycheck.settings import Settings
from relaycheck.store.base import CustomerStore
from relaycheck.v1 import relaycheck_pb2_grpc as pbg


def free_port(host: str = "127.0.0.1") -> int:
    """A currently free TCP port on `host`."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def wait_port(
    host: str, port: int, timeout: float = 10.0, proc: subprocess.Popen[bytes] | None = None
) -> None:
    """Block until something accepts connections on host:port (or the process died):
    a child process has no other way to say it is listening."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening on {port}")
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.2):
            return
        time.sleep(0.02)
    raise TimeoutError(f"nothing listening on {host}:{port} after {timeout} s")


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


class RelaycheckProcess:
    """`relaycheck serve` as a child process (the real CLI), for signal tests."""

    def __init__(self, *args: str, port: int, env: dict[str, str] | None = None) -> None:
        self.port = port
        self.address = f"127.0.0.1:{port}"
        self.args = ["serve", "--listen", self.address, *args]
        self.env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None
        fd, self.log_path = tempfile.mkstemp(prefix="relaycheck-", suffix=".log")
        os.close(fd)

    def start(self) -> RelaycheckProcess:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "relaycheck", *self.args],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
            )
        wait_port("127.0.0.1", self.port, proc=self.proc)
        return self

    def output(self) -> str:
        return Path(self.log_path).read_text()

    def stop(self, timeout: float = 10.0) -> int:
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def __enter__(self) -> RelaycheckProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
        with contextlib.suppress(OSError):
            os.unlink(self.log_path)
