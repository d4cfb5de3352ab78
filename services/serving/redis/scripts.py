"""A store's Lua scripts, run by SHA in one round trip, with one fallback.

The SHA is computed locally, so EVALSHA needs no round trip to learn it. A Redis that
restarted or flushed its script cache answers NOSCRIPT once: `run` falls back to EVAL
after loading every script once (`reload`, shared by every caller that met NOSCRIPT
meanwhile); `reload` also runs before a pipeline is retried.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Sequence
from importlib import resources
from typing import Any

from redis.exceptions import NoScriptError

from serving.redis.errors import mapped_errors


class Scripts:
    """`<package>/lua/<name>.lua` for each name, by SHA."""

    def __init__(self, package: str, names: Sequence[str]) -> None:
        self._by_name: dict[str, tuple[str, str]] = {}
        self._reloading: asyncio.Future[None] | None = None
        for name in names:
            src = resources.files(package).joinpath(f"lua/{name}.lua").read_text()
            self._by_name[name] = (hashlib.sha1(src.encode()).hexdigest(), src)

    def sha(self, name: str) -> str:
        return self._by_name[name][0]

    def source(self, name: str) -> str:
        return self._by_name[name][1]

    async def run(self, client: Any, name: str, keys: Sequence[str], args: Sequence[Any]) -> Any:
        """EVALSHA `name`; after NOSCRIPT, every script is loaded once (`reload`) and the
        call is sent again (EVAL if the cache was flushed once more meanwhile). redis-py
        errors mapped to the store tree."""
        sha, src = self._by_name[name]
        with mapped_errors():
            try:
                return await client.evalsha(sha, len(keys), *keys, *args)
            except NoScriptError:
                pass
            await self.reload(client)
            try:
                return await client.evalsha(sha, len(keys), *keys, *args)
            except NoScriptError:
                return await client.eval(src, len(keys), *keys, *args)

    async def reload(self, client: Any) -> None:
        """SCRIPT LOAD every script (after NOSCRIPT: a restarted or flushed Redis). Callers
        meeting NOSCRIPT together share one load: a burst of concurrent calls after a
        restart costs one SCRIPT LOAD per script, not an EVAL of its source per call."""
        task = self._reloading
        if task is None or task.done():
            task = self._reloading = asyncio.ensure_future(self._load_all(client))
            task.add_done_callback(_retrieved)
        await asyncio.shield(task)  # a caller's deadline does not cancel the others' load

    async def _load_all(self, client: Any) -> None:
        for _, src in self._by_name.values():
            await client.script_load(src)


def _retrieved(task: asyncio.Future[None]) -> None:
    """Every waiter may have given up (their deadlines): the outcome is still read."""
    if not task.cancelled():
        task.exception()
