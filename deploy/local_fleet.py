"""`make fleet`: a whole penaltyd fleet on this machine's loopback, in the foreground.

    .venv/bin/python deploy/local_fleet.py [--replicas 3] [--base-port N] [--no-prometheus]

Starts, each as a real process of its real command line:
- a redis-server on 127.0.0.1 with no persistence (`--save "" --appendonly no`) in a
  temporary directory;
- N penaltyd replicas on it (default 3), each with its own gRPC and metrics port, read
  from the sample settings file deploy/etc/penaltyd/penaltyd.toml with the ports and the
  Redis URL given as flags;
- one penalty-policyd in front of them (`--penaltyd host:p1,host:p2,host:p3`, round
  robin);
- a Prometheus (Debian's `prometheus`; `make fleet` installs it) scraping the replicas'
  /metrics with the plain-host alert rules (deploy/prometheus/rules.yml), storage in the
  temporary directory.

Every port is free and on 127.0.0.1 (or fixed, from --base-port up). When everything
answers (Redis PING, gRPC health SERVING on every replica and its store, policyd answering
a policy request, Prometheus ready with every target up) it prints where everything
listens (`--json`: one JSON line) and waits. Ctrl-C (SIGINT) or SIGTERM stops it: policyd,
the replicas, Prometheus and Redis are stopped in that order (SIGTERM, then SIGKILL after
--stop-timeout), the temporary directory (logs included) is removed, and the exit status
is 0. If a child dies on its own, everything else is stopped and the status is 1.

Each child runs in its own process group, so a Ctrl-C reaches this script alone and the
stop is ordered; each also gets SIGTERM from the kernel should this script die first
(PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SAMPLE_CONFIG = HERE / "etc" / "penaltyd" / "penaltyd.toml"
RULES = HERE / "prometheus" / "rules.yml"
BIN = Path(sys.executable).parent  # this venv's console scripts
HOST = "127.0.0.1"
POLICY_REQUEST = (
    b"request=smtpd_access_policy\nprotocol_state=RCPT\nprotocol_name=ESMTP\n"
    b"client_address=203.0.113.7\nclient_name=unknown\nhelo_name=mx.example.net\n"
    b"sender=a@example.net\nrecipient=b@example.org\n\n"
)
PR_SET_PDEATHSIG = 1


STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}


class FleetError(Exception):
    """Something did not start: the message says what and where its log is."""


class Interrupted(BaseException):
    """SIGINT or SIGTERM while the fleet was starting."""


def _child_setup() -> None:  # runs in the child between fork and exec
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)  # blocked around the fork
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


@dataclass
class Child:
    """One process of the fleet, its merged output copied to a log file by a thread that
    sets `ready` on the first line containing `marker`, and `exited` (then `ready`, so a
    waiter wakes) at the end of its output."""

    name: str
    argv: list[str]
    log_path: Path
    marker: str
    proc: subprocess.Popen[bytes] | None = None
    ready: threading.Event = field(default_factory=threading.Event)
    exited: threading.Event = field(default_factory=threading.Event)

    def start(self, env: dict[str, str], wake: threading.Event) -> None:
        # No stop signal between the fork and recording the process: it is always stopped.
        signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            self.proc = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                env=env,
                process_group=0,
                preexec_fn=_child_setup,
            )
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
        assert self.proc.stdout is not None
        threading.Thread(
            target=self._copy, args=(self.proc.stdout, wake), name=self.name, daemon=True
        ).start()

    def _copy(self, stream: IO[bytes], wake: threading.Event) -> None:
        with open(self.log_path, "ab") as log:
            for line in iter(stream.readline, b""):
                log.write(line)
                log.flush()
                if not self.ready.is_set() and self.marker.encode() in line:
                    self.ready.set()
        self.exited.set()
        self.ready.set()
        wake.set()

    def wait_ready(self, timeout: float) -> None:
        """Until the marker line; FleetError if the child exits or the time runs out."""
        if not self.ready.wait(timeout):
            raise FleetError(f"{self.name} not ready after {timeout:.0f} s:\n{self.tail()}")
        if self.exited.is_set():
            raise FleetError(f"{self.name} exited before it was ready:\n{self.tail()}")

    def tail(self, lines: int = 15) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no output)"
        return "\n".join("    " + line for line in text.splitlines()[-lines:]) or "(no output)"

    def stop(self, timeout: float) -> int | None:
        """SIGTERM to its process group, SIGKILL after `timeout`; its exit status."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        # Anything left in its group (none expected) goes too.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.exited.wait(5)
        return self.proc.returncode


def free_ports(n: int) -> list[int]:
    """`n` distinct free loopback ports, held together while choosing so none repeats."""
    socks: list[socket.socket] = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((HOST, 0))
            socks.append(s)
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


@dataclass
class Ports:
    redis: int
    grpc: list[int]
    metrics: list[int]
    policyd: int
    prometheus: int

    @classmethod
    def choose(cls, replicas: int, base: int) -> Ports:
        if base:
            # Fixed: base (Redis), base+1.. (gRPC), base+11.. (metrics), base+21, base+22.
            return cls(
                base,
                [base + 1 + i for i in range(replicas)],
                [base + 11 + i for i in range(replicas)],
                base + 21,
                base + 22,
            )
        p = free_ports(2 * replicas + 3)
        return cls(p[0], p[1 : 1 + replicas], p[1 + replicas : 1 + 2 * replicas], p[-2], p[-1])


def health(address: str, service: str, timeout: float) -> str:
    """grpc.health.v1 Watch until SERVING (the server streams each change); the status."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        status = "UNKNOWN"
        try:
            for reply in stub.Watch(
                health_pb2.HealthCheckRequest(service=service),
                timeout=timeout,
                wait_for_ready=True,
            ):
                status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
                if status == "SERVING":
                    break
        except grpc.RpcError as exc:
            raise FleetError(f"{address} health {service!r}: {exc.code().name}") from exc
        return status


def policy_answer(port: int, timeout: float) -> str:
    """One Postfix policy request to policyd; its answer (e.g. action=DUNNO)."""
    with socket.create_connection((HOST, port), timeout=timeout) as s:
        s.sendall(POLICY_REQUEST)
        answer = b""
        while not answer.endswith(b"\n\n"):
            chunk = s.recv(4096)
            if not chunk:
                break
            answer += chunk
    return answer.decode().strip()


def redis_ping(port: int, timeout: float) -> None:
    with socket.create_connection((HOST, port), timeout=timeout) as s:
        s.sendall(b"PING\r\n")
        if not s.recv(64).startswith(b"+PONG"):
            raise FleetError(f"redis-server on {port} does not answer PING")


def prometheus_targets_up(port: int, expected: int, timeout: float) -> None:
    """Poll the targets API until every target is up: a scrape has no event to wait on."""
    deadline = time.monotonic() + timeout
    url = f"http://{HOST}:{port}/api/v1/targets?state=active"
    seen: list[str] = []
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError, ValueError):
            with urllib.request.urlopen(url, timeout=2) as reply:  # loopback only
                data = json.load(reply)
            targets = data["data"]["activeTargets"]
            seen = [f"{t['labels']['instance']}={t['health']}" for t in targets]
            if len(targets) == expected and all(t["health"] == "up" for t in targets):
                return
        time.sleep(0.5)
    raise FleetError(f"Prometheus targets not all up after {timeout:.0f} s: {seen}")


def prometheus_config(directory: Path, ports: Ports) -> Path:
    targets = ", ".join(f'"{HOST}:{p}"' for p in ports.metrics)
    path = directory / "prometheus.yml"
    path.write_text(
        "# Written by deploy/local_fleet.py (make fleet) for this run only.\n"
        "global:\n  scrape_interval: 2s\n  scrape_timeout: 1s\n  evaluation_interval: 5s\n"
        f"rule_files:\n  - {json.dumps(str(RULES))}\n"
        "scrape_configs:\n"
        f"  - job_name: penaltyd\n    static_configs:\n      - targets: [{targets}]\n"
    )
    return path


class Fleet:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.ports = Ports.choose(args.replicas, args.base_port)
        self.dir = Path(tempfile.mkdtemp(prefix="penaltyd-fleet-"))
        self.children: list[Child] = []
        self.wake = threading.Event()
        self.stopping = False
        env = dict(os.environ)
        env.pop("PENALTYD_CONFIG", None)
        self.env = env

    def _spawn(self, name: str, argv: Sequence[str], marker: str) -> Child:
        child = Child(name, list(argv), self.dir / f"{name}.log", marker)
        self.children.append(child)
        child.start(self.env, self.wake)
        return child

    def start(self) -> dict[str, Any]:
        a, p, t = self.args, self.ports, self.args.start_timeout
        redis_bin = shutil.which("redis-server")
        if redis_bin is None:
            raise FleetError("redis-server not found: `make fleet` installs Debian's redis-server")
        prometheus_bin = None if a.no_prometheus else shutil.which("prometheus")
        if not a.no_prometheus and prometheus_bin is None:
            raise FleetError("prometheus not found: `make fleet` installs it (or --no-prometheus)")
        (self.dir / "redis").mkdir()
        redis_argv = [redis_bin, "--port", str(p.redis), "--bind", HOST, "--save", ""]
        redis_argv += ["--appendonly", "no", "--dir", str(self.dir / "redis"), "--logfile", ""]
        redis = self._spawn("redis", redis_argv, "Ready to accept connections")
        redis.wait_ready(t)
        redis_ping(p.redis, t)
        redis_url = f"redis://{HOST}:{p.redis}/0"

        replicas = []
        for i, (grpc_port, metrics_port) in enumerate(zip(p.grpc, p.metrics, strict=True), 1):
            argv = [str(BIN / "penaltyd"), "--config", str(SAMPLE_CONFIG)]
            argv += [
                "--listen",
                f"{HOST}:{grpc_port}",
                "--metrics-listen",
                f"{HOST}:{metrics_port}",
            ]
            argv += ["--redis-url", redis_url]
            replicas.append(self._spawn(f"penaltyd-{i}", argv, '"penaltyd_started"'))
        for child in replicas:
            child.wait_ready(t)
        status = {}
        for grpc_port in p.grpc:
            address = f"{HOST}:{grpc_port}"
            status[address] = {s or '""': health(address, s, t) for s in ("", "penaltyd.store")}

        addresses = ",".join(f"{HOST}:{port}" for port in p.grpc)
        argv = [str(BIN / "penalty-policyd"), "--listen", f"{HOST}:{p.policyd}"]
        policyd = self._spawn("policyd", [*argv, "--penaltyd", addresses], '"policyd_started"')
        policyd.wait_ready(t)
        answer = policy_answer(p.policyd, t)
        if not answer.startswith("action="):
            raise FleetError(f"policyd answered {answer!r}:\n{policyd.tail()}")

        prometheus = None
        if prometheus_bin is not None:
            config = prometheus_config(self.dir, p)
            prometheus = f"http://{HOST}:{p.prometheus}"
            prom = self._spawn(
                "prometheus",
                [
                    prometheus_bin,
                    f"--config.file={config}",
                    f"--storage.tsdb.path={self.dir / 'prometheus'}",
                    f"--web.listen-address={HOST}:{p.prometheus}",
                ],
                "Server is ready to receive web requests.",
            )
            prom.wait_ready(t)
            prometheus_targets_up(p.prometheus, len(p.metrics), t)

        return {
            "dir": str(self.dir),
            "redis": redis_url,
            "replicas": [
                {
                    "grpc": f"{HOST}:{g}",
                    "metrics": f"http://{HOST}:{m}/metrics",
                    "health": status[f"{HOST}:{g}"],
                    "pid": c.proc.pid if c.proc else None,
                }
                for g, m, c in zip(p.grpc, p.metrics, replicas, strict=True)
            ],
            "policyd": {
                "listen": f"{HOST}:{p.policyd}",
                "penaltyd": addresses,
                "answer": answer,
            },
            "prometheus": prometheus,
            "rules": str(RULES) if prometheus else None,
            "pids": {c.name: c.proc.pid for c in self.children if c.proc},
        }

    def died(self) -> Child | None:
        return next((c for c in self.children if c.exited.is_set()), None)

    def stop(self) -> None:
        """policyd, then the replicas, Prometheus, Redis; then the temporary directory."""
        self.stopping = True
        order = sorted(
            self.children,
            key=lambda c: ["policyd", "penaltyd", "prometheus", "redis"].index(
                c.name.split("-")[0]
            ),
        )
        for child in order:
            child.stop(self.args.stop_timeout)
        shutil.rmtree(self.dir, ignore_errors=True)


def summary(info: dict[str, Any]) -> str:
    lines = [
        f"fleet ready (logs in {info['dir']}, removed on exit):",
        f"  redis       {info['redis']}",
    ]
    for i, r in enumerate(info["replicas"], 1):
        store = r["health"]["penaltyd.store"]
        lines.append(f"  penaltyd-{i}  grpc {r['grpc']}  metrics {r['metrics']}  store {store}")
    pol = info["policyd"]
    lines.append(
        f"  policyd     {pol['listen']} (round robin over {pol['penaltyd']}): {pol['answer']}"
    )
    if info["prometheus"]:
        lines.append(f"  prometheus  {info['prometheus']} (rules {info['rules']})")
    else:
        lines.append("  prometheus  not started (--no-prometheus)")
    lines.append("Ctrl-C stops everything.")
    return "\n".join(lines)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="deploy/local_fleet.py",
        description="Redis, penaltyd replicas, penalty-policyd and Prometheus on loopback.",
    )
    p.add_argument("--replicas", type=int, default=3, help="penaltyd replicas (default 3)")
    p.add_argument(
        "--base-port",
        type=int,
        default=0,
        help="fixed ports from here up: Redis, +1.. gRPC, +11.. metrics, +21 policyd, "
        "+22 Prometheus (default: free ports)",
    )
    p.add_argument("--no-prometheus", action="store_true", help="do not start Prometheus")
    p.add_argument("--json", action="store_true", help="print the addresses as one JSON line")
    p.add_argument("--start-timeout", type=float, default=60.0, help="seconds per start step")
    p.add_argument("--stop-timeout", type=float, default=15.0, help="seconds before SIGKILL")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if not 1 <= args.replicas <= 10:
        parser().error("--replicas: 1 to 10")
    fleet = Fleet(args)
    stop = threading.Event()
    running = False

    def on_signal(signum: int, frame: object) -> None:
        stop.set()
        fleet.wake.set()
        if not running:
            raise Interrupted  # out of whatever start-up step is waiting

    previous: dict[int, Callable[..., Any] | int | None] = {
        s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)
    }
    code = 0
    try:
        info = fleet.start()
        running = True
        print(json.dumps(info) if args.json else summary(info), flush=True)
        while not stop.is_set():
            fleet.wake.wait()
            fleet.wake.clear()
            if (dead := fleet.died()) is not None and not stop.is_set():
                print(f"fleet: {dead.name} exited on its own:\n{dead.tail()}", file=sys.stderr)
                code = 1
                break
    except FleetError as exc:
        print(f"fleet: {exc}", file=sys.stderr)
        code = 1
    except Interrupted:
        pass  # stopped while starting: not a failure
    finally:
        running = True  # a second signal now only sets the event
        fleet.stop()
        for s, handler in previous.items():
            signal.signal(s, handler)
    print("fleet stopped" if code == 0 else "fleet stopped after a failure", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
