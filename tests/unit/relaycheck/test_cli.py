"""The `relaycheck` command line: the abuse desk's classify, customers, exit codes.

The CLI runs its own event loop (asyncio.run), so tests call it in a worker thread
against a real in-process server; the server's log lines are captured with structlog's
`capture_logs` so stdout holds only the CLI's output.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from relaycheck.cli import main
from tests.harness.inprocess import RelaycheckServed
from tests.harness.paths import TEST_DATA
from tests.harness.ports import free_port

DATA = TEST_DATA / "relaycheck"
SPAM = str(DATA / "relay-postfix-forged-chain.eml")
AUTH = str(DATA / "auth-postfix-esmtpsa.eml")


async def run(*argv: str) -> int:
    return await asyncio.to_thread(main, list(argv))


def test_offline_classify_human_and_json(capsys: pytest.CaptureFixture[str]) -> None:
    offline = [
        "--customer",
        "acme",
        "--domain",
        "acme.example",
        "--relay-network",
        "198.51.100.8/29",
    ]
    assert main(["classify", SPAM, *offline, "--own-host", "smart.isp.example"]) == 0
    out = capsys.readouterr().out
    assert "verdict:   RELAYED_THIRD_PARTY  (customer acme)" in out
    assert "origin:    203.0.113.66" in out
    assert "[weak] weak_own_domain: From claims acme.example" in out
    assert main(["classify", AUTH, *offline, "--own-host", "smart.isp.example", "--json"]) == 0
    answer = json.loads(capsys.readouterr().out)
    assert answer["verdict"] == "VERDICT_ORIGINATED_BY_CUSTOMER"
    assert answer["entry_hop"]["authenticated"] is True
    assert answer["origin_ip"] == "203.0.113.45"


def test_usage_errors(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["classify", str(tmp_path / "missing.eml"), "--customer", "x"]) == 2
    assert main(["classify", SPAM, "--domain", "bad domain"]) == 2
    assert main(["classify", SPAM, "--domain", "a.example", "--client-ip", "1.2.3"]) == 2
    assert main(["classify", SPAM]) == 2
    assert main(["probe", "host:notaport"]) == 2
    assert main(["probe", "127.0.0.1", "--test", "nope"]) == 2
    err = capsys.readouterr().err
    assert "cannot read" in err
    assert "--domain: not a domain name: 'bad domain'" in err
    assert "--client-ip: not an IP address" in err


def test_unreachable_server_is_exit_3(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(
        [
            "classify",
            SPAM,
            "--customer",
            "acme",
            "--server",
            f"127.0.0.1:{free_port()}",
            "--timeout",
            "0.5",
        ]
    )
    assert code == 3
    assert "UNAVAILABLE" in capsys.readouterr().err


async def test_customers_and_classify_through_the_server(
    rc: RelaycheckServed, capsys: pytest.CaptureFixture[str]
) -> None:
    srv = ["--server", rc.address]
    code = await run(
        "customer",
        "upsert",
        "acme",
        "--relay-network",
        "198.51.100.8/29",
        "--domain",
        "acme.example",
        "--note",
        "Postfix",
        *srv,
    )
    assert code == 0
    assert "relay networks:    198.51.100.8/29" in capsys.readouterr().out
    assert await run("customer", "get", "--ip", "198.51.100.9", "--json", *srv) == 0
    assert json.loads(capsys.readouterr().out)["id"] == "acme"
    code = await run("classify", SPAM, "--customer", "acme", "--rcpt", "victim@example.com", *srv)
    assert code == 0
    out = capsys.readouterr().out
    assert "RELAYED_THIRD_PARTY" in out
    assert "reported to penaltyd" not in out  # the CLI's classify is a dry run
    assert await run("customer", "upsert", "bad", "--relay-network", "10.0.0.0/8", *srv) == 2
    assert "INVALID_ARGUMENT: relay_networks[0]:" in capsys.readouterr().err
    assert await run("customer", "delete", "acme", *srv) == 0
    assert capsys.readouterr().out.strip() == "deleted"
    assert await run("customer", "get", "acme", *srv) == 2
    assert "NOT_FOUND" in capsys.readouterr().err
