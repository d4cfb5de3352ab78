"""Who may call: operator calls behind an admin token, service calls behind per-caller
tokens or mutual TLS. One implementation for every service, constant-time checks.

`operator_call` wraps an operator method once for every service: the gate, then the
errors mapped to status codes (bad input, the service's own refusals, store trouble)."""

from __future__ import annotations

import functools
import hmac
import ipaddress
import os
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Protocol, TypeVar

import grpc

from serving.errors import BadField, BadMessage, StoreError, abort_invalid, abort_store_error

R = TypeVar("R")


class _Counter(Protocol):
    def inc(self, amount: float = 1) -> None: ...


class AdminGate:
    """Operator calls need `authorization: Bearer <admin_token>` (UNAUTHENTICATED otherwise).

    Without a configured token they answer only on a loopback listener, for a single
    node's operator; elsewhere they are PERMISSION_DENIED, so a forgotten token never
    opens the operator API to the network. `api` names it in the messages ("admin",
    "operator") and `env_var` says how to set the token.
    """

    @classmethod
    def for_settings(cls, settings: Any, *, api: str, env_var: str) -> AdminGate:
        """The gate of a service's `admin_token` on its `listen` address."""
        return cls(
            settings.admin_token.get_secret_value(), settings.listen, api=api, env_var=env_var
        )

    def __init__(self, token: str, listen: str, *, api: str, env_var: str) -> None:
        self._expected = f"Bearer {token}".encode() if token else None
        self._api = api
        self._env_var = env_var
        host = listen.rpartition(":")[0].strip("[]")
        try:
            self._loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
        except ValueError:
            self._loopback = False

    async def authorize(self, context: grpc.aio.ServicerContext) -> None:
        if self._expected is None:
            if not self._loopback:
                await context.abort(
                    grpc.StatusCode.PERMISSION_DENIED,
                    f"{self._api} API disabled: set admin_token ({self._env_var}) to enable it",
                )
            return
        for key, value in context.invocation_metadata() or ():
            if key == "authorization":
                got = value.encode() if isinstance(value, str) else value
                if hmac.compare_digest(got, self._expected):
                    return
        await context.abort(
            grpc.StatusCode.UNAUTHENTICATED,
            f"{self._api} calls need authorization: Bearer <admin_token>",
        )


class CallerGate:
    """Who may use a service API: bearer tokens per caller (an MX each) and/or mTLS.

    `tokens` maps a caller's name to its token. A presented token is looked up by its
    keyed digest (HMAC with a per-process random key), so the lookup reveals nothing
    about tokens through timing, however many there are. With `mtls`, the TLS layer has
    already demanded a certificate from the configured CA: every caller is authenticated
    and named by its certificate's common name.
    """

    def __init__(self, tokens: dict[str, str], *, mtls: bool = False) -> None:
        self._key = os.urandom(32)
        self._names = {self._digest(f"Bearer {t}".encode()): n for n, t in tokens.items() if t}
        self._mtls = mtls

    @property
    def enabled(self) -> bool:
        return bool(self._names) or self._mtls

    def _digest(self, presented: bytes) -> bytes:
        return hmac.new(self._key, presented, "sha256").digest()

    def caller(self, context: grpc.aio.ServicerContext) -> str | None:
        """The authenticated caller's name, or None."""
        for key, value in context.invocation_metadata() or ():
            if key == "authorization":
                got = value.encode() if isinstance(value, str) else value
                name = self._names.get(self._digest(got))
                if name is not None:
                    return name
        if self._mtls:
            names = (context.auth_context() or {}).get("x509_common_name") or [b"mtls"]
            return bytes(names[0]).decode("utf-8", "replace")
        return None

    async def authorize(self, context: grpc.aio.ServicerContext, what: str) -> str:
        """The caller's name, or end the call with UNAUTHENTICATED."""
        name = self.caller(context)
        if name is None:
            await context.abort(
                grpc.StatusCode.UNAUTHENTICATED,
                f"{what} needs authorization: Bearer <token> (a service token of this MX)",
            )
            raise AssertionError("abort returned")  # pragma: no cover
        return name


class _OperatorServicer(Protocol):
    gate: AdminGate
    invalid_requests: _Counter


Refusal = Callable[[Exception], tuple[grpc.StatusCode, str]]
OperatorMethod = Callable[[Any, Any, grpc.aio.ServicerContext], Awaitable[R]]


def operator_call(
    refusals: Mapping[type[Exception], Refusal] | None = None,
) -> Callable[[OperatorMethod[R]], OperatorMethod[R]]:
    """Decorate an operator (admin) method: authorize with the servicer's `gate`, refuse
    undecodable requests and `BadField`s with INVALID_ARGUMENT (counted in the servicer's
    `invalid_requests`), answer the service's own exceptions as `refusals` say, and store
    trouble with UNAVAILABLE/DEADLINE_EXCEEDED: once, for every operator API."""
    table = dict(refusals or {})

    def decorate(method: OperatorMethod[R]) -> OperatorMethod[R]:
        @functools.wraps(method)
        async def wrapper(
            self: _OperatorServicer, request: Any, context: grpc.aio.ServicerContext
        ) -> R:
            await self.gate.authorize(context)
            if isinstance(request, BadMessage):
                await abort_invalid(context, request, self.invalid_requests)
            try:
                return await method(self, request, context)
            except BadField as err:
                await abort_invalid(context, err, self.invalid_requests)
            except Exception as exc:
                for kind, refuse in table.items():
                    if isinstance(exc, kind):
                        code, message = refuse(exc)
                        await context.abort(code, message)
                if isinstance(exc, StoreError | TimeoutError):
                    await abort_store_error(context, exc)
                raise
            raise AssertionError("abort returned")  # pragma: no cover

        return wrapper

    return decorate
