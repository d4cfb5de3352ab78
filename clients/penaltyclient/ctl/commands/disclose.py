"""`disclose`: everything penaltyd holds about an address, to answer a data request.

One row per item the store holds about the address and every client behind it (its
windows, penalty, shared mark, offence counter, last lift, index entries, allowlist
entries that cover it), with when each is deleted at the latest; then what holds the
address but cannot be read back per address. The call is audited: `--note` (the case
reference) is required, and the actor defaults to your login name.
"""

from __future__ import annotations

from typing import Annotated

import typer
from rich.console import Group
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from penalty.v1 import penalty_pb2 as pb
from penaltyclient.ctl.options import Actor, Ip, JsonOut, recorded_actor
from penaltyclient.ctl.output import literal, when
from penaltyclient.ctl.session import Session


def disclose(
    ctx: typer.Context,
    ip: Ip,
    note: Annotated[
        str,
        typer.Option("--note", help="the case reference of the data request (required, audited)."),
    ],
    actor: Actor = "",
    json_out: JsonOut = False,
) -> None:
    """Everything penaltyd holds about an address and every client behind it, with each
    item's expiry: the exact answer to a data request (audited; --note required)."""
    state = Session.of(ctx, json_out)
    with state.client() as client:
        found = client.disclose(ip, actor=recorded_actor(actor), note=note)
    state.show(found, render_disclosure(found))


def render_disclosure(d: pb.Disclosure) -> Panel:
    # Three columns so that a terminal of 80 keeps the sentences readable: the item
    # (kind, whose, where it is stored, dimmed), when it goes, and what it holds.
    table = Table(show_lines=True, expand=True)
    table.add_column("item", overflow="fold", ratio=3)
    table.add_column("deleted by", no_wrap=True)
    table.add_column("holds", overflow="fold", ratio=4)
    for item in d.items:
        where = item.stored_as + (f" [{item.member}]" if item.member else "")
        cell = Text(item.kind, style="bold")
        cell.append(f"\n{item.identity}")
        cell.append(f"\n{where}", style="dim")
        table.add_row(cell, when(item.expires_at_unix_ms), literal(item.content))
    keyed = "keyed tokens and sealed addresses" if d.keyed else "addresses in the clear"
    head = Text(
        f"{len(d.items)} items held about {d.identity} ({d.ip}) in the {d.store} store, "
        f"as {keyed}; read at {when(d.at_unix_ms)}"
    )
    parts: list[Table | Text] = [head]
    parts.append(table if d.items else literal("nothing is held about this address", "green"))
    if d.not_itemized:
        parts.append(Text("\nNot itemized (cannot be read back per address):", style="bold"))
        parts += [literal(f"- {line}") for line in d.not_itemized]
    return Panel(Group(*parts), title=literal(f"disclose {d.ip}"), title_align="left")
