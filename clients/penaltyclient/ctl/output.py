"""How results leave `penaltyctl`: JSON documents for scripts, rich text for people.

`--json` prints a message in the proto3 JSON mapping, field names as in the .proto, one
document per command or one line per item in streams, so scripts never parse tables.
Everything else is rich text built from the pieces here, which every command shares:
untrusted strings as literal text (never markup), timestamps in local time, enum names
as operators type them, and the phrases that recur across commands (a penalty's time
left, who changed something and why).
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

import typer
from google.protobuf import json_format
from google.protobuf.message import Message
from rich.console import Console
from rich.text import Text

from penalty.v1 import penalty_pb2 as pb


def console(soft_wrap: bool = False) -> Console:
    """A console on the current stdout: made per use, since tests (and redirections) swap
    sys.stdout between invocations. `soft_wrap` keeps long lines whole instead of wrapped."""
    return Console(highlight=False, soft_wrap=soft_wrap)


def as_dict(message: Message) -> dict[str, Any]:
    """The proto3 JSON mapping with the .proto's field names and zero values included,
    so `tempfail: false` is present rather than absent (int64/uint64 are strings there)."""
    result: dict[str, Any] = json_format.MessageToDict(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )
    return result


def emit(message: Message) -> None:
    """One JSON document (or one JSON line, in streams) on stdout."""
    typer.echo(json.dumps(as_dict(message), sort_keys=False))


def literal(text: str, style: str = "") -> Text:
    """Untrusted text (reasons, notes, HELO names) as literal rich text: never markup, and
    never a terminal escape or an invisible character (shown escaped, as `\\x1b`)."""
    if not text.isprintable():
        text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
    return Text(text, style=style)


def when(unix_ms: int) -> str:
    """A store timestamp in the operator's local time zone, to the second."""
    if not unix_ms:
        return "-"
    moment = datetime.fromtimestamp(unix_ms / 1000).astimezone()
    return moment.strftime("%Y-%m-%d %H:%M:%S %Z")


def outcome_name(number: int) -> str:
    """OUTCOME_UNKNOWN_RECIPIENT -> unknown_recipient (what `report` accepts)."""
    return pb.Outcome.Name(number).removeprefix("OUTCOME_").lower()  # type: ignore[arg-type]


def kind_name(kind: int) -> str:
    """KIND_PENALTY_STARTED -> penalty_started."""
    return pb.PenaltyEvent.Kind.Name(kind).removeprefix("KIND_").lower()  # type: ignore[arg-type]


def time_left(verdict: pb.Verdict) -> str:
    """`TEMPFAIL, 287 s left (until 2026-11-23 05:57:00 UTC)`."""
    until = when(verdict.expires_at_unix_ms)
    return f"TEMPFAIL, {verdict.seconds_left} s left (until {until})"


def signed(actor: str, note: str, by: str = " by ") -> str:
    """Who made an admin change and why, as a suffix: ` by alice: ticket 42` (each part
    only when recorded; `by` is what introduces the actor)."""
    return (f"{by}{actor}" if actor else "") + (f": {note}" if note else "")
