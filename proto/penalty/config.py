"""How penaltyd and relaycheck read their settings: one loader, one redaction rule.

Both services take their typed settings (pydantic-settings) from, strongest first,
command-line flags, `<SERVICE>_*` environment variables, a TOML file, then the defaults;
both print them with the admin token and the Redis password masked. The two services
must not import each other (DESIGN.md s. 2), so the mechanics live here, beside the
contract, and each service's `settings` module keeps only its own knobs.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

from pydantic import SecretStr
from pydantic_settings import (
    BaseSettings,
    InitSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

S = TypeVar("S", bound=BaseSettings)


def load_settings(
    settings_cls: type[S], title: str, config_file: str | Path | None, overrides: dict[str, Any]
) -> S:
    """Build `settings_cls` from flags (`overrides`, None = not given), environment, TOML
    file and defaults.

    Raises `pydantic.ValidationError` naming the offending knob, or `OSError` /
    `tomllib.TOMLDecodeError` for an unreadable file.
    """
    file_values: dict[str, Any] = {}
    if config_file:
        with open(config_file, "rb") as fh:
            file_values = tomllib.load(fh)

    # A subclass per call: the file's values are a source below the environment, which
    # pydantic-settings only lets a class (not an instance) declare.
    class _FromFile(settings_cls):  # type: ignore[valid-type,misc]  # the caller's settings class
        model_config = SettingsConfigDict(title=title)

        @classmethod
        def settings_customise_sources(
            cls,
            settings_cls: type[BaseSettings],
            init_settings: PydanticBaseSettingsSource,
            env_settings: PydanticBaseSettingsSource,
            dotenv_settings: PydanticBaseSettingsSource,
            file_secret_settings: PydanticBaseSettingsSource,
        ) -> tuple[PydanticBaseSettingsSource, ...]:
            return (init_settings, env_settings, InitSettingsSource(settings_cls, file_values))

    loaded: S = _FromFile(**{k: v for k, v in overrides.items() if v is not None})
    return loaded


def redacted(data: dict[str, Any], admin_token: SecretStr, redis_url: str) -> dict[str, Any]:
    """`data` (a settings `model_dump(mode="json")`) with the admin token and the Redis
    password masked, for --print-config and logs."""
    data["admin_token"] = "***" if admin_token.get_secret_value() else ""
    if redis_url:
        parts = urlsplit(redis_url)
        if parts.password:
            netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
            data["redis_url"] = urlunsplit(parts._replace(netloc=netloc))
    return data
