"""Coalesce concurrent unary calls into one store round trip.

Python spends far more CPU per Redis round trip than Redis does (DESIGN.md s. 12a), so
reports that arrive while another batch is on the wire wait for the next batch and share
its pipeline. At one call in flight this costs one event-loop hop; at 64 in flight it
turns 64 round trips into a handful.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")


class Coalescer(Generic[T, R]):
    def __init__(
        self,
        fn: Callable[[Sequence[T]], Awaitable[Sequence[R]]],
        *,
        max_batch: int = 256,
        workers: int = 2,
    ) -> None:
        self._fn = fn
        self._max_batch = max_batch
        self._pending: list[tuple[T, asyncio.Future[R]]] = []
        self._wakeup = asyncio.Event()
        self._workers = [
            asyncio.create_task(self._work(), name="coalescer") for _ in range(workers)
        ]

    async def submit(self, item: T) -> R:
        fut: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._pending.append((item, fut))
        self._wakeup.set()
        return await fut

    async def _work(self) -> None:
        while True:
            await self._wakeup.wait()
            if not self._pending:
                self._wakeup.clear()
                continue
            batch = self._pending[: self._max_batch]
            del self._pending[: self._max_batch]
            live = [(item, fut) for item, fut in batch if not fut.done()]
            if not live:
                continue
            try:
                results = await self._fn([item for item, _ in live])
            except Exception as exc:  # handed to every waiter: each call maps it itself
                for _, fut in live:
                    if not fut.done():
                        fut.set_exception(exc)
            else:
                for (_, fut), result in zip(live, results, strict=True):
                    if not fut.done():
                        fut.set_result(result)

    async def close(self) -> None:
        for task in self._workers:
            task.cancel()
        for task in self._workers:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for _, fut in self._pending:
            fut.cancel()
