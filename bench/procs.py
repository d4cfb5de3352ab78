"""The processes a bench run owns: redis-server, penaltyd, the echo ceiling.

Everything started here is stopped here, on success, on error and on Ctrl-C/SIGTERM:
`Servers` is a context manager built on an `ExitStack`, and `bench.runner` turns SIGTERM
into the same exception as Ctrl-C. penaltyd runs through its real CLI with default
settings; the one flag added, ``--metrics-listen``, starts an idle HTTP thread that the
bench scrapes between runs (never during one) to prove calls were really served.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from types import TracebackType

from tests.harness.ports import free_port, wait_port
from tests.harness.processes import PenaltydProcess, ServiceProcess
from tests.harness.redis import RedisServer

REPO_ROOT = Path(__file__).resolve().parent.parent


def child_env() -> dict[str, str]:
    """Environment for Python children: `bench` importable from any working directory."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    return env


class EchoProcess(ServiceProcess):
    """`bench.echo_server` as a child process on a free loopback port."""

    def __init__(self) -> None:
        port = free_port()
        super().__init__("bench.echo_server", ["--listen", f"127.0.0.1:{port}"], port, child_env())


class Servers:
    """redis-server, penaltyd on it (with /metrics), and the echo service; all or none."""

    def __init__(self, *, echo: bool = True, penaltyd: bool = True) -> None:
        self._stack = contextlib.ExitStack()
        self._want_echo = echo
        self._want_penaltyd = penaltyd
        self.redis: RedisServer | None = None
        self.penaltyd: PenaltydProcess | None = None
        self.metrics_url = ""
        self.echo: EchoProcess | None = None

    def __enter__(self) -> Servers:
        try:
            self.redis = RedisServer().start()
            self._stack.callback(self.redis.stop)
            if self._want_penaltyd:
                metrics_port = free_port()
                pd = PenaltydProcess(
                    "--redis-url", self.redis.url, "--metrics-listen", f"127.0.0.1:{metrics_port}"
                )
                self._stack.callback(pd.__exit__, None, None, None)
                self.penaltyd = pd.start()
                self.metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
                wait_port("127.0.0.1", metrics_port, proc=pd.proc)
            if self._want_echo:
                echo = EchoProcess()
                self._stack.callback(echo.__exit__, None, None, None)
                self.echo = echo.start()
        except BaseException:
            self._stack.close()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stack.close()

    def penaltyd_log_tail(self, lines: int = 20) -> str:
        """The end of penaltyd's JSON log, for error messages."""
        if self.penaltyd is None:
            return ""
        return "\n".join(self.penaltyd.output().splitlines()[-lines:])
