"""relaycheck Classify on forged `Received:` chains: ``python -m bench.relaycheck_hostile``.

Lines below the entry hop are written by whoever sent the message, so a spammer pushing
mail through a customer's open relay chooses their length and shape. The milter asks
Classify with a 0.5 s deadline and lets the mail through when it passes (fail-open): a
header block that makes the walk slow is a way past the check. This bench times
`Engine.classify` (what the gRPC Classify calls, customer lookup on the embedded store,
blocks over 64 KiB walked in a worker thread) on the hostile blocks built here, which
tests/unit/relaycheck/test_hostile.py also uses:

- `old_127k`: 64 Received lines of 2,000 characters whose `by` comment is a long run of
  digits after ``1.1.`` (the Sendmail-version regex backtracked quadratically on it);
- `mix_1m`: one megabyte mixing every shape found to cost super-linear time or many
  Python steps: long comments, deep nesting, brackets, digit-and-dot runs, unterminated
  and escaped quotes, unclosed ``<``, ``auth=`` runs, thousands of short Received lines,
  a-line-per-field and continuation floods.

Each comes in two forms: `relayed` (the customer relay's line records an outside client,
the hostile lines are below it: what a spammer can send) and `inside` (every line claims
a private client, so the walker is led through all of them: the worst case for the
parser, only possible for a sender inside the customer's networks). The figures: median
and max wall time of one Classify over `RUNS` runs, and the median CPU time (process
time: the worker thread included). A verdict other than the expected one is marked (!).
"""

from __future__ import annotations

import asyncio
import ipaddress
import statistics
import sys
import time
from collections.abc import Callable

from structlog.testing import capture_logs

from relaycheck.chain import Verdict
from relaycheck.customers import build_customer
from relaycheck.engine import Engine
from relaycheck.metrics import Metrics
from relaycheck.settings import Settings
from relaycheck.store.memory import MemoryStore
from relaycheck.validation import ClassifyInput

RUNS = 7
MB = 1 << 20
CUSTOMER = build_customer("acme", ["198.51.100.8/29"], ["192.0.2.96/28"], ["acme.example"])
RELAY = "198.51.100.10"  # the customer relay that connects to the smart relay
RCPT = ("victim@example.org",)
ENTRY = (  # written by the customer's open relay: an outside client, a foreign recipient
    "Received: from spam.example.net (unknown [203.0.113.66])\r\n"
    "\tby mail.acme.example (Postfix) with ESMTP id 4AbC for <victim@example.org>;"
    " Tue, 11 Jun 2024 09:14:28 +0200\r\n"
)


def _client(i: int, inside: bool) -> str:
    return f"10.{i // 65536 % 256}.{i // 256 % 256}.{i % 256}" if inside else "203.0.113.77"


def _fit(head: str, filler: str, tail: str, width: int) -> str:
    """head + filler repeated + tail, `width` characters in all (at least head + tail)."""
    room = max(0, width - len(head) - len(tail))
    return head + (filler * (room // max(1, len(filler)) + 1))[:room] + tail


# One Received value of about `width` characters per shape; `i` varies the client.
SHAPES: dict[str, Callable[[int, bool, int], str]] = {
    # The reported one: the Sendmail version regex on `by host (1.1.<digits>)`.
    "sendmail_digits": lambda i, inside, w: _fit(
        f"from h{i}.example (h{i}.example [{_client(i, inside)}]) by relay.example (1.1.",
        "1",
        ")",
        w,
    ),
    "digit_dot_runs": lambda i, inside, w: _fit(
        f"from h{i} (h{i} [{_client(i, inside)}]) by relay.example (", "1234567.", ")", w
    ),
    "long_comment": lambda i, inside, w: _fit(
        f"from h{i} (h{i} [{_client(i, inside)}]) (", "a", ") by relay.example", w
    ),
    "deep_nesting": lambda i, inside, w: _fit(
        f"from h{i} (h{i} [{_client(i, inside)}]) by relay.example ",
        "(",
        ")" * (w // 2),
        w,
    ),
    "brackets": lambda i, inside, w: _fit(
        f"from h{i} (h{i} [{_client(i, inside)}]) (", "[ipv6:aaaa:", ") by relay.example", w
    ),
    "escaped_quotes": lambda i, inside, w: _fit(
        f"from h{i} (h{i} [{_client(i, inside)}]) by relay.example (", '\\"', ")", w
    ),
    "unterminated_quote": lambda i, inside, w: _fit(
        f'from h{i} (h{i} [{_client(i, inside)}]) by relay.example ("', "x(<", "", w
    ),
    "unclosed_angles": lambda i, inside, w: _fit(
        f"from h{i} (h{i} [{_client(i, inside)}]) by relay.example (", "<", ")", w
    ),
    "auth_runs": lambda i, inside, w: _fit(
        f"from h{i} (h{i} [{_client(i, inside)}]) by relay.example (", "auth=", ")", w
    ),
    "helo_runs": lambda i, inside, w: _fit(
        f"from h{i} (h{i} [{_client(i, inside)}] ", "helo=port=1", ") by relay.example", w
    ),
}


def received(value: str) -> str:
    return "Received: " + value + "\r\n"


def old_127k(inside: bool = False) -> bytes:
    """The reported case: 64 Received lines of 2,000 characters (127 KB)."""
    shape = SHAPES["sendmail_digits"]
    first = received(shape(0, True, 2000)) if inside else ENTRY
    rest = "".join(received(shape(i, inside, 2000)) for i in range(1, 64))
    return (first + rest).encode()


def mix_1m(inside: bool = False, size: int = MB) -> bytes:
    """One megabyte (`size` bytes) of hostile header lines, every shape in turn."""
    first = received(SHAPES["sendmail_digits"](0, True, 2000)) if inside else ENTRY
    parts = [first.encode()]
    total = len(parts[0])
    shapes = list(SHAPES.values())
    i = 1
    while total < size // 2:  # half of it: long hostile Received lines
        line = received(shapes[i % len(shapes)](i, inside, 2000 if i % 3 else 8000)).encode()
        parts.append(line)
        total += len(line)
        i += 1
    fillers = (
        "".join(received(f"from x{k} ([{_client(k, inside)}]) by y") for k in range(2000)).encode(),
        b"X-A:1\r\n" * 5000,  # a field per line
        b"X-Fold: x\r\n" + b" \r\n" * 20_000,  # a continuation flood
        b'Received: from "\r\n' * 3000,  # unterminated quotes, one per line
        b"\xff\xfe\xc3 junk without a colon\r\n" * 2000,  # invalid UTF-8, no field
    )
    k = 0
    while total < size:
        chunk = fillers[k % len(fillers)]
        parts.append(chunk)
        total += len(chunk)
        k += 1
    return b"".join(parts)[:size]


CASES: dict[str, tuple[Callable[[], bytes], Verdict]] = {
    "old_127k_relayed": (lambda: old_127k(False), Verdict.RELAYED_THIRD_PARTY),
    "old_127k_inside": (lambda: old_127k(True), Verdict.UNDETERMINED),
    "mix_1m_relayed": (lambda: mix_1m(False), Verdict.RELAYED_THIRD_PARTY),
    "mix_1m_inside": (lambda: mix_1m(True), Verdict.UNDETERMINED),
}


async def _time(engine: Engine, headers: bytes, runs: int) -> tuple[list[float], list[float], str]:
    req = ClassifyInput("", ipaddress.ip_address(RELAY), "", "", RCPT, headers, True)
    await engine.classify(req)  # warm-up
    walls, cpus = [], []
    answer = ""
    for _ in range(runs):
        w0, c0 = time.perf_counter(), time.process_time()
        out = await engine.classify(req)
        walls.append((time.perf_counter() - w0) * 1000)
        cpus.append((time.process_time() - c0) * 1000)
        answer = f"{out.judgement.verdict.name} ({out.judgement.rule})"
    return walls, cpus, answer


async def _run(runs: int) -> tuple[dict[str, float], dict[str, str]]:
    engine = Engine(Settings(), MemoryStore(), Metrics())
    await engine.start()
    await engine.upsert(CUSTOMER)
    figures: dict[str, float] = {}
    verdicts: dict[str, str] = {}
    try:
        for name, (build, expected) in CASES.items():
            headers = build()
            walls, cpus, answer = await _time(engine, headers, runs)
            figures[f"{name}_kb"] = len(headers) / 1024
            figures[f"{name}_median_ms"] = statistics.median(walls)
            figures[f"{name}_max_ms"] = max(walls)
            figures[f"{name}_cpu_median_ms"] = statistics.median(cpus)
            verdicts[name] = answer if answer.startswith(expected.name) else f"{answer} (!)"
    finally:
        await engine.close()
    return figures, verdicts


def run(runs: int = RUNS) -> dict[str, float]:
    """The figures (milliseconds, kilobytes), keyed `<case>_<figure>`."""
    with capture_logs():
        return asyncio.run(_run(runs))[0]


def main() -> int:
    with capture_logs():
        figures, verdicts = asyncio.run(_run(RUNS))
    print(f"relaycheck Classify on hostile headers (Engine.classify, {RUNS} runs each)")
    print(f"{'case':<18} {'KB':>7} {'median ms':>10} {'max ms':>8} {'cpu ms':>8}  verdict")
    for name in CASES:
        print(
            f"{name:<18} {figures[f'{name}_kb']:7.0f} {figures[f'{name}_median_ms']:10.2f}"
            f" {figures[f'{name}_max_ms']:8.2f} {figures[f'{name}_cpu_median_ms']:8.2f}"
            f"  {verdicts[name]}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
