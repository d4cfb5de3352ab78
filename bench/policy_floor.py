"""The floor of a Python policy server on this machine: uvloop, zero work.

An `asyncio.Protocol` that answers every request (up to its empty line) with
`action=DUNNO`, nothing parsed, nothing looked up, nothing reported: what one Python
process with an event loop costs per request here (a wake-up, a read, a write), and the
latency the machine itself adds at a given offered rate. `bench.peers --fixed-rate` runs
it beside penalty-policyd at the same rate, in the same rounds, so a p99 can be read
against what the machine allowed at that moment.

    .venv/bin/python -m bench.policy_floor --listen 127.0.0.1:PORT
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from typing import cast

import uvloop

DUNNO = b"action=DUNNO\n\n"


class Floor(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buf = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        buf = self.buf + data if self.buf else data
        n = buf.count(b"\n\n")
        if n:
            assert self.transport is not None
            self.transport.write(DUNNO * n)
            buf = buf[buf.rindex(b"\n\n") + 2 :]
        self.buf = buf


async def serve(host: str, port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(Floor, host, port)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with server:
        await stop.wait()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.policy_floor", description=__doc__)
    p.add_argument("--listen", default="127.0.0.1:10041")
    args = p.parse_args(argv)
    host, _, port = args.listen.rpartition(":")
    uvloop.run(serve(host, int(port)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
