"""Free loopback ports, and waiting until something listens on one."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import time


def free_port(host: str = "127.0.0.1", below: int = 55536) -> int:
    """A currently free TCP port (below `below`, so port+10000 also fits for Cluster)."""
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((host, 0))
            port = int(s.getsockname()[1])
        if port < below:
            return port
    raise RuntimeError("no free port found")


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """`n` distinct free ports, held open together while choosing so none repeats."""
    socks: list[socket.socket] = []
    try:
        while len(socks) < n:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((host, 0))
            if s.getsockname()[1] < 55536:
                socks.append(s)
            else:
                s.close()
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


def wait_port(
    host: str, port: int, timeout: float = 10.0, proc: subprocess.Popen[bytes] | None = None
) -> None:
    """Block until something accepts connections on host:port (or the process died)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening on {port}")
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.2):
            return
        time.sleep(0.02)
    raise TimeoutError(f"nothing listening on {host}:{port} after {timeout} s")


def established(port: int) -> int:
    """How many IPv4 TCP connections to local `port` are established right now, from
    the kernel's table (/proc/net/tcp): who holds a server's connections open."""
    count = 0
    with open("/proc/net/tcp") as table:
        next(table)
        for row in table:
            fields = row.split()
            if fields[3] == "01" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                count += 1
    return count
