"""The exit codes of `penaltyctl`: the contract with the scripts that run it.

Scripts branch on the number and people read the one stderr line, so both live here:
`Code` (never renumber a member), `EXIT_CODES` (the same table in `--help`; also in
docs/penaltyctl.md) and `fail`, the one way a command leaves with an error.

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

import enum
from typing import NoReturn

import typer


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


def fail(code: Code, message: str) -> NoReturn:
    """Leave with `code` after one line on stderr (scripts read the code, people the line)."""
    typer.echo(f"penaltyctl: {message}", err=True)
    raise typer.Exit(int(code))
