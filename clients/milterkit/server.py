"""The milter server both milters run on: listening, one task per connection, draining.

`penalty-milter` (`penaltyclient.milter`) and `relaycheck-milter`
(`relaycheckclient.milter`) differ only in what a connection's conversation does;
how connections are accepted, read frame by frame, kept safe ("continue" on a bug,
closed on a protocol error) and drained at shutdown is the same, so it lives once here.
A subclass says how to start a conversation (`session`) and what else to release
(`on_close`).

What one connection may cost is bounded, whoever is at the other end: at most
`max_connections` at a time (more are accepted and closed at once, so the MTA applies
its `milter_default_action`; one rate-limited log line says so); a packet at most its
command's limit (`milter_protocol.frame_limit`, 64 KiB but for headers); a connection
silent for `idle_timeout` seconds, a packet not complete `packet_timeout` seconds after
its length, and a reply the peer has not read within `write_timeout` seconds (a peer that
never reads cannot make us buffer: one reply beyond the transport's high-water mark, then
the connection is closed) each end that connection only.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import stat
from typing import Any, Protocol

import structlog

from milterkit.protocol import (
    COMMAND_NAMES,
    CONTINUE,
    NO_REPLY,
    SMFIC_OPTNEG,
    Frame,
    ProtocolError,
    read_frame,
)


class Conversation(Protocol):
    """One milter connection's state machine (a milter's `MilterSession`)."""

    done: bool  # QUIT received

    @property
    def ip(self) -> str | None: ...

    async def handle(self, frame: Frame) -> bytes | None: ...


class ServerOptions(Protocol):
    @property
    def idle_timeout(self) -> float: ...  # seconds between packets

    @property
    def packet_timeout(self) -> float: ...  # seconds from a length prefix to its last byte

    @property
    def write_timeout(self) -> float: ...  # seconds the peer may take to read a reply

    @property
    def max_frame(self) -> int: ...  # packet limit for every command but header/body

    @property
    def max_connections(self) -> int: ...  # open at once; more are closed at once


class ServerStats(Protocol):
    connections: int
    active: int
    connections_refused: int  # closed at once: `max_connections` were open
    protocol_errors: int
    handler_errors: int


REFUSAL_LOG_INTERVAL = 10.0  # seconds between two milter_too_many_connections lines


class MilterServer:
    """Listens on TCP or a unix socket; one asyncio task per milter connection."""

    options: ServerOptions
    stats: ServerStats
    log: Any = structlog.get_logger("penalty.milter")  # a subclass may name its own

    def __init__(self) -> None:
        self._server: asyncio.Server | None = None
        self._unix_path: str | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closing = False
        self._refusal_logged_at = -REFUSAL_LOG_INTERVAL
        self._refusals_unlogged = 0

    def session(self, peer: str) -> Conversation:
        """A new conversation for the connection from `peer`."""
        raise NotImplementedError

    async def on_close(self) -> None:
        """Release what the milter holds beyond its connections (channels)."""

    async def start(self, listen: str) -> str:
        """Listen on `HOST:PORT` or `unix:/path`; returns the bound address (port 0 works).
        Raises OSError naming the address (in use, not ours, a path refused)."""
        try:
            return await self._listen(listen)
        except OSError as exc:
            raise OSError(f"listen {listen}: {exc.strerror or exc}") from exc

    async def _listen(self, listen: str) -> str:
        kind, host, port = parse_listen(listen)
        if kind == "unix":
            with contextlib.suppress(FileNotFoundError):
                if stat.S_ISSOCK(os.stat(host).st_mode):
                    os.unlink(host)  # a stale socket from an earlier run
            self._server = await asyncio.start_unix_server(self._on_connection, host)
            self._unix_path = host
            # Postfix's smtpd (user postfix) must be able to connect: as open as 127.0.0.1.
            os.chmod(host, 0o666)
            return f"unix:{host}"
        self._server = await asyncio.start_server(self._on_connection, host or None, port)
        sockname = self._server.sockets[0].getsockname()
        bound = f"[{sockname[0]}]" if ":" in sockname[0] else sockname[0]
        return f"{bound}:{sockname[1]}"

    @property
    def port(self) -> int:
        if self._server is None or not self._server.sockets:
            raise RuntimeError("not listening")
        return int(self._server.sockets[0].getsockname()[1])

    async def close(self, drain: float = 5.0) -> None:
        """Stop listening, give open connections `drain` seconds to finish, close the rest.

        Postfix treats a milter that goes away as `milter_default_action` (accept), so
        cutting the stragglers loses no mail, only their remaining work. A straggler's
        task is cancelled and ends normally (no traceback), its socket closed."""
        self._closing = True
        if self._server is not None:
            self._server.close()
        tasks = set(self._tasks)
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=drain)
            if pending:
                self.log.info("milter_drain_ended", seconds=drain, closed=len(pending))
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
        if self._unix_path is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._unix_path)
        await self.on_close()

    async def _on_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        if self._closing or self.stats.active >= self.options.max_connections:
            self._refuse(writer)
            return
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        peer = peer_name(writer)
        self.stats.connections += 1
        self.stats.active += 1
        session = self.session(peer)
        abort = True
        try:
            abort = await self._serve(session, reader, writer, peer)
        except asyncio.CancelledError:
            # Only `close` cancels a connection: its drain is over. End normally: Python
            # 3.11's start_server logs a cancelled handler as an unhandled exception.
            if task is not None:
                task.uncancel()
            self.log.debug("milter_connection_closed_at_shutdown", peer=peer, ip=session.ip)
        finally:
            self.stats.active -= 1
            if task is not None:
                self._tasks.discard(task)
            await self._close_writer(writer, abort)

    async def _serve(
        self,
        session: Conversation,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        peer: str,
    ) -> bool:
        """The conversation, packet by packet; True when the socket must be aborted (a
        reply is stuck in it), False when it can be closed."""
        options = self.options
        try:
            while not session.done:
                try:
                    frame = await read_frame(
                        reader,
                        options.max_frame,
                        idle_timeout=options.idle_timeout,
                        packet_timeout=options.packet_timeout,
                    )
                except TimeoutError:
                    self.log.info("milter_idle_timeout", peer=peer, seconds=options.idle_timeout)
                    return False
                if frame is None:
                    return False
                reply = await self._dispatch(session, frame)
                if reply:
                    writer.write(reply)
                    if not writer.transport.get_write_buffer_size():
                        continue  # all in the kernel already: nothing to wait for
                    try:
                        async with asyncio.timeout(options.write_timeout):
                            await writer.drain()
                    except TimeoutError:
                        self.log.warning(
                            "milter_write_timeout",
                            peer=peer,
                            ip=session.ip,
                            seconds=options.write_timeout,
                            buffered=writer.transport.get_write_buffer_size(),
                        )
                        return True
        except ProtocolError as exc:
            self.stats.protocol_errors += 1
            self.log.warning("milter_protocol_error", peer=peer, ip=session.ip, error=str(exc))
        except OSError as exc:  # the MTA went away mid-reply
            self.log.info("milter_connection_lost", peer=peer, error=str(exc))
            return True
        return False

    async def _close_writer(self, writer: asyncio.StreamWriter, abort: bool) -> None:
        """Close the socket; abort it (drop what is unsent) when a reply is stuck or it
        does not close within `write_timeout`, so a peer that never reads costs nothing."""
        if abort:
            writer.transport.abort()
            return
        writer.close()
        try:
            async with asyncio.timeout(self.options.write_timeout):
                await writer.wait_closed()
        except TimeoutError:
            writer.transport.abort()
        except OSError:
            pass
        except asyncio.CancelledError:  # `close` gave up on us while closing: see above
            writer.transport.abort()
            task = asyncio.current_task()
            if task is not None:
                task.uncancel()

    def _refuse(self, writer: asyncio.StreamWriter) -> None:
        """Too many connections (or shutting down): close this one at once, and say so
        at most once every REFUSAL_LOG_INTERVAL seconds."""
        writer.transport.abort()
        if self._closing:
            return
        self.stats.connections_refused += 1
        now = asyncio.get_running_loop().time()
        if now - self._refusal_logged_at < REFUSAL_LOG_INTERVAL:
            self._refusals_unlogged += 1
            return
        self.log.warning(
            "milter_too_many_connections",
            limit=self.options.max_connections,
            active=self.stats.active,
            connections_refused=self.stats.connections_refused,
            unlogged=self._refusals_unlogged,
            note="closed at once; the MTA applies its milter_default_action",
        )
        self._refusal_logged_at = now
        self._refusals_unlogged = 0

    async def _dispatch(self, session: Conversation, frame: Frame) -> bytes | None:
        """`session.handle`, with the safe default: a bug answers "continue", not a crash."""
        try:
            return await session.handle(frame)
        except ProtocolError:
            raise
        except Exception:
            if frame.cmd == SMFIC_OPTNEG:
                raise ProtocolError("option negotiation failed") from None
            self.stats.handler_errors += 1
            self.log.exception(
                "milter_handler_error", command=COMMAND_NAMES.get(frame.cmd, repr(frame.cmd))
            )
            return None if frame.cmd in NO_REPLY else CONTINUE


def peer_name(writer: asyncio.StreamWriter) -> str:
    """`host:port` of the MTA's end, or "unix" on a unix socket (for the logs)."""
    peer = writer.get_extra_info("peername")
    if isinstance(peer, tuple) and len(peer) >= 2:
        return f"{peer[0]}:{peer[1]}"
    return str(peer or "unix")


def parse_listen(text: str) -> tuple[str, str, int]:
    """`unix:/path` -> ("unix", path, 0); `[inet:]HOST:PORT` -> ("inet", host, port)."""
    if text.startswith("unix:"):
        path = text.removeprefix("unix:")
        if not path:
            raise ValueError("unix: needs a socket path")
        return "unix", path, 0
    host, sep, port = text.removeprefix("inet:").rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"--listen: not HOST:PORT or unix:/path: {text!r}")
    return "inet", host.strip("[]"), int(port)
