"""A private, real Haraka 3 instance with the penaltyd plugin, for end-to-end tests.

Haraka comes from the npm registry: `make haraka` (part of `make deps`) installs it into
`.cache/haraka/` (ignored by git); it needs Node.js 20+ and npm, and without them the
tests are skipped with the reason. Each instance is a Haraka directory under /tmp
(`haraka -c DIR`) listening on 127.0.0.1:<free port>, with the plugin file and its
config file from clients/haraka/ (the config's ports pointed at the test's sidecar and
penaltyd, nothing else changed), recipients at test.example accepted by Haraka's
`rcpt_to.in_host_list` after a test plugin (`e2e_users`) refused every local part but
root and postmaster with `550 5.1.1`, and every message discarded (`queue/discard`).
Clients connect from distinct loopback addresses: each is its own client to penaltyd.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

import pytest

from tests.harness.paths import REPO
from tests.harness.ports import free_port, wait_port

HARAKA_DIR = REPO / ".cache" / "haraka"
HARAKA = HARAKA_DIR / "node_modules" / "Haraka" / "bin" / "haraka"
PLUGIN = REPO / "clients" / "haraka" / "penaltyd.js"
PLUGIN_INI = REPO / "clients" / "haraka" / "config" / "penaltyd.ini"
#: The addresses in the shipped penaltyd.ini; each test points them at its own ports.
INI_POLICYD_PORT = "port = 10040\n"
INI_PENALTYD = "penaltyd = 127.0.0.1:50051\n"
#: The line the README tells operators to add to config/plugins.
PLUGINS_LINE = "penaltyd"

E2E_USERS = """\
// Test only: refuse every local part at test.example but root and postmaster.
exports.hook_rcpt = function (next, connection, params) {
    const rcpt = params[0]
    if (rcpt.host === 'test.example' && !['root', 'postmaster'].includes(rcpt.user)) {
        return next(DENY, '5.1.1 No such user here')
    }
    next()
}
"""


def node_major() -> int | None:
    node = shutil.which("node")
    if node is None:
        return None
    out = subprocess.run([node, "--version"], capture_output=True, text=True, timeout=30)
    match = re.match(r"v(\d+)\.", out.stdout)
    return int(match.group(1)) if match else None


def ensure_haraka() -> Path:
    """The installed Haraka (`make haraka` first on a fresh machine), or a skip that says
    what is missing."""
    major = node_major()
    if major is None:
        pytest.skip("Haraka needs Node.js: `node` is not on PATH")
    if major < 20:
        pytest.skip(f"Haraka 3 needs Node.js 20 or newer; this machine has {major}")
    if not HARAKA.exists():
        if shutil.which("npm") is None:
            pytest.skip("Haraka is installed with npm: `npm` is not on PATH")
        subprocess.run(
            ["make", "--no-print-directory", "-C", str(REPO), "haraka"], check=True, timeout=300
        )
    if not HARAKA.exists():
        raise RuntimeError(f"`make haraka` did not install {HARAKA}")
    return HARAKA


def plugin_ini(policy_port: int, penaltyd: str) -> str:
    """clients/haraka/config/penaltyd.ini with the test's ports (nothing else changed)."""
    ini = PLUGIN_INI.read_text()
    for line in (INI_POLICYD_PORT, INI_PENALTYD):
        if ini.count(line) != 1:
            raise AssertionError(f"{PLUGIN_INI} should have the line {line!r} once")
    return ini.replace(INI_POLICYD_PORT, f"port = {policy_port}\n").replace(
        INI_PENALTYD, f"penaltyd = {penaltyd}\n"
    )


class Haraka:
    def __init__(self, policy_port: int, penaltyd: str, timeout_ms: int | None = None) -> None:
        self.binary = ensure_haraka()
        self.root = Path(tempfile.mkdtemp(prefix="penaltyd-haraka-", dir="/tmp"))
        self.port = free_port()
        config = self.root / "config"
        plugins = self.root / "plugins"
        shutil.copytree(self.binary.parents[1] / "config", config)  # Haraka's defaults
        plugins.mkdir()
        # nodes=0: one process, no cluster master (SIGTERM stops it all).
        (config / "smtp.ini").write_text(f"[main]\nlisten=127.0.0.1:{self.port}\nnodes=0\n")
        (config / "me").write_text("mx.test.example\n")
        (config / "host_list").write_text("test.example\n")
        (config / "log.ini").write_text("[main]\nlevel=info\n")
        (config / "plugins").write_text(
            f"{PLUGINS_LINE}\ne2e_users\nrcpt_to.in_host_list\nqueue/discard\n"
        )
        ini = plugin_ini(policy_port, penaltyd)
        if timeout_ms is not None:
            ini = ini.replace("timeout = 1000\n", f"timeout = {timeout_ms}\n", 1)
        (config / "penaltyd.ini").write_text(ini)
        shutil.copy(PLUGIN, plugins / "penaltyd.js")
        (plugins / "e2e_users.js").write_text(E2E_USERS)
        self.log_path = self.root / "haraka.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Haraka:
        env = {**os.environ, "YES_REALLY_DO_DISCARD": "1"}  # queue/discard: accept, drop
        env.pop("PENALTYD_TOKEN", None)
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                ["node", str(self.binary), "-c", str(self.root)],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
            )
        wait_port("127.0.0.1", self.port, timeout=30, proc=self.proc)
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.root, ignore_errors=True)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def __enter__(self) -> Haraka:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
