"""Request validation: every bad input is refused with the field named, nothing stored.

`BadField` carries the protobuf field path (e.g. ``reports[3].counts[0].n``); the API
maps it to `INVALID_ARGUMENT` once. `BadMessage` stands in for a request the
deserializer could not (or must not) decode, so garbage never reaches a servicer as an
exception grpc would turn into `INTERNAL`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from google.protobuf.message import DecodeError

from penalty.identity import IdentityRules, InvalidAddress, identity_for
from penalty.v1 import penalty_pb2
from penaltyd.settings import Settings

_VALID_OUTCOMES = frozenset(penalty_pb2.Outcome.values()) - {penalty_pb2.OUTCOME_UNSPECIFIED}
_LIMITS = {"helo": 255, "mail_from": 512, "fingerprint": 128}


class BadField(ValueError):
    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


@dataclass(frozen=True, slots=True)
class BadMessage:
    """What the guarded deserializer returns instead of raising."""

    field: str
    message: str


def guarded_deserializer(
    deserialize: Callable[[bytes], Any], type_name: str, max_bytes: int
) -> Callable[[bytes], Any]:
    def guarded(raw: bytes) -> Any:
        if len(raw) > max_bytes:
            return BadMessage("message", f"{len(raw)} bytes exceeds the limit of {max_bytes}")
        try:
            return deserialize(raw)
        except DecodeError as exc:
            return BadMessage("message", f"not a valid {type_name}: {exc}")

    return guarded


class Validator:
    def __init__(self, settings: Settings) -> None:
        self.rules = IdentityRules(settings.ipv4_prefix, settings.ipv6_prefix)
        self.max_batch = settings.max_batch
        self.max_counts = settings.max_counts_per_report
        self.max_count = settings.max_count

    def client(self, client: penalty_pb2.Client, field: str) -> str:
        """Return the identity of a valid client."""
        for name, limit in _LIMITS.items():
            if len(getattr(client, name)) > limit:
                raise BadField(f"{field}.{name}", f"longer than {limit} characters")
        if not client.ip:
            raise BadField(f"{field}.ip", "required")
        try:
            return identity_for(client.ip, self.rules)
        except InvalidAddress as exc:
            raise BadField(f"{field}.ip", str(exc)) from exc

    def check(self, request: penalty_pb2.CheckRequest, field: str = "") -> str:
        if not request.HasField("client"):
            raise BadField(f"{field}client", "required")
        return self.client(request.client, f"{field}client")

    def report(
        self, request: penalty_pb2.ReportRequest, field: str = ""
    ) -> tuple[str, list[tuple[int, int]]]:
        if not request.HasField("client"):
            raise BadField(f"{field}client", "required")
        identity = self.client(request.client, f"{field}client")
        if not request.counts:
            raise BadField(f"{field}counts", "at least one outcome count is required")
        if len(request.counts) > self.max_counts:
            raise BadField(f"{field}counts", f"more than {self.max_counts} entries")
        merged: dict[int, int] = {}
        for i, c in enumerate(request.counts):
            if c.outcome not in _VALID_OUTCOMES:
                raise BadField(f"{field}counts[{i}].outcome", f"unknown outcome {c.outcome}")
            if not 1 <= c.n <= self.max_count:
                raise BadField(f"{field}counts[{i}].n", f"must be between 1 and {self.max_count}")
            merged[c.outcome] = merged.get(c.outcome, 0) + c.n
        return identity, sorted(merged.items())

    def session(
        self, request: penalty_pb2.SessionRequest
    ) -> tuple[list[str], list[tuple[str, list[tuple[int, int]]]]]:
        """Validate a whole Session message: all of it is good, or none of it is used."""
        if len(request.checks) + len(request.reports) > self.max_batch:
            raise BadField(
                "checks", f"more than {self.max_batch} checks and reports in one message"
            )
        reports = [self.report(r, f"reports[{i}].") for i, r in enumerate(request.reports)]
        checks = [self.check(c, f"checks[{i}].") for i, c in enumerate(request.checks)]
        return checks, reports
