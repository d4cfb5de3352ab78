"""Coalesce concurrent unary calls into one store round trip.

Python spends far more CPU per Redis round trip than Redis does (DESIGN.md s. 12a).
Single flight: when nothing is on the wire a call goes at once, with no hand-off (one
call in flight costs nothing extra); calls that arrive while one is on the wire queue up
and leave together, in one pipeline, when it returns. Under load the batches grow by
themselves; idle, there is no waiting.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")


class Coalescer(Generic[T, R]):
    def __init__(
        self, fn: Callable[[Sequence[T]], Awaitable[Sequence[R]]], *, max_batch: int = 256
    ) -> None:
        self._fn = fn
        self._max_batch = max_batch
        self._pending: list[tuple[T, asyncio.Future[R]]] = []
        self._busy = False  # a store call is on the wire
        self._tasks: set[asyncio.Task[None]] = set()
        self.batches = 0
        self.items = 0

    async def submit(self, item: T) -> R:
        if not self._busy:
            self._busy = True
            try:
                self.batches += 1
                self.items += 1
                return (await self._fn([item]))[0]
            finally:
                self._busy = False
                self._next()
        fut: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._pending.append((item, fut))
        return await fut

    def _next(self) -> None:
        """Send what queued meanwhile, as one batch (if nothing else is on the wire)."""
        if self._busy or not self._pending:
            return
        batch = self._pending[: self._max_batch]
        del self._pending[: self._max_batch]
        live = [(item, fut) for item, fut in batch if not fut.done()]
        if not live:
            self._next()
            return
        self._busy = True
        task = asyncio.create_task(self._send(live), name="coalesced-batch")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _send(self, live: list[tuple[T, asyncio.Future[R]]]) -> None:
        try:
            self.batches += 1
            self.items += len(live)
            results = await self._fn([item for item, _ in live])
        except Exception as exc:  # handed to every waiter: each call maps it itself
            for _, fut in live:
                if not fut.done():
                    fut.set_exception(exc)
        else:
            for (_, fut), result in zip(live, results, strict=True):
                if not fut.done():
                    fut.set_result(result)
        finally:
            self._busy = False
            self._next()

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        for _, fut in self._pending:
            fut.cancel()
        self._pending.clear()
