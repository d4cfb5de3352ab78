"""The milter server both milters run on: listening, one task per connection, draining.

`penalty-milter` (here) and `relaycheck-milter` (in relaycheck, which already builds on
`penaltyclient.milter_protocol`) differ only in what a connection's conversation does;
how connections are accepted, read frame by frame, kept safe ("continue" on a bug,
closed on a protocol error) and drained at shutdown is the same, so it lives once here.
A subclass says how to start a conversation (`session`) and what else to release
(`on_close`).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import stat
from typing import Any, Protocol

import structlog

from penaltyclient.milter_protocol import (
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
    def idle_timeout(self) -> float: ...

    @property
    def max_frame(self) -> int: ...


class ServerStats(Protocol):
    connections: int
    active: int
    protocol_errors: int
    handler_errors: int


class MilterServer:
    """Listens on TCP or a unix socket; one asyncio task per milter connection."""

    options: ServerOptions
    stats: ServerStats
    log: Any = structlog.get_logger("penalty.milter")  # a subclass may name its own

    def __init__(self) -> None:
        self._server: asyncio.Server | None = None
        self._unix_path: str | None = None
        self._tasks: set[asyncio.Task[Any]] = set()

    def session(self, peer: str) -> Conversation:
        """A new conversation for the connection from `peer`."""
        raise NotImplementedError

    async def on_close(self) -> None:
        """Release what the milter holds beyond its connections (channels)."""

    async def start(self, listen: str) -> str:
        """Listen on `HOST:PORT` or `unix:/path`; returns the bound address (port 0 works)."""
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
        cutting the stragglers loses no mail, only their remaining work."""
        if self._server is not None:
            self._server.close()
        tasks = set(self._tasks)
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=drain)
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
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        peer = peer_name(writer)
        self.stats.connections += 1
        self.stats.active += 1
        session = self.session(peer)
        try:
            while not session.done:
                async with asyncio.timeout(self.options.idle_timeout):
                    frame = await read_frame(reader, self.options.max_frame)
                if frame is None:
                    break
                reply = await self._dispatch(session, frame)
                if reply:
                    writer.write(reply)
                    await writer.drain()
        except ProtocolError as exc:
            self.stats.protocol_errors += 1
            self.log.warning("milter_protocol_error", peer=peer, ip=session.ip, error=str(exc))
        except TimeoutError:
            self.log.info("milter_idle_timeout", peer=peer, seconds=self.options.idle_timeout)
        except OSError as exc:  # the MTA went away mid-reply
            self.log.info("milter_connection_lost", peer=peer, error=str(exc))
        finally:
            self.stats.active -= 1
            if task is not None:
                self._tasks.discard(task)
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

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
