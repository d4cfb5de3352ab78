"""Settings every service has, and how every service reads them: one base, one loader,
one redaction rule.

`ServingSettings` holds what serving takes (listen address, metrics, TLS and mutual
TLS, the admin token, the log level, the Redis URL of any topology, deadlines); each
service's settings class inherits it, sets its own `env_prefix` and defaults, and adds
only its own knobs. Values come from, strongest first, command-line flags,
`<SERVICE>_*` environment variables, a TOML file, then the defaults (`load_settings`);
`redacted()` masks secrets for `--print-config` and logs.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any, Literal, Self, TypeVar
from urllib.parse import urlsplit, urlunsplit

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    InitSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from penalty.identity import InvalidAddress, parse_network
from serving.errors import StoreMisconfigured
from serving.redis.topology import parse

S = TypeVar("S", bound=BaseSettings)

REDIS_SCHEMES = "redis://, rediss://, unix://, redis+sentinel:// or redis+cluster://"


def cidr_list(value: list[str]) -> list[str]:
    """CIDRs in canonical form (`penalty.identity.parse_network`), or ValueError naming one."""
    out = []
    for cidr in value:
        try:
            out.append(str(parse_network(cidr)))
        except InvalidAddress as exc:
            raise ValueError(str(exc)) from exc
    return out


def host_port(value: str) -> str:
    """`HOST:PORT` (`[::1]:PORT` for IPv6), or ValueError."""
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError("must be HOST:PORT")
    return value


class ServingSettings(BaseSettings):
    """What every service is told about serving. Subclasses set `env_prefix` and may
    change defaults by redeclaring a field; the validators here still apply."""

    model_config = SettingsConfigDict(env_nested_delimiter="__", extra="forbid", frozen=True)

    listen: str = "127.0.0.1:0"  # gRPC HOST:PORT ([::1]:PORT for IPv6)
    metrics_listen: str = ""  # Prometheus /metrics HOST:PORT; empty disables it
    grace_seconds: float = Field(5.0, ge=0, le=120)  # SIGTERM drain time for in-flight calls
    max_connection_age_seconds: float = Field(300.0, ge=0.5, le=86_400)  # then clients rebalance
    connection_age_grace_seconds: float = Field(30.0, ge=0, le=3600)  # open streams' grace
    max_message_bytes: int = Field(1 << 20, ge=1024, le=16 << 20)  # larger: INVALID_ARGUMENT
    log_level: Literal["debug", "info", "warning", "error"] = "info"  # log threshold
    admin_token: SecretStr = SecretStr("")  # bearer token for operator calls; empty: loopback
    tls_cert_file: str = ""  # PEM certificate chain; with tls_key_file the listener speaks TLS
    tls_key_file: str = ""  # PEM private key
    tls_client_ca_file: str = ""  # PEM CA bundle; when set, clients must present a certificate
    redis_url: str = ""  # redis://, rediss://, unix://, redis+sentinel://, redis+cluster://
    redis_max_connections: int = Field(32, ge=1, le=1024)  # pool size per replica
    admin_timeout_ms: int = Field(2000, ge=1, le=60_000)  # store deadline for operator calls
    workers: int = Field(1, ge=1, le=64)  # processes sharing the port (SO_REUSEPORT); Redis only

    @field_validator("listen")
    @classmethod
    def _listen(cls, value: str) -> str:
        return host_port(value)

    @field_validator("metrics_listen")
    @classmethod
    def _metrics(cls, value: str) -> str:
        return host_port(value) if value else value

    @field_validator("redis_url")
    @classmethod
    def _redis_url(cls, value: str) -> str:
        if not value:
            return value
        try:
            parse(value)
        except StoreMisconfigured as exc:
            raise ValueError(f"{exc} (use {REDIS_SCHEMES})") from exc
        return value

    @model_validator(mode="after")
    def _tls(self) -> Self:
        if bool(self.tls_cert_file) != bool(self.tls_key_file):
            raise ValueError("tls_cert_file and tls_key_file go together")
        if self.tls_client_ca_file and not self.tls_cert_file:
            raise ValueError("tls_client_ca_file needs tls_cert_file and tls_key_file")
        if self.workers > 1 and not self.redis_url:
            raise ValueError(
                f"workers={self.workers} needs the Redis store (redis_url): the embedded "
                "store lives in one process, so several would each hold their own penalties"
            )
        return self

    @property
    def store_kind(self) -> str:
        return "redis" if self.redis_url else "memory"

    def redacted(self) -> dict[str, Any]:
        """The effective configuration with secrets masked, for --print-config and logs."""
        return redacted(self.model_dump(mode="json"), self.admin_token, self.redis_url)


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
