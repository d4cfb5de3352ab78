"""Errors every service answers the same way (DESIGN.md s. 6), mapped once at the RPC
boundary: bad input is INVALID_ARGUMENT naming the field, store trouble on an operator
call is UNAVAILABLE (or DEADLINE_EXCEEDED), never INTERNAL.

- `BadField`: a request field that fails validation (raised by each service's validator).
- `BadMessage`: what the guarded deserializer hands a servicer instead of raising.
- The store exception tree, the same for every store of every service (httpx-style:
  typed exceptions per layer, mapped once)::

      StoreError
       ├── StoreUnavailable      no answer in time, connection lost: fail open
       └── StoreMisconfigured    the store answered but cannot serve us (bad URL, auth)

  A service adds its own leaves (relaycheck's `NetworkConflict`).
- `abort_invalid`, `abort_store_error`: end a call with the right status, once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NoReturn, Protocol

import grpc


class BadField(ValueError):
    """A request field that fails validation; the API answers INVALID_ARGUMENT naming it."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


@dataclass(frozen=True, slots=True)
class BadMessage:
    """What the guarded deserializer returns instead of raising.

    `id` is field 1 of the undecodable message when it could be read (a stream's request
    id, so a stream can answer that one message and go on)."""

    field: str
    message: str
    id: int = 0


class StoreError(Exception):
    """Base of everything a store raises."""


class StoreUnavailable(StoreError):
    """The store did not answer within the deadline or cannot be reached: fail open."""


class StoreMisconfigured(StoreError):
    """The store answered but cannot serve us (bad URL, auth, missing commands)."""


class _Counter(Protocol):
    def inc(self, amount: float = 1) -> None: ...


async def abort_invalid(
    context: grpc.aio.ServicerContext, err: BadField | BadMessage, counter: _Counter
) -> NoReturn:
    """End the call with INVALID_ARGUMENT naming the field, counted in `counter`."""
    counter.inc()
    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{err.field}: {err.message}")
    raise AssertionError("abort returned")  # pragma: no cover - abort always raises


async def abort_store_error(context: grpc.aio.ServicerContext, exc: Exception) -> NoReturn:
    """Operator calls fail when the store does not answer: an operator wants to know.

    A store deadline is DEADLINE_EXCEEDED, any other store error UNAVAILABLE.
    """
    code = (
        grpc.StatusCode.DEADLINE_EXCEEDED
        if isinstance(exc, TimeoutError)
        else grpc.StatusCode.UNAVAILABLE
    )
    await context.abort(code, f"store: {exc or type(exc).__name__}")
    raise AssertionError("abort returned")  # pragma: no cover - abort always raises
