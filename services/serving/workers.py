"""`workers`: N processes of a service sharing one listening port (SO_REUSEPORT).

A grpc.aio process uses one core at most (the GIL); on a host with many cores, N workers
accept connections on the same port and the kernel spreads connections over them. Each
worker is a whole replica (its own store connections, feed and view), so this only makes
sense on a shared store: with the embedded store each process would have its own
penalties, and the settings refuse it.

The first process supervises: it starts workers 1..N-1 as children running the same
command line (told their index by `<PREFIX>_WORKER_INDEX`), serves as worker 0 itself,
restarts a child that dies (with backoff), and on SIGTERM/SIGINT stops them all and waits.
Worker i serves /metrics on the metrics port + i, so each is scraped on its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import Sequence

import structlog

log = structlog.get_logger("serving.workers")


def worker_index(env_prefix: str) -> int:
    """This process's worker index (0 for the supervisor, or a single process)."""
    return int(os.environ.get(f"{env_prefix}_WORKER_INDEX", "0") or 0)


def metrics_listen_of(metrics_listen: str, index: int) -> str:
    """Worker i's /metrics address: the configured port + i (empty stays empty)."""
    if not metrics_listen or not index:
        return metrics_listen
    host, _, port = metrics_listen.rpartition(":")
    return f"{host}:{int(port) + index}"


class Supervisor:
    """Starts and keeps workers 1..n-1 running as child processes of the same command."""

    def __init__(self, n: int, module: str, argv: Sequence[str], env_prefix: str) -> None:
        self.n = n
        self.module = module
        self.argv = list(argv)
        self.env_prefix = env_prefix
        self.children: dict[int, asyncio.subprocess.Process] = {}
        self.restarts = 0
        self._stopping = False
        self._tasks: list[asyncio.Task[None]] = []

    async def _spawn(self, index: int) -> asyncio.subprocess.Process:
        env = {**os.environ, f"{self.env_prefix}_WORKER_INDEX": str(index)}
        return await asyncio.create_subprocess_exec(
            sys.executable, "-m", self.module, *self.argv, env=env
        )

    async def _keep(self, index: int) -> None:
        backoff = 0.5
        while not self._stopping:
            proc = await self._spawn(index)
            self.children[index] = proc
            log.info("worker_started", worker=index, pid=proc.pid)
            code = await proc.wait()
            if self._stopping:
                return
            self.restarts += 1
            log.warning("worker_exited", worker=index, code=code, restart_in_seconds=backoff)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 30.0)

    def start(self) -> None:
        for index in range(1, self.n):
            self._tasks.append(asyncio.create_task(self._keep(index), name=f"worker-{index}"))

    async def stop(self, within: float) -> None:
        """SIGTERM every worker (each drains its calls), then wait; SIGKILL stragglers."""
        self._stopping = True
        for proc in self.children.values():
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
        for proc in self.children.values():
            try:
                async with asyncio.timeout(within):
                    await proc.wait()
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
