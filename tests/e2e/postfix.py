"""Private, real Postfix instances on loopback ports, for end-to-end tests.

Debian's `postfix` package is installed by `make test` when absent (with "No
configuration": we never touch /etc/postfix). Each instance gets its own config, queue
and data directories under /tmp, logs to its own file (`maillog_file`, read by
penalty-logwatch), listens on 127.0.0.1:<free port> and lets loopback clients speak as
any address with XCLIENT. Clients may also connect from distinct loopback addresses
(127.0.0.7, 127.0.0.8, ...): Postfix sees a real TCP peer. No service is chrooted.

Three roles, each a few lines on top of `BASE_CF`; everything not set there is Postfix's
default (the error limits above all):

- `MX_CF`: the MX of tests/e2e/test_postfix.py, the local domain test.example and
  nothing else; every message is discarded. The penaltyd wiring is the README's
  (`wiring_for`: its three sidecar commands and its `main.cf` lines, with only the
  addresses changed), so the README is what the test runs.
- `SMART_RELAY_CF`: an ISP's smart relay (tests/e2e/test_relaycheck.py): relays for the
  customer relays in `mynetworks` to a final destination (an aiosmtpd server).
- `OPEN_RELAY_CF`: a customer's mail server that is an open relay (`mynetworks =
  0.0.0.0/0`, the classic mistake), sending everything to the smart relay from its own
  loopback address.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from tests.harness.mta import postfix_blocks, relaycheck_blocks
from tests.harness.ports import free_port, wait_port

BASE_CF = """\
compatibility_level = 3.6
queue_directory = {root}/queue
data_directory = {root}/data
mail_owner = postfix
setgid_group = postdrop
myhostname = {hostname}
inet_interfaces = loopback-only
inet_protocols = ipv4
alias_maps =
alias_database =
smtpd_authorized_xclient_hosts = 127.0.0.0/8
maillog_file = {root}/maillog
maillog_file_prefixes = {root}
syslog_name = postfix-e2e
"""

#: The MX: its domain and where mail goes. Loopback clients other than 127.0.0.1 are
#: outside clients (not in mynetworks).
MX_CF = """\
mydomain = test.example
mydestination = test.example
mynetworks = 127.0.0.1/32
local_transport = discard
default_transport = discard
relay_transport = discard
"""

#: The smart relay: customers' relays in mynetworks (`{customers}`), everything sent to
#: the final destination `{destination}` (an aiosmtpd server on a loopback port).
SMART_RELAY_CF = """\
mydestination =
mynetworks = {customers}
relayhost = {destination}
smtp_dns_support_level = disabled
smtp_tls_security_level = none
"""

#: A customer's server that relays for anyone (the open relay), to the smart relay
#: `{smart_relay}`, connecting from `{bind}`. A SASL login (XCLIENT LOGIN, what an
#: authenticated submission leaves) is recorded as ESMTPA and `(Authenticated sender:)`.
OPEN_RELAY_CF = """\
mydestination =
mynetworks = 0.0.0.0/0
relayhost = {smart_relay}
smtp_bind_address = {bind}
smtp_dns_support_level = disabled
smtp_tls_security_level = none
smtpd_sasl_authenticated_header = yes
"""

# --- the README's Postfix wiring

#: The addresses in the README's Postfix section; each test points them at its own.
README_POLICYD = "127.0.0.1:10040"
README_MILTER = "127.0.0.1:10041"
README_PENALTYD = "127.0.0.1:50051"
README_MAILLOG = "/var/log/mail.log"
#: The console scripts the README runs and the module each is (pyproject's scripts).
SCRIPTS = {
    "penalty-policyd": "penaltyclient.policyd",
    "penalty-milter": "penaltyclient.milter",
    "penalty-logwatch": "penaltyclient.logwatch",
}


@dataclass(frozen=True)
class Wiring:
    """The sidecar commands (each argv: the console script, then its arguments) and the
    `main.cf` lines of the README's Postfix section."""

    commands: tuple[tuple[str, ...], ...]
    main_cf: str

    def command(self, script: str) -> tuple[str, ...]:
        found = [c for c in self.commands if c[0] == script]
        if len(found) != 1:
            raise AssertionError(f"the README's Postfix wiring should run {script} once")
        return found[0]


def readme_wiring() -> Wiring:
    """The README's Postfix wiring as it stands."""
    commands, main_cf = postfix_blocks()
    argvs = tuple(
        tuple(shlex.split(line, comments=True)) for line in commands.splitlines() if line.strip()
    )
    return Wiring(tuple(a for a in argvs if a), main_cf)


def wiring_for(policy_port: int, milter_port: int, penaltyd: str, maillog: str) -> Wiring:
    """The README's wiring with its addresses replaced by a test's: the policy server's
    and milter's ports, penaltyd's address and the log file. Nothing else changes."""
    readme = readme_wiring()
    tokens = {
        README_POLICYD: f"127.0.0.1:{policy_port}",
        README_MILTER: f"127.0.0.1:{milter_port}",
        README_PENALTYD: penaltyd,
        README_MAILLOG: maillog,
    }
    commands = tuple(tuple(tokens.get(arg, arg) for arg in argv) for argv in readme.commands)
    main_cf = readme.main_cf
    for old, new in ((README_POLICYD, policy_port), (README_MILTER, milter_port)):
        if main_cf.count(f"inet:{old}") != 1:
            raise AssertionError(f"the README's main.cf lines should name inet:{old} once")
        main_cf = main_cf.replace(f"inet:{old}", f"inet:127.0.0.1:{new}")
    return Wiring(commands, main_cf)


# --- relaycheck on the smart relay, as the README and docs/relaycheck.md run it

README_RELAYCHECK = "127.0.0.1:50061"
README_RELAYCHECK_MILTER = "127.0.0.1:10042"


@dataclass(frozen=True)
class RelaycheckWiring:
    """`relaycheck serve ...` and `relaycheck-milter ...` (each an argv without the
    program: `serve` first for the former) and the smart relay's `main.cf` lines."""

    serve: tuple[str, ...]
    milter: tuple[str, ...]
    main_cf: str


def relaycheck_wiring_for(
    relaycheck_port: int, milter_port: int, penaltyd: str
) -> RelaycheckWiring:
    """The README's relaycheck commands and docs/relaycheck.md's `main.cf` lines with
    their addresses replaced by a test's; nothing else changes."""
    commands, main_cf = relaycheck_blocks()
    tokens = {
        README_RELAYCHECK: f"127.0.0.1:{relaycheck_port}",
        README_RELAYCHECK_MILTER: f"127.0.0.1:{milter_port}",
        README_PENALTYD: penaltyd,
    }
    serve, milter = (tuple(tokens.get(arg, arg) for arg in argv[1:]) for argv in commands)
    if main_cf.count(f"inet:{README_RELAYCHECK_MILTER}") != 1:
        raise AssertionError(
            f"the smart relay's main.cf should name inet:{README_RELAYCHECK_MILTER}"
        )
    main_cf = main_cf.replace(f"inet:{README_RELAYCHECK_MILTER}", f"inet:127.0.0.1:{milter_port}")
    return RelaycheckWiring(serve, milter, main_cf)


# --- an instance

_SERVICE = re.compile(r"^(\S+\s+\S+\s+\S+\s+\S+\s+)\S+")  # up to the chroot column


class Postfix:
    """One private Postfix: `BASE_CF` for `hostname` plus the role's `main_cf` lines."""

    def __init__(self, main_cf: str, hostname: str = "mx.test.example") -> None:
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
        self.main_cf = BASE_CF.format(root=self.root, hostname=hostname) + main_cf
        (self.conf / "main.cf").write_text(self.main_cf)
        master = Path("/etc/postfix/master.cf").read_text().splitlines()
        lines = [f"127.0.0.1:{self.port} inet n - n - - smtpd"]
        for line in master:
            if line.startswith("smtp      inet"):
                continue
            if line[:1] not in ("", "#", " ", "\t"):
                line = _SERVICE.sub(r"\1n", line)  # no chroot: nothing to copy into it
            lines.append(line)
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
        return self.maillog.read_text(errors="replace") if self.maillog.exists() else ""

    def __enter__(self) -> Postfix:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
