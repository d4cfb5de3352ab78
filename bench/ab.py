"""``python -m bench.ab``: penaltyd variants side by side on unary h2load shapes.

For before/after figures on a shared machine: the echo ceiling and one penaltyd per
variant run at once on one Redis (or the embedded store), and each shape is measured
against every server in interleaved rounds (ABC, CBA, ...), so drift and other people's
jobs hit all alike. A variant is a name and the git commit whose `services/` tree it
runs (exported with `git archive` into a temp dir; clients and proto are this tree's),
``.`` for this working tree as it is, or a directory holding a `services/` tree (an
experiment copied and edited outside the repository):

    .venv/bin/python -m bench.ab --variant before=f52b1ac --variant after=HEAD \\
        --shapes report-c64,report-c1,check-c1,check-penalized-c1 --rounds 3

Prints what is compared (request bytes, load shape, round order, load average), then
the size of each server's answer to each shape (one call through a real gRPC client:
echo and penaltyd answer the same size class), then per shape and server the median
calls/s, server CPU per call (from /proc) and Redis's CPU per call, and per variant
the median of the per-round ratios to echo (by rate and by CPU, and each round's), with
the share of the CPU other processes used. Asserts nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

from bench import h2load, probe
from bench.cpu import CpuMeter
from bench.procs import REPO_ROOT, Servers
from bench.runner import (
    CHECK_OK,
    CHECK_PENALIZED,
    ONE_IN_FLIGHT,
    REPORT_ACCEPTED,
    REPORT_ERRORS,
    SIXTY_FOUR,
)
from tests.harness.processes import PenaltydProcess

SHAPES = {
    "report-c64": ("Report", REPORT_ACCEPTED, SIXTY_FOUR),
    "report-c1": ("Report", REPORT_ACCEPTED, ONE_IN_FLIGHT),
    "check-c64": ("Check", CHECK_OK, SIXTY_FOUR),
    "check-c1": ("Check", CHECK_OK, ONE_IN_FLIGHT),
    "check-penalized-c64": ("Check", CHECK_PENALIZED, SIXTY_FOUR),
    "check-penalized-c1": ("Check", CHECK_PENALIZED, ONE_IN_FLIGHT),
}


class Row(NamedTuple):
    """One server's run of one shape in one round."""

    rate: float  # calls/s (h2load)
    us: float  # the server's CPU per call
    others: float  # share of the CPU other processes used meanwhile (not Redis, not h2load)
    redis_us: float  # redis-server's CPU per call


def _loadavg() -> str:
    with open("/proc/loadavg") as fh:
        return " ".join(fh.read().split()[:3])


def _fairness(shapes: list[str], names: list[str], args: argparse.Namespace) -> str:
    """What is compared, stated: same client, same bytes, same load, interleaved rounds."""
    lines = [
        f"load average {_loadavg()}; {args.rounds} rounds of {args.seconds:g} s (+0.5 s warm-up),"
        f" servers in the order {', '.join(names)} then reversed, round after round;"
        f" {'embedded memory store' if args.memory else 'one redis-server'} for every penaltyd",
    ]
    for shape in shapes:
        method, body, load = SHAPES[shape]
        lines.append(
            f"  {shape}: {method}, the same {len(body)}-byte request to every server, "
            f"{load} ({load.in_flight} in flight), one h2load process (-t1)"
        )
    return "\n".join(lines)


def _services_of(commit: str, into: Path) -> Path:
    """`services/` of `commit`, exported under `into`."""
    archive = subprocess.run(
        ["git", "-C", str(REPO_ROOT), "archive", commit, "services"],
        check=True,
        capture_output=True,
    ).stdout
    tar = into / "services.tar"
    tar.write_bytes(archive)
    with tarfile.open(tar) as t:
        t.extractall(into, filter="data")
    return into / "services"


@contextlib.contextmanager
def variants(
    specs: list[tuple[str, str]], redis_url: str | None, workdir: Path
) -> Iterator[dict[str, PenaltydProcess]]:
    started: dict[str, PenaltydProcess] = {}
    try:
        for name, commit in specs:
            env = None
            if commit != ".":
                if Path(commit, "services").is_dir():
                    services = Path(commit, "services").resolve()
                else:
                    services = _services_of(commit, Path(tempfile.mkdtemp(dir=workdir)))
                path = [str(REPO_ROOT), str(REPO_ROOT / "clients"), str(REPO_ROOT / "proto")]
                env = {"PYTHONPATH": os.pathsep.join([*path, str(services)])}
            args = ("--redis-url", redis_url) if redis_url else ()
            started[name] = PenaltydProcess(*args, env=env).start()
        yield started
    finally:
        for proc in started.values():
            proc.stop()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.ab", description=__doc__.split("\n")[0])
    p.add_argument("--variant", action="append", required=True, metavar="NAME=COMMIT|DIR")
    p.add_argument("--shapes", default="report-c64,check-c1,check-penalized-c1")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seconds", type=float, default=3.0)
    p.add_argument("--memory", action="store_true", help="embedded store instead of Redis")
    args = p.parse_args(argv)
    specs = [tuple(v.split("=", 1)) for v in args.variant]
    if any(len(s) != 2 for s in specs):
        p.error("--variant takes NAME=COMMIT")
    shapes = [s.strip() for s in args.shapes.split(",") if s.strip()]
    unknown = [s for s in shapes if s not in SHAPES]
    if unknown:
        p.error(f"unknown shape {unknown[0]!r}; choose from {', '.join(SHAPES)}")
    with tempfile.TemporaryDirectory() as tmp, Servers(echo=True, penaltyd=False) as s:
        assert s.echo is not None
        assert s.redis is not None
        url = None if args.memory else s.redis.url
        with variants([(n, c) for n, c in specs], url, Path(tmp)) as pds:
            servers = {"echo": s.echo, **pds}
            clients = {k: probe.Unary(v.address) for k, v in servers.items()}
            for name in pds:
                clients[name].call("Report", REPORT_ERRORS)  # the penalized client
            pids = {k: v.proc.pid for k, v in servers.items() if v.proc}
            if s.redis.proc is not None:
                pids["redis"] = s.redis.proc.pid  # not "others": it serves the variants
            meter = CpuMeter(pids)
            names = list(servers)
            print(_fairness(shapes, names, args), flush=True)
            for shape in shapes:  # the answers compared, as a real gRPC client gets them
                method, body, _ = SHAPES[shape]
                sizes = {k: clients[k].call(method, body).ByteSize() for k in names}
                print(
                    f"  {shape} answers (bytes): "
                    + ", ".join(f"{k} {n}" for k, n in sizes.items()),
                    flush=True,
                )
            res: dict[tuple[str, str], list[Row]] = {}
            for r in range(args.rounds):
                for shape in shapes:
                    method, body, load = SHAPES[shape]
                    for srv in names if r % 2 == 0 else names[::-1]:
                        before = meter.sample()
                        run = h2load.run(
                            f"http://{clients[srv].address}/penalty.v1.PenaltyService/{method}",
                            h2load.grpc_frame(body),
                            load,
                            duration_s=args.seconds,
                            warmup_s=0.5,
                            workdir=Path(tmp),
                        )
                        c = meter.since(before)
                        calls = run.req_per_s * (args.seconds + 0.5)
                        per_call = c["wall_s"] * 1e6 / calls if calls else 0.0
                        row = Row(
                            run.req_per_s,
                            c[f"{srv}_cores"] * per_call,
                            c.get("foreign_share", 0.0),
                            c.get("redis_cores", 0.0) * per_call,
                        )
                        res.setdefault((shape, srv), []).append(row)
                        bad = run.failed + run.errored + run.non_200
                        print(
                            f"round {r + 1} {shape:<20} {srv:<10} {row.rate:8,.0f}/s "
                            f"{row.us:6.0f} µs/call  redis {row.redis_us:4.0f} µs/call  "
                            f"others {row.others:.0%}" + (f"  {bad} FAILED" if bad else ""),
                            file=sys.stderr,
                            flush=True,
                        )
            med = statistics.median
            for shape in shapes:
                echo = res[(shape, "echo")]
                print(
                    f"{shape}: echo {med(x.rate for x in echo):,.0f}/s "
                    f"{med(x.us for x in echo):.0f} µs/call"
                )
                for name in pds:
                    rows = res[(shape, name)]
                    rate = med(a.rate / e.rate for a, e in zip(rows, echo, strict=True))
                    cpu = med(e.us / a.us for a, e in zip(rows, echo, strict=True) if a.us)
                    each = " ".join(
                        f"{a.rate / e.rate:.2f}" for a, e in zip(rows, echo, strict=True)
                    )
                    print(
                        f"  {name:<10} {med(x.rate for x in rows):8,.0f}/s "
                        f"{med(x.us for x in rows):6.0f} µs/call  x echo {rate:.2f} "
                        f"(by cpu {cpu:.2f}; per round {each})  "
                        f"redis {med(x.redis_us for x in rows):.0f} µs/call  others "
                        f"{min(x.others for x in rows):.0%}-{max(x.others for x in rows):.0%} "
                        "of the CPU"
                    )
            print(f"load average at the end: {_loadavg()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
