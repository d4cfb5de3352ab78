"""`watch`: follow penalties live, surviving a rolling restart of penaltyd.

The only command that holds a stream open: a snapshot of active penalties, shared
addresses and allowlist entries, then every change, as one line (or one JSON line) each.
Once a snapshot has been seen, a lost stream is watched again with backoff.
"""

from __future__ import annotations

import time
from typing import Annotated

import grpc
import typer

from penalty.v1 import penalty_pb2 as pb
from penaltyclient.aio import PenaltydError
from penaltyclient.ctl.options import JsonOut
from penaltyclient.ctl.output import kind_name, signed, when
from penaltyclient.ctl.session import Session
from penaltyclient.sync import PenaltyClient

Kind = pb.PenaltyEvent.Kind


def watch(
    ctx: typer.Context,
    max_events: Annotated[
        int,
        typer.Option(
            "--max-events",
            min=0,
            metavar="N",
            help="exit 0 after N live events (the snapshot does not count); 0: until Ctrl-C.",
        ),
    ] = 0,
    snapshot_only: Annotated[
        bool,
        typer.Option("--snapshot-only", help="print the snapshot and exit 0."),
    ] = False,
    json_out: JsonOut = False,
) -> None:
    """Follow penalties live: first a snapshot of active penalties, shared addresses and
    allowlist entries, then every change, one line each, until Ctrl-C (exit 0).

    Once a snapshot has arrived, a lost stream (penaltyd restarted, its feed resynced)
    is watched again and the fresh snapshot printed; exit 6 if penaltyd cannot be
    reached at the start. Expiry is not an event: a penalty ends at its stated time.
    """
    state = Session.of(ctx, json_out)
    with state.client() as client:
        try:
            _stream(state, client, max_events, snapshot_only)
        except KeyboardInterrupt:
            return


def _stream(state: Session, client: PenaltyClient, max_events: int, snapshot_only: bool) -> None:
    """Print the snapshot, then live events. Once a first snapshot has been seen, a lost
    stream (penaltyd restarted, or its feed resynced) is watched again with backoff and
    the fresh snapshot printed: a watch on a terminal should survive a rolling restart."""
    live = 0
    synced_once = False
    announced = False  # one "watch lost" line per loss, not one per failed retry
    backoff = 0.5
    while True:
        snapshot = True
        try:
            for event in client.watch():
                if state.json:
                    state.emit(event)
                else:
                    typer.echo(event_line(event, snapshot))
                if event.kind == Kind.KIND_SNAPSHOT_DONE:
                    snapshot, synced_once, announced, backoff = False, True, False, 0.5
                    if snapshot_only:
                        return
                elif not snapshot:
                    live += 1
                    if max_events and live >= max_events:
                        return
            code, details = grpc.StatusCode.UNAVAILABLE, "the stream ended"
        except PenaltydError as exc:
            code, details = exc.code, exc.details
        if not synced_once or code != grpc.StatusCode.UNAVAILABLE:
            state.rpc_failed(code, details)
        if not announced:
            typer.echo(f"penaltyctl: watch lost ({details}); watching again", err=True)
            announced = True
        time.sleep(backoff)
        backoff = min(backoff * 2, 5.0)


def event_line(event: pb.PenaltyEvent, snapshot: bool) -> str:
    """One readable line per event; snapshot lines say so, live ones carry the time."""
    stamp = "snapshot" if snapshot else when(event.store_now_unix_ms)
    kind = event.kind
    if kind == Kind.KIND_PENALTY_STARTED:
        p = event.penalty
        what = f"penalty {p.identity}: {p.seconds_left} s, until {when(p.expires_at_unix_ms)}"
        if p.reason:
            what += f": {p.reason}"
    elif kind == Kind.KIND_PENALTY_LIFTED:
        what = f"lifted {event.penalty.identity}"
    elif kind == Kind.KIND_SHARED_MARKED:
        what = f"shared address {event.address}"
    elif kind == Kind.KIND_ALLOW_ADDED:
        a = event.allow
        what = f"allow {a.cidr} until {when(a.expires_at_unix_ms)}" + signed(a.actor, a.note)
    elif kind == Kind.KIND_ALLOW_REMOVED:
        what = f"unallow {event.allow.cidr}"
    elif kind == Kind.KIND_SNAPSHOT_DONE:
        return "--- snapshot done; live changes follow (Ctrl-C to stop) ---"
    else:
        what = f"{kind_name(kind)} (unknown event kind)"
    return f"{stamp}  {what}"
