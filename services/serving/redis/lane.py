"""A lean lane for single script calls on one Redis node: one connection, hiredis replies.

redis-py's asyncio client costs ~85-140 µs of CPU per command here (a pool checkout and
release, a retry wrapper, event dispatch and observability hooks, two parser calls),
against ~15-20 µs for the same EVALSHA written on a plain asyncio transport and parsed
by hiredis (measured on the reference machine, `docs/performance.md`). A unary Report
is one EVALSHA, so that overhead was a fifth of its server CPU.

`Lane` keeps one connection and pipelines every call on it in order (Redis answers a
connection's commands in order): the reply to the n-th command written completes the
n-th waiter. Single flight: a command finding nothing on the wire is written at once;
commands made while a batch is on the wire wait for it and then leave together, in one
write (one syscall, one wake-up of Redis and of us for the lot: under load, concurrent
reports share round trips without any timer; idle, nothing waits). A waiter whose
caller gave up (its deadline) stays in the queue until its reply arrives and is then
dropped. Errors are those of redis-py: a reply error is parsed by redis-py's own parser
(`NoScriptError`, `BusyLoadingError`, `ResponseError`, ...), a lost connection fails
every waiter with `redis.exceptions.ConnectionError`, and the next call connects again;
a call that met a connection the server had closed meanwhile is sent once more on a
new one, as redis-py's `Retry(NoBackoff(), 1)` does. So
`serving.redis.errors.mapped_errors` maps everything the same way.

Only for a plain single node (`redis://`): TLS, unix sockets, Sentinel and Cluster keep
redis-py for everything. On the lane: EVALSHA, and short non-transactional pipelines
(`LanePipeline`: the coalesced reports, a penalty start); pub/sub, transactions, long
pipelines and every other command keep redis-py.
"""

from __future__ import annotations

import asyncio
import collections
import inspect
from collections.abc import Sequence
from typing import Any

import hiredis
import redis.asyncio as aioredis
from redis._parsers.base import BaseParser
from redis._parsers.response_callbacks import get_response_callbacks
from redis.asyncio.client import Pipeline
from redis.client import EMPTY_RESPONSE, NEVER_DECODE, CaseInsensitiveDict
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
        self._out: list[bytes] = []  # commands waiting for the batch on the wire to return
        self._sent = 0  # commands written whose replies have not arrived yet
        self.writes = 0  # transport writes (each a batch of one or more commands)
        self.commands = 0  # commands written

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # a stream transport

    def send(self, packed: list[bytes]) -> None:
        """Write commands at once when nothing is on the wire; otherwise queue them behind
        the batch that is, to leave with every command queued meanwhile in one write (a
        pipeline's commands are never split over two writes)."""
        if self._sent:
            self._out.extend(packed)
        else:
            self._write(packed)

    def _write(self, out: list[bytes]) -> None:
        transport = self.transport
        if transport is None or self.lost:
            return  # the waiters are failed by connection_lost/_fail
        self._sent += len(out)
        self.writes += 1
        self.commands += len(out)
        transport.write(out[0] if len(out) == 1 else b"".join(out))

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
                if not self._sent and self._out:  # the batch on the wire is back: next one
                    out, self._out = self._out, []
                    self._write(out)
                return
            if not waiters:  # a reply nobody asked for: the stream is out of step
                self._fail(RedisConnectionError("redis sent an unexpected reply"))
                if self.transport is not None:
                    self.transport.abort()
                return
            fut = waiters.popleft()
            self._sent -= 1
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
        self._out.clear()
        while self.waiters:
            fut = self.waiters.popleft()
            if not fut.done():
                fut.set_exception(exc)


def _words(args: tuple[Any, ...]) -> tuple[Any, ...]:
    """A command as Redis reads it: redis-py names some in two words ("SCRIPT LOAD")."""
    if isinstance(args[0], str) and " " in args[0]:
        return (*args[0].split(), *args[1:])
    return args


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

    async def execute_many(self, commands: Sequence[tuple[Any, ...]]) -> list[Any]:
        """Send commands in one write and return their replies in order, a reply error as
        its exception (as a redis-py pipeline does); a lost connection raises, and a
        connection the server had closed meanwhile is met with one more try, as in
        `execute`."""
        packed = [hiredis.pack_command(_words(args)) for args in commands]
        proto = self._proto
        if proto is None or proto.lost:
            proto = await self._connect()
        fresh = self.connects
        try:
            return await self._gather(self._send_many(proto, packed))
        except RedisConnectionError:
            if self.closed or self.connects != fresh:
                raise
            return await self._gather(self._send_many(await self._connect(), packed))

    @staticmethod
    async def _gather(futures: list[asyncio.Future[Any]]) -> list[Any]:
        out: list[Any] = []
        failed: RedisConnectionError | None = None
        for fut in futures:  # a batch's replies usually arrive together: one wait
            try:
                out.append(await fut)
            except RedisConnectionError as exc:
                failed = failed or exc
            except Exception as exc:  # a reply error: its command's result
                out.append(exc)
        if failed is not None:
            raise failed
        return out

    @staticmethod
    def _room(proto: _Protocol, n: int) -> None:
        """Raise unless `n` more commands may go on `proto` (bounded waiters)."""
        if proto.lost or proto.transport is None:
            raise RedisConnectionError("connection to redis lost")
        if len(proto.waiters) + n > MAX_WAITERS:
            proto.transport.abort()
            raise RedisConnectionError(f"redis has not answered {MAX_WAITERS} commands")

    def _send_many(self, proto: _Protocol, packed: list[bytes]) -> list[asyncio.Future[Any]]:
        self._room(proto, len(packed))
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in packed]
        proto.waiters.extend(futures)
        proto.send(packed)
        return futures

    def _send(self, proto: _Protocol, args: tuple[Any, ...]) -> asyncio.Future[Any]:
        self._room(proto, 1)
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        proto.waiters.append(fut)
        proto.send([hiredis.pack_command(args)])
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

    def pipeline(self, transaction: bool = True, shard_hint: str | None = None) -> Pipeline:
        kw = self.connection_pool.connection_kwargs
        if kw.get("protocol") not in (None, 2, "2") or not kw.get("legacy_responses", True):
            return super().pipeline(transaction, shard_hint)  # shapes the lane cannot give
        return LanePipeline(self.lane, self.connection_pool, _RESP2, transaction, shard_hint)

    async def aclose(self, close_connection_pool: bool | None = None) -> None:
        self.lane.close()
        await super().aclose(close_connection_pool)


#: Pipelines at most this long (commands) and this large (bytes) go on the lane; longer
#: ones (the stats flush of a busy interval) keep redis-py's pooled connections, so a
#: report never waits behind them in the lane's queue.
LANE_PIPELINE_COMMANDS = 256
LANE_PIPELINE_BYTES = 64 * 1024

#: The lane speaks RESP2 (redis-py 8 speaks RESP3 and converts to these same shapes,
#: `legacy_responses`): its replies take redis-py's RESP2 reply callbacks.
_RESP2: CaseInsensitiveDict = CaseInsensitiveDict(
    get_response_callbacks(user_protocol=2, legacy_responses=True)  # type: ignore[arg-type]  # redis-py annotates it as str -> str
)

#: Options that change how redis-py reads a reply: such pipelines keep redis-py.
_READ_OPTIONS = frozenset({NEVER_DECODE, EMPTY_RESPONSE})


class LanePipeline(Pipeline):
    """A `LaneRedis` pipeline: a short non-transactional one is written on the lane in one
    write (what the coalesced reports of `Engine.report` are, a few EVALSHAs), with
    redis-py's reply callbacks applied and its errors (`raise_first_error`); anything
    else (MULTI/EXEC, WATCH, `register_script`, long ones) is redis-py's own pipeline."""

    def __init__(self, lane: Lane, *args: Any) -> None:
        super().__init__(*args)
        self._lane = lane

    def _on_lane(self) -> bool:
        stack = self.command_stack
        return (
            0 < len(stack) <= LANE_PIPELINE_COMMANDS
            and not (self.is_transaction or self.explicit_transaction or self.watching)
            and not self.scripts
            and not any(_READ_OPTIONS.intersection(options) for _, options in stack)
        )

    async def execute(self, raise_on_error: bool = True) -> list[Any]:
        if not self._on_lane():
            return await super().execute(raise_on_error)
        stack = list(self.command_stack)
        try:
            if sum(len(a) for args, _ in stack for a in args if isinstance(a, str | bytes)) > (
                LANE_PIPELINE_BYTES
            ):
                return await super().execute(raise_on_error)
            replies = await self._lane.execute_many([args for args, _ in stack])
        finally:
            await self.reset()  # type: ignore[no-untyped-call]  # redis-py leaves it unannotated
        callbacks = self.response_callbacks
        out: list[Any] = []
        for (args, options), reply in zip(stack, replies, strict=True):
            callback = callbacks.get(args[0])
            if callback is not None and not isinstance(reply, Exception):
                reply = callback(reply, **{k: v for k, v in options.items() if k != "keys"})
                if inspect.isawaitable(reply):
                    reply = await reply
            out.append(reply)
        if raise_on_error:
            self.raise_first_error(stack, out)
        return out
