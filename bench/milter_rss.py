"""RSS of a running penalty-milter before/after N connections each send one big
SMFIC_MACRO packet (the hostile-input report: 40 x 1 MiB).

    python -m bench.milter_rss [--connections 40] [--size 1048576] [--shape pairs|value]

Starts `python -m penaltyclient.milter` (uvloop, as in production) against a dead
penaltyd, reads VmRSS from /proc, opens the connections; each negotiates, sends
CONNECT, the macro packet, then a HELO (answered, so we know the macro packet was read
and parsed, or the connection was closed for it), and reads VmRSS again with every
connection still open.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import struct
import sys


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def packet(cmd: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data) + 1) + cmd + data


def macro_packet(size: int, shape: str, stage: bytes) -> bytes:
    """A macro packet of `size` bytes in all (length prefix included)."""
    room = size - 4 - 1 - 1  # length prefix, command, stage
    if shape == "value":  # one macro, one huge value
        data = stage + b"{rcpt_addr}\0" + b"x" * (room - 13) + b"\0"
    else:  # as many tiny name/value pairs as fit: the worst case for per-string overhead
        # distinct names, so the parsed dict keeps every pair
        out, i = bytearray(stage), 0
        while True:
            pair = b"%x\0v\0" % i
            if len(out) - 1 + len(pair) > room:
                break
            out += pair
            i += 1
        data = bytes(out)
    return packet(b"D", data)


async def one(port: int, big: bytes) -> tuple[str, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(packet(b"O", struct.pack(">III", 6, 0x1FF, 0x1FFFFF)))
    await writer.drain()
    (n,) = struct.unpack(">I", await reader.readexactly(4))
    await reader.readexactly(n)
    connect = b"unknown\0" + b"4" + struct.pack(">H", 4000) + b"203.0.113.9\0"
    writer.write(packet(b"C", connect))
    await writer.drain()
    (n,) = struct.unpack(">I", await reader.readexactly(4))
    await reader.readexactly(n)
    writer.write(big)
    try:
        writer.write(packet(b"H", b"client.example\0"))  # answered: the packet was read
        await writer.drain()
        (n,) = struct.unpack(">I", await reader.readexactly(4))
        cmd = (await reader.readexactly(n))[:1]
        return f"answered {cmd!r}", writer
    except (asyncio.IncompleteReadError, ConnectionError):
        return "closed by the milter", writer


async def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--connections", type=int, default=40)
    p.add_argument("--size", type=int, default=1 << 20)
    p.add_argument("--shape", choices=["pairs", "value"], default="pairs")
    p.add_argument("--stage", default="H", help="the command the macros are for")
    args = p.parse_args()
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "penaltyclient.milter",
        "--listen",
        f"127.0.0.1:{port}",
        "--penaltyd",
        f"127.0.0.1:{free_port()}",
        "--stats-interval",
        "3600",
        stdout=asyncio.subprocess.PIPE,
    )
    assert proc.stdout is not None
    assert json.loads(await proc.stdout.readline())["event"] == "milter_started"
    before = rss_kib(proc.pid)
    big = macro_packet(args.size, args.shape, args.stage.encode())
    results = await asyncio.gather(*(one(port, big) for _ in range(args.connections)))
    await asyncio.sleep(0.5)  # let the process settle (measurement only, not a sync)
    after = rss_kib(proc.pid)
    outcomes = sorted({r for r, _ in results})
    for _, w in results:
        w.close()
    proc.terminate()
    await proc.wait()
    print(
        f"connections={args.connections} packet={len(big)} bytes shape={args.shape} "
        f"stage={args.stage} "
        f"outcome={outcomes} rss_before={before / 1024:.1f} MiB rss_after={after / 1024:.1f} MiB "
        f"delta={(after - before) / 1024:.1f} MiB"
    )


asyncio.run(main())
