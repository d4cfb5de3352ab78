"""`penaltyd`: the server's command line.

Flags override `PENALTYD_*` environment variables, which override the TOML file, which
overrides the defaults (see `penaltyd.settings`). Every knob can be set from a file or
the environment; the most used ones also have flags.
"""

from __future__ import annotations

import argparse
import sys

from penaltyd import __version__
from penaltyd.settings import load_settings
from serving.cli import add_serving_arguments, run_server


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
    add_serving_arguments(
        p,
        env_prefix="PENALTYD",
        default_listen="127.0.0.1:50051",
        redis_help="redis:// (or +sentinel, +cluster) URL of the shared store",
    )
    p.add_argument("--version", action="version", version=f"penaltyd {__version__}")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    from penaltyd.server import serve

    return run_server(
        "penaltyd", args, load_settings, serve, module="penaltyd", env_prefix="PENALTYD"
    )


if __name__ == "__main__":
    sys.exit(main())
