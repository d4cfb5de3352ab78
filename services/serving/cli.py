"""The command line every service's server shares: the same flags, the same errors.

`add_serving_arguments` adds `--config`, `--listen`, `--redis-url`, `--metrics-listen`,
`--log-level` and `--print-config`; `run_server` loads the settings (flags > environment
> file > defaults), prints them or reports a bad configuration on stderr (exit 2), then
runs the server; `run_program`, what every console script (servers and sidecars) ends
with, configures logs and runs on uvloop until SIGTERM (a start-up failure such as a port
in use is one line on stderr, exit 1).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from serving.settings import ServingSettings, SettingsProblem
from serving.workers import Supervisor, metrics_listen_of, worker_index

S = TypeVar("S", bound=ServingSettings)


def add_serving_arguments(
    p: argparse.ArgumentParser, *, env_prefix: str, default_listen: str, redis_help: str
) -> None:
    """The flags of a server (the most used settings; every setting has an env var)."""
    p.add_argument(
        "--config",
        metavar="FILE",
        default=os.environ.get(f"{env_prefix}_CONFIG"),
        help=f"TOML settings file (env {env_prefix}_CONFIG)",
    )
    p.add_argument(
        "--listen",
        metavar="HOST:PORT",
        help=f"gRPC address (env {env_prefix}_LISTEN; default {default_listen})",
    )
    p.add_argument(
        "--redis-url",
        metavar="URL",
        help=f"{redis_help} (env {env_prefix}_REDIS_URL; default: none, embedded store)",
    )
    p.add_argument(
        "--metrics-listen",
        metavar="HOST:PORT",
        help=f"serve Prometheus /metrics here (env {env_prefix}_METRICS_LISTEN; default off)",
    )
    p.add_argument(
        "--log-level",
        choices=["debug", "info", "warning", "error"],
        help=f"log threshold (env {env_prefix}_LOG_LEVEL; default info)",
    )
    p.add_argument(
        "--print-config",
        action="store_true",
        help="print the effective configuration as JSON and exit",
    )


def run_server(
    prog: str,
    args: argparse.Namespace,
    load: Callable[..., S],
    serve: Callable[[S], Coroutine[Any, Any, None]],
    *,
    module: str,
    env_prefix: str,
    **overrides: Any,
) -> int:
    """Load the settings from `args` (and `overrides`), then print them or serve (with
    `workers` > 1, this process supervises the others: `serving.workers`)."""
    try:
        settings = load(
            args.config,
            listen=args.listen,
            redis_url=args.redis_url,
            metrics_listen=args.metrics_listen,
            log_level=args.log_level,
            **overrides,
        )
    except SettingsProblem as problem:
        for line in problem.lines:
            print(f"{prog}: {line}", file=sys.stderr)
        return 2
    if args.print_config:
        print(json.dumps(settings.redacted(), indent=2))
        return 0

    index = worker_index(env_prefix)
    if index:
        settings = settings.model_copy(
            update={"metrics_listen": metrics_listen_of(settings.metrics_listen, index)}
        )

    async def main() -> None:
        supervisor = None
        if settings.workers > 1 and index == 0:
            supervisor = Supervisor(settings.workers, module, sys.argv[1:], env_prefix)
            supervisor.start()
        try:
            await serve(settings)
        finally:
            if supervisor is not None:
                await supervisor.stop(settings.grace_seconds + 5)

    return run_program(prog, settings.log_level, main)


def run_program(
    prog: str, log_level: str, main: Callable[[], Coroutine[Any, Any, int | None]]
) -> int:
    """Configure JSON logs and run `main()` on uvloop: every console script ends here. A
    start-up failure (a port in use, a path refused) is one line on stderr, exit 2."""
    import uvloop

    from serving import logs

    logs.configure(log_level)
    try:
        code = uvloop.run(main())
    except (OSError, ValueError) as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 2
    return int(code or 0)
