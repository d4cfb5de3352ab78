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
import gc
import json
import os
import sys
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar, cast

from serving.settings import ServingSettings, SettingsProblem, read_key
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

    return run_program(
        prog,
        settings.log_level,
        main,
        log_addresses=settings.log_addresses,
        log_key=settings.log_key,
    )


LOG_ADDRESSES = ("plain", "keyed", "none")


def add_log_address_arguments(p: argparse.ArgumentParser, *, env_prefix: str) -> None:
    """A sidecar's `--log-addresses` and `--log-key-file`: what penaltyd and relaycheck
    take as the `log_addresses` setting (and their identity key), with the same
    environment variables, so one env file on an MX says it for every program."""
    p.add_argument(
        "--log-addresses",
        choices=LOG_ADDRESSES,
        default=os.environ.get(f"{env_prefix}_LOG_ADDRESSES", "plain"),
        help="IP addresses in log lines: plain, keyed (a short keyed token, the same for "
        f"one address) or none (env {env_prefix}_LOG_ADDRESSES; default plain)",
    )
    p.add_argument(
        "--log-key-file",
        metavar="FILE",
        default=os.environ.get(f"{env_prefix}_LOG_KEY_FILE", ""),
        help="with --log-addresses keyed: the secret of the tokens; `python -m "
        "penaltyd.keying --log-key` prints penaltyd's (derived from its identity_key, which "
        f"never belongs on an MX), so both write the same tokens (env {env_prefix}_LOG_KEY_FILE; "
        "default: a secret drawn at start, so tokens join lines within one run only)",
    )


def log_address_options(args: argparse.Namespace) -> dict[str, Any]:
    """`run_program`'s log_addresses/log_key from the flags of `add_log_address_arguments`."""
    path: str = args.log_key_file
    return {
        "log_addresses": args.log_addresses,
        "log_key": lambda: read_key("", path, "log_key") if path else None,
    }


def run_program(
    prog: str,
    log_level: str,
    main: Callable[[], Coroutine[Any, Any, int | None]],
    *,
    log_addresses: str = "plain",
    log_key: Callable[[], bytes | None] | None = None,
) -> int:
    """Configure JSON logs and run `main()` on uvloop: every console script ends here. A
    start-up failure (a port in use, a path refused) is one line on stderr, exit 2.

    `log_addresses` and `log_key`: how IP addresses are written (`serving.logs`)."""
    import uvloop

    from serving import logs

    try:
        key = log_key() if log_key is not None and log_addresses == "keyed" else None
    except (OSError, ValueError) as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 2
    logs.configure(log_level, cast(logs.LogAddresses, log_addresses), key)
    try:
        code = uvloop.run(main())
    except (OSError, ValueError) as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 2
    return int(code or 0)


def tune_gc() -> None:
    """Garbage collections that do not stall the answers; call it after start-up, so
    what start-up built is frozen too (penaltyd and penalty-policyd).

    A penaltyd replica holds ~200k long-lived objects (caches, the penalty view) and a
    policyd its identity cache and live replica; with CPython's default thresholds full
    collections over them paused every answer for 20-101 ms about once a second under
    load (measured, `gc.callbacks`). Start-up objects are frozen out of the collector and
    the young generations collected less often; reference counting still frees almost
    everything at once, and cycles are still collected."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)
