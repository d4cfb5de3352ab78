"""Postfix's end of a milter connection, for the milters' tests."""

from __future__ import annotations

import asyncio
import contextlib
import struct
from collections.abc import Mapping
from typing import Self

#: What Postfix 3.x offers in its option negotiation (actions, protocol steps).
POSTFIX_ACTIONS = 0x1FF
POSTFIX_PROTOCOL = 0x1FFFFF


class Mta:
    """Postfix's end of one milter connection."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, port: int) -> Self:
        return cls(*await asyncio.open_connection("127.0.0.1", port))

    def send(self, cmd: bytes, data: bytes = b"") -> None:
        self.writer.write(struct.pack(">I", len(data) + 1) + cmd + data)

    async def reply(self, within: float = 3.0) -> tuple[bytes, bytes]:
        async with asyncio.timeout(within):
            (n,) = struct.unpack(">I", await self.reader.readexactly(4))
            body = await self.reader.readexactly(n)
        return body[:1], body[1:]

    async def ask(self, cmd: bytes, data: bytes = b"", within: float = 3.0) -> tuple[bytes, bytes]:
        self.send(cmd, data)
        await self.writer.drain()
        return await self.reply(within)

    async def optneg(
        self, version: int = 6, actions: int = POSTFIX_ACTIONS, protocol: int = POSTFIX_PROTOCOL
    ) -> tuple[int, int, int, bytes]:
        cmd, data = await self.ask(b"O", struct.pack(">III", version, actions, protocol))
        assert cmd == b"O"
        return (*struct.unpack(">III", data[:12]), data[12:])

    def macros(self, stage: bytes, values: Mapping[str, str]) -> None:
        self.send(b"D", stage + b"".join(f"{k}\0{v}\0".encode() for k, v in values.items()))

    async def connect(
        self, ip: str, family: bytes = b"4", hostname: str = "unknown", port: int = 40000
    ) -> bytes:
        self.macros(b"C", {"j": "mx.test.example", "{daemon_name}": "mx"})
        data = f"{hostname}\0".encode() + family + struct.pack(">H", port) + f"{ip}\0".encode()
        return (await self.ask(b"C", data))[0]

    async def session(self, ip: str, helo: str, sender: str) -> None:
        """Negotiate, CONNECT, HELO and MAIL, each answered 'continue'."""
        await self.optneg()
        assert await self.connect(ip) == b"c"
        assert (await self.ask(b"H", f"{helo}\0".encode()))[0] == b"c"
        assert (await self.ask(b"M", f"<{sender}>\0SIZE=100\0".encode()))[0] == b"c"

    async def rcpt(
        self, rcpt: str, *, rejected: str | None = None, status: str = "5.1.1", within: float = 2.0
    ) -> tuple[bytes, bytes]:
        if rejected is None:  # accepted by Postfix: the resolved transport and next hop
            values = {"{rcpt_mailer}": "local", "{rcpt_host}": "test.example", "{rcpt_addr}": rcpt}
        else:  # rejected by Postfix: smtpd_milter.c's stand-ins
            values = {"{rcpt_mailer}": "error", "{rcpt_host}": status, "{rcpt_addr}": rejected}
        self.macros(b"R", values)
        return await self.ask(b"R", f"<{rcpt}>\0".encode(), within)

    async def closed(self, within: float = 2.0) -> bool:
        """True when the milter closed the connection (EOF) within `within` seconds."""
        async with asyncio.timeout(within):
            while True:
                try:
                    if not await self.reader.read(65536):
                        return True
                except ConnectionError:
                    return True

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(OSError):
            await self.writer.wait_closed()
