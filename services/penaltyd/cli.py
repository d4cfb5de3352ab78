"""`penaltyd`: the server's command line.

Flags override `PENALTYD_*` environment variables, which override the TOML file, which
overrides the defaults (see `penaltyd.settings`). Every knob can be set from a file or
the environment; the most used ones also have flags.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tomllib

import pydantic

from penaltyd import __version__
from penaltyd.settings import load_settings


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="penaltyd",
        description=(
            "Statistical SMTP error penalties over gRPC. Without a Redis URL the embedded "
            "in-process store is used (one node); with one, replicas share Redis."
        ),
        epilog=(
            "Every setting can also come from a TOML file (--config) or a PENALTYD_<NAME> "
            "environment variable (nested with __, e.g. PENALTYD_WEIGHTS__BAD_HELO=0.25); "
            "flags win over the environment, which wins over the file. "
            "`penaltyd --print-config` shows the effective configuration."
        ),
    )
    p.add_argument(
        "--config",
        metavar="FILE",
        default=os.environ.get("PENALTYD_CONFIG"),
        help="TOML settings file (env PENALTYD_CONFIG)",
    )
    p.add_argument(
        "--listen",
        metavar="HOST:PORT",
        help="gRPC address (env PENALTYD_LISTEN; default 127.0.0.1:50051)",
    )
    p.add_argument(
        "--redis-url",
        metavar="URL",
        help="redis://HOST:PORT/DB of the shared store (env PENALTYD_REDIS_URL; "
        "default: none, embedded store)",
    )
    p.add_argument(
        "--metrics-listen",
        metavar="HOST:PORT",
        help="serve Prometheus /metrics here (env PENALTYD_METRICS_LISTEN; default off)",
    )
    p.add_argument(
        "--log-level",
        choices=["debug", "info", "warning", "error"],
        help="log threshold (env PENALTYD_LOG_LEVEL; default info)",
    )
    p.add_argument(
        "--print-config",
        action="store_true",
        help="print the effective configuration as JSON and exit",
    )
    p.add_argument("--version", action="version", version=f"penaltyd {__version__}")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        settings = load_settings(
            args.config,
            listen=args.listen,
            redis_url=args.redis_url,
            metrics_listen=args.metrics_listen,
            log_level=args.log_level,
        )
    except pydantic.ValidationError as exc:
        print(f"penaltyd: invalid configuration:\n{exc}", file=sys.stderr)
        return 2
    except (OSError, tomllib.TOMLDecodeError) as exc:
        print(f"penaltyd: cannot read config file {args.config}: {exc}", file=sys.stderr)
        return 2
    if args.print_config:
        print(json.dumps(settings.redacted(), indent=2))
        return 0

    import uvloop

    from penalty import logs
    from penaltyd.server import serve

    logs.configure(settings.log_level)
    try:
        uvloop.run(serve(settings))
    except OSError as exc:
        print(f"penaltyd: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
