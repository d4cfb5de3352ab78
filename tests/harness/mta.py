"""Helpers for the MTA end-to-end tests and the test that keeps the README's MTA sections
equal to what those tests run.

- `readme_section` / `fenced_blocks`: the README's `## Postfix in two lines`, `### Exim`
  and `### Haraka` sections and their code blocks. The Postfix test runs the README's
  sidecar commands and pastes its `main.cf` lines (`postfix_blocks`), the Exim test its
  ACL block, each as it stands but for the addresses, so the README is what is tested.
- `silent_listener`: a sidecar that accepts connections and never answers (the kernel
  completes the handshake; nothing reads or writes), for the fail-open-on-timeout tests.
- `closed_port`: a loopback port nothing listens on (connections are refused).
- `until`: a bounded poll of another process's state.
- `smtp_from`: an SMTP session whose client address is a chosen loopback address (the
  MTA sees a real TCP peer: 127.0.0.7, 127.0.0.8, ... are distinct clients).
"""

from __future__ import annotations

import contextlib
import re
import shlex
import smtplib
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

from tests.harness.paths import REPO
from tests.harness.ports import free_port

README = REPO / "README.md"
T = TypeVar("T")


def readme_section(title: str, level: int = 3, path: Path = README) -> str:
    """The text of the README section headed `title` (`### Exim`), up to the next heading
    of the same or a higher level (of another Markdown file: `path`)."""
    text = path.read_text()
    hashes = "#" * level
    match = re.search(
        rf"^{hashes} {re.escape(title)}\n(.*?)(?=^#{{1,{level}}} )", text, re.M | re.S
    )
    if match is None:
        raise AssertionError(f"{path.name} has no '{hashes} {title}' section")
    return match.group(1)


def fenced_blocks(text: str, info: str = "") -> list[str]:
    """The fenced code blocks of `text` whose info string is `info` ("" for none), each
    with its final newline."""
    return [
        m.group(2)
        for m in re.finditer(r"^```([^\n]*)\n(.*?)^```$", text, re.M | re.S)
        if m.group(1).strip() == info
    ]


#: The README section with the Postfix wiring (level 2: `## Postfix in two lines`).
POSTFIX_SECTION = "Postfix in two lines"


def postfix_blocks() -> tuple[str, str]:
    """The README's Postfix wiring: (the sidecar commands, the `main.cf` lines), its
    first `sh` block and its first plain block."""
    section = readme_section(POSTFIX_SECTION, level=2)
    commands, main_cf = fenced_blocks(section, "sh"), fenced_blocks(section)
    if not commands or not main_cf:
        raise AssertionError(
            f"README.md's '{POSTFIX_SECTION}' section needs an sh block of sidecar commands "
            "and a plain block of main.cf lines"
        )
    return commands[0], main_cf[0]


#: The README section that runs relaycheck and relaycheck-milter, and the page with the
#: smart relay's `main.cf` lines.
RELAYCHECK_SECTION = "relaycheck: customers' open relays"
RELAYCHECK_DOC = REPO / "docs" / "relaycheck.md"


def relaycheck_blocks() -> tuple[list[list[str]], str]:
    """How the README runs relaycheck on the smart relay: (the `relaycheck serve` and
    `relaycheck-milter` commands, each an argv; docs/relaycheck.md's quick-start `main.cf`
    lines)."""
    commands = [
        shlex.split(line, comments=True)
        for block in fenced_blocks(readme_section(RELAYCHECK_SECTION, level=2), "sh")
        for line in block.splitlines()
        if line.startswith(("relaycheck serve ", "relaycheck-milter "))
    ]
    main_cf = fenced_blocks(readme_section("Quick start", level=2, path=RELAYCHECK_DOC))
    if len(commands) != 2 or not main_cf:
        raise AssertionError(
            "README.md's relaycheck section should run `relaycheck serve` and "
            "`relaycheck-milter` once each, and docs/relaycheck.md's quick start should "
            "give the smart relay's main.cf lines"
        )
    return commands, main_cf[0]


def exim_acl() -> str:
    """The README's Exim ACL statements (the first plain block of `### Exim`)."""
    blocks = fenced_blocks(readme_section("Exim"))
    if not blocks:
        raise AssertionError("README.md's Exim section has no ACL block")
    return blocks[0]


@contextlib.contextmanager
def silent_listener() -> Iterator[int]:
    """A loopback port that accepts connections (the kernel's backlog) and never answers."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        s.listen(64)
        yield int(s.getsockname()[1])


def closed_port() -> int:
    """A loopback port with nothing listening (connecting is refused at once)."""
    return free_port()


def smtp_from(client_ip: str, port: int, helo: str, timeout: float = 10.0) -> smtplib.SMTP:
    """An SMTP session to 127.0.0.1:`port` from the loopback address `client_ip`, after
    EHLO `helo`."""
    smtp = smtplib.SMTP("127.0.0.1", port, timeout=timeout, source_address=(client_ip, 0))
    code, text = smtp.ehlo(helo)
    assert code == 250, text
    return smtp


def until(probe: Callable[[], T], ok: Callable[[T], bool], within: float = 10.0) -> T:
    """Ask `probe` until `ok(result)`, for another process's state that has no event to
    await (a sidecar's live replica learning of a penalty). Fails after `within` seconds."""
    deadline = time.monotonic() + within
    while True:
        result = probe()
        if ok(result):
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {within} s; last: {result!r}")
        time.sleep(0.02)
