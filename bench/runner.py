"""`python -m bench`: start the servers, run the scenarios, print the table, write JSON.

One run owns its redis-server, penaltyd (real CLI, default settings, on that Redis) and
the echo ceiling; each scenario is measured against penaltyd and the echo service back to
back, under the same load shape, so the ratio compares like with like on a machine whose
two cores are shared by client and server. Every run is bounded: fixed durations,
timeouts on every child, and all children stopped on exit, error, Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import uvloop

from bench import echo_server, h2load, probe, redis_floor
from bench.cpu import CpuMeter, foreign_load, wait_quiet
from bench.procs import REPO_ROOT, Servers, child_env
from bench.report import BUSY, evaluate, format_table, machine_info, write_json
from bench.stats import Check, Result, latency_summary
from penalty.v1 import penalty_pb2 as pb

RESULTS_DIR = REPO_ROOT / "bench" / "results"

NOT_PENALIZED = "198.51.100.10"  # documentation range: never reported with errors
PENALIZED = echo_server.PENALIZED_IP  # 40 unknown recipients before the runs
REPORTER = "198.51.100.20"  # the one client of the unary Report runs (ACCEPTED only)

ONE_IN_FLIGHT = h2load.Shape(1, 1)
# 64 in flight: 4 connections x 16 streams gave the echo service its best here
# (-c1 -m64 ~5% lower, -c2 -m32 and -c8 -m8 within noise); both servers get the same.
SIXTY_FOUR = h2load.Shape(4, 16)

SESSION_STREAMS = 2  # two streams x two messages in flight: best outcomes/s at the
SESSION_DEPTH = 2  # lowest latency (deeper only queues: see docs/performance.md)
SESSION_BATCH = 100


@dataclass(frozen=True, slots=True)
class Durations:
    rounds: int  # each unary and Session figure: this many alternating runs, pooled
    unary_s: float
    unary_warmup_s: float
    session_s: float
    session_warmup_s: float
    redis_s: float
    redis_warmup_s: float


FULL = Durations(2, 4.0, 0.5, 4.0, 1.0, 3.0, 0.5)
QUICK = Durations(1, 1.0, 0.5, 1.0, 0.5, 0.7, 0.2)


def _msg(m: Any) -> bytes:
    data: bytes = m.SerializeToString()
    return data


CHECK_OK = _msg(pb.CheckRequest(client=pb.Client(ip=NOT_PENALIZED)))
CHECK_PENALIZED = _msg(pb.CheckRequest(client=pb.Client(ip=PENALIZED)))
REPORT_ACCEPTED = _msg(
    pb.ReportRequest(
        client=pb.Client(ip=REPORTER), counts=[pb.OutcomeCount(outcome=pb.OUTCOME_ACCEPTED, n=1)]
    )
)
REPORT_ERRORS = _msg(
    pb.ReportRequest(
        client=pb.Client(ip=PENALIZED),
        counts=[pb.OutcomeCount(outcome=pb.OUTCOME_UNKNOWN_RECIPIENT, n=40)],
    )
)


def expect_pass(identity: str) -> Callable[[pb.Verdict], str]:
    def check(v: pb.Verdict) -> str:
        if v.tempfail or v.degraded or v.identity != identity:
            return (
                f"expected a pass for {identity}, got tempfail={v.tempfail} "
                f"degraded={v.degraded} identity={v.identity!r}"
            )
        return ""

    return check


def expect_tempfail(min_seconds: float) -> Callable[[pb.Verdict], str]:
    def check(v: pb.Verdict) -> str:
        if not v.tempfail or v.degraded or not v.smtp_reply.startswith("4"):
            got = f"tempfail={v.tempfail} degraded={v.degraded}"
            return f"expected tempfail for {PENALIZED}, got {got}"
        if v.seconds_left < min_seconds:
            return f"penalty has {v.seconds_left} s left, the run needs {min_seconds:.0f} s"
        return ""

    return check


def expect_echo(expected: pb.Verdict) -> Callable[[pb.Verdict], str]:
    def check(v: pb.Verdict) -> str:
        return "" if v == expected else f"not the echo's verdict: {v}"

    return check


@dataclass(frozen=True, slots=True)
class UnaryScenario:
    name: str
    method: str
    request: bytes
    shape: h2load.Shape
    counter: str  # penaltyd counter that must grow by the calls h2load counted
    penalized: bool = False


UNARY: tuple[UnaryScenario, ...] = (
    UnaryScenario("check-c1", "Check", CHECK_OK, ONE_IN_FLIGHT, probe.CHECK_PASS),
    UnaryScenario("check-c64", "Check", CHECK_OK, SIXTY_FOUR, probe.CHECK_PASS),
    UnaryScenario(
        "check-penalized-c1",
        "Check",
        CHECK_PENALIZED,
        ONE_IN_FLIGHT,
        probe.CHECK_TEMPFAIL,
        penalized=True,
    ),
    UnaryScenario(
        "check-penalized-c64",
        "Check",
        CHECK_PENALIZED,
        SIXTY_FOUR,
        probe.CHECK_TEMPFAIL,
        penalized=True,
    ),
    UnaryScenario("report-c1", "Report", REPORT_ACCEPTED, ONE_IN_FLIGHT, probe.REPORTS),
    UnaryScenario("report-c64", "Report", REPORT_ACCEPTED, SIXTY_FOUR, probe.REPORTS),
)
SESSION = ("session-report", "session-check")
GROUPS: dict[str, tuple[str, ...]] = {
    "unary": tuple(s.name for s in UNARY),
    "session": SESSION,
    "redis": ("redis",),
}
ALL = (*GROUPS["unary"], *SESSION, "redis")


def select(only: str | None) -> list[str]:
    """Scenario names from ``--only a,b`` (names or groups), in the canonical order."""
    if not only:
        return list(ALL)
    wanted: set[str] = set()
    for name in (n.strip() for n in only.split(",") if n.strip()):
        if name in GROUPS:
            wanted.update(GROUPS[name])
        elif name in ALL:
            wanted.add(name)
        else:
            choices = ", ".join(dict.fromkeys((*GROUPS, *ALL)))
            raise SystemExit(f"--only: unknown {name!r}; choose from {choices}")
    return [n for n in ALL if n in wanted]


def cpu_us(cpu: dict[str, float], server: str, calls: float) -> float:
    """Server CPU per call (or Session item) in µs: the cost figure noise moves least."""
    cores = cpu.get(f"{server}_cores", 0.0)
    return cores * cpu.get("wall_s", 0.0) * 1e6 / calls if calls else float("nan")


def pooled_extra(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-round details, plus the mean server CPU per call and the busiest round's noise."""
    costs = [r["server_cpu_us_per_call"] for r in rounds if "server_cpu_us_per_call" in r]
    return {
        "server_cpu_us_per_call": sum(costs) / len(costs) if costs else float("nan"),
        "foreign_share": max(
            (r.get("cpu", {}).get("foreign_share", 0.0) for r in rounds), default=0.0
        ),
        "rounds": rounds,
    }


class Bench:
    """Runs scenarios against one set of servers and collects `Result`s."""

    def __init__(self, servers: Servers, durations: Durations, workdir: Path) -> None:
        pd, echo, redis = servers.penaltyd, servers.echo, servers.redis
        assert pd is not None
        assert pd.proc is not None
        assert echo is not None
        assert echo.proc is not None
        assert redis is not None
        assert redis.proc is not None
        self.servers = servers
        self.d = durations
        self.workdir = workdir
        self.results: dict[str, Result] = {}
        self.penaltyd = probe.Unary(pd.address)
        self.echo = probe.Unary(echo.address)
        self.penalty_check: Check | None = None
        self.cpu = CpuMeter(
            {"penaltyd": pd.proc.pid, "echo": echo.proc.pid, "redis": redis.proc.pid}
        )
        self.errors: dict[str, str] = {}

    def close(self) -> None:
        self.penaltyd.close()
        self.echo.close()

    def _say(self, text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    def _add(self, result: Result) -> None:
        self.results[result.key] = result
        bad = [f"{c.name}: {c.detail}" for c in result.checks if not c.ok]
        self._say(
            f"  {result.key:<30} {result.rate:>10,.0f} {result.unit:<10} p50 {result.p50_ms:.3f} ms"
            f"  p99 {result.p99_ms:.3f} ms{'  CHECKS FAILED: ' + '; '.join(bad) if bad else ''}"
        )

    def _penalize(self) -> Check:
        """Penalize PENALIZED once (40 unknown recipients), and make sure it lasts the run."""
        if self.penalty_check is None:
            verdict = self.penaltyd.call("Report", REPORT_ERRORS)
            if not verdict.tempfail:
                why = f"40 unknown recipients did not penalize: {verdict}"
                self.penalty_check = Check("penalized", False, why)
            else:
                self.penalty_check = Check("penalized", True, f"{PENALIZED}: {verdict.smtp_reply}")
        return self.penalty_check

    # --- unary (h2load)

    def unary(self, sc: UnaryScenario) -> None:
        """Echo and penaltyd in alternating rounds (ABBA), so drift hits both alike."""
        run_s = self.d.unary_s + self.d.unary_warmup_s
        if sc.penalized:
            expect = expect_tempfail(run_s + 5)
        else:
            expect = expect_pass(REPORTER if sc.method == "Report" else NOT_PENALIZED)
        echo_verdict = echo_server.TEMPFAIL if sc.penalized else echo_server.VERDICT
        targets = {
            "echo": (self.echo, expect_echo(echo_verdict)),
            "penaltyd": (self.penaltyd, expect),
        }
        rounds: dict[str, list[tuple[h2load.H2Run, list[Check], dict[str, Any]]]] = {
            server: [] for server in targets
        }
        for n in range(self.d.rounds):
            for server in ("echo", "penaltyd") if n % 2 == 0 else ("penaltyd", "echo"):
                client, expect_fn = targets[server]
                rounds[server].append(self._unary_once(sc, server, client, expect_fn))
        for server, runs in rounds.items():
            succeeded = sum(run.succeeded for run, _, _ in runs)
            duration = sum(run.duration_s for run, _, _ in runs)
            latencies = [us / 1000 for run, _, _ in runs for us in run.latencies_us]
            self._add(
                Result(
                    key=f"{server}/{sc.name}",
                    server=server,
                    scenario=sc.name,
                    label=f"{sc.method} {'penalized' if sc.penalized else ''}".strip(),
                    concurrency=sc.shape.in_flight,
                    shape=f"{sc.shape}, {len(runs)} rounds",
                    unit="calls/s",
                    rate=succeeded / duration if duration else 0.0,
                    count=succeeded,
                    duration_s=duration,
                    checks=[c for _, checks, _ in runs for c in checks],
                    extra=pooled_extra([extra for _, _, extra in runs]),
                    **latency_summary(latencies),
                )
            )

    def _unary_once(
        self,
        sc: UnaryScenario,
        server: str,
        client: probe.Unary,
        expect: Callable[[pb.Verdict], str],
    ) -> tuple[h2load.H2Run, list[Check], dict[str, Any]]:
        """Pre-flight, one h2load run, and the proof that its calls were served."""
        checks = [self._penalize()] if sc.penalized and server == "penaltyd" else []
        checks.append(probe.preflight(client, sc.method, sc.request, expect))
        before = probe.scrape(self.servers.metrics_url) if server == "penaltyd" else {}
        cpu_before = self.cpu.sample()
        run = h2load.run(
            f"http://{client.address}/penalty.v1.PenaltyService/{sc.method}",
            h2load.grpc_frame(sc.request),
            sc.shape,
            duration_s=self.d.unary_s,
            warmup_s=self.d.unary_warmup_s,
            workdir=self.workdir,
        )
        # CPU covers warm-up too: per call, assume the warm-up ran at the measured rate.
        cpu = self.cpu.since(cpu_before)
        calls = run.req_per_s * (self.d.unary_s + self.d.unary_warmup_s)
        clean = run.failed + run.errored + run.timeout + run.non_200 == 0 and run.succeeded > 0
        checks.append(
            Check(
                "http",
                clean,
                f"{run.succeeded} succeeded, {run.failed} failed, {run.errored} errored, "
                f"{run.timeout} timeout, {run.non_200} non-200",
            )
        )
        # A gRPC error is a trailers-only response: no DATA at all. Every success
        # carries at least a 5-byte frame header plus a non-empty Verdict.
        checks.append(
            Check(
                "data frames",
                run.data_bytes >= run.succeeded * 7,
                f"{run.data_bytes} bytes of DATA for {run.succeeded} responses",
            )
        )
        extra: dict[str, Any] = {
            "req_per_s": run.req_per_s,
            "succeeded": run.succeeded,
            "duration_s": run.duration_s,
            "data_bytes": run.data_bytes,
            **run.summary(),
            "cpu": cpu,
            "server_cpu_us_per_call": cpu_us(cpu, server, calls),
        }
        if server == "penaltyd":
            after = probe.scrape(self.servers.metrics_url)
            counter_checks, deltas = probe.counter_checks(before, after, sc.counter, run.succeeded)
            checks += counter_checks
            extra["penaltyd_counters"] = deltas
        return run, checks, extra

    # --- Session (child process)

    def session(self, kind: str) -> None:
        """Echo and penaltyd in alternating rounds, each a `bench.session_load` child."""
        assert self.servers.penaltyd is not None
        assert self.servers.echo is not None
        addresses = {"echo": self.servers.echo.address, "penaltyd": self.servers.penaltyd.address}
        rounds: dict[str, list[tuple[dict[str, Any], list[Check]]]] = {s: [] for s in addresses}
        for n in range(self.d.rounds):
            for server in ("echo", "penaltyd") if n % 2 == 0 else ("penaltyd", "echo"):
                rounds[server].append(self._session_once(kind, server, addresses[server]))
        for server, runs in rounds.items():
            items = sum(out["items"] for out, _ in runs)
            duration = sum(out["duration_s"] for out, _ in runs)
            latencies = [ms for out, _ in runs for ms in out.pop("latencies_ms")]
            self._add(
                Result(
                    key=f"{server}/session-{kind}",
                    server=server,
                    scenario=f"session-{kind}",
                    label=f"Session {kind}s",
                    concurrency=SESSION_STREAMS * SESSION_DEPTH,
                    shape=f"{SESSION_STREAMS} streams x {SESSION_DEPTH} messages in flight"
                    f" x {SESSION_BATCH} {kind}s, {len(runs)} rounds",
                    unit="outcomes/s" if kind == "report" else "checks/s",
                    rate=items / duration if duration else 0.0,
                    count=items,
                    duration_s=duration,
                    checks=[c for _, checks in runs for c in checks],
                    extra=pooled_extra([out for out, _ in runs]),
                    **latency_summary(latencies),
                )
            )

    def _session_once(
        self, kind: str, server: str, address: str
    ) -> tuple[dict[str, Any], list[Check]]:
        """One `bench.session_load` run; against penaltyd, also its counters."""
        cmd = [
            *(sys.executable, "-m", "bench.session_load", "--target", address, "--kind", kind),
            *("--streams", str(SESSION_STREAMS), "--depth", str(SESSION_DEPTH)),
            *("--batch", str(SESSION_BATCH), "--duration", f"{self.d.session_s:g}"),
            *("--warmup", f"{self.d.session_warmup_s:g}"),
        ]
        checks: list[Check] = []
        if kind == "check":
            cmd += ["--penalized", PENALIZED]
        if server == "penaltyd":
            cmd.append("--semantic")
            if kind == "check":
                checks.append(self._penalize())
            before = probe.scrape(self.servers.metrics_url)
        out: dict[str, Any] = {}
        cpu_before = self.cpu.sample()
        proc = subprocess.run(
            cmd,
            capture_output=True,
            text=True,
            env=child_env(),
            cwd=REPO_ROOT,
            check=False,
            timeout=self.d.session_s + self.d.session_warmup_s + 60,
        )
        cpu = self.cpu.since(cpu_before)
        out["cpu"] = cpu
        if proc.returncode != 0:
            raise RuntimeError(
                f"session_load exited with {proc.returncode}:\n{proc.stderr[-3000:]}"
            )
        out.update(json.loads(proc.stdout.strip().splitlines()[-1]))
        # every item answered, warm-up and drain included, against all the server's CPU
        out["server_cpu_us_per_call"] = cpu_us(cpu, server, out["responses"] * SESSION_BATCH)
        checks.append(
            Check(
                "responses",
                out["failures"] == 0 and out["items"] > 0,
                f"{out['messages']} messages, {out['failures']} wrong: "
                + "; ".join(out["failure_examples"]),
            )
        )
        checks.append(
            Check(
                "fail-open",
                out["degraded"] == 0,
                f"{out['degraded']} answers were fail-open (degraded) in "
                f"{out['degraded_messages']} messages; not counted as outcomes",
                severity="service",
            )
        )
        if server == "penaltyd":
            after = probe.scrape(self.servers.metrics_url)
            served = probe.REPORTS if kind == "report" else probe.CHECK_PASS
            # one check per message is the penalized address: a tempfail, not a pass
            at_least = out["items"] if kind == "report" else out["items"] - out["messages"]
            counter_checks, deltas = probe.counter_checks(before, after, served, at_least)
            checks += counter_checks
            out["penaltyd_counters"] = deltas
        return out, checks

    # --- Redis floors (this process)

    def redis(self) -> None:
        assert self.servers.redis is not None
        for result in uvloop.run(
            redis_floor.measure(
                self.servers.redis.url, self.d.redis_s, self.d.redis_warmup_s, self.cpu
            )
        ):
            self._add(result)

    def run(self, names: list[str]) -> None:
        """Each scenario in turn; one that fails is recorded and the others still run."""
        by_name = {s.name: s for s in UNARY}
        for name in names:
            self._say(f"{name} ...")
            try:
                if name in by_name:
                    self.unary(by_name[name])
                elif name.startswith("session-"):
                    self.session(name.removeprefix("session-"))
                else:
                    self.redis()
            except Exception as exc:  # reported in the table and the JSON; exit status 1
                self.errors[name] = f"{type(exc).__name__}: {exc}"
                self._say(f"  {name} FAILED: {self.errors[name]}")
                self._say(f"  penaltyd log tail:\n{self.servers.penaltyd_log_tail()}")


@contextlib.contextmanager
def _signals_as_interrupt() -> Iterator[None]:
    """SIGTERM and SIGINT unwind as KeyboardInterrupt, so `finally` stops every child.

    SIGINT is set explicitly: a shell that starts a job in the background hands it over
    ignored, and a bench that cannot be interrupted leaves servers behind.
    """

    def handler(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description="penaltyd benchmarks: unary (h2load), Session, Redis floors; "
        "each beside the echo ceiling and the raw Redis round trip of the same run.",
    )
    p.add_argument(
        "--quick", action="store_true", help="short runs (~35 s in all), for smoke tests"
    )
    p.add_argument(
        "--only",
        metavar="NAME[,NAME]",
        help=f"run a subset: a group ({', '.join(GROUPS)}) or any of {', '.join(ALL[:-1])}",
    )
    p.add_argument(
        "--wait-quiet",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="before starting, wait up to SECONDS for other processes to leave the CPU idle "
        "(the bench shares two cores with whatever else runs; default: just measure and warn)",
    )
    p.add_argument(
        "--json",
        type=Path,
        metavar="PATH",
        help="also write the JSON here (always written: "
        "bench/results/bench-<timestamp>.json and bench/results/latest.json)",
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    names = select(args.only)
    durations = QUICK if args.quick else FULL
    started = dt.datetime.now(dt.UTC)
    t0 = time.monotonic()
    with _signals_as_interrupt():
        try:
            info = machine_info()
            info["h2load"] = h2load.h2load_version()
            if args.wait_quiet > 0:
                load = wait_quiet(args.wait_quiet, BUSY, lambda m: print(m, file=sys.stderr))
            else:
                load = foreign_load()
            info["foreign_load_before"] = load
            if load > BUSY:
                print(
                    f"warning: other processes use {load:.0%} of the CPU; figures will be low "
                    "(see 'machine busy' notes in the table)",
                    file=sys.stderr,
                )
            with Servers() as servers, tempfile.TemporaryDirectory(prefix="bench-") as tmp:
                bench = Bench(servers, durations, Path(tmp))
                try:
                    bench.run(names)
                finally:
                    bench.close()
        except KeyboardInterrupt:
            print("\ninterrupted: servers stopped, nothing written", file=sys.stderr)
            return 130
    rows = evaluate(bench.results)
    print()
    print(format_table(rows))
    for name, error in bench.errors.items():
        print(f"ERROR {name}: {error}")
    stamp = started.strftime("%Y%m%dT%H%M%SZ")
    payload = {
        "started_at": started.isoformat(timespec="seconds"),
        "elapsed_s": round(time.monotonic() - t0, 1),
        "command": " ".join(
            ["python", "-m", "bench", *(argv if argv is not None else sys.argv[1:])]
        ),
        "quick": args.quick,
        "scenarios": names,
        "durations": asdict(durations),
        "shapes": {
            "one_in_flight": str(ONE_IN_FLIGHT),
            "sixty_four": str(SIXTY_FOUR),
            "session": {"streams": SESSION_STREAMS, "depth": SESSION_DEPTH, "batch": SESSION_BATCH},
        },
        "machine": info,
        "results": {k: r.to_json() for k, r in bench.results.items()},
        "rows": rows,
        "errors": bench.errors,
    }
    paths = [RESULTS_DIR / f"bench-{stamp}.json", RESULTS_DIR / "latest.json"]
    if args.json:
        paths.append(args.json)
    write_json(payload, paths)
    print(
        f"\nJSON: {paths[0]} (and {', '.join(str(p) for p in paths[1:])}); "
        f"{payload['elapsed_s']:.0f} s",
        file=sys.stderr,
    )
    # Missed targets are findings, not errors; unverifiable or failed runs are errors.
    invalid = any(r["verdict"] == "INVALID" for r in rows)
    return 1 if invalid or bench.errors else 0
