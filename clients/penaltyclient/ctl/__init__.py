"""`penaltyctl`: the operator's and abuse desk's command line for a penaltyd fleet.

Every command is one call (or one paged listing, or one stream) through the blocking
`PenaltyClient`, so the CLI behaves exactly like the library: `check`/`report` fail open
(a degraded answer is exit 4, never an error), admin calls raise and are mapped to exit
codes a script can branch on. Human output is rich text on stdout; `--json` prints the
messages in the proto3 JSON mapping (field names as in the .proto) so scripts never
parse tables. Errors go to stderr as one readable line, never a traceback.

The package, by concern:

    app.py       the typer app: global options, top-level help, `main` (console script)
    exits.py     the exit codes (`Code`, the contract with scripts) and `fail`
    session.py   `Session`: the global options, one client, gRPC errors -> exit codes,
                 JSON-or-rich output of a result
    parsing.py   what operators type: outcomes, durations (--ttl), penaltyd addresses
    output.py    JSON documents and the shared rich-text pieces (timestamps, names, ...)
    options.py   arguments and options shared by commands; `client_command`
    commands/    the commands, one module per subject, and `COMMANDS`, their table
                 (its docstring says how to add one)

This module re-exports what callers use: the console script (`main`), the app (`app`,
e.g. for typer's CliRunner), the exit codes and the argument parsers.
"""

from __future__ import annotations

from penaltyclient.ctl.app import app, main
from penaltyclient.ctl.exits import Code
from penaltyclient.ctl.parsing import parse_outcome, parse_ttl

__all__ = ["Code", "app", "main", "parse_outcome", "parse_ttl"]
