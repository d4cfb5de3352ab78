"""redis-py's exceptions mapped once to the store tree of `serving.errors`
(httpx-style: `raise ... from exc` at one place)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from redis.exceptions import AuthenticationError, RedisClusterException, RedisError, ResponseError

from serving.errors import StoreMisconfigured, StoreUnavailable

#: Replies that say "not now" rather than "never": a replica being promoted, a dataset
#: loading, a script running, a Cluster resharding or missing slots.
TRANSIENT = ("LOADING", "BUSY", "READONLY", "MASTERDOWN", "TRYAGAIN", "CLUSTERDOWN")


@contextlib.asynccontextmanager
async def mapped_errors() -> AsyncIterator[None]:
    """Turn redis-py errors raised inside into `StoreUnavailable` (fail open) or
    `StoreMisconfigured` (the store answers but cannot serve us)."""
    try:
        yield
    except AuthenticationError as exc:
        raise StoreMisconfigured(f"redis refused our credentials: {exc}") from exc
    except RedisClusterException as exc:  # not a RedisError: "slots not covered", no nodes
        raise StoreUnavailable(f"redis cluster unavailable: {exc}") from exc
    except (RedisError, OSError) as exc:
        if isinstance(exc, ResponseError) and not str(exc).startswith(TRANSIENT):
            raise StoreMisconfigured(f"redis error: {exc}") from exc
        raise StoreUnavailable(f"redis unavailable: {exc or type(exc).__name__}") from exc
