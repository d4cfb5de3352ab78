"""`lift`, `list` and `stats`: the admin calls on penalties themselves.

End one client's penalty fleet-wide, page through the active ones, count them. Like
every admin command these need the admin token when penaltyd has one, and an error from
penaltyd is an exit code (see penaltyclient.ctl.exits), never a fail-open answer.
"""

from __future__ import annotations

import itertools
from typing import Annotated

import typer
from rich.table import Table

from penalty.v1 import penalty_pb2 as pb
from penaltyclient.ctl.options import Actor, Helo, Ip, JsonOut, MailFrom, Note, recorded_actor
from penaltyclient.ctl.output import literal, when
from penaltyclient.ctl.session import Session


def lift(
    ctx: typer.Context,
    ip: Ip,
    actor: Actor = "",
    note: Note = "",
    helo: Helo = "",
    mail_from: MailFrom = "",
    json_out: JsonOut = False,
) -> None:
    """End a client's penalty now, on every replica (recorded with actor and note).

    Exit 1 when there was no active penalty to lift.
    """
    state = Session.of(ctx, json_out)
    with state.client() as client:
        result = client.lift(
            ip, actor=recorded_actor(actor), note=note, helo=helo, mail_from=mail_from
        )
    state.conclude(
        result,
        result.lifted,
        did=f"lifted the penalty on {result.identity}",
        nothing=f"no active penalty on {result.identity}: nothing lifted",
    )


def list_penalties(
    ctx: typer.Context,
    limit: Annotated[
        int, typer.Option("--limit", min=0, metavar="N", help="show at most N penalties; 0: all.")
    ] = 0,
    page_size: Annotated[
        int,
        typer.Option(
            "--page-size",
            min=1,
            max=1000,
            metavar="N",
            help="penalties fetched per ListPenalties call.",
        ),
    ] = 500,
    actor: Actor = "",
    note: Note = "",
    json_out: JsonOut = False,
) -> None:
    """Active penalties fleet-wide (identity, seconds left, expiry, reason), fetched page
    by page from the server's index; with --json one JSON line per penalty."""
    state = Session.of(ctx, json_out)
    if limit:  # one more than shown tells whether more exist
        page_size = min(page_size, limit + 1)
    with state.client() as client:
        pager = client.penalties(page_size=page_size, actor=recorded_actor(actor), note=note)
        if state.json:  # stream: a huge list never sits in memory
            for p in itertools.islice(pager, limit or None):
                state.emit(p)
            return
        rows = list(itertools.islice(pager, limit + 1 if limit else None))
    more = bool(limit) and len(rows) > limit
    rows = rows[:limit] if limit else rows
    title = f"active penalties: {len(rows)}" + (f" (first {limit}; more exist)" if more else "")
    state.out.print(penalties_table(title, rows))


def penalties_table(title: str, rows: list[pb.Penalty]) -> Table:
    """Active penalties, one row each: identity, seconds left, expiry, reason."""
    table = Table(title=title, title_justify="left")
    table.add_column("identity", no_wrap=True)
    table.add_column("s left", justify="right")
    table.add_column("expires at", no_wrap=True)
    table.add_column("reason", overflow="fold")
    for p in rows:
        table.add_row(
            literal(p.identity), str(p.seconds_left), when(p.expires_at_unix_ms), literal(p.reason)
        )
    return table


def stats(ctx: typer.Context, json_out: JsonOut = False) -> None:
    """Fleet-wide figures: active penalties, tracked identities, shared addresses,
    degraded replicas and the store kind."""
    state = Session.of(ctx, json_out)
    with state.client() as client:
        s = client.stats()
    state.show(s, stats_grid(s))


def stats_grid(s: pb.StatsResponse) -> Table:
    """The fleet's figures as a two-column grid, numbers right-aligned."""
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold")
    grid.add_column(justify="right")
    grid.add_row("active penalties", str(s.active_penalties))
    grid.add_row("tracked identities", str(s.tracked_identities))
    grid.add_row("shared addresses", str(s.shared_addresses))
    grid.add_row("degraded replicas", str(s.degraded_replicas))
    grid.add_row("store", literal(s.store))
    return grid
