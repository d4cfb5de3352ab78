"""Helpers for the Exim and Haraka end-to-end tests and the test that keeps the README's
MTA sections equal to what those tests run.

- `readme_section` / `fenced_blocks`: the README's `### Exim` / `### Haraka` sections and
  their code blocks. The Exim test pastes the README's ACL block into its config as it
  stands (only the sidecar's port changes), so the README is what is tested.
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
import smtplib
import socket
import time
from collections.abc import Callable, Iterator
from typing import TypeVar

from tests.harness.paths import REPO
from tests.harness.ports import free_port

README = REPO / "README.md"
T = TypeVar("T")


def readme_section(title: str, level: int = 3) -> str:
    """The text of the README section headed `title` (`### Exim`), up to the next heading
    of the same or a higher level."""
    text = README.read_text()
    hashes = "#" * level
    match = re.search(
        rf"^{hashes} {re.escape(title)}\n(.*?)(?=^#{{1,{level}}} )", text, re.M | re.S
    )
    if match is None:
        raise AssertionError(f"README.md has no '{hashes} {title}' section")
    return match.group(1)


def fenced_blocks(text: str, info: str = "") -> list[str]:
    """The fenced code blocks of `text` whose info string is `info` ("" for none), each
    with its final newline."""
    return [
        m.group(2)
        for m in re.finditer(r"^```([^\n]*)\n(.*?)^```$", text, re.M | re.S)
        if m.group(1).strip() == info
    ]


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
