"""Every configuration or start-up mistake of every console script: one line on stderr
naming the setting and where its value came from, exit 2, never a traceback."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness.ports import free_port


@pytest.fixture(scope="module")
def taken() -> Iterator[int]:
    """A loopback port something already listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield int(s.getsockname()[1])


def run(
    module: str, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("PENALTYD_", "RELAYCHECK_"))}
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        env={**clean, **(env or {})},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def one_line(out: subprocess.CompletedProcess[str], *expected: str) -> None:
    assert out.returncode == 2, out
    assert "Traceback" not in out.stderr, out.stderr
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, out.stderr
    for text in expected:
        assert text in lines[0], lines[0]


def listen() -> str:
    return f"127.0.0.1:{free_port()}"


CONFIG_CASES = [
    ({"PENALTYD_PENALTY_SECNDS": "3"}, ["unknown variable PENALTYD_PENALTY_SECNDS",
                                       "did you mean PENALTYD_PENALTY_SECONDS"]),
    ({"PENALTYD_SHARED_CIDRS": "100.64.0.0/10,nope"}, ["shared_cidrs",
                                                       "variable PENALTYD_SHARED_CIDRS", "'nope'"]),
    ({"PENALTYD_PENALTY_SECONDS": "abc"}, ["penalty_seconds = 'abc'",
                                           "variable PENALTYD_PENALTY_SECONDS", "integer"]),
    ({"PENALTYD_SMTP_REPLY": "550 no"}, ["smtp_reply", "4xx"]),
    ({"PENALTYD_SERVICE_AUTH": "sometimes"}, ["service_auth", "'none', 'reports' or 'all'"]),
    ({"PENALTYD_WEIGHTS__BAD_HELOO": "1"}, ["weights.bad_heloo", "did you mean weights.bad_helo"]),
    ({"PENALTYD_WORKERS": "2"}, ["workers=2 needs the Redis store"]),
    ({"PENALTYD_REDIS_URL": "http://x"}, ["redis_url", "redis+sentinel://"]),
]  # fmt: skip


@pytest.mark.parametrize(("env", "expected"), CONFIG_CASES)
def test_penaltyd_configuration_mistakes(env: dict[str, str], expected: list[str]) -> None:
    one_line(run("penaltyd", "--listen", listen(), env=env), *expected)


def test_penaltyd_list_settings_take_commas_from_the_environment() -> None:
    out = run(
        "penaltyd", "--print-config", env={"PENALTYD_SHARED_CIDRS": "100.64.0.0/10, 192.0.2.0/24"}
    )
    assert out.returncode == 0, out.stderr
    assert '"100.64.0.0/10"' in out.stdout
    assert '"192.0.2.0/24"' in out.stdout


def test_penaltyd_file_mistakes(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("penalty_secnds = 3\n")
    one_line(run("penaltyd", "--config", str(bad)), f"{bad}, key penalty_secnds",
             "did you mean penalty_seconds")  # fmt: skip
    bad.write_text("[weights]\nbad_helo = 'x'\n")
    one_line(
        run("penaltyd", "--config", str(bad)), "weights.bad_helo", f"{bad}, key weights.bad_helo"
    )
    bad.write_text("not toml at all = = \n")
    one_line(run("penaltyd", "--config", str(bad)), "is not TOML")
    one_line(run("penaltyd", "--config", str(tmp_path / "missing.toml")), "cannot read config file")


def test_penaltyd_start_up_mistakes(taken: int, tmp_path: Path) -> None:
    one_line(run("penaltyd", "--listen", f"127.0.0.1:{taken}"), f"listen 127.0.0.1:{taken}",
             "in use")  # fmt: skip
    one_line(run("penaltyd", "--listen", listen(), "--metrics-listen", f"127.0.0.1:{taken}"),
             f"metrics_listen 127.0.0.1:{taken}", "in use")  # fmt: skip
    missing = str(tmp_path / "cert.pem")
    tls = {"PENALTYD_TLS_CERT_FILE": missing, "PENALTYD_TLS_KEY_FILE": missing}
    one_line(run("penaltyd", "--listen", listen(), env=tls), "tls_key_file", "No such file")
    tokens = {"PENALTYD_SERVICE_AUTH": "reports", "PENALTYD_SERVICE_TOKENS_FILE": missing}
    one_line(run("penaltyd", "--listen", listen(), env=tokens), "service_tokens_file")


def test_relaycheck_mistakes(taken: int, tmp_path: Path) -> None:
    one_line(run("relaycheck", "serve", env={"RELAYCHECK_LISTN": "x"}),
             "unknown variable RELAYCHECK_LISTN", "did you mean RELAYCHECK_LISTEN")  # fmt: skip
    one_line(run("relaycheck", "serve", "--listen", f"127.0.0.1:{taken}"), "in use")
    one_line(run("relaycheck", "serve", env={"RELAYCHECK_MAX_RECEIVED": "1"}), "max_received")


@pytest.mark.parametrize(
    ("module", "args"),
    [
        ("penaltyclient.policyd", ["--penaltyd", "127.0.0.1:1", "--listen"]),
        ("penaltyclient.milter", ["--penaltyd", "127.0.0.1:1", "--listen"]),
        ("relaycheckclient.milter", ["--relaycheck", "127.0.0.1:1", "--listen"]),
    ],
)
def test_sidecars_name_a_port_in_use(module: str, args: list[str], taken: int) -> None:
    one_line(run(module, *args, f"127.0.0.1:{taken}"), f"{taken}")


def test_a_refused_secret_is_named_but_never_echoed() -> None:
    # A real key mistyped by one character would otherwise land in the journal.
    secret = "shortsecretvalue123"
    out = run("penaltyd", "--print-config", env={"PENALTYD_IDENTITY_KEY": secret})
    one_line(out, "identity_key = '***'", "variable PENALTYD_IDENTITY_KEY", "at least 32")
    assert secret not in out.stderr + out.stdout
