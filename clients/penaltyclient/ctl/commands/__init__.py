"""The `penaltyctl` commands, one module per subject, and the table that lists them.

`COMMANDS` maps each command's name to its function, in the order `--help` shows them;
`penaltyclient.ctl.app` registers them from it, so no module here needs the app.

To add a command:

1. Write it in the module of its subject, or a new module here (`disclose.py`,
   `reputation.py`). A command is a plain typer function whose parameters are its
   arguments and options (reuse the shared ones in `penaltyclient.ctl.options`; end with
   `json_out: JsonOut = False`) and whose docstring is its help text. A command about
   one client as an MX sees it can take `(state: Session, who: ClientArgs)` instead and
   be wrapped in `@client_command`, as `check` and `explain` are.
2. In its body: `state = Session.of(ctx, json_out)`; make the call inside
   `with state.client() as client:` (every error becomes an exit code); print with
   `state.show(message, renderable)`, which emits JSON under --json. Exit codes other
   than 0 come from `penaltyclient.ctl.exits` (`state.conclude` for "nothing to do").
3. Add it to `COMMANDS` below, where it should stand in `--help`, and to
   docs/penaltyctl.md.
"""

from __future__ import annotations

from collections.abc import Callable

from penaltyclient.ctl.commands import (
    allowlist,
    checks,
    disclose,
    explain,
    penalties,
    reputation,
    watch,
)

COMMANDS: dict[str, Callable[..., None]] = {
    # The MX API: verdicts, fail-open (no token needed).
    "check": checks.check,
    "report": checks.report,
    # The admin API (the admin token, when penaltyd has one).
    "explain": explain.explain,
    "lift": penalties.lift,
    "allow": allowlist.allow,
    "unallow": allowlist.unallow,
    "allowlist": allowlist.allowlist,
    "list": penalties.list_penalties,
    "stats": penalties.stats,
    "disclose": disclose.disclose,
    "reputation": reputation.reputation,
    "worst": reputation.worst,
    # The change feed.
    "watch": watch.watch,
}
