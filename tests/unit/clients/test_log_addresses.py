"""`--log-addresses` on every sidecar: the same choice penaltyd and relaycheck take as the
`log_addresses` setting, applied to every line the real console scripts write."""

from __future__ import annotations

import ipaddress
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.harness.paths import REPO, SHARED_DATA
from tests.harness.ports import free_port
from tests.harness.processes import ServiceProcess

MAILLOG = SHARED_DATA / "postfix-3.7" / "maillog-sample.log"
KEY = "sidecar-log-key-0123456789abcdefghijklmnop"
_CANDIDATE = re.compile(r"[0-9A-Fa-f:.]{7,}")


def addresses_in(text: str) -> set[str]:
    """Every IP literal in `text` (a run of hex digits, dots and colons that parses)."""
    found = set()
    for run in _CANDIDATE.findall(text):
        for candidate in (run, run.strip(".:"), run.rsplit(":", 1)[0]):
            try:
                found.add(str(ipaddress.ip_address(candidate)))
                break
            except ValueError:
                continue
    return found


def logwatch(*flags: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "penaltyclient.logwatch",
            "--once",
            "--dry-run",
            *flags,
            str(MAILLOG),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin", **(env or {})},
    )


def test_logwatch_writes_no_address_of_a_real_postfix_log_with_none_or_keyed(
    tmp_path: Path,
) -> None:
    plain = logwatch()
    assert plain.returncode == 0, plain.stderr
    seen = addresses_in(plain.stdout)
    assert len(seen) >= 5  # the control: the dry run's lines do name the log's clients
    key = tmp_path / "identity.key"
    key.write_text(KEY + "\n")
    for flags, env in [
        (("--log-addresses", "none"), None),
        (("--log-addresses", "keyed", "--log-key-file", str(key)), None),
        ((), {"PENALTYD_LOG_ADDRESSES": "keyed"}),  # the env file's way, key drawn at start
    ]:
        done = logwatch(*flags, env=env)
        assert done.returncode == 0, done.stderr
        assert not addresses_in(done.stdout) & seen, flags
        assert [json.loads(line) for line in done.stdout.splitlines()]  # still JSON lines
        if "none" not in flags:  # keyed: one token per address, so the tally keeps its rows
            final = json.loads(done.stdout.splitlines()[-1])
            want = json.loads(plain.stdout.splitlines()[-1])["clients"]
            assert len(final["clients"]) == len(want)


def test_keyed_tokens_are_stable_under_one_key_file(tmp_path: Path) -> None:
    key = tmp_path / "identity.key"
    key.write_text(KEY)
    runs = [logwatch("--log-addresses", "keyed", "--log-key-file", str(key)) for _ in range(2)]
    tokens = [set(re.findall(r"~[A-Za-z0-9_-]{11}", r.stdout)) for r in runs]
    assert tokens[0]
    assert tokens[0] == tokens[1]


@pytest.mark.parametrize(
    ("content", "message"),
    [("short", "at least 32 characters"), ("", "the file is empty")],
)
def test_a_bad_log_key_file_is_one_line_and_exit_2(
    tmp_path: Path, content: str, message: str
) -> None:
    key = tmp_path / "identity.key"
    key.write_text(content)
    done = logwatch("--log-addresses", "keyed", "--log-key-file", str(key))
    assert done.returncode == 2
    assert message in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize(
    ("module", "flags"),
    [
        ("penaltyclient.policyd", ["--penaltyd", "127.0.0.1:9"]),
        ("penaltyclient.milter", ["--penaltyd", "127.0.0.1:9"]),
        ("relaycheckclient.milter", ["--relaycheck", "127.0.0.1:9"]),
    ],
)
def test_every_sidecar_server_takes_log_addresses(module: str, flags: list[str]) -> None:
    outputs = {}
    for mode in ("plain", "none"):
        port = free_port()
        proc = ServiceProcess(
            module, [*flags, "--listen", f"127.0.0.1:{port}", "--log-addresses", mode], port
        )
        proc.start()  # listening: its start line is written
        try:
            assert proc.stop() == 0  # SIGTERM: the stop lines
            outputs[mode] = proc.output()
        finally:
            proc.__exit__()
    assert "127.0.0.1" in outputs["plain"]  # the control: the start line names its address
    assert outputs["none"].strip()
    assert not addresses_in(outputs["none"])
