"""redis-py's exceptions mapped once to the store tree of `serving.errors`
(httpx-style: `raise ... from exc` at one place)."""

from __future__ import annotations

from types import TracebackType

from redis.exceptions import AuthenticationError, RedisClusterException, RedisError, ResponseError

from serving.errors import StoreMisconfigured, StoreUnavailable

#: Replies that say "not now" rather than "never": a replica being promoted, a dataset
#: loading, a script running, a Cluster resharding or missing slots.
TRANSIENT = ("LOADING", "BUSY", "READONLY", "MASTERDOWN", "TRYAGAIN", "CLUSTERDOWN")


class _Mapped:
    """The context manager `mapped_errors` returns (usable with `with` and `async with`):
    a class rather than an `asynccontextmanager`, which costs a generator, a context
    object and four extra calls on every store call of the hot path."""

    __slots__ = ()

    def __enter__(self) -> None:
        return None

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is not None:
            _raise_mapped(exc)

    async def __aenter__(self) -> None:
        return None

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.__exit__(exc_type, exc, tb)


_MAPPED = _Mapped()


def mapped_errors() -> _Mapped:
    """Turn redis-py errors raised inside into `StoreUnavailable` (fail open) or
    `StoreMisconfigured` (the store answers but cannot serve us); anything else passes."""
    return _MAPPED


def _raise_mapped(exc: BaseException) -> None:
    if isinstance(exc, AuthenticationError):
        raise StoreMisconfigured(f"redis refused our credentials: {exc}") from exc
    if isinstance(exc, RedisClusterException):  # not a RedisError: "slots not covered", no nodes
        raise StoreUnavailable(f"redis cluster unavailable: {exc}") from exc
    if isinstance(exc, RedisError | OSError):
        if isinstance(exc, ResponseError) and not str(exc).startswith(TRANSIENT):
            raise StoreMisconfigured(f"redis error: {exc}") from exc
        raise StoreUnavailable(f"redis unavailable: {exc or type(exc).__name__}") from exc
