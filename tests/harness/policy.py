"""Driving penalty-policyd as Postfix does: requests, connections, a policyd in process
or as its real command line."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
from collections.abc import AsyncIterator
from typing import Any

from penalty.v1 import penalty_pb2 as pb
from penaltyclient.aio import AsyncPenaltyClient
from penaltyclient.policyd import PolicyServer

DUNNO = "action=DUNNO\n\n"
PENALIZED = "203.0.113.7"


def request(state: str = "RCPT", ip: str = "203.0.113.7", **extra: str) -> bytes:
    attrs = {
        "request": "smtpd_access_policy",
        "protocol_state": state,
        "protocol_name": "ESMTP",
        "client_address": ip,
        "client_name": "unknown",
        "helo_name": "mx.example.net",
        "sender": "a@example.net",
        "recipient": "b@example.org",
        **extra,
    }
    return "".join(f"{k}={v}\n" for k, v in attrs.items()).encode() + b"\n"


Conn = tuple[asyncio.StreamReader, asyncio.StreamWriter]


class Policy:
    def __init__(self, server: asyncio.Server, policy: PolicyServer, port: int) -> None:
        self.server, self.policy, self.port = server, policy, port

    async def connect(self) -> Conn:
        return await asyncio.open_connection("127.0.0.1", self.port)

    async def ask(self, conn: Conn, raw: bytes) -> str:
        reader, writer = conn
        writer.write(raw)
        await writer.drain()
        async with asyncio.timeout(5):
            return (await reader.readuntil(b"\n\n")).decode()

    async def answers(self, conn: Conn, n: int) -> list[str]:
        async with asyncio.timeout(5):
            return [(await conn[0].readuntil(b"\n\n")).decode() for _ in range(n)]


async def start_policy(address: str, **kw: Any) -> AsyncIterator[Policy]:
    listen = kw.pop("listen", "127.0.0.1:0")
    client = AsyncPenaltyClient(address, deadline=0.3, live_replica=bool(kw.pop("live", False)))
    client.start()
    policy = PolicyServer(client, **kw)
    policy.reporter.start()
    server = await policy.listen(listen)
    port = server.sockets[0].getsockname()[1] if listen.startswith("127.") else 0
    try:
        yield Policy(server, policy, port)
    finally:
        await policy.close()
        await policy.reporter.close(0.5)
        await client.close()


async def penalize(client: AsyncPenaltyClient, ip: str = PENALIZED) -> None:
    for _ in range(40):
        await client.report(ip, {pb.OUTCOME_UNKNOWN_RECIPIENT: 1})


@contextlib.asynccontextmanager
async def policyd_cli(*args: str, **kw: Any) -> AsyncIterator[asyncio.subprocess.Process]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "penaltyclient.policyd",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        **kw,
    )
    try:
        yield proc
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def next_event(proc: asyncio.subprocess.Process, name: str, seen: list[Any]) -> Any:
    assert proc.stdout is not None
    async with asyncio.timeout(15):
        while True:
            raw = await proc.stdout.readline()
            assert raw, f"penalty-policyd exited before {name}: {seen[-3:]}"
            event = json.loads(raw)  # every line is one JSON object (no traceback)
            seen.append(event)
            if event["event"] == name:
                return event
