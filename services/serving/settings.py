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

import difflib
import os
import re
import tomllib
from pathlib import Path
from typing import Any, Literal, Self, TypeVar, get_origin
from urllib.parse import urlsplit, urlunsplit

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    InitSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)
from pydantic_settings import SettingsError as PydanticSettingsError

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
    log_addresses: Literal["plain", "keyed", "none"] = "plain"  # IP addresses in log lines
    admin_token: SecretStr = SecretStr("")  # bearer token for operator calls; empty: loopback
    tls_cert_file: str = ""  # PEM certificate chain; with tls_key_file the listener speaks TLS
    tls_key_file: str = ""  # PEM private key
    tls_client_ca_file: str = ""  # PEM CA bundle; when set, clients must present a certificate
    redis_url: str = ""  # redis://, rediss://, unix://, redis+sentinel://, redis+cluster://
    redis_max_connections: int = Field(32, ge=1, le=1024)  # pool size per replica
    admin_timeout_ms: int = Field(2000, ge=1, le=60_000)  # store deadline for operator calls
    workers: int = Field(1, ge=1, le=64)  # processes sharing the port (SO_REUSEPORT); Redis only

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return _sources(settings_cls, init_settings, {})

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

    def log_key(self) -> bytes | None:
        """The key `log_addresses = "keyed"` tokens are made with (None: one drawn at start)."""
        return None

    @property
    def store_kind(self) -> str:
        return "redis" if self.redis_url else "memory"

    def redacted(self) -> dict[str, Any]:
        """The effective configuration with secrets masked, for --print-config and logs."""
        return redacted(self.model_dump(mode="json"), self.admin_token, self.redis_url)


class SettingsProblem(ValueError):
    """A configuration that cannot be used: `lines` say what, one line each, naming the
    setting, where its value came from (flag, variable, file and key) and what is allowed."""

    def __init__(self, lines: list[str]) -> None:
        super().__init__("; ".join(lines))
        self.lines = lines


class CommaListEnvSource(EnvSettingsSource):
    """Environment values as pydantic-settings reads them, except that a list setting
    also takes comma-separated text (`PENALTYD_SHARED_CIDRS=100.64.0.0/10,192.0.2.0/24`):
    only JSON was accepted, and plain text ended in a traceback."""

    def prepare_field_value(
        self, field_name: str, field: FieldInfo, value: Any, value_is_complex: bool
    ) -> Any:
        if (
            isinstance(value, str)
            and get_origin(field.annotation) is list
            and not value.lstrip().startswith("[")
        ):
            return [part.strip() for part in value.split(",") if part.strip()]
        return super().prepare_field_value(field_name, field, value, value_is_complex)


def _sources(
    settings_cls: type[BaseSettings],
    init_settings: PydanticBaseSettingsSource,
    file_values: dict[str, Any],
) -> tuple[PydanticBaseSettingsSource, ...]:
    return (
        init_settings,
        CommaListEnvSource(settings_cls),
        InitSettingsSource(settings_cls, file_values),
    )


#: Variables with the service's prefix that are not settings (clients and tooling read them).
CLIENT_VARIABLES = ("ADDRESS", "CONFIG", "TOKEN", "TOKEN_FILE", "TLS", "TLS_CA", "TLS_CERT",
                    "TLS_KEY", "WORKER_INDEX")  # fmt: skip


def _prefix(settings_cls: type[BaseSettings]) -> str:
    return str(settings_cls.model_config.get("env_prefix", ""))


def _did_you_mean(name: str, known: list[str], render: Any = str) -> str:
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.7)
    return f"; did you mean {render(close[0])}?" if close else ""


def _unknown_variables(settings_cls: type[BaseSettings]) -> list[str]:
    prefix = _prefix(settings_cls)
    if not prefix:
        return []
    known = [name.upper() for name in settings_cls.model_fields]
    lines = []
    for var in sorted(os.environ):
        if not var.startswith(prefix):
            continue
        rest = var[len(prefix) :]
        if rest.split("__")[0] in known or rest in CLIENT_VARIABLES:
            continue
        hint = _did_you_mean(rest, known, lambda n: prefix + n)
        lines.append(f"unknown variable {var}{hint}")
    return lines


def _where(
    settings_cls: type[BaseSettings],
    loc: tuple[Any, ...],
    overrides: dict[str, Any],
    file_values: dict[str, Any],
    config_file: str | Path | None,
) -> str:
    """Where the value at `loc` came from: a flag, a variable, the file, or the default."""
    name = str(loc[0]) if loc else ""
    prefix = _prefix(settings_cls)
    if overrides.get(name) is not None:
        return f"flag --{name.replace('_', '-')}"
    var = prefix + "__".join(str(part) for part in loc).upper()
    if var in os.environ:
        return f"variable {var}"
    if prefix + name.upper() in os.environ:
        return f"variable {prefix}{name.upper()}"
    if name in file_values:
        return f"{config_file}, key {'.'.join(str(part) for part in loc)}"
    return "the defaults"


def _problem_lines(
    settings_cls: type[BaseSettings],
    exc: ValidationError,
    overrides: dict[str, Any],
    file_values: dict[str, Any],
    config_file: str | Path | None,
) -> list[str]:
    known = list(settings_cls.model_fields)
    lines = []
    for error in exc.errors():
        loc = tuple(error.get("loc", ()))
        message = str(error.get("msg", "invalid")).removeprefix("Value error, ")
        message = message[:1].lower() + message[1:]
        where = _where(settings_cls, loc, overrides, file_values, config_file)
        if not loc:  # a rule across settings (e.g. tls_cert_file without tls_key_file)
            named = [
                f"{name} from {source}"
                for name in known
                if re.search(rf"\b{name}\b", message)
                and (source := _where(settings_cls, (name,), overrides, file_values, config_file))
                != "the defaults"
            ]
            lines.append(f"{message}" + (f" ({'; '.join(named)})" if named else ""))
        elif error.get("type") == "extra_forbidden":
            key = ".".join(str(part) for part in loc)
            choices, parent = known, ""
            if len(loc) > 1:  # a nested model's key: suggest among its own fields
                nested = settings_cls.model_fields.get(str(loc[0]))
                fields = getattr(getattr(nested, "annotation", None), "model_fields", None)
                if fields:
                    choices, parent = list(fields), f"{loc[0]}."
            hint = _did_you_mean(str(loc[-1]), choices, lambda n, p=parent: f"{p}{n}")
            lines.append(f"unknown setting {key!r} ({where}){hint}")
        else:
            key = ".".join(str(part) for part in loc)
            given = error.get("input")
            shown = f" = {given!r}" if isinstance(given, str | int | float) else ""
            if _is_secret(settings_cls, loc):  # never a secret on stderr (the journal)
                shown = " = '***'"
            lines.append(f"{key}{shown} ({where}): {message}")
    return lines


def _is_secret(settings_cls: type[BaseSettings], loc: tuple[Any, ...]) -> bool:
    """Whether the setting at `loc` holds a secret (a SecretStr, at any nesting level)."""
    field = settings_cls.model_fields.get(str(loc[0])) if loc else None
    return field is not None and "SecretStr" in str(field.annotation)


def load_settings(
    settings_cls: type[S], title: str, config_file: str | Path | None, overrides: dict[str, Any]
) -> S:
    """Build `settings_cls` from flags (`overrides`, None = not given), environment, TOML
    file and defaults.

    Raises `SettingsProblem` with one line per problem: the setting, the source of its
    value, what is allowed, a "did you mean" for unknown keys and variables.
    """
    file_values: dict[str, Any] = {}
    if config_file:
        try:
            with open(config_file, "rb") as fh:
                file_values = tomllib.load(fh)
        except OSError as exc:
            raise SettingsProblem(
                [f"cannot read config file {config_file}: {exc.strerror}"]
            ) from exc
        except tomllib.TOMLDecodeError as exc:
            raise SettingsProblem([f"config file {config_file} is not TOML: {exc}"]) from exc
    unknown = _unknown_variables(settings_cls)

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
            return _sources(settings_cls, init_settings, file_values)

    given = {k: v for k, v in overrides.items() if v is not None}
    try:
        loaded: S = _FromFile(**given)
    except ValidationError as exc:
        raise SettingsProblem(
            unknown + _problem_lines(settings_cls, exc, given, file_values, config_file)
        ) from exc
    except PydanticSettingsError as exc:  # a value the environment source could not parse
        raise SettingsProblem([*unknown, str(exc)]) from exc
    if unknown:
        raise SettingsProblem(unknown)
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


MIN_KEY_CHARS = 32  # a key made as the docs say (openssl rand -base64 32) has 44


def read_key(value: str, path: str, name: str) -> bytes | None:
    """A secret key from its setting or its file (surrounding whitespace dropped); None
    if neither is set. One reader for penaltyd's `identity_key` and the sidecars'
    `--log-key-file`, so that both refuse the same short or unreadable keys.

    Raises OSError naming an unreadable file, ValueError naming an empty file or a key
    shorter than MIN_KEY_CHARS."""
    text, source = value, name
    if path:
        try:
            with open(path, encoding="utf-8") as fh:
                text = fh.read(4096)
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
            raise OSError(f"{name}_file {path}: {reason or exc}") from exc
        source = f"{name}_file {path}"
    text = text.strip()
    if not text:
        if path:
            raise ValueError(f"{source}: the file is empty")
        return None
    if len(text) < MIN_KEY_CHARS:
        raise ValueError(
            f"{source}: a key must be at least {MIN_KEY_CHARS} characters "
            "(make one with: openssl rand -base64 32)"
        )
    return text.encode()
