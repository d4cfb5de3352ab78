"""`penaltyctl`: the operator's and abuse desk's command line for a penaltyd fleet.

Every command is one call (or one paged listing, or one stream) through the blocking
`PenaltyClient`, so the CLI behaves exactly like the library: `check`/`report` fail open
(a degraded answer is exit 4, never an error), admin calls raise and are mapped to exit
codes a script can branch on. Human output is rich text on stdout; `--json` prints the
messages in the proto3 JSON mapping (field names as in the .proto) so scripts never
parse tables. Errors go to stderr as one readable line, never a traceback.

Exit codes (also in `--help` and docs/penaltyctl.md):

    0  success (check/report: no penalty)
    1  nothing to do: `lift` found no active penalty, `unallow` no such entry
    2  usage or bad input, including INVALID_ARGUMENT from penaltyd (the field is named)
    3  check/report: tempfail (the client is penalized)
    4  check/report: degraded (penaltyd or its store did not answer: fail-open answer)
    5  authentication/permission (UNAUTHENTICATED, PERMISSION_DENIED)
    6  penaltyd unavailable (admin calls, watch): UNAVAILABLE or DEADLINE_EXCEEDED
    7  any other error from penaltyd
"""

from __future__ import annotations

import contextlib
import enum
import itertools
import json
import logging
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from importlib import metadata
from pathlib import Path
from typing import Annotated, Any, NoReturn

import grpc
import typer
from google.protobuf import json_format
from google.protobuf.message import Message
from rich.console import Console, Group, RenderableType
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from penalty.v1 import penalty_pb2 as pb
from penaltyclient.aio import PenaltydError
from penaltyclient.sync import PenaltyClient

Kind = pb.PenaltyEvent.Kind


class Code(enum.IntEnum):
    """Process exit codes: the contract with scripts (documented; never renumber)."""

    OK = 0
    NOTHING = 1
    USAGE = 2
    TEMPFAIL = 3
    DEGRADED = 4
    AUTH = 5
    UNAVAILABLE = 6
    ERROR = 7


EXIT_CODES = """\
Exit codes:

* 0: success (check/report: no penalty)
* 1: nothing to do (lift: no active penalty; unallow: no such entry)
* 2: usage or bad input, including INVALID_ARGUMENT from penaltyd
* 3: check/report: tempfail, the client is penalized
* 4: check/report: degraded, penaltyd did not answer (fail-open answer)
* 5: UNAUTHENTICATED or PERMISSION_DENIED (see --token)
* 6: penaltyd unavailable (admin calls, watch)
* 7: any other error from penaltyd"""

app = typer.Typer(
    name="penaltyctl",
    help=(
        "Operate a penaltyd fleet: check and explain clients, lift penalties, manage "
        "the allowlist, list and watch active penalties.\n\n" + EXIT_CODES
    ),
    epilog="Documentation: docs/penaltyctl.md in the penaltyd repository.",
    no_args_is_help=True,
    rich_markup_mode="markdown",
    add_completion=False,
    pretty_exceptions_enable=False,  # errors are mapped to exit codes, never shown as tracebacks
    context_settings={"help_option_names": ["-h", "--help"]},
)

# Outcome names operators type: the enum names without the OUTCOME_ prefix, lower case.
OUTCOMES: dict[str, int] = {
    name.removeprefix("OUTCOME_").lower(): number
    for name, number in pb.Outcome.items()
    if number != pb.OUTCOME_UNSPECIFIED
}
_UINT32_MAX = 2**32 - 1
_TTL_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_TTL_PART = re.compile(r"(\d+)([smhdw])")


# --- parsing operator input (pure; errors are typer.BadParameter -> exit 2)


def parse_outcome(text: str) -> tuple[int, int]:
    """`unknown_recipient=3` -> (OUTCOME_UNKNOWN_RECIPIENT, 3); `accepted` -> (ACCEPTED, 1).

    Names are case-insensitive, `-` works for `_`, and the `OUTCOME_` prefix is optional,
    so both what the README prints and what an operator types are accepted. A count must
    fit the message's uint32; its allowed range (1..max_count) is penaltyd's to enforce,
    and its refusal names the field.
    """
    name, sep, count = text.partition("=")
    key = name.strip().lower().replace("-", "_").removeprefix("outcome_")
    if key not in OUTCOMES:
        valid = ", ".join(OUTCOMES)
        raise typer.BadParameter(
            f"unknown outcome {name!r}; valid outcomes: {valid}", param_hint="'OUTCOME[=N]'"
        )
    if not sep:
        return OUTCOMES[key], 1
    if not count.strip().isdigit() or int(count) > _UINT32_MAX:
        raise typer.BadParameter(
            f"{text!r}: the count after '=' must be a whole number", param_hint="'OUTCOME[=N]'"
        )
    return OUTCOMES[key], int(count)


def parse_ttl(text: str) -> int:
    """`2592000`, `30d`, `12h`, `15m`, `1d12h` -> seconds. `0` asks for penaltyd's default."""
    text = text.strip().lower()
    if text.isdigit():
        return int(text)
    parts = _TTL_PART.findall(text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise typer.BadParameter(
            f"{text!r} is not a duration: give seconds or e.g. 30d, 12h, 15m, 1d12h",
            param_hint="'--ttl'",
        )
    return sum(int(n) * _TTL_UNITS[u] for n, u in parts)


# --- formatting


def when(unix_ms: int) -> str:
    """A store timestamp in the operator's local time zone, to the second."""
    if not unix_ms:
        return "-"
    moment = datetime.fromtimestamp(unix_ms / 1000).astimezone()
    return moment.strftime("%Y-%m-%d %H:%M:%S %Z")


def as_dict(message: Message) -> dict[str, Any]:
    """The proto3 JSON mapping with the .proto's field names and zero values included,
    so `tempfail: false` is present rather than absent (int64/uint64 are strings there)."""
    result: dict[str, Any] = json_format.MessageToDict(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )
    return result


def outcome_name(number: int) -> str:
    """OUTCOME_UNKNOWN_RECIPIENT -> unknown_recipient (what `report` accepts)."""
    return pb.Outcome.Name(number).removeprefix("OUTCOME_").lower()  # type: ignore[arg-type]


def kind_name(kind: int) -> str:
    return pb.PenaltyEvent.Kind.Name(kind).removeprefix("KIND_").lower()  # type: ignore[arg-type]


def _t(text: str, style: str = "") -> Text:
    """Untrusted text (reasons, notes, HELO names) as literal rich text: never markup."""
    return Text(text, style=style)


# --- the session: global options, one client, error mapping


@dataclass
class Ctl:
    """Global options, kept on the typer context for every command."""

    address: str
    token: str
    json: bool
    timeout: float
    tls: bool
    tls_ca: Path | None
    tls_cert: Path | None
    tls_key: Path | None

    @property
    def out(self) -> Console:
        # Bound per use: tests (and redirections) swap sys.stdout between invocations.
        return Console(highlight=False, soft_wrap=False)

    def emit(self, message: Message) -> None:
        """One JSON document (or one JSON line, in streams) on stdout."""
        typer.echo(json.dumps(as_dict(message), sort_keys=False))

    def credentials(self) -> grpc.ChannelCredentials | None:
        """TLS when asked for (or implied by a CA/cert file); None means plaintext."""
        if not (self.tls or self.tls_ca or self.tls_cert or self.tls_key):
            return None
        if bool(self.tls_cert) != bool(self.tls_key):
            fail(Code.USAGE, "--tls-cert and --tls-key go together (mutual TLS)")
        try:
            ca = self.tls_ca.read_bytes() if self.tls_ca else None
            cert = self.tls_cert.read_bytes() if self.tls_cert else None
            key = self.tls_key.read_bytes() if self.tls_key else None
        except OSError as exc:
            fail(Code.USAGE, f"cannot read TLS file: {exc}")
        return grpc.ssl_channel_credentials(
            root_certificates=ca, private_key=key, certificate_chain=cert
        )

    @contextlib.contextmanager
    def client(self) -> Iterator[PenaltyClient]:
        """A client for one command; every failure leaves as a readable line and exit code."""
        creds = self.credentials()
        try:
            check_target(self.address)
            client = PenaltyClient(
                self.address,
                deadline=self.timeout,
                admin_deadline=self.timeout,
                admin_token=self.token,
                credentials=creds,
            )
        except ValueError as exc:
            fail(Code.USAGE, f"--penaltyd {self.address!r}: {exc}")
        try:
            yield client
        except PenaltydError as exc:
            self.rpc_failed(exc.code, exc.details)
        except grpc.RpcError as exc:  # pragma: no cover - the client wraps these
            self.rpc_failed(exc.code(), exc.details() or "")
        except ValueError as exc:  # protobuf refuses an out-of-range field before sending
            fail(Code.USAGE, str(exc))
        finally:
            client.close()

    def rpc_failed(self, code: grpc.StatusCode, details: str) -> NoReturn:
        if code == grpc.StatusCode.INVALID_ARGUMENT:
            fail(Code.USAGE, f"refused by penaltyd: {details}")
        if code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
            # PERMISSION_DENIED means the server has no token set: giving one cannot help.
            missing = code == grpc.StatusCode.UNAUTHENTICATED and not self.token
            hint = " (no token given: --token or PENALTYD_ADMIN_TOKEN)" if missing else ""
            fail(Code.AUTH, f"{code.name}: {details}{hint}")
        if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
            fail(
                Code.UNAVAILABLE,
                f"penaltyd at {self.address} did not answer ({code.name}: {details})",
            )
        fail(Code.ERROR, f"penaltyd error {code.name}: {details}")


def check_target(address: str) -> None:
    """Refuse what is surely a typo before grpc turns it into a slow "unavailable".

    A gRPC target URI (`dns:///name:port`, `unix:/path`) is passed on as given; anything
    else must be HOST:PORT entries with a numeric port (`[::1]:50051` for IPv6).
    """
    if re.match(r"^[a-z][a-z0-9+.-]*:(//|/|[^0-9/])", address):
        return
    for part in address.split(","):
        host, sep, port = part.strip().rpartition(":")
        if not (sep and host and port.isdigit()):
            raise ValueError(f"not HOST:PORT: {part.strip()!r}")


def fail(code: Code, message: str) -> NoReturn:
    """Leave with `code` after one line on stderr (scripts read the code, people the line)."""
    typer.echo(f"penaltyctl: {message}", err=True)
    raise typer.Exit(int(code))


def ctl(ctx: typer.Context, json_out: bool) -> Ctl:
    """The global options, with a command's own `--json` (accepted on either side)."""
    obj = ctx.find_object(Ctl)
    assert obj is not None, "the app callback sets ctx.obj"
    if json_out:
        obj.json = True
    return obj


def _version(value: bool) -> None:
    if value:
        typer.echo(f"penaltyctl {metadata.version('penaltyd')}")
        raise typer.Exit()


@app.callback()
def main_options(
    ctx: typer.Context,
    penaltyd: Annotated[
        str,
        typer.Option(
            "--penaltyd",
            envvar="PENALTYD_ADDRESS",
            metavar="HOST:PORT[,...]",
            help="penaltyd replica(s): one HOST:PORT, a comma-separated list of IP "
            "literals (round robin), or dns:///NAME:PORT.",
        ),
    ] = "127.0.0.1:50051",
    token: Annotated[
        str,
        typer.Option(
            "--token",
            envvar="PENALTYD_ADMIN_TOKEN",
            help="admin token (sent as 'authorization: Bearer ...'); prefer the "
            "environment variable, a flag shows in ps.",
            show_default=False,
        ),
    ] = "",
    json_out: Annotated[
        bool,
        typer.Option(
            "--json",
            help="machine-readable output: one JSON document per command, JSON lines for "
            "list and watch (proto field names; int64 values are strings).",
        ),
    ] = False,
    timeout: Annotated[
        float,
        typer.Option("--timeout", min=0.01, help="deadline of each call, in seconds."),
    ] = 5.0,
    tls: Annotated[
        bool,
        typer.Option("--tls", envvar="PENALTYD_TLS", help="speak TLS (system CA roots)."),
    ] = False,
    tls_ca: Annotated[
        Path | None,
        typer.Option(
            "--tls-ca",
            envvar="PENALTYD_TLS_CA",
            help="PEM CA bundle to verify penaltyd (implies --tls).",
        ),
    ] = None,
    tls_cert: Annotated[
        Path | None,
        typer.Option(
            "--tls-cert", envvar="PENALTYD_TLS_CERT", help="PEM client certificate (mutual TLS)."
        ),
    ] = None,
    tls_key: Annotated[
        Path | None,
        typer.Option("--tls-key", envvar="PENALTYD_TLS_KEY", help="PEM client key (mutual TLS)."),
    ] = None,
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_version, is_eager=True, help="print the version and exit."
        ),
    ] = False,
) -> None:
    """Global options apply to every command and come before it."""
    ctx.obj = Ctl(penaltyd, token, json_out, timeout, tls, tls_ca, tls_cert, tls_key)


# --- options shared by the commands

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
Actor = Annotated[str, typer.Option("--actor", help="who does this (recorded).")]
Note = Annotated[str, typer.Option("--note", help="why (recorded).")]


def _verdict(state: Ctl, ip: str, v: pb.Verdict) -> NoReturn:
    """Print a verdict and leave with its exit code: 0 no penalty, 3 tempfail, 4 degraded."""
    code = Code.TEMPFAIL if v.tempfail else Code.DEGRADED if v.degraded else Code.OK
    if state.json:
        state.emit(v)
        raise typer.Exit(int(code))
    # Whole lines, never wrapped: people copy the reply, scripts grep the reason.
    out = Console(highlight=False, soft_wrap=True)
    who = v.identity or ip
    if v.tempfail:
        until = when(v.expires_at_unix_ms)
        out.print(_t(f"{who}: TEMPFAIL, {v.seconds_left} s left (until {until})", "bold red"))
        out.print(_t(f"  reason: {v.reason}"))
        out.print(_t(f"  reply:  {v.smtp_reply}"))
    elif v.degraded:
        text = f"{who}: no penalty (DEGRADED: no answer from penaltyd or its store; fail-open)"
        out.print(_t(text, "yellow"))
    elif v.allowlisted:
        out.print(_t(f"{who}: no penalty (allowlisted)", "green"))
    else:
        out.print(_t(f"{who}: no penalty", "green"))
    raise typer.Exit(int(code))


@app.command()
def check(
    ctx: typer.Context,
    ip: Ip,
    helo: Helo = "",
    mail_from: MailFrom = "",
    fingerprint: Fingerprint = "",
    json_out: JsonOut = False,
) -> None:
    """Ask "tempfail, and how many seconds are left?" as an MX would.

    Exit 0: no penalty; 3: tempfail; 4: degraded (penaltyd did not answer, so the MX
    would get the fail-open answer "no penalty").
    """
    state = ctl(ctx, json_out)
    with state.client() as client:
        verdict = client.check(ip, helo, mail_from, fingerprint)
    _verdict(state, ip, verdict)


@app.command()
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
    state = ctl(ctx, json_out)
    counts = [parse_outcome(o) for o in outcomes]
    with state.client() as client:
        verdict = client.report(ip, counts, helo, mail_from, fingerprint)
    _verdict(state, ip, verdict)


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
        window.add_row(_t("(no events)", "dim"), "0")
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
        verdict = _t(
            f"TEMPFAIL, {v.seconds_left} s left (until {when(v.expires_at_unix_ms)})", "bold red"
        )
    elif v.allowlisted:
        verdict = _t("no penalty (allowlisted)", "green")
    else:
        verdict = _t("no penalty", "green")
    if v.degraded:
        verdict.append(" [degraded: the store did not answer]", "yellow")
    grid.add_row("verdict", verdict)
    if v.reason:
        grid.add_row("reason", _t(v.reason))
    return grid


def render_explanation(ex: pb.Explanation) -> Panel:
    """The whole Explanation as one panel: who, why shared, evidence, verdict, overrides."""
    head = Table.grid(padding=(0, 2))
    head.add_column(style="bold")
    head.add_column()
    head.add_row("identity", _t(ex.identity))
    shared = f"yes: {ex.shared_reason or 'shared'}" if ex.shared else "no"
    if ex.distinct_sub_identities:
        shared += f" ({ex.distinct_sub_identities} distinct clients in the window)"
    head.add_row("shared address", _t(shared))
    if ex.HasField("allow"):
        a = ex.allow
        allow = f"{a.cidr}, until {when(a.expires_at_unix_ms)}"
        if a.actor:
            allow += f", by {a.actor}"
        if a.note:
            allow += f": {a.note}"
        head.add_row("allowlisted", _t(allow, "green"))
    else:
        head.add_row("allowlisted", "no")
    if ex.HasField("last_lift"):
        lift = ex.last_lift
        text = f"at {when(lift.at_unix_ms)} by {lift.actor or '(unknown)'}"
        if lift.note:
            text += f": {lift.note}"
        head.add_row("last lift", _t(text))
    else:
        head.add_row("last lift", "none in the window")
    parts: list[RenderableType] = [head, Text(""), _numbers(ex)]
    if ex.HasField("sub"):
        parts.append(
            Panel(
                _numbers(ex.sub),
                title=_t(f"this client's own window: {ex.sub_identity}"),
                title_align="left",
            )
        )
    return Panel(Group(*parts), title=_t(f"explain {ex.identity}"), title_align="left")


@app.command()
def explain(
    ctx: typer.Context,
    ip: Ip,
    helo: Helo = "",
    mail_from: MailFrom = "",
    fingerprint: Fingerprint = "",
    json_out: JsonOut = False,
) -> None:
    """Why is (or isn't) this client penalized? Window counts, ratio, Wilson bound,
    threshold and baseline, verdict and reason, shared-address status, the client's own
    sub-identity window, allowlist match and last lift."""
    state = ctl(ctx, json_out)
    with state.client() as client:
        ex = client.explain(ip, helo, mail_from, fingerprint)
    if state.json:
        state.emit(ex)
        return
    state.out.print(render_explanation(ex))


@app.command()
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
    state = ctl(ctx, json_out)
    with state.client() as client:
        result = client.lift(ip, actor=actor, note=note, helo=helo, mail_from=mail_from)
    if state.json:
        state.emit(result)
    elif result.lifted:
        state.out.print(_t(f"lifted the penalty on {result.identity}", "green"))
    else:
        state.out.print(_t(f"no active penalty on {result.identity}: nothing lifted", "yellow"))
    raise typer.Exit(int(Code.OK if result.lifted else Code.NOTHING))


@app.command()
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
    state = ctl(ctx, json_out)
    seconds = parse_ttl(ttl)
    with state.client() as client:
        entry = client.allow(cidr, ttl_seconds=seconds, note=note, actor=actor)
    if state.json:
        state.emit(entry)
        return
    state.out.print(_t(f"allowlisted {entry.cidr} until {when(entry.expires_at_unix_ms)}", "green"))


@app.command()
def unallow(
    ctx: typer.Context,
    cidr: Annotated[
        str, typer.Argument(metavar="CIDR", help="the entry, as `allowlist` shows it.")
    ],
    actor: Actor = "",
    json_out: JsonOut = False,
) -> None:
    """Remove an allowlist entry. Exit 1 when there was no such entry."""
    state = ctl(ctx, json_out)
    with state.client() as client:
        removed = client.remove_allow(cidr, actor=actor)
    if state.json:
        state.emit(pb.RemoveAllowResponse(removed=removed))
    elif removed:
        state.out.print(_t(f"removed {cidr} from the allowlist", "green"))
    else:
        state.out.print(_t(f"{cidr} is not on the allowlist: nothing removed", "yellow"))
    raise typer.Exit(int(Code.OK if removed else Code.NOTHING))


@app.command()
def allowlist(ctx: typer.Context, json_out: JsonOut = False) -> None:
    """Show the allowlist (CIDR, expiry, creation, actor, note)."""
    state = ctl(ctx, json_out)
    with state.client() as client:
        entries = client.allowlist()
    if state.json:
        state.emit(pb.ListAllowlistResponse(entries=entries))
        return
    title = f"allowlist: {len(entries)} {'entry' if len(entries) == 1 else 'entries'}"
    table = Table(title=title, title_justify="left")
    table.add_column("cidr", no_wrap=True)
    table.add_column("expires at", no_wrap=True)
    table.add_column("created at", no_wrap=True)
    table.add_column("actor")
    table.add_column("note", overflow="fold")
    for e in entries:
        table.add_row(
            _t(e.cidr),
            when(e.expires_at_unix_ms),
            when(e.created_at_unix_ms),
            _t(e.actor),
            _t(e.note),
        )
    state.out.print(table)


@app.command("list")
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
    json_out: JsonOut = False,
) -> None:
    """Active penalties fleet-wide (identity, seconds left, expiry, reason), fetched page
    by page from the server's index; with --json one JSON line per penalty."""
    state = ctl(ctx, json_out)
    if limit:  # one more than shown tells whether more exist
        page_size = min(page_size, limit + 1)
    with state.client() as client:
        pager = client.penalties(page_size=page_size)
        if state.json:  # stream: a huge list never sits in memory
            for p in itertools.islice(pager, limit or None):
                state.emit(p)
            return
        rows = list(itertools.islice(pager, limit + 1 if limit else None))
    more = bool(limit) and len(rows) > limit
    rows = rows[:limit] if limit else rows
    title = f"active penalties: {len(rows)}" + (f" (first {limit}; more exist)" if more else "")
    table = Table(title=title, title_justify="left")
    table.add_column("identity", no_wrap=True)
    table.add_column("s left", justify="right")
    table.add_column("expires at", no_wrap=True)
    table.add_column("reason", overflow="fold")
    for p in rows:
        table.add_row(_t(p.identity), str(p.seconds_left), when(p.expires_at_unix_ms), _t(p.reason))
    state.out.print(table)


@app.command()
def stats(ctx: typer.Context, json_out: JsonOut = False) -> None:
    """Fleet-wide figures: active penalties, tracked identities, shared addresses,
    degraded replicas and the store kind."""
    state = ctl(ctx, json_out)
    with state.client() as client:
        s = client.stats()
    if state.json:
        state.emit(s)
        return
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold")
    grid.add_column(justify="right")
    grid.add_row("active penalties", str(s.active_penalties))
    grid.add_row("tracked identities", str(s.tracked_identities))
    grid.add_row("shared addresses", str(s.shared_addresses))
    grid.add_row("degraded replicas", str(s.degraded_replicas))
    grid.add_row("store", _t(s.store))
    state.out.print(grid)


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
        what = f"allow {a.cidr} until {when(a.expires_at_unix_ms)}"
        if a.actor:
            what += f" by {a.actor}"
        if a.note:
            what += f": {a.note}"
    elif kind == Kind.KIND_ALLOW_REMOVED:
        what = f"unallow {event.allow.cidr}"
    elif kind == Kind.KIND_SNAPSHOT_DONE:
        return "--- snapshot done; live changes follow (Ctrl-C to stop) ---"
    else:
        what = f"{kind_name(kind)} (unknown event kind)"
    return f"{stamp}  {what}"


def _stream(state: Ctl, client: PenaltyClient, max_events: int, snapshot_only: bool) -> None:
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


@app.command()
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
    state = ctl(ctx, json_out)
    with state.client() as client:
        try:
            _stream(state, client, max_events, snapshot_only)
        except KeyboardInterrupt:
            return


def main() -> None:
    """Console-script entry point (`penaltyctl`)."""
    # The library warns on every fail-open answer; the CLI states it in its own output.
    logging.getLogger("penaltyclient").addHandler(logging.NullHandler())
    logging.getLogger("penaltyclient").propagate = False
    app(prog_name="penaltyctl")


if __name__ == "__main__":  # pragma: no cover
    main()
