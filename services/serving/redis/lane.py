"""A lean lane for single script calls on one Redis node: one connection, hiredis replies.

redis-py's asyncio client costs ~85-140 µs of CPU per command here (a pool checkout and
release, a retry wrapper, event dispatch and observability hooks, two parser calls),
against ~15-20 µs for the same EVALSHA written on a plain asyncio transport and parsed
by hiredis (measured on the reference machine, `docs/performance.md`). A unary Report
is one EVALSHA, so that overhead was a fifth of its server CPU.

`Lane` keeps one connection and pipelines every call on it in order (Redis answers a
connection's commands in order): the reply to the n-th command written completes the
n-th waiter. A waiter whose caller gave up (its deadline) stays in the queue until its
reply arrives and is then dropped. Errors are those of redis-py: a reply error is parsed
by redis-py's own parser (`NoScriptError`, `BusyLoadingError`, `ResponseError`, ...), a
lost connection fails every waiter with `redis.exceptions.ConnectionError`, and the
next call connects again; a call that met a connection the server had closed meanwhile
is sent once more on a new one, as redis-py's `Retry(NoBackoff(), 1)` does. So
`serving.redis.errors.mapped_errors` maps everything the same way.

Only for a plain single node (`redis://`): TLS, unix sockets, Sentinel and Cluster keep
redis-py for everything. Pipelines, pub/sub and every other command keep redis-py too.
"""

from __future__ import annotations

import asyncio
import collections
from typing import Any

import hiredis
import redis.asyncio as aioredis
from redis._parsers.base import BaseParser
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import InvalidResponse

#: Waiters queued on the lane beyond which the connection is dropped (a Redis that has
#: stopped answering; every caller has already met its own deadline by then).
MAX_WAITERS = 10_000


class _Protocol(asyncio.Protocol):
    def __init__(self) -> None:
        self.reader = hiredis.Reader(
            protocolError=InvalidResponse, replyError=BaseParser.parse_error
        )
        self.waiters: collections.deque[asyncio.Future[Any]] = collections.deque()
        self.transport: asyncio.Transport | None = None
        self.lost = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # a stream transport

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        waiters = self.waiters
        while True:
            try:
                reply = self.reader.gets()
            except Exception as exc:  # a protocol error: nothing after it can be trusted
                self._fail(RedisConnectionError(f"redis protocol error: {exc}"))
                if self.transport is not None:
                    self.transport.abort()
                return
            if reply is False:
                return
            if not waiters:  # a reply nobody asked for: the stream is out of step
                self._fail(RedisConnectionError("redis sent an unexpected reply"))
                if self.transport is not None:
                    self.transport.abort()
                return
            fut = waiters.popleft()
            if fut.done():  # its caller gave up (deadline)
                continue
            if isinstance(reply, Exception):
                fut.set_exception(reply)
            else:
                fut.set_result(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self._fail(RedisConnectionError(f"connection to redis lost: {exc or 'closed by server'}"))

    def _fail(self, exc: Exception) -> None:
        self.lost = True
        while self.waiters:
            fut = self.waiters.popleft()
            if not fut.done():
                fut.set_exception(exc)


class Lane:
    """One pipelined connection for single commands (see the module docstring)."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        db: int = 0,
        username: str | None = None,
        password: str | None = None,
        connect_timeout: float | None = 0.5,
    ) -> None:
        self.host, self.port, self.db = host, port, db
        self.username, self.password = username, password
        self.connect_timeout = connect_timeout
        self._proto: _Protocol | None = None
        self._connecting: asyncio.Lock | None = None
        self.connects = 0
        self.closed = False

    async def execute(self, *args: Any) -> Any:
        """Send one command and return its reply (raises redis-py's exceptions)."""
        proto = self._proto
        if proto is None or proto.lost:
            proto = await self._connect()
        fresh = self.connects
        try:
            return await self._send(proto, args)
        except RedisConnectionError:
            if self.closed or self.connects != fresh:
                raise
            # The server closed a connection we still held (a restart): once more, anew.
            return await self._send(await self._connect(), args)

    def _send(self, proto: _Protocol, args: tuple[Any, ...]) -> asyncio.Future[Any]:
        if proto.lost or proto.transport is None:
            raise RedisConnectionError("connection to redis lost")
        if len(proto.waiters) >= MAX_WAITERS:
            proto.transport.abort()
            raise RedisConnectionError(f"redis has not answered {MAX_WAITERS} commands")
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        proto.waiters.append(fut)
        proto.transport.write(hiredis.pack_command(args))
        return fut

    async def _connect(self) -> _Protocol:
        if self.closed:
            raise RedisConnectionError("lane closed")
        if self._connecting is None:
            self._connecting = asyncio.Lock()
        async with self._connecting:
            proto = self._proto
            if proto is not None and not proto.lost:
                return proto  # another caller connected meanwhile
            proto = None
            loop = asyncio.get_running_loop()
            try:
                async with asyncio.timeout(self.connect_timeout):
                    _, proto = await loop.create_connection(_Protocol, self.host, self.port)
                    setup: list[tuple[Any, ...]] = []
                    if self.password is not None:
                        auth = (self.username, self.password) if self.username else (self.password,)
                        setup.append(("AUTH", *auth))
                    if self.db:
                        setup.append(("SELECT", self.db))
                    for command in setup:
                        await self._send(proto, command)
            except TimeoutError as exc:
                if proto is not None and proto.transport is not None:
                    proto.transport.abort()
                raise RedisConnectionError(
                    f"connecting to redis at {self.host}:{self.port} timed out"
                ) from exc
            except OSError as exc:  # refused, unreachable: as redis-py says it
                raise RedisConnectionError(
                    f"error connecting to redis at {self.host}:{self.port}: {exc}"
                ) from exc
            except BaseException:
                if proto is not None and proto.transport is not None:
                    proto.transport.abort()
                raise
            self._proto = proto
            self.connects += 1
            return proto

    def close(self) -> None:
        self.closed = True
        if self._proto is not None and self._proto.transport is not None:
            self._proto.transport.close()
        self._proto = None


class LaneRedis(aioredis.Redis):
    """redis-py's client, whose EVALSHA goes through a `Lane` (everything else as before)."""

    lane: Lane

    def attach_lane(self) -> None:
        kw = self.connection_pool.connection_kwargs
        self.lane = Lane(
            kw.get("host", "localhost"),
            int(kw.get("port", 6379)),
            db=int(kw.get("db", 0) or 0),
            username=kw.get("username"),
            password=kw.get("password"),
            connect_timeout=kw.get("socket_connect_timeout"),
        )

    async def evalsha(self, sha: str, numkeys: int, *keys_and_args: Any) -> Any:
        return await self.lane.execute("EVALSHA", sha, numkeys, *keys_and_args)

    async def aclose(self, close_connection_pool: bool | None = None) -> None:
        self.lane.close()
        await super().aclose(close_connection_pool)
