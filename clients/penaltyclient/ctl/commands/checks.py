"""`check` and `report`: the MX API, asked by hand.

Both answer with a verdict and leave with its exit code (0 no penalty, 3 tempfail, 4
degraded), because they fail open exactly as an MX does: when penaltyd does not answer,
the answer is "no penalty, degraded", never an error. They need no admin token.
"""

from __future__ import annotations

from typing import Annotated, NoReturn

import typer

from penalty.v1 import penalty_pb2 as pb
from penaltyclient.ctl.exits import Code
from penaltyclient.ctl.options import (
    ClientArgs,
    Fingerprint,
    Helo,
    Ip,
    JsonOut,
    MailFrom,
    client_command,
)
from penaltyclient.ctl.output import console, literal, time_left
from penaltyclient.ctl.parsing import OUTCOMES, parse_outcome
from penaltyclient.ctl.session import Session


@client_command
def check(state: Session, who: ClientArgs) -> None:
    """Ask "tempfail, and how many seconds are left?" as an MX would.

    Exit 0: no penalty; 3: tempfail; 4: degraded (penaltyd did not answer, so the MX
    would get the fail-open answer "no penalty").
    """
    with state.client() as client:
        verdict = client.check(who.ip, who.helo, who.mail_from, who.fingerprint)
    show_verdict(state, who.ip, verdict)


def report(
    ctx: typer.Context,
    ip: Ip,
    outcomes: Annotated[
        list[str],
        typer.Argument(
            metavar="OUTCOME[=N]...",
            help="what the client did, e.g. unknown_recipient=3 accepted. Names: "
            + ", ".join(OUTCOMES)
            + " (case-insensitive).",
            show_default=False,
        ),
    ],
    helo: Helo = "",
    mail_from: MailFrom = "",
    fingerprint: Fingerprint = "",
    json_out: JsonOut = False,
) -> None:
    """Report outcomes for a client (as an MX does) and show the verdict after it.

    Exit codes as for check; with 4 the report may not have been stored.
    """
    state = Session.of(ctx, json_out)
    counts = [parse_outcome(o) for o in outcomes]
    with state.client() as client:
        verdict = client.report(ip, counts, helo, mail_from, fingerprint)
    show_verdict(state, ip, verdict)


def show_verdict(state: Session, ip: str, v: pb.Verdict) -> NoReturn:
    """Print a verdict and leave with its exit code: 0 no penalty, 3 tempfail, 4 degraded."""
    code = Code.TEMPFAIL if v.tempfail else Code.DEGRADED if v.degraded else Code.OK
    if state.json:
        state.emit(v)
        raise typer.Exit(int(code))
    # Whole lines, never wrapped: people copy the reply, scripts grep the reason.
    out = console(soft_wrap=True)
    who = v.identity or ip
    if v.tempfail:
        out.print(literal(f"{who}: {time_left(v)}", "bold red"))
        out.print(literal(f"  reason: {v.reason}"))
        out.print(literal(f"  reply:  {v.smtp_reply}"))
    elif v.degraded:
        text = f"{who}: no penalty (DEGRADED: no answer from penaltyd or its store; fail-open)"
        out.print(literal(text, "yellow"))
    elif v.allowlisted:
        out.print(literal(f"{who}: no penalty (allowlisted)", "green"))
    else:
        out.print(literal(f"{who}: no penalty", "green"))
    raise typer.Exit(int(code))
