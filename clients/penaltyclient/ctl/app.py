"""The typer application: the global options, the help text, and the entry point.

This is where `penaltyctl` is assembled: `app` carries the top-level help (with the exit
codes), the options that come before any command (address, token, TLS, timeout, --json,
--version) and, from `penaltyclient.ctl.commands.COMMANDS`, every command. `main` is the
console script.
"""

from __future__ import annotations

import logging
from importlib import metadata
from pathlib import Path
from typing import Annotated

import typer

from penaltyclient.ctl.commands import COMMANDS
from penaltyclient.ctl.exits import EXIT_CODES
from penaltyclient.ctl.session import Session

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
    ctx.obj = Session(penaltyd, token, json_out, timeout, tls, tls_ca, tls_cert, tls_key)


for _name, _command in COMMANDS.items():
    app.command(_name)(_command)


def main() -> None:
    """Console-script entry point (`penaltyctl`)."""
    # The library warns on every fail-open answer; the CLI states it in its own output.
    logging.getLogger("penaltyclient").addHandler(logging.NullHandler())
    logging.getLogger("penaltyclient").propagate = False
    app(prog_name="penaltyctl")
