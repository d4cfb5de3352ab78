"""`penaltyctl` against real in-process penaltyd servers (memory store).

The `serve` fixture runs penaltyd on the test's event loop and the CLI uses the blocking
client, so every invocation runs in a worker thread (`asyncio.to_thread`); CliRunner
captures stdout and stderr separately, so the tests see what a script would.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog
import typer
from typer.testing import CliRunner, Result

from penalty.v1 import penalty_pb2 as pb
from penaltyclient.ctl import Code, app, parse_outcome, parse_ttl
from penaltyd.store.memory import MemoryStore
from tests.harness.builders import UNKNOWN, report
from tests.harness.inprocess import Served, ServeFactory
from tests.harness.ports import free_port

runner = CliRunner()
# Never let the developer's environment choose the server, the token or TLS; a wide
# terminal keeps rich tables from wrapping what the assertions look for.
CLEAN_ENV: dict[str, str | None] = {
    "PENALTYD_ADDRESS": None,
    "PENALTYD_ADMIN_TOKEN": None,
    "PENALTYD_TLS": None,
    "PENALTYD_TLS_CA": None,
    "PENALTYD_TLS_CERT": None,
    "PENALTYD_TLS_KEY": None,
    "COLUMNS": "250",
}


@pytest.fixture(autouse=True)
def quiet_server_logs() -> Iterator[None]:
    """The in-process penaltyd logs to whatever sys.stdout is when it logs, which during
    an invocation is CliRunner's capture: keep its lines out of the CLI's output."""
    with structlog.testing.capture_logs():
        yield


async def ctl(address: str, *args: str, env: dict[str, str] | None = None) -> Result:
    """Run `penaltyctl --penaltyd ADDRESS ARGS...` off the event loop that serves penaltyd."""
    return await asyncio.to_thread(
        runner.invoke,
        app,
        ["--penaltyd", address, *args],
        env={**CLEAN_ENV, **(env or {})},
    )


def doc(result: Result) -> Any:
    return json.loads(result.stdout)


def lines(result: Result) -> list[Any]:
    return [json.loads(line) for line in result.stdout.splitlines()]


async def penalize(pd: Served, ip: str) -> None:
    for _ in range(25):
        await pd.service.Report(report(ip, UNKNOWN))


async def test_check_exit_codes(serve: ServeFactory) -> None:
    pd = await serve(MemoryStore())
    ok = await ctl(pd.address, "check", "203.0.113.7")
    assert ok.exit_code == Code.OK, ok.output
    assert "203.0.113.7: no penalty" in ok.stdout

    await penalize(pd, "203.0.113.7")
    tempfail = await ctl(pd.address, "check", "203.0.113.7", "--helo", "mx.example.net")
    assert tempfail.exit_code == 3
    assert "TEMPFAIL" in tempfail.stdout
    assert "450 4.7.1 too many SMTP errors from 203.0.113.7; try again in" in tempfail.stdout

    nobody = f"127.0.0.1:{free_port()}"
    degraded = await ctl(nobody, "--timeout", "1", "check", "203.0.113.7")
    assert degraded.exit_code == 4
    assert "DEGRADED" in degraded.stdout
    down = await ctl(nobody, "--timeout", "1", "stats")  # admin calls: unavailable
    assert down.exit_code == 6
    assert "did not answer (UNAVAILABLE" in down.stderr
    assert "Traceback" not in down.output


async def test_report_then_explain_shows_the_numbers(serve: ServeFactory) -> None:
    pd = await serve(MemoryStore())
    reported = await ctl(pd.address, "report", "198.51.100.5", "unknown_recipient=3", "ACCEPTED=7")
    assert reported.exit_code == Code.OK, reported.output
    explained = await ctl(pd.address, "explain", "198.51.100.5")
    assert explained.exit_code == Code.OK, explained.output
    out = explained.stdout
    assert "explain 198.51.100.5" in out
    for fragment in ["unknown_recipient │     3", "accepted          │     7", "events"]:
        assert fragment in out
    assert "error ratio          0.300" in out
    assert "threshold 0.500" in out
    assert "fleet baseline" in out
    assert "verdict              no penalty" in out

    fired = await ctl(pd.address, "report", "198.51.100.5", "Unknown-Recipient=40")
    assert fired.exit_code == Code.TEMPFAIL
    explained = await ctl(pd.address, "explain", "198.51.100.5")
    assert "TEMPFAIL" in explained.stdout
    assert "error ratio significantly above threshold" in explained.stdout

    # A client behind an address with several clients: its own window is shown too.
    await ctl(pd.address, "report", "100.64.1.1", "accepted=5", "--helo", "pc1.home")
    await ctl(pd.address, "report", "100.64.1.1", "unknown_recipient=40", "--helo", "bulk")
    own = await ctl(pd.address, "explain", "100.64.1.1", "--helo", "bulk")
    assert "this client's own window: 100.64.1.1#" in own.stdout
    assert "distinct clients in the window" in own.stdout


async def test_report_refuses_unknown_outcomes(serve: ServeFactory) -> None:
    pd = await serve(MemoryStore())
    bad = await ctl(pd.address, "report", "198.51.100.5", "spam=3")
    assert bad.exit_code == Code.USAGE
    assert "unknown outcome 'spam'" in bad.stderr
    assert "unknown_recipient" in bad.stderr
    assert "lost_connection" in bad.stderr
    zero = await ctl(pd.address, "report", "198.51.100.5", "accepted=0")  # penaltyd refuses
    assert zero.exit_code == Code.USAGE
    assert "counts[0].n" in zero.stderr
    ex = await pd.admin.Explain(pb.ExplainRequest(client=pb.Client(ip="198.51.100.5")))
    assert ex.events == 0  # nothing was stored


async def test_lift(serve: ServeFactory) -> None:
    pd = await serve(MemoryStore())
    await penalize(pd, "203.0.113.8")
    lifted = await ctl(pd.address, "lift", "203.0.113.8", "--actor", "alice", "--note", "ticket 42")
    assert lifted.exit_code == Code.OK, lifted.output
    assert "lifted the penalty on 203.0.113.8" in lifted.stdout
    again = await ctl(pd.address, "lift", "203.0.113.8")
    assert again.exit_code == 1
    assert "nothing lifted" in again.stdout
    assert (await ctl(pd.address, "check", "203.0.113.8")).exit_code == Code.OK
    explained = await ctl(pd.address, "explain", "203.0.113.8")
    assert "by alice: ticket 42" in explained.stdout


async def test_allow_allowlist_unallow(serve: ServeFactory) -> None:
    pd = await serve(MemoryStore())
    added = await ctl(
        pd.address, "allow", "192.0.2.0/24", "--ttl", "12h", "--note", "partner [x]", "--actor", "a"
    )
    assert added.exit_code == Code.OK, added.output
    assert "allowlisted 192.0.2.0/24 until" in added.stdout
    table = await ctl(pd.address, "allowlist")
    assert "192.0.2.0/24" in table.stdout
    assert "partner [x]" in table.stdout  # notes are literal text, never rich markup
    entries = doc(await ctl(pd.address, "allowlist", "--json"))["entries"]
    assert [e["cidr"] for e in entries] == ["192.0.2.0/24"]
    ttl_ms = int(entries[0]["expires_at_unix_ms"]) - int(entries[0]["created_at_unix_ms"])
    assert ttl_ms == 12 * 3600 * 1000
    await penalize(pd, "192.0.2.5")
    allowed = await ctl(pd.address, "check", "192.0.2.5")
    assert allowed.exit_code == Code.OK
    assert "allowlisted" in allowed.stdout

    removed = await ctl(pd.address, "unallow", "192.0.2.0/24", "--actor", "a")
    assert removed.exit_code == Code.OK
    assert (await ctl(pd.address, "unallow", "192.0.2.0/24")).exit_code == Code.NOTHING
    assert doc(await ctl(pd.address, "--json", "allowlist")) == {"entries": []}

    bad_ttl = await ctl(pd.address, "allow", "192.0.2.0/24", "--ttl", "3 weeks")
    assert bad_ttl.exit_code == Code.USAGE
    assert "not a duration" in bad_ttl.stderr
    too_broad = await ctl(pd.address, "allow", "10.0.0.0/8")
    assert too_broad.exit_code == Code.USAGE
    assert "cidr" in too_broad.stderr


async def test_list_several_penalties(serve: ServeFactory) -> None:
    pd = await serve(MemoryStore())
    ips = [f"203.0.113.{i}" for i in range(10, 15)]
    for ip in ips:
        await penalize(pd, ip)
    table = await ctl(pd.address, "list", "--page-size", "2")  # three pages
    assert table.exit_code == Code.OK, table.output
    assert "active penalties: 5" in table.stdout
    for ip in ips:
        assert ip in table.stdout
    assert "error ratio significantly above threshold" in table.stdout
    limited = await ctl(pd.address, "list", "--limit", "2")
    assert "active penalties: 2 (first 2; more exist)" in limited.stdout
    assert sum(ip in limited.stdout for ip in ips) == 2
    rows = lines(await ctl(pd.address, "list", "--json", "--page-size", "2"))
    assert sorted(r["identity"] for r in rows) == ips
    assert all(0 < r["seconds_left"] <= 300 and r["reason"] for r in rows)
    assert len(lines(await ctl(pd.address, "--json", "list", "--limit", "3"))) == 3


async def test_stats(serve: ServeFactory) -> None:
    pd = await serve(MemoryStore())
    await penalize(pd, "203.0.113.20")
    shown = await ctl(pd.address, "stats")
    assert shown.exit_code == Code.OK, shown.output
    assert "active penalties" in shown.stdout
    assert "memory" in shown.stdout
    stats = doc(await ctl(pd.address, "stats", "--json"))
    assert stats["active_penalties"] == "1"  # uint64: a string in the proto3 JSON mapping
    assert stats["store"] == "memory"
    assert stats["degraded_replicas"] == 0


async def test_json_output(serve: ServeFactory) -> None:
    pd = await serve(MemoryStore())
    clean = await ctl(pd.address, "--json", "check", "203.0.113.30")
    assert clean.exit_code == Code.OK
    assert doc(clean) == {
        "tempfail": False,
        "seconds_left": 0,
        "expires_at_unix_ms": "0",
        "identity": "203.0.113.30",
        "reason": "",
        "smtp_reply": "",
        "degraded": False,
        "allowlisted": False,
        "client": "",
    }
    await penalize(pd, "203.0.113.30")
    verdict = await ctl(pd.address, "check", "203.0.113.30", "--json")
    assert verdict.exit_code == Code.TEMPFAIL
    v = doc(verdict)
    assert v["tempfail"] is True
    assert 0 < v["seconds_left"] <= 300
    assert v["smtp_reply"].startswith("450 4.7.1")
    reported = doc(await ctl(pd.address, "--json", "report", "203.0.113.31", "accepted=2"))
    assert reported["identity"] == "203.0.113.31"
    explained = doc(await ctl(pd.address, "--json", "explain", "203.0.113.31"))
    assert explained["window"] == [{"outcome": "OUTCOME_ACCEPTED", "n": "2"}]
    assert explained["error_ratio"] == 0
    assert explained["threshold"] == 0.5
    assert explained["verdict"]["tempfail"] is False
    lifted = doc(await ctl(pd.address, "--json", "lift", "203.0.113.30"))
    assert lifted == {"lifted": True, "identity": "203.0.113.30"}


async def test_bad_input_names_the_field(serve: ServeFactory) -> None:
    pd = await serve(MemoryStore())
    for command in ("check", "explain", "lift"):
        bad = await ctl(pd.address, command, "1.2.3")
        assert bad.exit_code == 2, bad.output
        assert "client.ip: not an IP address: '1.2.3'" in bad.stderr
        assert "Traceback" not in bad.output
    address = await ctl("penaltyd.example", "check", "192.0.2.1")  # no port
    assert address.exit_code == Code.USAGE
    assert "--penaltyd 'penaltyd.example': not HOST:PORT" in address.stderr
    usage = await ctl(pd.address, "check")  # missing argument: typer's own usage error
    assert usage.exit_code == Code.USAGE


async def test_admin_token(serve: ServeFactory) -> None:
    pd = await serve(MemoryStore(), admin_token="s3cret")
    missing = await ctl(pd.address, "stats")
    assert missing.exit_code == 5
    assert "UNAUTHENTICATED" in missing.stderr
    assert "PENALTYD_ADMIN_TOKEN" in missing.stderr
    wrong = await ctl(pd.address, "--token", "wrong", "lift", "192.0.2.1")
    assert wrong.exit_code == Code.AUTH
    right = await ctl(pd.address, "--token", "s3cret", "stats")
    assert right.exit_code == Code.OK, right.output
    from_env = await ctl(pd.address, "allowlist", env={"PENALTYD_ADMIN_TOKEN": "s3cret"})
    assert from_env.exit_code == Code.OK, from_env.output
    assert (await ctl(pd.address, "check", "192.0.2.1")).exit_code == Code.OK  # MX calls: no token


async def test_watch_shows_the_snapshot_then_live_events(serve: ServeFactory) -> None:
    pd = await serve(MemoryStore())
    await penalize(pd, "203.0.113.40")
    watching = asyncio.ensure_future(ctl(pd.address, "watch", "--max-events", "1"))
    # Each Allow is either in the snapshot (the watch had not subscribed yet) or the one
    # live event that ends the watch; stop as soon as the watch has exited.
    for i in range(1, 200):
        await pd.admin.Allow(pb.AllowRequest(cidr=f"198.51.100.{i}/32", note=f"n{i}"))
        done, _ = await asyncio.wait({watching}, timeout=0.05)
        if done:
            break
    assert watching.done(), "the watch saw no live event"
    result = watching.result()
    assert result.exit_code == Code.OK, result.output
    out = result.stdout.splitlines()
    done_at = next(n for n, line in enumerate(out) if line.startswith("--- snapshot done"))
    snapshot, live = out[:done_at], out[done_at + 1 :]
    assert any(line.startswith("snapshot  penalty 203.0.113.40: ") for line in snapshot)
    assert len(live) == 1
    assert " allow 198.51.100." in live[0]
    assert not live[0].startswith("snapshot")

    dumped = lines(await ctl(pd.address, "--json", "watch", "--snapshot-only"))
    assert dumped[0]["kind"] == "KIND_PENALTY_STARTED"
    assert dumped[0]["penalty"]["identity"] == "203.0.113.40"
    assert dumped[-1]["kind"] == "KIND_SNAPSHOT_DONE"
    assert "{seconds}" in dumped[-1]["smtp_reply_template"]

    nobody = await ctl(f"127.0.0.1:{free_port()}", "watch")
    assert nobody.exit_code == Code.UNAVAILABLE


def _self_signed(tmp: Path) -> tuple[Path, Path]:
    key, cert = tmp / "key.pem", tmp / "cert.pem"
    args = ["-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    args += ["-days", "1", "-subj", "/CN=localhost"]
    args += ["-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"]
    subprocess.run(["openssl", "req", *args, "-keyout", key, "-out", cert], check=True)
    return key, cert


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl")
async def test_tls(serve: ServeFactory, tmp_path: Path) -> None:
    key, cert = _self_signed(tmp_path)
    pd = await serve(MemoryStore(), tls_cert_file=str(cert), tls_key_file=str(key))
    secure = await ctl(pd.address, "--tls-ca", str(cert), "stats")
    assert secure.exit_code == Code.OK, secure.output
    via_env = await ctl(pd.address, "check", "192.0.2.1", env={"PENALTYD_TLS_CA": str(cert)})
    assert via_env.exit_code == Code.OK, via_env.output
    plaintext = await ctl(pd.address, "--timeout", "1", "check", "192.0.2.1")
    assert plaintext.exit_code == Code.DEGRADED  # refused: the MX answer fails open
    half = await ctl(pd.address, "--tls-cert", str(cert), "stats")
    assert half.exit_code == Code.USAGE
    assert "go together" in half.stderr


def test_exit_codes_are_a_fixed_contract() -> None:
    """Scripts branch on these numbers: renumbering one breaks them."""
    assert {c.name: int(c) for c in Code} == {
        "OK": 0,
        "NOTHING": 1,
        "USAGE": 2,
        "TEMPFAIL": 3,
        "DEGRADED": 4,
        "AUTH": 5,
        "UNAVAILABLE": 6,
        "ERROR": 7,
    }


def test_help_documents_the_exit_codes() -> None:
    shown = runner.invoke(app, ["--help"], env=CLEAN_ENV)
    assert shown.exit_code == 0
    for text in ("Exit codes", "3: check/report: tempfail", "5: UNAUTHENTICATED", "watch"):
        assert text in shown.stdout


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("accepted", (pb.OUTCOME_ACCEPTED, 1)),
        ("unknown_recipient=3", (pb.OUTCOME_UNKNOWN_RECIPIENT, 3)),
        ("OUTCOME_RELAY_DENIED=2", (pb.OUTCOME_RELAY_DENIED, 2)),
        ("Bad-Helo=1", (pb.OUTCOME_BAD_HELO, 1)),
    ],
)
def test_parse_outcome(text: str, expected: tuple[int, int]) -> None:
    assert parse_outcome(text) == expected


@pytest.mark.parametrize("text", ["", "unspecified", "accepted=", "accepted=-1", "accepted=x"])
def test_parse_outcome_refuses(text: str) -> None:
    with pytest.raises(typer.BadParameter):
        parse_outcome(text)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("0", 0),
        ("3600", 3600),
        ("30d", 2_592_000),
        ("12h", 43_200),
        ("15m", 900),
        ("1d12h", 129_600),
    ],
)
def test_parse_ttl(text: str, seconds: int) -> None:
    assert parse_ttl(text) == seconds


@pytest.mark.parametrize("text", ["", "-5", "1y", "12 h", "h12", "1.5h"])
def test_parse_ttl_refuses(text: str) -> None:
    with pytest.raises(typer.BadParameter):
        parse_ttl(text)


async def test_disclose_answers_a_data_request_and_is_audited(serve: ServeFactory) -> None:
    pd = await serve(MemoryStore())
    for _ in range(30):
        await pd.service.Report(report("203.0.113.8", UNKNOWN))
    with structlog.testing.capture_logs() as logs:
        out = await ctl(pd.address, "disclose", "203.0.113.8", "--note", "REQ-9", "--actor", "dpo")
        assert out.exit_code == 0, out.output
        assert "3 items held about 203.0.113.8" in out.stdout  # window, penalty, reputation
        assert "penalty" in out.stdout
        assert "Not itemized" in out.stdout
        as_json = await ctl(
            pd.address, "--json", "disclose", "203.0.113.8", "--note", "REQ-9", "--actor", "dpo"
        )
    found = json.loads(as_json.stdout)
    assert {i["kind"] for i in found["items"]} == {"window", "penalty", "reputation"}
    audits = [e for e in logs if e["event"] == "audit"]
    assert [(e["method"], e["actor"], e["note"]) for e in audits] == [
        ("Disclose", "dpo", "REQ-9")
    ] * 2
    missing = await ctl(pd.address, "disclose", "203.0.113.8")
    assert missing.exit_code == 2  # --note is required: a data request has a case reference
    assert "--note" in missing.output


async def test_admin_commands_record_the_login_name_as_actor(serve: ServeFactory) -> None:
    pd = await serve(MemoryStore())
    with structlog.testing.capture_logs() as logs:
        await ctl(pd.address, "explain", "203.0.113.8", env={"PENALTYCTL_ACTOR": "alice"})
        await ctl(pd.address, "list", "--note", "weekly review")
    audits = [e for e in logs if e["event"] == "audit"]
    assert audits[0]["actor"] == "alice"
    assert audits[1]["note"] == "weekly review"
    assert audits[1]["actor"]  # the login name, never an empty actor
