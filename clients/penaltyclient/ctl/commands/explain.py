"""`explain`: why a client is (or is not) penalized, with all the numbers.

The Explanation penaltyd returns is the largest thing penaltyctl renders (window counts,
ratio, Wilson bound, threshold and baseline, verdict, shared-address status, the client's
own sub-identity window, allowlist match and last lift), so it has a module of its own.
"""

from __future__ import annotations

import typer
from rich.console import Group, RenderableType
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from penalty.v1 import penalty_pb2 as pb
from penaltyclient.ctl.options import (
    Actor,
    Fingerprint,
    Helo,
    Ip,
    JsonOut,
    MailFrom,
    Note,
    recorded_actor,
)
from penaltyclient.ctl.output import literal, outcome_name, signed, time_left, when
from penaltyclient.ctl.session import Session


def explain(
    ctx: typer.Context,
    ip: Ip,
    helo: Helo = "",
    mail_from: MailFrom = "",
    fingerprint: Fingerprint = "",
    actor: Actor = "",
    note: Note = "",
    json_out: JsonOut = False,
) -> None:
    """Why is (or isn't) this client penalized? Window counts, ratio, Wilson bound,
    threshold and baseline, verdict and reason, shared-address status, the client's own
    sub-identity window, allowlist match and last lift."""
    state = Session.of(ctx, json_out)
    with state.client() as client:
        ex = client.explain(
            ip, helo, mail_from, fingerprint, actor=recorded_actor(actor), note=note
        )
    state.show(ex, render_explanation(ex))


def render_explanation(ex: pb.Explanation) -> Panel:
    """The whole Explanation as one panel: who, why shared, evidence, verdict, overrides."""
    head = Table.grid(padding=(0, 2))
    head.add_column(style="bold")
    head.add_column()
    head.add_row("identity", literal(ex.identity))
    shared = f"yes: {ex.shared_reason or 'shared'}" if ex.shared else "no"
    if ex.distinct_sub_identities:
        shared += f" ({ex.distinct_sub_identities} distinct clients in the window)"
    head.add_row("shared address", literal(shared))
    if ex.HasField("allow"):
        a = ex.allow
        allow = f"{a.cidr}, until {when(a.expires_at_unix_ms)}" + signed(a.actor, a.note, ", by ")
        head.add_row("allowlisted", literal(allow, "green"))
    else:
        head.add_row("allowlisted", "no")
    if ex.HasField("last_lift"):
        lift = ex.last_lift
        text = f"at {when(lift.at_unix_ms)}" + signed(lift.actor or "(unknown)", lift.note)
        head.add_row("last lift", literal(text))
    else:
        head.add_row("last lift", "none in the window")
    if ex.neighbourhood:
        head.add_row("reputation", literal(_reputation(ex)))
    parts: list[RenderableType] = [head, Text(""), _numbers(ex)]
    if ex.HasField("sub"):
        parts.append(
            Panel(
                _numbers(ex.sub),
                title=literal(f"this client's own window: {ex.sub_identity}"),
                title_align="left",
            )
        )
    return Panel(Group(*parts), title=literal(f"explain {ex.identity}"), title_align="left")


def _reputation(ex: pb.Explanation) -> str:
    """The long memory (issue 15) in two lines: the counters, then what they do."""
    parts = []
    if ex.HasField("reputation"):
        r = ex.reputation
        parts.append(
            f"address {r.events:.0f} events, ratio {r.error_ratio:.3f} (bound {r.lower_bound:.3f})"
        )
    if ex.HasField("neighbourhood_reputation"):
        n = ex.neighbourhood_reputation
        parts.append(
            f"{ex.neighbourhood} {n.events:.0f} events, ratio {n.error_ratio:.3f} "
            f"(bound {n.lower_bound:.3f})"
        )
    bar = f"bar {ex.reputation_threshold:.3f}: " if ex.reputation_threshold else ""
    return "; ".join(parts) + ("\n" if parts else "") + bar + ex.reputation_effect


def _numbers(ex: pb.Explanation) -> Table:
    """The evidence and the decision of one window (address or sub-identity)."""
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold")
    grid.add_column()
    window = Table(show_footer=True)
    window.add_column("outcome", footer="events")
    window.add_column("count", justify="right", footer=str(ex.events))
    for total in ex.window:
        window.add_row(outcome_name(total.outcome), str(total.n))
    if not ex.window:
        window.add_row(literal("(no events)", "dim"), "0")
    # Evidence already used by a penalty is not counted again, hence "unused".
    grid.add_row(f"window, last {ex.window_seconds} s\n(unused evidence)", window)
    grid.add_row("weighted errors", f"{ex.weighted_errors:g}")
    grid.add_row("error ratio", f"{ex.error_ratio:.3f}")
    bound = ex.wilson_lower_bound
    cmp = ">" if bound > ex.threshold else "<="
    grid.add_row("Wilson lower bound", f"{bound:.3f} ({cmp} threshold {ex.threshold:.3f})")
    grid.add_row("threshold", f"{ex.threshold:.3f}")
    grid.add_row("fleet baseline", f"{ex.baseline:.3f}")
    fires = f"yes, rule {ex.rule}" if ex.would_fire else "no"
    grid.add_row("evidence would fire", fires)
    v = ex.verdict
    if v.tempfail:
        verdict = literal(time_left(v), "bold red")
    elif v.allowlisted:
        verdict = literal("no penalty (allowlisted)", "green")
    else:
        verdict = literal("no penalty", "green")
    if v.degraded:
        verdict.append(" [degraded: the store did not answer]", "yellow")
    grid.add_row("verdict", verdict)
    if v.reason:
        grid.add_row("reason", literal(v.reason))
    return grid
