"""A private, real Exim 4.96 (Debian's exim4-daemon-light binary) for end-to-end tests.

Debian's Exim packages conflict with postfix (installed for tests/e2e/postfix.py), so
Exim is never installed: `make exim` (part of `make deps`) downloads
exim4-daemon-light, the shared libraries it needs that the machine lacks, and
nss_wrapper, and unpacks them into `.cache/exim4/` (ignored by git). The binary is
built to run as the user `Debian-exim`, which only its postinst creates: nss_wrapper
(LD_PRELOAD) gives the process a private passwd/group file in which `Debian-exim` is
the unprivileged `nobody`, so nothing on the machine changes.

Each instance has its own config (`-C`, the README's ACL pasted into acl_check_rcpt),
spool and log directories under /tmp, and either listens on 127.0.0.1:<free port>
(`-bdf -oX PORT`: a real daemon; clients connect from distinct loopback addresses) or
answers one SMTP dialogue on stdin as if from a given address (`-bh IP`, Exim's own
host-checking mode: the same ACLs, nothing delivered). It runs as root (Exim drops to
its user for each SMTP session); messages are queued (`queue_only`), never delivered.
"""

from __future__ import annotations

import grp
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

from tests.harness.mta import exim_acl
from tests.harness.paths import REPO
from tests.harness.ports import free_port, wait_port

EXIM_ROOT = REPO / ".cache" / "exim4"
EXIM = EXIM_ROOT / "usr" / "sbin" / "exim4"
#: The sidecar address in the README's ACL; each test points it at its own port.
README_SIDECAR = "inet:127.0.0.1:10040"

CONFIGURE = """\
primary_hostname = mx.test.example
domainlist local_domains = test.example
spool_directory = {root}/spool
log_file_path = {root}/log/%slog
exim_user = Debian-exim
exim_group = Debian-exim
queue_only = true
host_lookup =
rfc1413_hosts =
tls_advertise_hosts =
keep_environment =
local_interfaces = 127.0.0.1
acl_smtp_rcpt = acl_check_rcpt

begin acl

acl_check_rcpt:
  require domains = +local_domains
  require verify  = recipient
{acl}  accept

begin routers

local_user:
  driver = accept
  domains = +local_domains
  local_parts = root : postmaster
  transport = discard

begin transports

discard:
  driver = appendfile
  file = /dev/null
"""


def ensure_exim() -> Path:
    """The unpacked binary; `make exim` first if it is not there yet (a fresh machine)."""
    if not EXIM.exists():
        subprocess.run(
            ["make", "--no-print-directory", "-C", str(REPO), "exim"], check=True, timeout=300
        )
    if not EXIM.exists():
        raise RuntimeError(f"`make exim` did not unpack {EXIM}")
    return EXIM


def acl_for(policy_port: int) -> str:
    """The README's ACL statements, asking the sidecar on `policy_port`."""
    acl = exim_acl()
    if acl.count(README_SIDECAR) != 1:
        raise AssertionError(f"the README's Exim ACL should name {README_SIDECAR} once")
    return acl.replace(README_SIDECAR, f"inet:127.0.0.1:{policy_port}")


class Exim:
    def __init__(self, policy_port: int) -> None:
        ensure_exim()
        if os.geteuid() != 0:
            raise RuntimeError("a private Exim daemon runs as root (it drops to its user)")
        self.root = Path(tempfile.mkdtemp(prefix="penaltyd-exim-", dir="/tmp"))
        self.root.chmod(0o755)
        self.port = free_port()
        self.conf = self.root / "exim.conf"
        self.conf.write_text(CONFIGURE.format(root=self.root, acl=acl_for(policy_port)))
        nobody = pwd.getpwnam("nobody")
        nogroup = grp.getgrgid(nobody.pw_gid)
        for sub in ("spool", "log"):
            (self.root / sub).mkdir()
            os.chown(self.root / sub, nobody.pw_uid, nobody.pw_gid)
        # Exim's compiled-in user, in a passwd file only this process tree sees.
        (self.root / "passwd").write_text(
            f"root:x:0:0:root:/root:/bin/sh\n"
            f"Debian-exim:x:{nobody.pw_uid}:{nobody.pw_gid}:Exim:/nonexistent:/bin/false\n"
        )
        (self.root / "group").write_text(
            f"root:x:0:\nDebian-exim:x:{nobody.pw_gid}:\n{nogroup.gr_name}:x:{nobody.pw_gid}:\n"
        )
        libdirs = sorted({str(p.parent) for p in EXIM_ROOT.rglob("*.so*")})
        self.env = {
            **os.environ,
            "LD_LIBRARY_PATH": ":".join(libdirs),
            "LD_PRELOAD": next(str(p) for p in EXIM_ROOT.rglob("libnss_wrapper.so")),
            "NSS_WRAPPER_PASSWD": str(self.root / "passwd"),
            "NSS_WRAPPER_GROUP": str(self.root / "group"),
        }
        self.proc: subprocess.Popen[bytes] | None = None

    def command(self, *args: str) -> list[str]:
        return [str(EXIM), "-C", str(self.conf), *args]

    def start(self) -> Exim:
        """The daemon on 127.0.0.1:`port`, in the foreground of a child process."""
        with open(self.root / "daemon.err", "wb") as err:
            self.proc = subprocess.Popen(
                self.command("-bdf", "-oX", str(self.port)),
                env=self.env,
                stdout=subprocess.DEVNULL,
                stderr=err,
            )
        wait_port("127.0.0.1", self.port, timeout=20, proc=self.proc)
        return self

    def host_check(self, client_ip: str, smtp: str, timeout: float = 20.0) -> str:
        """Exim's `-bh` run of one SMTP dialogue (lines joined with CRLF) as if from
        `client_ip`: Exim's replies, one per line."""
        out = subprocess.run(
            self.command("-bh", client_ip),
            env=self.env,
            input=smtp.replace("\n", "\r\n").encode(),
            capture_output=True,
            timeout=timeout,
            check=True,
        )
        return out.stdout.decode(errors="replace")

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
        path = self.root / "log" / "mainlog"
        return path.read_text(errors="replace") if path.exists() else ""

    def __enter__(self) -> Exim:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
