"""`make fleet` (deploy/local_fleet.py): everything starts, answers, and stops on Ctrl-C.

The script runs as `make fleet` does, in its own session (a terminal's foreground process
group), and gets SIGINT on that group as a Ctrl-C would send it. Prometheus is part of it
when Debian's prometheus is installed (`make fleet` installs it); without it the test
runs the rest with --no-prometheus.
"""

from __future__ import annotations

import contextlib
import json
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
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from deploy.checks.config import ROOT

SCRIPT = ROOT / "deploy" / "local_fleet.py"
HAS_PROMETHEUS = shutil.which("prometheus") is not None
START_TIMEOUT = 90.0
POLICY_REQUEST = (
    b"request=smtpd_access_policy\nprotocol_state=RCPT\nprotocol_name=ESMTP\n"
    b"client_address=198.51.100.9\nclient_name=unknown\nhelo_name=test.example\n"
    b"sender=a@example.net\nrecipient=b@example.org\n\n"
)


class Fleet:
    def __init__(self, proc: subprocess.Popen[str], info: dict[str, Any]) -> None:
        self.proc = proc
        self.info = info

    @property
    def ports(self) -> list[int]:
        addresses = [self.info["redis"].removeprefix("redis://").split("/")[0]]
        for r in self.info["replicas"]:
            addresses += [r["grpc"], r["metrics"].removeprefix("http://").split("/")[0]]
        addresses.append(self.info["policyd"]["listen"])
        if self.info["prometheus"]:
            addresses.append(self.info["prometheus"].removeprefix("http://"))
        return [int(a.rsplit(":", 1)[1]) for a in addresses]


def _read_ready_line(proc: subprocess.Popen[str], timeout: float) -> dict[str, Any]:
    """The JSON line the script prints once everything answers (stdout, line by line)."""
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        while (left := deadline - time.monotonic()) > 0:
            if not sel.select(left):
                break
            line = proc.stdout.readline()
            if not line:
                break  # the script exited
            if line.startswith("{"):
                info: dict[str, Any] = json.loads(line)
                return info
    proc.kill()
    _, err = proc.communicate(timeout=30)
    pytest.fail(f"fleet not ready within {timeout} s (exit {proc.returncode}):\n{err}")


@contextlib.contextmanager
def fleet() -> Iterator[Fleet]:
    args = [sys.executable, str(SCRIPT), "--json", "--stop-timeout", "10"]
    if not HAS_PROMETHEUS:
        args.append("--no-prometheus")
    proc = subprocess.Popen(
        args,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group, as under a terminal
        cwd=ROOT,
    )
    try:
        yield Fleet(proc, _read_ready_line(proc, START_TIMEOUT))
    finally:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


def _health(address: str, service: str) -> str:
    with grpc.insecure_channel(address) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=5
        )
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))


def _policy(address: str) -> str:
    host, port = address.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=5) as s:
        s.sendall(POLICY_REQUEST)
        answer = b""
        while not answer.endswith(b"\n\n"):
            chunk = s.recv(4096)
            if not chunk:
                break
            answer += chunk
    return answer.decode()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"


def _free(port: int) -> bool:
    """Nothing listens there: a server could bind it again (SO_REUSEADDR, as servers do,
    so the TIME_WAIT left by this test's own connections does not count)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
            s.listen()
        except OSError:
            return False
    return True


def _assert_all_gone(f: Fleet) -> None:
    alive = {name: pid for name, pid in f.info["pids"].items() if _alive(pid)}
    assert not alive, f"left running: {alive}"
    busy = [p for p in f.ports if not _free(p)]
    assert not busy, f"ports still bound: {busy}"
    assert not Path(f.info["dir"]).exists(), "temporary directory left behind"


@pytest.mark.timeout(180)
def test_fleet_answers_then_ctrl_c_stops_everything() -> None:
    if not HAS_PROMETHEUS:
        print("prometheus is not installed: the fleet runs without it (make fleet installs it)")
    with fleet() as f:
        replicas = f.info["replicas"]
        assert len(replicas) == 3
        assert len({r["grpc"] for r in replicas}) == 3
        for r in replicas:
            assert _health(r["grpc"], "") == "SERVING"
            assert _health(r["grpc"], "penaltyd.store") == "SERVING"  # on the shared Redis
            with urllib.request.urlopen(r["metrics"], timeout=5) as reply:
                assert b"penaltyd_degraded 0.0" in reply.read()
        assert f.info["policyd"]["penaltyd"] == ",".join(r["grpc"] for r in replicas)
        assert _policy(f.info["policyd"]["listen"]).startswith("action=")
        if HAS_PROMETHEUS:
            query = f"{f.info['prometheus']}/api/v1/query?query=up%7Bjob%3D%22penaltyd%22%7D"
            with urllib.request.urlopen(query, timeout=5) as reply:
                result = json.load(reply)["data"]["result"]
            assert sorted(r["metric"]["instance"] for r in result) == sorted(
                r["metrics"].removeprefix("http://").removesuffix("/metrics") for r in replicas
            )
            assert all(r["value"][1] == "1" for r in result)
            rules = f"{f.info['prometheus']}/api/v1/rules"
            with urllib.request.urlopen(rules, timeout=5) as reply:
                groups = json.load(reply)["data"]["groups"]
            assert {r["health"] for g in groups for r in g["rules"]} == {"ok"}

        started = time.monotonic()
        os.killpg(f.proc.pid, signal.SIGINT)  # Ctrl-C
        _, err = f.proc.communicate(timeout=60)
        assert f.proc.returncode == 0, err
        assert "fleet stopped" in err
        assert time.monotonic() - started < 30
        _assert_all_gone(f)


@pytest.mark.timeout(180)
def test_a_replica_that_dies_stops_the_fleet_with_status_1() -> None:
    with fleet() as f:
        os.kill(f.info["replicas"][1]["pid"], signal.SIGKILL)
        _, err = f.proc.communicate(timeout=60)
        assert f.proc.returncode == 1
        assert "penaltyd-2 exited on its own" in err
        _assert_all_gone(f)
