"""Unary gRPC load with h2load, the C HTTP/2 load generator from nghttp2.

Why h2load: client and server share two cores here, and a Python gRPC client spends as
much CPU per call as the server does, so it would halve what it measures (DESIGN.md
s. 12a: a bare echo does ~4.9k calls/s under h2load, ~3k/s against a Python client).
h2load costs the server little CPU.

gRPC is plain HTTP/2: a POST to ``/package.Service/Method`` with
``content-type: application/grpc`` and ``te: trailers``, whose body is the
length-prefixed message (1 byte "compressed" flag, 4-byte big-endian length, bytes).
h2load cannot read trailers, so it counts an HTTP 200 even when the gRPC status in the
trailers is an error: callers must verify calls some other way (a pre-flight call with a
real gRPC client, and the server's counters; see `bench.runner`).
"""

from __future__ import annotations

import re
import shutil
import struct
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from bench.stats import LatencySummary, latency_summary

GRPC_HEADERS = ("content-type: application/grpc", "te: trailers")


def grpc_frame(message: bytes) -> bytes:
    """The gRPC length-prefixed message: uncompressed flag, big-endian length, payload."""
    return b"\x00" + struct.pack(">I", len(message)) + message


def h2load_binary() -> str:
    binary = shutil.which("h2load")
    if binary is None:
        raise RuntimeError("h2load not found: `make bench` installs Debian's nghttp2-client")
    return binary


def h2load_version() -> str:
    out = subprocess.run([h2load_binary(), "--version"], capture_output=True, text=True, timeout=10)
    return out.stdout.strip()


@dataclass(frozen=True, slots=True)
class Shape:
    """Connections x streams per connection: the calls kept in flight."""

    clients: int
    streams: int

    @property
    def in_flight(self) -> int:
        return self.clients * self.streams

    def __str__(self) -> str:
        return f"h2load -c{self.clients} -m{self.streams}"


@dataclass(slots=True)
class H2Run:
    """h2load's own summary plus latencies computed from its per-request log."""

    requests_total: int
    succeeded: int
    failed: int
    errored: int
    timeout: int
    status_2xx: int
    req_per_s: float  # h2load's figure over the measured period (after warm-up)
    duration_s: float
    data_bytes: int  # DATA frame payload received: gRPC frames, never trailers
    latencies_us: list[int] = field(repr=False)
    non_200: int
    stdout: str = field(repr=False)

    def summary(self) -> LatencySummary:
        return latency_summary([us / 1000 for us in self.latencies_us])


_FINISHED = re.compile(r"finished in ([\d.]+)(ms|s), ([\d.]+) req/s")
_REQUESTS = re.compile(
    r"requests: (\d+) total, \d+ started, (\d+) done, (\d+) succeeded, (\d+) failed, "
    r"(\d+) errored, (\d+) timeout"
)
_STATUS = re.compile(r"status codes: (\d+) 2xx")
_TRAFFIC = re.compile(r"traffic: .*?\((\d+)\) data")


def parse_summary(stdout: str) -> dict[str, float]:
    """The numbers h2load prints at the end; raises ValueError if its format changed."""
    finished = _FINISHED.search(stdout)
    requests = _REQUESTS.search(stdout)
    status = _STATUS.search(stdout)
    traffic = _TRAFFIC.search(stdout)
    if not (finished and requests and status and traffic):
        raise ValueError(f"unexpected h2load output:\n{stdout[-2000:]}")
    duration = float(finished[1]) / (1000 if finished[2] == "ms" else 1)
    return {
        "duration_s": duration,
        "req_per_s": float(finished[3]),
        "total": int(requests[1]),
        "done": int(requests[2]),
        "succeeded": int(requests[3]),
        "failed": int(requests[4]),
        "errored": int(requests[5]),
        "timeout": int(requests[6]),
        "status_2xx": int(status[1]),
        "data_bytes": int(traffic[1]),
    }


def parse_log(path: Path) -> tuple[list[int], int]:
    """(latencies in µs of the HTTP 200 responses, number of other responses).

    Columns: start time (µs since the epoch), HTTP status, µs until the response ended.
    h2load logs only the measured period, not the warm-up.
    """
    latencies: list[int] = []
    other = 0
    with path.open() as fh:
        for line in fh:
            cols = line.split("\t")
            if len(cols) < 3:
                continue
            if cols[1] == "200":
                latencies.append(int(cols[2]))
            else:
                other += 1
    return latencies, other


def run(
    url: str,
    body: bytes,
    shape: Shape,
    *,
    duration_s: float,
    warmup_s: float,
    workdir: Path,
) -> H2Run:
    """POST `body` (a gRPC frame) to `url` for `duration_s` after `warmup_s` of warm-up.

    Bounded: h2load is killed if it runs 30 s past its duration (a hung server).
    """
    with tempfile.NamedTemporaryFile(dir=workdir, suffix=".grpc", delete=False) as fh:
        fh.write(body)
        body_path = Path(fh.name)
    log_path = body_path.with_suffix(".log")  # h2load appends to an existing log: use a new one
    cmd = [
        h2load_binary(),
        f"-c{shape.clients}",
        f"-m{shape.streams}",
        "-t1",
        "-D",
        f"{round(duration_s * 1000)}ms",
        "--warm-up-time",
        f"{round(warmup_s * 1000)}ms",
        "-d",
        str(body_path),
        "--log-file",
        str(log_path),
    ]
    for header in GRPC_HEADERS:
        cmd += ["-H", header]
    cmd.append(url)
    try:
        proc = subprocess.run(
            cmd, capture_output=True, text=True, timeout=duration_s + warmup_s + 30, check=False
        )
        if proc.returncode != 0:
            output = proc.stderr or proc.stdout
            raise RuntimeError(f"h2load exited with {proc.returncode}: {output}")
        s = parse_summary(proc.stdout)
        latencies, non_200 = parse_log(log_path)
    finally:
        body_path.unlink(missing_ok=True)
        log_path.unlink(missing_ok=True)
    return H2Run(
        requests_total=int(s["total"]),
        succeeded=int(s["succeeded"]),
        failed=int(s["failed"]),
        errored=int(s["errored"]),
        timeout=int(s["timeout"]),
        status_2xx=int(s["status_2xx"]),
        req_per_s=s["req_per_s"],
        duration_s=s["duration_s"],
        data_bytes=int(s["data_bytes"]),
        latencies_us=latencies,
        non_200=non_200,
        stdout=proc.stdout,
    )
