"""relaycheck-milter against a real in-process relaycheck (memory store).

The test plays Postfix's side of the milter protocol by hand (plain `struct` packing, not
the protocol module the milter uses) over real TCP sockets on 127.0.0.1, with what a
Postfix 3.x smart relay sends: a version 6 offer with every action and protocol bit,
CONNECT, HELO, the MAIL macros ({auth_authen}), MAIL, RCPT, each header (folded values
with LF and a tab, as Postfix passes them), then end of headers.
"""

from __future__ import annotations

import asyncio
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from relaycheck.store.memory import MemoryStore
from relaycheck.v1 import relaycheck_pb2 as pb
from relaycheckclient.milter import MilterOptions, RelayMilter, check_reply, main
from tests.harness import milter as milter_harness
from tests.harness.inprocess import RelaycheckServed, relaycheck_serving
from tests.harness.ports import free_port

SMFIP_NOBODY, SMFIP_NR_HDR, SMFIP_NOHDRS, SMFIP_NOEOH = 0x10, 0x80, 0x20, 0x40

SPAM_HEADERS = [
    (
        "Received",
        "from spam.example.net (unknown [203.0.113.66])\n\tby mail.acme.example "
        "(Postfix) with ESMTP id 1\n\tfor <victim@example.com>; Tue, 16 Jul 2024 03:33:00 +0200",
    ),
    (
        "Received",
        "from [192.168.10.5] (unknown [192.168.10.5])\n\t(Authenticated sender: "
        "ceo@acme.example)\n\tby mail.acme.example (Postfix) with ESMTPSA id 0",
    ),
    ("From", '"Acme CEO" <ceo@acme.example>'),
    ("Subject", "Urgent wire transfer"),
]
OWN_HEADERS = [
    (
        "Received",
        "from [192.168.10.23] (unknown [203.0.113.45])\n\t(Authenticated sender: "
        "alice@acme.example)\n\tby mail.acme.example (Postfix) with ESMTPSA id 4",
    ),
    ("From", "alice@acme.example"),
]


class Mta(milter_harness.Mta):
    """Postfix's end of one milter connection, with a whole message up to its headers."""

    async def message(
        self,
        ip: str,
        headers: list[tuple[str, str]],
        *,
        sender: str = "ceo@acme.example",
        rcpts: tuple[str, ...] = ("victim@example.com",),
        auth: str = "",
        header_replies: bool = False,
    ) -> tuple[bytes, bytes]:
        """A whole SMTP session up to end of headers; the EOH reply."""
        await self.optneg()
        data = b"mail.acme.example\x004" + struct.pack(">H", 40000) + f"{ip}\0".encode()
        assert (await self.ask(b"C", data))[0] == b"c"
        assert (await self.ask(b"H", b"mail.acme.example\0"))[0] == b"c"
        self.macros(b"M", {"{auth_authen}": auth} if auth else {})
        assert (await self.ask(b"M", f"<{sender}>\0SIZE=100\0".encode()))[0] == b"c"
        for rcpt in rcpts:
            assert (await self.ask(b"R", f"<{rcpt}>\0".encode()))[0] == b"c"
        for name, value in headers:
            self.send(b"L", f"{name}\0{value}\0".encode())
            if header_replies:
                assert (await self.reply())[0] == b"c"
        return await self.ask(b"N")


MilterFactory = Callable[..., Awaitable[RelayMilter]]


@pytest.fixture
async def rc() -> AsyncIterator[RelaycheckServed]:
    with capture_logs():
        async with relaycheck_serving(MemoryStore()) as served:
            await served.stub.UpsertCustomer(
                pb.Customer(id="acme", relay_networks=["198.51.100.8/29"], domains=["acme.example"])
            )
            yield served


@pytest.fixture
async def milters() -> AsyncIterator[MilterFactory]:
    started: list[RelayMilter] = []

    async def factory(target: str, **options: Any) -> RelayMilter:
        milter = RelayMilter(target, MilterOptions(**options))
        await milter.start("127.0.0.1:0")
        started.append(milter)
        return milter

    yield factory
    for m in started:
        await m.close(drain=0.1)


async def test_relayed_mail_gets_the_reply_and_own_mail_continues(
    rc: RelaycheckServed, milters: MilterFactory
) -> None:
    milter = await milters(rc.address)
    mta = await Mta.open(milter.port)
    version, actions, protocol, symlists = await mta.optneg()
    assert actions == 0x100  # SETSYMLIST only: we never change a message
    assert version == 6
    assert protocol & SMFIP_NOBODY
    assert protocol & SMFIP_NR_HDR
    assert not protocol & (SMFIP_NOHDRS | SMFIP_NOEOH)
    assert b"{auth_authen}" in symlists
    await mta.close()

    mta = await Mta.open(milter.port)
    cmd, data = await mta.message("198.51.100.10", SPAM_HEADERS)
    assert cmd == b"y"
    text = data.rstrip(b"\0").decode()
    assert text.startswith(
        "451 4.7.1 Relaying denied for acme: this message came from 203.0.113.66"
    )
    mta.send(b"A")  # Postfix aborts the refused message; the next session is the customer's
    await mta.close()
    mta = await Mta.open(milter.port)
    cmd, _ = await mta.message("198.51.100.10", OWN_HEADERS, sender="alice@acme.example")
    assert cmd == b"c"
    assert (await mta.ask(b"E"))[0] == b"c"
    await mta.close()
    assert milter.stats.refused == 1
    assert milter.stats.classified == {"RELAYED_THIRD_PARTY": 1, "ORIGINATED_BY_CUSTOMER": 1}


async def test_dry_run_and_customer_from_auth(rc: RelaycheckServed, milters: MilterFactory) -> None:
    milter = await milters(rc.address, dry_run=True, customer_from_auth=True)
    mta = await Mta.open(milter.port)
    # A dynamic relay address outside the networks, named by its SASL login.
    cmd, _ = await mta.message("203.0.113.210", SPAM_HEADERS, auth="acme")
    assert cmd == b"c"
    await mta.close()
    assert milter.stats.classified == {"RELAYED_THIRD_PARTY": 1}
    assert milter.stats.refused == 0


async def test_relaycheck_down_fails_open_quickly(milters: MilterFactory) -> None:
    milter = await milters(f"127.0.0.1:{free_port()}", deadline=0.3)
    mta = await Mta.open(milter.port)
    t0 = time.monotonic()
    cmd, _ = await mta.message("198.51.100.10", SPAM_HEADERS)
    assert time.monotonic() - t0 < 2.0
    assert cmd == b"c"
    await mta.close()
    assert milter.stats.failed_open == 1


async def test_oversized_headers_keep_the_newest(
    rc: RelaycheckServed, milters: MilterFactory
) -> None:
    milter = await milters(rc.address, max_header_bytes=1024)
    mta = await Mta.open(milter.port)
    padding = [("X-Pad", "p" * 200)] * 20
    cmd, _ = await mta.message("198.51.100.10", SPAM_HEADERS + padding)
    assert cmd == b"y"
    await mta.close()


async def test_protocol_garbage_closes_the_connection(
    rc: RelaycheckServed, milters: MilterFactory
) -> None:
    milter = await milters(rc.address)
    mta = await Mta.open(milter.port)
    mta.writer.write(b"\xff\xff\xff\xffjunk")
    await mta.writer.drain()
    async with asyncio.timeout(3):
        assert await mta.reader.read() == b""
    await mta.close()
    assert milter.stats.protocol_errors == 1


@pytest.mark.parametrize(
    "reply",
    ["421 4.7.1 bye", "250 ok", "451 nope", "451 4.7.1 {nope}", "451 4.7.1 a\r\nb"],
)
def test_bad_replies_are_refused(reply: str) -> None:
    with pytest.raises(ValueError, match=r"."):
        check_reply(reply)
    assert main(["--reply", reply]) == 2


def test_default_reply_is_a_tempfail() -> None:
    assert check_reply(MilterOptions().reply).startswith("451 4.7.1 ")


async def test_unix_socket_listener(rc: RelaycheckServed, tmp_path: Path) -> None:
    path = tmp_path / "relaycheck.sock"
    milter = RelayMilter(rc.address)
    assert await milter.start(f"unix:{path}") == f"unix:{path}"
    try:
        reader, writer = await asyncio.open_unix_connection(str(path))
        mta = Mta(reader, writer)
        cmd, _ = await mta.message("198.51.100.10", SPAM_HEADERS)
        assert cmd == b"y"
        await mta.close()
    finally:
        await milter.close(drain=0.1)
    assert not path.exists()
