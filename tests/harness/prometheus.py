"""A real Prometheus (Debian's `prometheus`) on a free loopback port, and its HTTP API.

`make deps` installs Debian's prometheus package. The server gets a generated
configuration (static scrape targets, rule files) and a throwaway TSDB directory; it is
stopped with SIGTERM (SIGKILL after a timeout) and its directory removed. A scrape or a
rule evaluation has no event to await, so callers poll the HTTP API with a deadline
(`tests.harness.builders.eventually`).
"""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Self

import yaml

from tests.harness.ports import free_port


class PrometheusError(RuntimeError):
    """The API answered with an error (a bad query), or the server did not come up."""


class PrometheusServer:
    """`prometheus` scraping `jobs` ({job: [(target, labels), ...]}) with `rule_files`."""

    def __init__(
        self,
        jobs: Mapping[str, Sequence[tuple[str, Mapping[str, str]]]],
        rule_files: Sequence[Path] = (),
        *,
        scrape_interval: str = "1s",
        evaluation_interval: str = "1s",
    ) -> None:
        binary = shutil.which("prometheus")
        if binary is None:
            raise RuntimeError("prometheus not found: `make deps` installs Debian's prometheus")
        self.binary = binary
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.dir = Path(tempfile.mkdtemp(prefix="penaltyd-prometheus-"))
        self.log_path = self.dir / "prometheus.log"
        self.config = {
            "global": {
                "scrape_interval": scrape_interval,
                "scrape_timeout": scrape_interval,
                "evaluation_interval": evaluation_interval,
            },
            "rule_files": [str(p) for p in rule_files],
            "scrape_configs": [
                {
                    "job_name": job,
                    "static_configs": [
                        {"targets": [target], "labels": dict(labels)} for target, labels in targets
                    ],
                }
                for job, targets in jobs.items()
            ],
        }
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30.0) -> Self:
        config = self.dir / "prometheus.yml"
        config.write_text(yaml.safe_dump(self.config, sort_keys=False))
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [
                    self.binary,
                    f"--config.file={config}",
                    f"--storage.tsdb.path={self.dir / 'data'}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                    "--log.level=warn",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:  # /-/ready: the TSDB is open and rules loaded
            if self.proc.poll() is not None:
                raise PrometheusError(
                    f"prometheus exited with {self.proc.returncode}:\n{self.log()}"
                )
            with (
                contextlib.suppress(OSError),
                urllib.request.urlopen(f"{self.url}/-/ready", timeout=1) as reply,
            ):
                if reply.status == 200:
                    return self
            time.sleep(0.05)
        raise PrometheusError(f"prometheus not ready after {timeout} s:\n{self.log()}")

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-2000:]
        except OSError:
            return "(no log)"

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> Self:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- the HTTP API (loopback only)

    def api(self, path: str, **params: str) -> Any:
        """GET /api/v1/<path>; the `data` of a success, PrometheusError otherwise."""
        url = f"{self.url}/api/v1/{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        try:
            with urllib.request.urlopen(url, timeout=10) as reply:
                body = json.load(reply)
        except urllib.error.HTTPError as exc:  # 400/422: a bad query, with the reason
            body = json.load(exc)
        if body.get("status") != "success":
            raise PrometheusError(f"{path} {params}: {body.get('error', body)}")
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        """An instant query at the server's now: the vector's samples."""
        data = self.api("query", query=expr)
        if data["resultType"] != "vector":
            raise PrometheusError(f"{expr!r} is a {data['resultType']}, not a vector")
        result: list[dict[str, Any]] = data["result"]
        return result

    def alerts(self) -> list[dict[str, Any]]:
        """Active alerts (pending and firing), with their labels and state."""
        alerts: list[dict[str, Any]] = self.api("alerts")["alerts"]
        return alerts

    def targets(self) -> list[dict[str, Any]]:
        targets: list[dict[str, Any]] = self.api("targets", state="active")["activeTargets"]
        return targets
