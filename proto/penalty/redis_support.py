"""What penaltyd's and relaycheck's Redis stores share: Lua scripts loaded by SHA, and
redis-py's exceptions mapped once to a store's own "unavailable" (fail open) and
"misconfigured" errors (httpx-style: `raise ... from exc` at one place)."""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import AsyncIterator, Callable, Sequence
from importlib import resources

from redis.exceptions import AuthenticationError, RedisClusterException, RedisError, ResponseError

#: Replies that say "not now" rather than "never": a replica being promoted, a dataset
#: loading, a script running, a Cluster resharding or missing slots.
TRANSIENT = ("LOADING", "BUSY", "READONLY", "MASTERDOWN", "TRYAGAIN", "CLUSTERDOWN")


def load_scripts(package: str, names: Sequence[str]) -> dict[str, tuple[str, str]]:
    """name -> (sha1, source) of `<package>/lua/<name>.lua`; the SHA is computed locally so
    EVALSHA needs no round trip."""
    out = {}
    for name in names:
        src = resources.files(package).joinpath(f"lua/{name}.lua").read_text()
        out[name] = (hashlib.sha1(src.encode()).hexdigest(), src)
    return out


def error_mapper(
    unavailable: Callable[[str], Exception], misconfigured: Callable[[str], Exception]
) -> Callable[[], contextlib.AbstractAsyncContextManager[None]]:
    """A context manager factory turning redis-py errors into the store's own."""

    @contextlib.asynccontextmanager
    async def mapped() -> AsyncIterator[None]:
        try:
            yield
        except AuthenticationError as exc:
            raise misconfigured(f"redis refused our credentials: {exc}") from exc
        except RedisClusterException as exc:  # not a RedisError: "slots not covered", no nodes
            raise unavailable(f"redis cluster unavailable: {exc}") from exc
        except (RedisError, OSError) as exc:
            if isinstance(exc, ResponseError) and not str(exc).startswith(TRANSIENT):
                raise misconfigured(f"redis error: {exc}") from exc
            raise unavailable(f"redis unavailable: {exc or type(exc).__name__}") from exc

    return mapped
