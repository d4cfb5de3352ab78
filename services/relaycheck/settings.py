"""Typed settings: one object, every knob with a default and a one-line comment.

Sources, strongest first: command-line flags, `RELAYCHECK_*` environment variables, a
TOML file (`--config` or `RELAYCHECK_CONFIG`), then the defaults below. `relaycheck serve
--print-config` shows the result. Unknown keys are refused, so typos do not pass.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import Field, field_validator, model_validator
from pydantic_settings import SettingsConfigDict

from penalty import outcomes
from relaycheck.customers import DEFAULT_PRIVATE_NETWORKS, normalise_domain
from serving import settings as serving_settings
from serving.settings import ServingSettings, cidr_list, host_port


class Settings(ServingSettings):
    """Everything relaycheck can be told. Defaults suit one node on the embedded store.

    Serving (listen, metrics, TLS and mutual TLS, admin token for customer and probe
    calls, the Redis URL of any topology, ...) is `ServingSettings`'s."""

    model_config = SettingsConfigDict(env_prefix="RELAYCHECK_")

    # --- serving (defaults of relaycheck)
    listen: str = "127.0.0.1:50061"  # gRPC HOST:PORT ([::1]:50061 for IPv6)
    max_message_bytes: int = Field(2 << 20, ge=4096, le=16 << 20)  # request size; larger: refused
    redis_max_connections: int = Field(16, ge=1, le=1024)  # pool size per replica

    # --- classification
    max_header_bytes: int = Field(1 << 20, ge=1024, le=8 << 20)  # larger `headers`: refused
    max_received: int = Field(64, ge=4, le=1000)  # Received lines parsed (newest first)
    max_line: int = Field(2000, ge=200, le=100_000)  # characters kept of one header value
    max_rcpt: int = Field(1000, ge=1, le=100_000)  # envelope recipients in one request
    own_hostnames: list[str] = Field(default_factory=list)  # our smart relays (".x" = subdomains)
    private_networks: list[str] = Field(
        default_factory=lambda: list(DEFAULT_PRIVATE_NETWORKS)
    )  # clients here are inside every customer

    # --- customer store
    key_prefix: str = Field("rc", pattern=r"^[A-Za-z0-9_.-]{1,16}$")  # namespace of every key
    store_timeout_ms: int = Field(
        100, ge=1, le=10_000
    )  # customer lookup deadline, then UNDETERMINED
    customer_ttl_days: int = Field(
        400, ge=1, le=3650
    )  # a record not upserted for this long expires
    relay_min_prefix_v4: int = Field(16, ge=0, le=32)  # broader IPv4 relay networks are refused
    relay_min_prefix_v6: int = Field(32, ge=0, le=128)  # broader IPv6 relay networks are refused

    # --- reporting relayed mail to penaltyd
    penaltyd: str = ""  # penaltyd HOST:PORT[,...] or dns:///name:port; empty: no reports
    report_outcome: str = "relay_denied"  # the penaltyd outcome a relayed origin is reported as
    report_queue: int = Field(10_000, ge=1, le=1_000_000)  # reports held while penaltyd is away

    # --- Probe (RFC 2505 battery)
    probe_step_timeout_ms: int = Field(5000, ge=10, le=120_000)  # default per SMTP command
    probe_budget_ms: int = Field(60_000, ge=100, le=600_000)  # default for the whole battery
    probe_max_budget_ms: int = Field(300_000, ge=100, le=3_600_000)  # longest a caller may ask
    probe_helo: str = "relaycheck.invalid"  # our EHLO name
    probe_foreign_domain: str = "relay-test.invalid"  # where test mail must not be relayed to
    probe_allowed_networks: list[str] = Field(default_factory=list)  # targets allowed; empty: any
    probe_max_concurrent: int = Field(4, ge=1, le=256)  # batteries running at once

    @field_validator("private_networks", "probe_allowed_networks")
    @classmethod
    def _cidrs(cls, value: list[str]) -> list[str]:
        return cidr_list(value)

    @field_validator("own_hostnames")
    @classmethod
    def _names(cls, value: list[str]) -> list[str]:
        out = []
        for name in value:
            dot = name.startswith(".")
            out.append(("." if dot else "") + normalise_domain(name.lstrip(".")))
        return out

    @field_validator("probe_helo", "probe_foreign_domain")
    @classmethod
    def _domain(cls, value: str) -> str:
        return normalise_domain(value)

    @field_validator("report_outcome")
    @classmethod
    def _outcome(cls, value: str) -> str:
        name = value.lower().removeprefix("outcome_")
        if name not in outcomes.ERROR_NAMES:
            raise ValueError(f"must be one of {sorted(outcomes.ERROR_NAMES)}")
        return name

    @field_validator("penaltyd")
    @classmethod
    def _penaltyd(cls, value: str) -> str:
        for part in value.split(","):
            part = part.strip()
            if part and "://" not in part:
                host_port(part)
        return value

    @model_validator(mode="after")
    def _consistent(self) -> Settings:  # TLS pairs are checked by ServingSettings
        if self.probe_budget_ms > self.probe_max_budget_ms:
            raise ValueError("probe_budget_ms must not exceed probe_max_budget_ms")
        if self.max_header_bytes > self.max_message_bytes:
            raise ValueError("max_header_bytes must not exceed max_message_bytes")
        return self

    @property
    def report_outcome_value(self) -> int:
        return outcomes.number(self.report_outcome)


def load_settings(config_file: str | Path | None = None, **overrides: Any) -> Settings:
    """Build the settings from flags (`overrides`), environment, TOML file and defaults.

    Raises `pydantic.ValidationError` naming the offending knob, or `OSError` /
    `tomllib.TOMLDecodeError` for an unreadable file.
    """
    return serving_settings.load_settings(Settings, "relaycheck settings", config_file, overrides)
