"""The arguments and options that several commands share, declared once.

Each is an `Annotated` type a command puts in its signature (`ip: Ip`, `note: Note = ""`),
so a flag has the same name and help text wherever it appears. `client_command` goes one
step further for commands about one client as an MX sees it (check, explain): it gives
them the IP argument and the --helo, --mail-from and --fingerprint options in one go.
"""

from __future__ import annotations

import getpass
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated

import typer

from penaltyclient.ctl.session import Session

JsonOut = Annotated[
    bool,
    typer.Option("--json", help="machine-readable output (same as the global --json)."),
]

Helo = Annotated[str, typer.Option("--helo", help="HELO/EHLO name the client gave.")]
MailFrom = Annotated[str, typer.Option("--mail-from", help="envelope sender (its domain is used).")]
Fingerprint = Annotated[
    str, typer.Option("--fingerprint", help="the MX's opaque client fingerprint, if it sets one.")
]
Ip = Annotated[str, typer.Argument(metavar="IP", help="the client's IPv4 or IPv6 address.")]
Actor = Annotated[
    str,
    typer.Option(
        "--actor",
        envvar="PENALTYCTL_ACTOR",
        help="who does this (recorded in the audit log); default: your login name.",
        show_default=False,
    ),
]
Note = Annotated[str, typer.Option("--note", help="why, e.g. a ticket (recorded).")]


def recorded_actor(actor: str) -> str:
    """The actor an admin call records: as given, else the login name running penaltyctl
    (penaltyd's audit log names who asked; an empty actor would name nobody)."""
    if actor:
        return actor
    try:
        return getpass.getuser()
    except (OSError, KeyError):  # no login name (a container without a passwd entry)
        return ""


@dataclass(frozen=True)
class ClientArgs:
    """One client as the MX knows it: its address and what it said about itself."""

    ip: str
    helo: str = ""
    mail_from: str = ""
    fingerprint: str = ""


ClientCommand = Callable[[Session, ClientArgs], None]


def client_command(run: ClientCommand) -> Callable[..., None]:
    """The typer command for `run(session, client)`: `IP [--helo] [--mail-from]
    [--fingerprint] [--json]`, with `run`'s name and docstring (its help text)."""

    def command(
        ctx: typer.Context,
        ip: Ip,
        helo: Helo = "",
        mail_from: MailFrom = "",
        fingerprint: Fingerprint = "",
        json_out: JsonOut = False,
    ) -> None:
        run(Session.of(ctx, json_out), ClientArgs(ip, helo, mail_from, fingerprint))

    command.__name__ = run.__name__
    command.__qualname__ = run.__qualname__
    command.__doc__ = run.__doc__
    return command
