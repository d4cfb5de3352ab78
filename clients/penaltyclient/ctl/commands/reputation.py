"""`reputation` and `worst`: the long memory (issue 15) of an address, a network, the fleet.

`reputation 203.0.113.7` shows the address's decayed counters and its neighbourhood's
(IPv4 /24, IPv6 /48 by default), the long-horizon bar they are judged against, and what
that does to the address's next decision; `reputation --network 203.0.113.0/24` one
network's. `worst` lists the neighbourhoods with the most weighted errors, for a
dashboard or an abuse desk. Both are audited admin calls (`--actor`, `--note`).
"""

from __future__ import annotations

from typing import Annotated

import typer
from rich.console import RenderableType
from rich.panel import Panel
from rich.table import Table

from penalty.v1 import penalty_pb2 as pb
from penaltyclient.ctl.options import Actor, JsonOut, Note, recorded_actor
from penaltyclient.ctl.output import literal
from penaltyclient.ctl.session import Session


def reputation(
    ctx: typer.Context,
    ip: Annotated[str, typer.Argument(help="the client address (omit with --network).")] = "",
    network: Annotated[
        str, typer.Option("--network", help="a neighbourhood instead, e.g. 203.0.113.0/24.")
    ] = "",
    actor: Actor = "",
    note: Note = "",
    json_out: JsonOut = False,
) -> None:
    """An address's reputation and its neighbourhood's, or one network's: decayed
    events, weighted errors and penalties, the long-horizon bar, and their effect."""
    if bool(ip) == bool(network):
        raise typer.BadParameter("give an address or --network, not both nor neither")
    state = Session.of(ctx, json_out)
    with state.client() as client:
        answer = client.reputation(ip, network, actor=recorded_actor(actor), note=note)
    state.show(answer, render_reputation(answer))


def worst(
    ctx: typer.Context,
    limit: Annotated[int, typer.Option("--limit", min=1, max=1000, help="how many.")] = 20,
    actor: Actor = "",
    note: Note = "",
    json_out: JsonOut = False,
) -> None:
    """The neighbourhoods with the most (decayed) weighted errors, worst first."""
    state = Session.of(ctx, json_out)
    with state.client() as client:
        found = client.worst_neighbourhoods(limit, actor=recorded_actor(actor), note=note)
    table = Table(title="worst neighbourhoods")
    for col in ("network", "events", "weighted errors", "ratio", "bound", "penalties", "state"):
        table.add_column(col, justify="left" if col in ("network", "state") else "right")
    for n in found.neighbourhoods:
        r = n.neighbourhood
        state_text = "misbehaving" if n.bad_neighbourhood else "ok"
        table.add_row(
            literal(n.network),
            f"{r.events:.0f}",
            f"{r.weighted_errors:.1f}",
            f"{r.error_ratio:.3f}",
            f"{r.lower_bound:.3f}",
            f"{r.penalties:.2f}",
            state_text,
        )
    if not found.neighbourhoods:
        table.add_row(literal("(none with errors)", "dim"), "", "", "", "", "", "")
    state.show(found, table)


def _row(table: Table, name: RenderableType, r: pb.Reputation) -> None:
    table.add_row(
        name,
        f"{r.events:.1f}",
        f"{r.weighted_errors:.1f}",
        f"{r.error_ratio:.3f}",
        f"{r.lower_bound:.3f}",
        f"{r.penalties:.2f}",
    )


def render_reputation(a: pb.ReputationAnswer) -> Panel:
    table = Table()
    for col in ("of", "events", "weighted errors", "ratio", "bound", "penalties"):
        table.add_column(col, justify="left" if col == "of" else "right")
    if a.HasField("reputation"):
        _row(table, literal(a.identity), a.reputation)
    _row(table, literal(a.network), a.neighbourhood)
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold")
    grid.add_column()
    grid.add_row("counters (decayed)", table)
    grid.add_row("long-horizon bar", f"{a.threshold:.3f}")
    grid.add_row("history", a.history or "neutral (too little, or in between)")
    grid.add_row("neighbourhood", "misbehaving" if a.bad_neighbourhood else "ok")
    grid.add_row("effect", literal(a.effect))
    title = f"reputation {a.identity or a.network}"
    return Panel(grid, title=literal(title), title_align="left")
