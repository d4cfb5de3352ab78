"""The table, the targets, and the JSON record of a run.

Each penaltyd row is shown beside its floor from the same run: the echo service with the
same load shape (what grpc.aio costs with zero work; the ratio is penaltyd / echo) and,
for latency rows, the Redis round trip penaltyd cannot avoid (the ratio is penaltyd p50 /
Redis p50). The targets are the project's (see docs/performance.md); a row whose calls
could not be verified says INVALID rather than PASS.

``python -m bench.report FILE...`` prints the table of the per-figure medians of several
JSON results (how docs/performance.md is made).
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.metadata
import json
import math
import os
import platform
import statistics
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.stats import Check, Result


@dataclass(frozen=True, slots=True)
class Target:
    """A pass/fail rule: `kind` is "p99_ms_below", "x_echo_at_least" or "rate_at_least"."""

    kind: str
    value: float

    def __str__(self) -> str:
        if self.kind == "p99_ms_below":
            return f"p99 < {self.value:g} ms"
        if self.kind == "x_echo_at_least":
            return f">= {self.value:g}x echo"
        return f">= {self.value:,.0f}/s"

    def judge(self, rate: float, p99_ms: float, x_echo: float | None) -> str:
        if self.kind == "p99_ms_below":
            return "PASS" if p99_ms < self.value else "FAIL"
        if self.kind == "x_echo_at_least":
            if x_echo is None:
                return "n.a."
            return "PASS" if x_echo >= self.value else "FAIL"
        return "PASS" if rate >= self.value else "FAIL"


@dataclass(frozen=True, slots=True)
class Row:
    label: str
    key: str
    echo: str = ""  # echo result with the same load shape
    floor: str = ""  # Redis result whose p50 is the latency floor
    target: Target | None = None
    section: str = ""


ROWS: tuple[Row, ...] = (
    Row("echo Check (ceiling)", "echo/check-c1", section="unary gRPC, h2load"),
    Row(
        "penaltyd Check, not penalized",
        "penaltyd/check-c1",
        "echo/check-c1",
        "redis/get-c1",
        Target("p99_ms_below", 1.5),
    ),
    Row("echo Check, tempfail-sized answer", "echo/check-penalized-c1"),
    Row(
        "penaltyd Check, penalized",
        "penaltyd/check-penalized-c1",
        "echo/check-penalized-c1",
        "redis/get-c1",
        Target("p99_ms_below", 1.5),
    ),
    Row("echo Check (ceiling)", "echo/check-c64"),
    Row(
        "penaltyd Check, not penalized",
        "penaltyd/check-c64",
        "echo/check-c64",
        "",
        Target("x_echo_at_least", 0.8),
    ),
    Row("echo Check, tempfail-sized answer", "echo/check-penalized-c64"),
    Row(
        "penaltyd Check, penalized",
        "penaltyd/check-penalized-c64",
        "echo/check-penalized-c64",
        "",
        Target("x_echo_at_least", 0.8),
    ),
    Row("echo Report (ceiling)", "echo/report-c1"),
    Row("penaltyd Report, ACCEPTED n=1", "penaltyd/report-c1", "echo/report-c1", "redis/window-c1"),
    Row("echo Report (ceiling)", "echo/report-c64"),
    Row(
        "penaltyd Report, ACCEPTED n=1",
        "penaltyd/report-c64",
        "echo/report-c64",
        "",
        Target("x_echo_at_least", 0.45),
    ),
    Row(
        "echo Session reports (ceiling)",
        "echo/session-report",
        section="Session stream, 100 items/message",
    ),
    Row(
        "penaltyd Session reports",
        "penaltyd/session-report",
        "echo/session-report",
        "redis/pipeline100",
        Target("rate_at_least", 10_000),
    ),
    Row("echo Session checks (ceiling)", "echo/session-check"),
    Row("penaltyd Session checks", "penaltyd/session-check", "echo/session-check"),
    Row("redis GET", "redis/get-c1", section="floor: redis-py asyncio on the same Redis"),
    Row("redis EVALSHA return 1", "redis/evalsha-c1"),
    Row("redis EVALSHA window update", "redis/window-c1"),
    Row("redis GET", "redis/get-c64"),
    Row("redis EVALSHA return 1", "redis/evalsha-c64"),
    Row("redis pipeline 100 window updates", "redis/pipeline100"),
)

_UNITS = {"calls/s": "calls", "outcomes/s": "outcomes", "checks/s": "checks", "ops/s": "ops"}


#: Other processes using more than this share of the CPU during a run make it suspect.
BUSY = 0.10


def _us(value: float | None) -> str:
    if value is None or math.isnan(value):
        return "-"
    return f"{value:.0f}" if value >= 10 else f"{value:.1f}"


def _ms(value: float | None) -> str:
    if value is None or math.isnan(value):
        return "-"
    return f"{value:.3f}" if value < 10 else f"{value:.1f}"


def _cpu_us(result: Result) -> float:
    value = result.extra.get("server_cpu_us_per_call")
    return math.nan if value is None else float(value)


def evaluate(results: dict[str, Result]) -> list[dict[str, Any]]:
    """The rows whose result exists, with ratios and verdicts (also written to JSON)."""
    rows: list[dict[str, Any]] = []
    for row in ROWS:
        res = results.get(row.key)
        if res is None:
            continue
        echo = results.get(row.echo) if row.echo else None
        floor = results.get(row.floor) if row.floor else None
        x_echo = res.rate / echo.rate if echo and echo.rate else None
        # The same comparison by cost: echo's CPU per call / ours. Both servers are
        # CPU-bound at 64 in flight, so this tracks x_echo but moves far less when other
        # processes take CPU from the run.
        cpu = _cpu_us(res)
        echo_cpu = _cpu_us(echo) if echo else math.nan
        x_echo_cpu = echo_cpu / cpu if cpu > 0 and not math.isnan(echo_cpu) else None
        x_floor = res.p50_ms / floor.p50_ms if floor and floor.p50_ms else None
        verdict = "n.a." if row.target is None else row.target.judge(res.rate, res.p99_ms, x_echo)
        failed = [c for c in res.checks if not c.ok]
        if any(c.severity == "proof" for c in failed):
            verdict = "INVALID"
        elif failed:
            verdict = "FAIL"
        rows.append(
            {
                "section": row.section,
                "label": row.label,
                "key": row.key,
                "in_flight": res.concurrency,
                "rate": res.rate,
                "unit": res.unit,
                "p50_ms": res.p50_ms,
                "p99_ms": res.p99_ms,
                "echo_key": row.echo if echo else "",
                "x_echo": x_echo,
                "x_echo_cpu": x_echo_cpu,
                "floor_key": row.floor if floor else "",
                "floor_p50_ms": floor.p50_ms if floor else None,
                "x_floor_p50": x_floor,
                "server_cpu_us_per_call": cpu,
                "foreign_share": res.extra.get("foreign_share", 0.0),
                "target": str(row.target) if row.target else "",
                "verdict": verdict,
                "failed_checks": [f"{c.name}: {c.detail}" for c in failed],
            }
        )
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    """Plain text, one line per figure, sections as separators."""
    header = (
        f"{'figure':<33} {'flight':>6} {'rate/s':>9} {'unit':<8} {'p50 ms':>7} {'p99 ms':>7}"
        f" {'cpu µs':>6} {'x echo':>6} {'by cpu':>6}  {'p50 x Redis floor':<24} {'target':<16}"
        " result"
    )
    lines = [header, "-" * len(header)]
    footer = (
        "cpu µs: the server's CPU per call, Session item or Redis op (warm-up included); "
        "x echo: rate / the echo's with the same load shape; by cpu: echo's cpu µs / ours"
    )
    for r in rows:
        if r["section"]:
            lines.append(f"[{r['section']}]")
        x_echo = f"{r['x_echo']:.2f}" if r["x_echo"] is not None else ""
        by_cpu = f"{r['x_echo_cpu']:.2f}" if r.get("x_echo_cpu") is not None else ""
        floor = ""
        if r["x_floor_p50"] is not None:
            name = r["floor_key"].split("/", 1)[1]
            floor = f"{r['x_floor_p50']:.1f}x ({name} {_ms(r['floor_p50_ms'])})"
        unit = _UNITS.get(r["unit"], r["unit"])
        result = r["verdict"]
        if len(r.get("runs", [])) > 1 and set(r["runs"]) != {"n.a."}:
            result += f" (runs: {' '.join(r['runs'])})"
        cells = [
            f"{r['label']:<33} {r['in_flight']:>6} {r['rate']:>9,.0f} {unit:<8}",
            f"{_ms(r['p50_ms']):>7} {_ms(r['p99_ms']):>7} {_us(r['server_cpu_us_per_call']):>6}"
            f" {x_echo:>6} {by_cpu:>6}  {floor:<24}",
            f"{r['target'] or '-':<16} {result}",
        ]
        lines.append(" ".join(cells).rstrip())
        for failed in r["failed_checks"]:
            lines.append(f"    ! {failed}")
        if r["foreign_share"] > BUSY:
            lines.append(
                f"    ! machine busy: other processes used {r['foreign_share']:.0%} of the CPU"
            )
    return "\n".join([*lines, footer])


def _version(cmd: list[str]) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unavailable: {exc}"
    return (out.stdout or out.stderr).strip()


def _dist_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def machine_info() -> dict[str, Any]:
    """What the numbers depend on: cores, CPU, versions, commit."""
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    git = ["git", "-C", str(Path(__file__).resolve().parent.parent)]
    return {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "nproc": len(os.sched_getaffinity(0)),
        "cpu_count": os.cpu_count(),
        "cpu_model": cpu,
        "loadavg": os.getloadavg(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        **{
            f"py_{name}": _dist_version(name)
            for name in ("grpcio", "protobuf", "redis", "hiredis", "uvloop")
        },
        "redis_server": _version(["redis-server", "--version"]),
        "h2load": _version(["h2load", "--version"]),
        # An exported tree (git archive) has no .git: its runner may name the commit.
        "git_commit": os.environ.get("BENCH_GIT_COMMIT") or _version([*git, "rev-parse", "HEAD"]),
        # Service code differing from the commit (another branch of work in progress).
        "git_dirty": (
            False
            if os.environ.get("BENCH_GIT_COMMIT")
            else bool(_version([*git, "status", "--porcelain", "--", "services", "proto"]))
        ),
    }


def _finite(value: Any) -> Any:
    """NaN (no samples) becomes null: strict JSON readers reject NaN."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def write_json(payload: dict[str, Any], paths: list[Path]) -> None:
    text = json.dumps(_finite(payload), indent=2, default=str)
    for path in paths:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + "\n")


def load_results(path: Path) -> dict[str, Result]:
    """Results of a JSON file written by `bench` (extra fields are kept as they are)."""
    data = json.loads(path.read_text())
    out: dict[str, Result] = {}
    for key, raw in data["results"].items():
        raw = dict(raw)
        raw.pop("verified", None)
        raw["checks"] = [Check(**c) for c in raw.get("checks", [])]
        for name in ("p50_ms", "p99_ms", "mean_ms", "max_ms"):
            raw[name] = math.nan if raw.get(name) is None else raw[name]
        out[key] = Result(**raw)
    return out


_MEDIANS = (
    "rate", "p50_ms", "p99_ms", "x_echo", "x_echo_cpu", "floor_p50_ms", "x_floor_p50",
    "server_cpu_us_per_call",
)  # fmt: skip


def median_rows(runs: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Table rows of several runs: per figure the median of each number (ratios are the
    median of each run's ratio, not a ratio of medians), the target judged on those
    medians, and every run's own verdict kept in `runs`.

    A run whose figure could not be verified makes the merged figure INVALID; failed
    service checks (fail-open answers) in most runs make it FAIL.
    """
    by_key: dict[str, list[dict[str, Any]]] = {}
    for rows in runs:
        for row in rows:
            by_key.setdefault(row["key"], []).append(row)
    merged: list[dict[str, Any]] = []
    targets = {row.key: row.target for row in ROWS}
    for key in [row.key for row in ROWS if row.key in by_key]:
        present = by_key[key]
        out = dict(present[0])
        for field in _MEDIANS:
            values = [r[field] for r in present if r.get(field) is not None]
            values = [v for v in values if not (isinstance(v, float) and math.isnan(v))]
            out[field] = statistics.median(values) if values else None
        out["foreign_share"] = max(r.get("foreign_share", 0.0) for r in present)
        out["failed_checks"] = list(dict.fromkeys(c for r in present for c in r["failed_checks"]))
        out["runs"] = [r["verdict"] for r in present]
        target = targets.get(key)
        verdict = (
            "n.a."
            if target is None
            else target.judge(
                out["rate"], out["p99_ms"] if out["p99_ms"] is not None else math.nan, out["x_echo"]
            )
        )
        if "INVALID" in out["runs"]:
            verdict = "INVALID"
        elif sum(1 for r in present if r["failed_checks"]) * 2 > len(present):
            verdict = "FAIL"
        out["verdict"] = verdict
        merged.append(out)
    return merged


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench.report",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("files", nargs="+", type=Path, help="bench/results/bench-*.json")
    args = p.parse_args(argv)
    runs = [evaluate(load_results(f)) for f in args.files]
    print(f"medians of {len(runs)} runs: {' '.join(str(f) for f in args.files)}")
    print(format_table(median_rows(runs)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
