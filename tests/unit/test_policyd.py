"""penalty-policyd speaking the Postfix policy protocol to a real in-process penaltyd."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from structlog.testing import capture_logs

from penalty.testing import free_port
from penalty.v1 import penalty_pb2 as pb
from penaltyclient.aio import AsyncPenaltyClient
from penaltyclient.policyd import MAX_LINE, PolicyServer
from penaltyd.store.memory import MemoryStore
from tests.conftest import ServeFactory
from tests.helpers import eventually


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


class Policy:
    def __init__(self, server: asyncio.Server, policy: PolicyServer, port: int) -> None:
        self.server, self.policy, self.port = server, policy, port

    async def connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.open_connection("127.0.0.1", self.port)

    async def ask(self, conn: tuple[asyncio.StreamReader, asyncio.StreamWriter], raw: bytes) -> str:
        reader, writer = conn
        writer.write(raw)
        await writer.drain()
        return (await reader.readuntil(b"\n\n")).decode()


async def start_policy(address: str, **kw: object) -> AsyncIterator[Policy]:
    client = AsyncPenaltyClient(address, deadline=0.3, live_replica=bool(kw.pop("live", False)))
    client.start()
    policy = PolicyServer(client, **kw)  # type: ignore[arg-type]  # test-only keyword pass-through
    policy.reporter.start()
    server = await asyncio.start_server(policy.handle, "127.0.0.1", 0, limit=MAX_LINE)
    port = server.sockets[0].getsockname()[1]
    try:
        yield Policy(server, policy, port)
    finally:
        server.close()
        await server.wait_closed()
        await policy.reporter.close(0.5)
        await client.close()


@pytest.fixture
async def policy(serve: ServeFactory) -> AsyncIterator[Policy]:
    pd = await serve(MemoryStore())
    async for p in start_policy(pd.address, live=True):
        assert await p.policy.client.wait_synced()
        yield p


async def test_tempfail_with_seconds_on_the_same_connection(policy: Policy) -> None:
    conn = await policy.connect()
    assert await policy.ask(conn, request()) == "action=DUNNO\n\n"
    client = policy.policy.client
    for _ in range(40):
        await client.report("203.0.113.7", {pb.OUTCOME_UNKNOWN_RECIPIENT: 1})

    async def answer() -> str:
        return await policy.ask(conn, request())

    action = await eventually(answer, lambda a: a != "action=DUNNO\n\n", within=2)
    assert action.startswith(
        "action=450 4.7.1 too many SMTP errors from 203.0.113.7; try again in "
    )
    seconds = int(action.split("try again in ")[1].split()[0])
    assert 295 <= seconds <= 300
    # other stages and other clients are untouched
    assert await policy.ask(conn, request("MAIL")) == "action=DUNNO\n\n"
    assert await policy.ask(conn, request(ip="198.51.100.1")) == "action=DUNNO\n\n"
    conn[1].close()


async def test_accepted_recipients_are_reported(policy: Policy) -> None:
    conn = await policy.connect()
    for _ in range(5):
        assert await policy.ask(conn, request(ip="198.51.100.33")) == "action=DUNNO\n\n"
    assert await policy.policy.reporter.flush(5)
    ex = await policy.policy.client.explain("198.51.100.33")
    assert [(t.outcome, t.n) for t in ex.window] == [(pb.OUTCOME_ACCEPTED, 5)]


@pytest.mark.parametrize(
    "garbage",
    [
        b"hello world\n\n",
        b"request=something_else\nclient_address=1.2.3.4\n\n",
        b"=novalue\n\n",
        b"request=smtpd_access_policy\nprotocol_state=RCPT\nclient_address=not-an-ip\n\n",
        b"request=smtpd_access_policy\nprotocol_state=RCPT\nclient_address=unknown\n\n",
    ],
)
async def test_garbage_gets_dunno_and_a_log_line(policy: Policy, garbage: bytes) -> None:
    conn = await policy.connect()
    with capture_logs() as logs:
        assert await policy.ask(conn, garbage) == "action=DUNNO\n\n"
    assert any(e["event"] in ("policy_garbage", "policy_unknown_client") for e in logs)
    assert await policy.ask(conn, request()) == "action=DUNNO\n\n"  # the connection still works
    conn[1].close()


async def test_overlong_line_closes_the_connection_only(policy: Policy) -> None:
    conn = await policy.connect()
    conn[1].write(b"request=" + b"x" * (MAX_LINE * 2) + b"\n\n")
    assert (await conn[0].read()) == b"action=DUNNO\n\n"  # answered, then closed
    other = await policy.connect()
    assert await policy.ask(other, request()) == "action=DUNNO\n\n"


async def test_exim_readsocket_style_half_close(policy: Policy) -> None:
    reader, writer = await policy.connect()
    writer.write(request().rstrip(b"\n") + b"\n")  # no final empty line, then EOF
    writer.write_eof()
    assert await reader.read() == b"action=DUNNO\n\n"


async def test_many_concurrent_connections(policy: Policy) -> None:
    async def one(i: int) -> list[str]:
        conn = await policy.connect()
        answers = [await policy.ask(conn, request(ip=f"198.51.100.{i}")) for _ in range(10)]
        conn[1].close()
        return answers

    results = await asyncio.gather(*(one(i) for i in range(50)))
    assert all(a == "action=DUNNO\n\n" for r in results for a in r)
    assert policy.policy.stats.requests == 500


async def test_penaltyd_down_is_dunno_within_the_deadline() -> None:
    async for p in start_policy(f"127.0.0.1:{free_port()}"):
        conn = await p.connect()
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        assert await p.ask(conn, request()) == "action=DUNNO\n\n"
        assert loop.time() - t0 < 0.6
        assert p.policy.stats.degraded == 1
        conn[1].close()
