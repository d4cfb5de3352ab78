"""A private, real Postfix instance on a loopback port, for end-to-end tests.

Debian's `postfix` package is installed by `make test` when absent (with "No
configuration": we never touch /etc/postfix). Each instance gets its own config,
queue and data directories under /tmp, logs to its own file (`maillog_file`, read by
penalty-logwatch), listens on 127.0.0.1:<free port>, lets loopback clients speak as any
address with XCLIENT, and delivers nothing (every transport is `discard`).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from tests.harness.ports import free_port, wait_port

MAIN_CF = """\
compatibility_level = 3.6
queue_directory = {root}/queue
data_directory = {root}/data
mail_owner = postfix
setgid_group = postdrop
myhostname = mx.test.example
mydomain = test.example
mydestination = test.example
inet_interfaces = loopback-only
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
alias_maps =
alias_database =
local_transport = discard
default_transport = discard
relay_transport = discard
smtpd_authorized_xclient_hosts = 127.0.0.0/8
maillog_file = {root}/maillog
maillog_file_prefixes = {root}
syslog_name = postfix-e2e
# A dictionary attack of 40 RCPTs in one session: Postfix would otherwise drop the client
# after 20 errors (smtpd_hard_error_limit) and sleep after each one past 10.
smtpd_soft_error_limit = 100
smtpd_hard_error_limit = 100
smtpd_error_sleep_time = 0
smtpd_recipient_restrictions = {restrictions}
{extra}
"""


class Postfix:
    def __init__(self, restrictions: str, extra: str = "") -> None:
        if shutil.which("postfix") is None:
            raise RuntimeError("postfix is not installed: `make test` installs Debian's postfix")
        if os.geteuid() != 0:
            raise RuntimeError(
                "a private Postfix instance needs root (its daemons drop to 'postfix')"
            )
        self.root = Path(tempfile.mkdtemp(prefix="penaltyd-postfix-", dir="/tmp"))
        self.root.chmod(0o755)
        self.port = free_port()
        self.conf = self.root / "conf"
        self.maillog = self.root / "maillog"
        self.conf.mkdir()
        (self.root / "queue").mkdir()
        (self.root / "data").mkdir()
        shutil.chown(self.root / "data", "postfix", "postfix")
        self.maillog.touch()
        (self.conf / "main.cf").write_text(
            MAIN_CF.format(root=self.root, restrictions=restrictions, extra=extra)
        )
        master = Path("/etc/postfix/master.cf").read_text().splitlines()
        lines = [f"127.0.0.1:{self.port} inet n - n - - smtpd"]
        lines += [line for line in master if not line.startswith("smtp      inet")]
        (self.conf / "master.cf").write_text("\n".join(lines) + "\n")

    def _postfix(self, *args: str) -> None:
        subprocess.run(
            ["postfix", "-c", str(self.conf), *args], check=True, capture_output=True, timeout=60
        )

    def start(self) -> Postfix:
        self._postfix("check")
        self._postfix("start")
        wait_port("127.0.0.1", self.port, timeout=20)
        return self

    def stop(self) -> None:
        try:
            self._postfix("stop")
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired):
            subprocess.run(
                ["postfix", "-c", str(self.conf), "abort"], capture_output=True, timeout=30
            )
        shutil.rmtree(self.root, ignore_errors=True)

    def log(self) -> str:
        return self.maillog.read_text(errors="replace")
