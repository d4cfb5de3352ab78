"""A store's Lua scripts, run by SHA in one round trip, with one fallback.

The SHA is computed locally, so EVALSHA needs no round trip to learn it. A Redis that
restarted or flushed its script cache answers NOSCRIPT once: `run` falls back to EVAL
(which caches it again), `reload` sends every script before a pipeline is retried.
"""

from __future__ import annotations

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
        for name in names:
            src = resources.files(package).joinpath(f"lua/{name}.lua").read_text()
            self._by_name[name] = (hashlib.sha1(src.encode()).hexdigest(), src)

    def sha(self, name: str) -> str:
        return self._by_name[name][0]

    def source(self, name: str) -> str:
        return self._by_name[name][1]

    async def run(self, client: Any, name: str, keys: Sequence[str], args: Sequence[Any]) -> Any:
        """EVALSHA `name` (EVAL after NOSCRIPT); redis-py errors mapped to the store tree."""
        sha, src = self._by_name[name]
        with mapped_errors():
            try:
                return await client.evalsha(sha, len(keys), *keys, *args)
            except NoScriptError:
                return await client.eval(src, len(keys), *keys, *args)

    async def reload(self, client: Any) -> None:
        """SCRIPT LOAD every script (after NOSCRIPT in a pipeline)."""
        for _, src in self._by_name.values():
            await client.script_load(src)
