"""A service's real CLI as a child process on a loopback port, its output in a log file:
for signal, multi-replica and end-to-end tests, and for the benchmarks."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Self

from tests.harness.ports import free_port, wait_port


def terminate(proc: subprocess.Popen[Any], timeout: float = 10.0) -> int:
    """SIGTERM a child we started, SIGKILL it after `timeout`; its exit code."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


class ServiceProcess:
    """A service's real CLI (`python -m <module> ...`) as a child process on a loopback
    port (None: one that listens nowhere, such as penalty-logwatch), its output in a log
    file: for signal, multi-replica and end-to-end tests."""

    def __init__(
        self,
        module: str,
        args: Sequence[str],
        port: int | None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.module = module
        self.port = port
        self.address = f"127.0.0.1:{port}"
        self.args = list(args)
        self.env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None
        fd, self.log_path = tempfile.mkstemp(prefix=f"{module}-", suffix=".log")
        os.close(fd)

    def start(self) -> Self:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", self.module, *self.args],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
            )
        if self.port is not None:
            wait_port("127.0.0.1", self.port, proc=self.proc)
        return self

    def output(self) -> str:
        return Path(self.log_path).read_text()

    def stop(self, timeout: float = 10.0) -> int:
        """SIGTERM (the graceful drain under test), SIGKILL after `timeout`; the exit code."""
        return 0 if self.proc is None else terminate(self.proc, timeout)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
        with contextlib.suppress(OSError):
            os.unlink(self.log_path)


class PenaltydProcess(ServiceProcess):
    """`penaltyd` as a child process (the real CLI), for multi-replica tests and benches."""

    def __init__(
        self, *args: str, env: dict[str, str] | None = None, port: int | None = None
    ) -> None:
        port = port or free_port()
        super().__init__("penaltyd", ["--listen", f"127.0.0.1:{port}", *args], port, env)


class RelaycheckProcess(ServiceProcess):
    """`relaycheck serve` as a child process (the real CLI), for signal tests."""

    def __init__(self, *args: str, port: int, env: dict[str, str] | None = None) -> None:
        super().__init__("relaycheck", ["serve", "--listen", f"127.0.0.1:{port}", *args], port, env)
