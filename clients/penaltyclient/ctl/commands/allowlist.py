"""`allow`, `unallow` and `allowlist`: the admin calls on the allowlist.

An allowlisted CIDR is never penalized until its entry expires; each change is recorded
with an actor and a note, which `allowlist` (and `explain`, for a matching client) show.
"""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from penalty.v1 import penalty_pb2 as pb
from penaltyclient.ctl.options import Actor, JsonOut, Note, recorded_actor
from penaltyclient.ctl.output import literal, when
from penaltyclient.ctl.parsing import parse_ttl
from penaltyclient.ctl.session import Session


def allow(
    ctx: typer.Context,
    cidr: Annotated[
        str,
        typer.Argument(metavar="CIDR", help="e.g. 192.0.2.0/24; a bare address is a /32 or /128."),
    ],
    ttl: Annotated[
        str,
        typer.Option(
            "--ttl",
            metavar="DURATION",
            help="expiry: seconds or 30d, 12h, 15m, 1d12h; 0 means penaltyd's default (30 days).",
        ),
    ] = "0",
    note: Note = "",
    actor: Actor = "",
    json_out: JsonOut = False,
) -> None:
    """Allowlist a CIDR: its clients are never penalized until the entry expires.

    Remove an entry with `penaltyctl unallow CIDR`.
    """
    state = Session.of(ctx, json_out)
    seconds = parse_ttl(ttl)
    with state.client() as client:
        entry = client.allow(cidr, ttl_seconds=seconds, note=note, actor=recorded_actor(actor))
    text = f"allowlisted {entry.cidr} until {when(entry.expires_at_unix_ms)}"
    state.show(entry, literal(text, "green"))


def unallow(
    ctx: typer.Context,
    cidr: Annotated[
        str, typer.Argument(metavar="CIDR", help="the entry, as `allowlist` shows it.")
    ],
    actor: Actor = "",
    note: Note = "",
    json_out: JsonOut = False,
) -> None:
    """Remove an allowlist entry. Exit 1 when there was no such entry."""
    state = Session.of(ctx, json_out)
    with state.client() as client:
        removed = client.remove_allow(cidr, actor=recorded_actor(actor), note=note)
    state.conclude(
        pb.RemoveAllowResponse(removed=removed),
        removed,
        did=f"removed {cidr} from the allowlist",
        nothing=f"{cidr} is not on the allowlist: nothing removed",
    )


def allowlist(ctx: typer.Context, json_out: JsonOut = False) -> None:
    """Show the allowlist (CIDR, expiry, creation, actor, note)."""
    state = Session.of(ctx, json_out)
    with state.client() as client:
        entries = client.allowlist()
    state.show(pb.ListAllowlistResponse(entries=entries), allowlist_table(entries))


def allowlist_table(entries: list[pb.AllowEntry]) -> Table:
    """The allowlist, one row per entry; notes and actors as literal text."""
    title = f"allowlist: {len(entries)} {'entry' if len(entries) == 1 else 'entries'}"
    table = Table(title=title, title_justify="left")
    table.add_column("cidr", no_wrap=True)
    table.add_column("expires at", no_wrap=True)
    table.add_column("created at", no_wrap=True)
    table.add_column("actor")
    table.add_column("note", overflow="fold")
    for e in entries:
        table.add_row(
            literal(e.cidr),
            when(e.expires_at_unix_ms),
            when(e.created_at_unix_ms),
            literal(e.actor),
            literal(e.note),
        )
    return table
