"""Every daemon runs inside the sandbox its systemd unit asks for.

`systemd-analyze verify` (tests/unit/deploy/test_systemd.py) says the units are valid,
not that the programs survive them. Here each program runs as its unit would confine it
(tests/integration/deploy/sandbox.py: read-only system, private /tmp, /proc with
subset=pid, no capabilities, no_new_privs, and systemd's seccomp filters for
SystemCallFilter=, MemoryDenyWriteExecute= and RestrictAddressFamilies=), and must start,
answer, and stop cleanly on SIGTERM: a refused syscall, a W+X mapping (a JIT, a ctypes
callback), a write outside /tmp or an unlisted socket family would show here. Needs root
(namespaces, mounts) and systemd-analyze (`make deps`).
"""

from __future__ import annotations

import contextlib
import os
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from deploy.checks.config import ROOT
from tests.harness.ports import free_ports
from tests.harness.redis import RedisServer

UNITS = ROOT / "deploy" / "systemd"
BIN = Path(sys.executable).parent
POLICY_REQUEST = (
    b"request=smtpd_access_policy\nprotocol_state=RCPT\nprotocol_name=ESMTP\n"
    b"client_address=198.51.100.9\nclient_name=unknown\nhelo_name=test.example\n"
    b"sender=a@example.net\nrecipient=b@example.org\n\n"
)

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="the sandbox needs root (mount namespace)"),
    pytest.mark.skipif(
        shutil.which("systemd-analyze") is None,
        reason="systemd-analyze missing: `make deps` installs Debian's systemd",
    ),
    pytest.mark.timeout(120),
]


class Sandboxed:
    def __init__(self, proc: subprocess.Popen[str], lines: list[str]) -> None:
        self.proc = proc
        self.lines = lines

    def status(self, field: str) -> str:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return line.split(":", 1)[1].strip()
        raise AssertionError(field)

    def catches_sigterm(self) -> bool:
        return bool(int(self.status("SigCgt"), 16) & (1 << (signal.SIGTERM - 1)))

    def stop(self) -> str:
        """SIGTERM, as systemd's KillSignal=; the whole output. Must exit 0.

        The milters log their start line just before installing their SIGTERM handler,
        so a SIGTERM right after it can find the default action: wait (bounded) until
        the kernel shows the signal caught. No event says so, hence the short poll."""
        deadline = time.monotonic() + 10
        while not self.catches_sigterm() and time.monotonic() < deadline:
            time.sleep(0.01)
        self.proc.send_signal(signal.SIGTERM)
        out, _ = self.proc.communicate(timeout=30)
        text = "".join(self.lines) + out
        assert self.proc.returncode == 0, text
        return text


@contextlib.contextmanager
def sandboxed(
    unit: str, argv: list[str], ready: str, stdin: int | None = None
) -> Iterator[Sandboxed]:
    """argv under `unit`'s sandbox, yielded once a line contains `ready`."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.integration.deploy.sandbox", str(UNITS / unit), "--", *argv],
        stdin=stdin if stdin is not None else subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=ROOT,
    )
    assert proc.stdout is not None
    lines: list[str] = []
    try:
        deadline = time.monotonic() + 30
        with selectors.DefaultSelector() as sel:
            sel.register(proc.stdout, selectors.EVENT_READ)
            while (left := deadline - time.monotonic()) > 0 and sel.select(left):
                line = proc.stdout.readline()
                if not line:
                    break
                lines.append(line)
                if ready in line:
                    break
        if not lines or ready not in lines[-1]:
            proc.kill()
            out, _ = proc.communicate(timeout=10)
            pytest.fail(f"{unit}: no {ready!r}:\n" + "".join(lines) + out)
        sandbox = Sandboxed(proc, lines)
        # Confined as the unit says (the kernel's view of the exec'd program).
        assert sandbox.status("NoNewPrivs") == "1"
        assert int(sandbox.status("CapEff"), 16) == 0
        assert sandbox.status("Seccomp") == "2"
        yield sandbox
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def _serving(address: str, service: str = "") -> str:
    with grpc.insecure_channel(address) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=10, wait_for_ready=True
        )
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))


def _refused(text: str) -> None:
    for sign in ("Operation not permitted", "Read-only file system", "Traceback"):
        assert sign not in text, text


@pytest.fixture(scope="module")
def redis() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


@pytest.fixture(scope="module")
def penaltyd(redis: RedisServer) -> Iterator[str]:
    grpc_port, metrics_port = free_ports(2)
    address = f"127.0.0.1:{grpc_port}"
    argv = [str(BIN / "penaltyd"), "--config", str(ROOT / "deploy/etc/penaltyd/penaltyd.toml")]
    argv += ["--listen", address, "--metrics-listen", f"127.0.0.1:{metrics_port}"]
    argv += ["--redis-url", redis.url]
    with sandboxed("penaltyd.service", argv, '"penaltyd_started"') as box:
        assert _serving(address) == "SERVING"
        assert _serving(address, "penaltyd.store") == "SERVING"
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as r:
            assert b"penaltyd_degraded 0.0" in r.read()
        yield address
        _refused(box.stop())


def test_penaltyd_serves_under_its_unit(penaltyd: str) -> None:
    from penalty.v1 import penalty_pb2, penalty_pb2_grpc

    with grpc.insecure_channel(penaltyd) as channel:
        reply = penalty_pb2_grpc.PenaltyServiceStub(channel).Check(
            penalty_pb2.CheckRequest(client=penalty_pb2.Client(ip="203.0.113.7")), timeout=5
        )
    assert not reply.tempfail


def test_relaycheck_serves_under_its_unit(redis: RedisServer) -> None:
    (port,) = free_ports(1)
    address = f"127.0.0.1:{port}"
    argv = [str(BIN / "relaycheck"), "serve", "--listen", address, "--redis-url", redis.url]
    with sandboxed("relaycheck.service", argv, '"relaycheck_started"') as box:
        assert _serving(address) == "SERVING"
        _refused(box.stop())


def test_policyd_answers_under_its_unit(penaltyd: str) -> None:
    (port,) = free_ports(1)
    argv = [str(BIN / "penalty-policyd"), "--listen", f"127.0.0.1:{port}", "--penaltyd", penaltyd]
    with sandboxed("penalty-policyd.service", argv, '"policyd_started"') as box:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.sendall(POLICY_REQUEST)
            answer = s.recv(4096)
        assert answer.startswith(b"action=")
        text = box.stop()
        assert '"policyd_fd_limit"' in text  # its setrlimit (in @resources) went through
        _refused(text)


@pytest.mark.parametrize(
    ("unit", "program", "flag", "address_flag"),
    [
        ("penalty-milter.service", "penalty-milter", "--penaltyd", "penaltyd"),
        ("relaycheck-milter.service", "relaycheck-milter", "--relaycheck", "relaycheck"),
    ],
)
def test_milters_listen_under_their_units(
    penaltyd: str, unit: str, program: str, flag: str, address_flag: str
) -> None:
    (port,) = free_ports(1)
    target = penaltyd if address_flag == "penaltyd" else "127.0.0.1:1"  # fails open
    argv = [str(BIN / program), "--listen", f"127.0.0.1:{port}", flag, target]
    with sandboxed(unit, argv, '"milter_started"') as box:
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            pass
        _refused(box.stop())


def test_logwatch_reads_under_its_unit() -> None:
    line = (
        "Jan 10 10:00:00 mx postfix/smtpd[123]: NOQUEUE: reject: RCPT from "
        "unknown[203.0.113.9]: 550 5.1.1 <x@example.org>: Recipient address rejected: "
        "User unknown in local recipient table; from=<a@example.net> to=<x@example.org> "
        "proto=ESMTP helo=<h>\n"
    )
    read, write = os.pipe()
    try:
        argv = [str(BIN / "penalty-logwatch"), "--dry-run", "-"]
        with sandboxed("penalty-logwatch.service", argv, "logwatch started", stdin=read) as box:
            os.close(read)
            read = -1
            os.write(write, line.encode())
            os.close(write)  # end of input: it reports and exits
            write = -1
            out, _ = box.proc.communicate(timeout=30)
            text = "".join(box.lines) + out
            assert box.proc.returncode == 0, text
            assert "203.0.113.9" in text
            _refused(text)
    finally:
        for fd in (read, write):
            if fd >= 0:
                os.close(fd)
