"""Typed settings: one object, every knob with a default and a one-line comment.

Sources, strongest first: command-line flags, `PENALTYD_*` environment variables
(nested with `__`, e.g. `PENALTYD_WEIGHTS__BAD_HELO=0.25`), a TOML file (`--config` or
`PENALTYD_CONFIG`), then the defaults below. `penaltyd --print-config` shows the result.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator
from pydantic_settings import SettingsConfigDict

from penalty.identity import IdentityRules, nat64_network
from penalty.keyed import IdentityKey
from penalty.replies import DEFAULT_SMTP_REPLY
from serving import settings as serving_settings
from serving.settings import MIN_KEY_CHARS, ServingSettings, cidr_list, read_key


class Weights(BaseModel):
    """How much one event of each error kind counts; ACCEPTED is the denominator (0)."""

    model_config = ConfigDict(extra="forbid")

    unknown_recipient: float = Field(1.0, ge=0, le=10)  # dictionary attacks, stale lists
    relay_denied: float = Field(1.0, ge=0, le=10)  # open-relay probing
    bad_helo: float = Field(0.5, ge=0, le=10)  # broken ratware HELO; some legit misconfig
    protocol_violation: float = Field(1.0, ge=0, le=10)  # pipelining, early talk, non-SMTP
    auth_failed: float = Field(0.5, ge=0, le=10)  # password guessing; users mistype too
    sender_rejected: float = Field(0.5, ge=0, le=10)  # forged or unresolvable senders
    content_rejected: float = Field(0.5, ge=0, le=10)  # content filter said no
    dnsbl_listed: float = Field(1.0, ge=0, le=10)  # listed in a DNSBL the MX consults
    lost_connection: float = Field(0.25, ge=0, le=10)  # hang-ups; also flaky networks


class Settings(ServingSettings):
    """Everything penaltyd can be told. Defaults suit one node on the embedded store.

    Serving (listen, metrics, TLS, admin token, Redis URL, ...) is `ServingSettings`'s;
    these are penaltyd's own knobs."""

    model_config = SettingsConfigDict(env_prefix="PENALTYD_")

    # --- serving (defaults of penaltyd)
    listen: str = "127.0.0.1:50051"  # gRPC HOST:PORT ([::1]:50051 for IPv6)
    max_message_bytes: int = Field(
        1 << 20, ge=1024, le=4 << 20
    )  # larger requests: INVALID_ARGUMENT
    max_batch: int = Field(1000, ge=1, le=100_000)  # checks+reports in one Session message
    max_counts_per_report: int = Field(32, ge=1, le=1024)  # OutcomeCount entries per report
    max_count: int = Field(100_000, ge=1, le=10_000_000)  # largest n in one OutcomeCount
    bulk_slice: int = Field(100, ge=1, le=100_000)  # larger Session messages take the bulk lane
    bulk_lanes: int = Field(1, ge=1, le=64)  # large messages processed at once (checks first)
    # PenaltyService callers (MX sidecars): "none" (anyone who reaches the port), "reports"
    # (Report and Session need a token or client certificate; Check and Watch stay open)
    # or "all".
    service_auth: Literal["none", "reports", "all"] = "none"
    service_tokens: dict[str, SecretStr] = Field(default_factory=dict)  # MX name -> token
    service_tokens_file: str = ""  # lines "name token" (# comments), read at start-up

    # --- store
    key_prefix: str = Field("pd", pattern=r"^[A-Za-z0-9_.-]{1,16}$")  # namespace of every key
    index_shards: int = Field(16, ge=1, le=1024)  # active-penalty index split over this many keys
    check_timeout_ms: int = Field(20, ge=1, le=10_000)  # store deadline for a check, then fail open
    report_timeout_ms: int = Field(50, ge=1, le=10_000)  # store deadline for a report
    report_timeout_per_item_ms: float = Field(
        0.5, ge=0, le=100
    )  # + this per extra report in a batch
    report_buffer: int = Field(10_000, ge=0, le=1_000_000)  # reports kept while the store is down
    use_penalty_view: bool = True  # answer checks from the in-process view fed by pub/sub
    memory_max_identities: int = Field(1_000_000, ge=100, le=100_000_000)  # embedded store bound
    memory_max_penalties: int = Field(250_000, ge=100, le=100_000_000)  # embedded: more refused

    # --- WatchPenalties (live replicas on MX nodes)
    max_watchers: int = Field(1000, ge=1, le=100_000)  # more concurrent watchers: refused
    watch_log_events: int = Field(100_000, ge=100, le=10_000_000)  # changes kept for watchers
    watch_stall_seconds: float = Field(30.0, gt=0, le=3600)  # a write stuck this long ends it

    # --- privacy (docs/privacy.md)
    # With a key the store holds keyed tokens instead of addresses, and sealed addresses
    # only replicas with the key can read; at least 32 characters (openssl rand -base64 32).
    identity_key: SecretStr = SecretStr("")
    identity_key_file: str = ""  # the same, read from this file at start-up
    identity_key_previous: SecretStr = SecretStr("")  # the key being rotated out (read only)
    identity_key_previous_file: str = ""  # the same, from a file

    # --- identities
    ipv4_prefix: int = Field(32, ge=8, le=32)  # identity prefix length for IPv4
    ipv6_prefix: int = Field(64, ge=16, le=128)  # identity prefix length for IPv6
    nat64_prefixes: list[str] = Field(default_factory=list)  # local NAT64 prefixes (RFC 6052)

    # --- shared addresses (NAT, CGNAT; DESIGN.md section 3)
    shared_cidrs: list[str] = Field(default_factory=list)  # always handled per sub-identity
    shared_min_sub_identities: int = Field(20, ge=2, le=100_000)  # more distinct clients: shared
    shared_ttl_seconds: int = Field(3600, ge=60, le=7 * 86_400)  # how long a detected mark lasts
    shared_threshold_floor: float = Field(0.75, gt=0, lt=1)  # whole-address bar when shared
    shared_n_min: int = Field(30, ge=1, le=1_000_000)  # whole-address n_min when shared
    shared_burst_errors: float = Field(300.0, gt=0)  # whole-address burst when shared

    # --- adaptive threshold and escalation
    baseline_multiplier: float = Field(
        3.0, ge=0, le=100
    )  # threshold >= this x fleet baseline ratio
    baseline_min_events: int = Field(1000, ge=1)  # fleet events in the window before it applies
    baseline_identity_events: int = Field(100, ge=1, le=1_000_000)  # one identity's weight, max
    threshold_max: float = Field(0.8, gt=0, lt=1)  # a noisy fleet raises the bar at most to this
    stats_flush_seconds: float = Field(5.0, ge=0.1, le=300)  # replica -> store aggregate interval
    escalation_multiplier: float = Field(
        1.0, ge=1, le=10
    )  # repeat offence: length x this^n (1 = off)
    escalation_cap_seconds: int = Field(3600, ge=1, le=86_400)  # longest escalated penalty
    escalation_window_seconds: int = Field(86_400, ge=60, le=30 * 86_400)  # offences remembered

    # --- reputation: the longer memory (docs/detection.md, "Reputation")
    reputation_half_life_seconds: int = Field(
        3600, ge=60, le=7 * 86_400
    )  # counters halve this fast
    reputation_ttl_seconds: int = Field(14_400, ge=60, le=30 * 86_400)  # forgotten this long after
    neighbourhood_ipv4_prefix: int = Field(24, ge=8, le=32)  # IPv4 neighbourhood (/24)
    neighbourhood_ipv6_prefix: int = Field(48, ge=16, le=128)  # IPv6 neighbourhood (/48)
    reputation_z: float = Field(2.0, gt=0, le=10)  # Wilson z on the long-horizon counters
    reputation_min_events: float = Field(50.0, ge=1)  # decayed events before history counts
    reputation_threshold_floor: float = Field(0.2, gt=0, lt=1)  # long-horizon bar, at least this
    reputation_baseline_multiplier: float = Field(4.0, ge=0, le=100)  # ...or this x fleet ratio
    reputation_clean_events: float = Field(500.0, ge=1)  # decayed events of a "long clean history"
    reputation_clean_factor: float = Field(2.0, ge=1, le=100)  # clean history: n_min, burst x this
    neighbourhood_min_events: float = Field(50.0, ge=1)  # decayed events before a network counts
    neighbourhood_n_min: int = Field(4, ge=1, le=1000)  # bad network: events an address needs
    neighbourhood_min_errors: float = Field(3.0, gt=0)  # ...and weighted errors of its own
    neighbourhood_min_ratio: float = Field(0.6, ge=0, le=1)  # ...at at least this raw ratio
    neighbourhood_cache: int = Field(65_536, ge=16, le=10_000_000)  # networks kept per replica
    neighbourhood_worst_keep: int = Field(256, ge=1, le=100_000)  # worst networks indexed per shard

    # --- allowlist
    allow_min_prefix_v4: int = Field(16, ge=0, le=32)  # broader IPv4 CIDRs are refused
    allow_min_prefix_v6: int = Field(32, ge=0, le=128)  # broader IPv6 CIDRs are refused
    allow_default_ttl_seconds: int = Field(30 * 86_400, ge=1)  # expiry when ttl_seconds is 0
    allow_max_ttl_seconds: int = Field(365 * 86_400, ge=1)  # longest expiry (every key expires)

    # --- detection (DESIGN.md section 4)
    window_seconds: int = Field(600, ge=10, le=86_400)  # sliding window length
    bucket_seconds: int = Field(60, ge=1, le=3600)  # window resolution (window/bucket buckets)
    n_min: int = Field(20, ge=1, le=1_000_000)  # events needed before the ratio test may fire
    z: float = Field(3.0, gt=0, le=10)  # Wilson score z (3.0 ~ 99.87% one-sided)
    threshold_floor: float = Field(
        0.5, gt=0, lt=1
    )  # lower bound of the error ratio must exceed this
    burst_errors: float = Field(100.0, gt=0)  # weighted errors in the window that fire on their own
    burst_min_ratio: float = Field(0.25, ge=0, le=1)  # ...if the raw error ratio is at least this
    weights: Weights = Field(default_factory=Weights)  # per error kind

    # --- penalties (DESIGN.md section 7)
    penalty_seconds: int = Field(300, ge=1, le=86_400)  # how long a penalty lasts
    smtp_reply: str = DEFAULT_SMTP_REPLY  # {ip}, {identity}, {seconds} filled in; a 4xx

    @field_validator("smtp_reply")
    @classmethod
    def _tempfail_only(cls, value: str) -> str:
        code = value[:3]
        if not (code.isdigit() and code[0] == "4" and value[3:4] == " "):
            raise ValueError("must start with a 4xx code and a space: a penalty is a tempfail")
        if code == "421":
            raise ValueError("421 closes the connection; use 450 or 451")
        if "{seconds}" not in value:
            raise ValueError("must contain {seconds}: the reply states the exact time left")
        try:
            value.format(ip="192.0.2.1", identity="192.0.2.1", seconds=1)
        except (KeyError, IndexError, ValueError) as exc:
            raise ValueError(
                f"only {{ip}}, {{identity}} and {{seconds}} may be used: {exc}"
            ) from exc
        return value

    @field_validator("identity_key", "identity_key_previous")
    @classmethod
    def _key_length(cls, value: SecretStr) -> SecretStr:
        text = value.get_secret_value().strip()
        if text and len(text) < MIN_KEY_CHARS:
            raise ValueError(
                f"a key must be at least {MIN_KEY_CHARS} characters "
                "(make one with: openssl rand -base64 32)"
            )
        return SecretStr(text)

    @field_validator("shared_cidrs")
    @classmethod
    def _cidrs(cls, value: list[str]) -> list[str]:
        return cidr_list(value)

    @field_validator("nat64_prefixes")
    @classmethod
    def _nat64(cls, value: list[str]) -> list[str]:
        return [str(nat64_network(text)) for text in value]

    @model_validator(mode="after")
    def _window_fits(self) -> Settings:
        if self.window_seconds % self.bucket_seconds:
            raise ValueError("window_seconds must be a multiple of bucket_seconds")
        if self.reputation_ttl_seconds < self.reputation_half_life_seconds:
            raise ValueError("reputation_ttl_seconds must be at least reputation_half_life_seconds")
        if self.window_seconds // self.bucket_seconds > 120:
            raise ValueError("at most 120 buckets per window (memory per identity)")
        for name in ("identity_key", "identity_key_previous"):
            if getattr(self, name).get_secret_value() and getattr(self, f"{name}_file"):
                raise ValueError(f"{name} and {name}_file: set one of them")
        if self.service_auth != "none" and not (
            self.service_tokens or self.service_tokens_file or self.tls_client_ca_file
        ):
            raise ValueError(
                f"service_auth={self.service_auth} needs service_tokens, service_tokens_file "
                "or tls_client_ca_file (mutual TLS)"
            )
        return self

    def identity_keys(self) -> tuple[bytes | None, bytes | None]:
        """(current, previous) identity keys, from the settings or their files.

        Raises OSError naming an unreadable file, ValueError naming a key too short or a
        previous key without a current one."""
        current = read_key(
            self.identity_key.get_secret_value(), self.identity_key_file, "identity_key"
        )
        previous = read_key(
            self.identity_key_previous.get_secret_value(),
            self.identity_key_previous_file,
            "identity_key_previous",
        )
        if previous is not None and current is None:
            raise ValueError("identity_key_previous needs identity_key (the key rotated to)")
        if previous is not None and previous == current:
            raise ValueError("identity_key_previous is the same key as identity_key")
        return current, previous

    def log_key(self) -> bytes | None:
        """The log secret derived from identity_key (`penalty.keyed`), not the key itself."""
        current = self.identity_keys()[0]
        return None if current is None else IdentityKey(current).log_secret

    def caller_tokens(self) -> dict[str, str]:
        """Service tokens by caller name, from `service_tokens` and `service_tokens_file`.

        Raises ValueError naming the file line that is not "name token"."""
        tokens = {name: t.get_secret_value() for name, t in self.service_tokens.items()}
        if self.service_tokens_file:
            try:
                fh = open(self.service_tokens_file, encoding="utf-8")  # noqa: SIM115  # closed below
            except OSError as exc:
                raise OSError(
                    f"service_tokens_file {self.service_tokens_file}: {exc.strerror or exc}"
                ) from exc
            with fh:
                for number, line in enumerate(fh, 1):
                    text = line.strip()
                    if not text or text.startswith("#"):
                        continue
                    parts = text.split()
                    if len(parts) != 2:
                        raise ValueError(
                            f"{self.service_tokens_file}:{number}: expected 'name token'"
                        )
                    tokens[parts[0]] = parts[1]
        return tokens

    @property
    def identity_rules(self) -> IdentityRules:
        """How addresses become identities (`penalty.identity`), as configured."""
        return IdentityRules(self.ipv4_prefix, self.ipv6_prefix, tuple(self.nat64_prefixes))


def load_settings(config_file: str | Path | None = None, **overrides: Any) -> Settings:
    """Build the settings from flags (`overrides`), environment, TOML file and defaults.

    Raises `pydantic.ValidationError` naming the offending knob, or `OSError` /
    `tomllib.TOMLDecodeError` for an unreadable file.
    """
    return serving_settings.load_settings(Settings, "penaltyd settings", config_file, overrides)
