"""The decision: does a window of outcomes stand out? Pure math, no I/O (DESIGN.md s. 4).

The store only counts; this module decides, once, for every backend. Two rules:

- *significance*: at least `n_min` events, and the lower bound of the Wilson score
  interval of the weighted error ratio is above the threshold. The lower bound (not the
  raw ratio) is what keeps a small legitimate sender with three typos from ever firing:
  with few events the interval is wide and its lower bound low.
- *burst*: weighted errors in the window reach `burst_errors` while the raw error ratio
  is at least `burst_min_ratio`: many errors at a clearly elevated ratio, the shape of a
  guessing attack that mixes in enough valid recipients to stay under the threshold.

The threshold is the larger of `threshold_floor` and (from issue 3) a multiple of the
fleet-wide baseline, so a noisy internet raises the bar instead of penalizing everyone.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from penalty.v1 import penalty_pb2
from penaltyd.settings import Settings

#: Outcome enum numbers index every per-outcome vector (0 is UNSPECIFIED, never stored).
N_OUTCOMES = max(penalty_pb2.Outcome.values()) + 1
ACCEPTED = penalty_pb2.OUTCOME_ACCEPTED


def outcome_name(number: int) -> str:
    """`OUTCOME_UNKNOWN_RECIPIENT` -> `unknown_recipient` (for reasons and logs)."""
    return penalty_pb2.Outcome.Name(number).removeprefix("OUTCOME_").lower()  # type: ignore[arg-type]  # enum int


def wilson_lower_bound(errors: float, n: float, z: float) -> float:
    """Lower bound of the Wilson score interval for `errors` successes out of `n`."""
    if n <= 0:
        return 0.0
    p = min(errors, n) / n
    z2 = z * z
    centre = p + z2 / (2 * n)
    spread = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    return max(0.0, (centre - spread) / (1 + z2 / n))


@dataclass(frozen=True, slots=True)
class Evidence:
    """What a window says, derived once from the raw per-outcome counts."""

    counts: tuple[int, ...]
    events: int
    weighted_errors: float
    ratio: float
    lower_bound: float

    def summary(self) -> str:
        parts = [f"{outcome_name(i)}={n}" for i, n in enumerate(self.counts) if n and i]
        return " ".join(parts) or "no events"


@dataclass(frozen=True, slots=True)
class Decision:
    fire: bool
    rule: str  # "significance", "burst" or ""
    threshold: float
    evidence: Evidence


class Detector:
    """Evaluates windows against the configured rules; cheap enough for every report."""

    def __init__(self, settings: Settings) -> None:
        w = settings.weights
        weights = [0.0] * N_OUTCOMES
        for number in penalty_pb2.Outcome.values():
            if number not in (penalty_pb2.OUTCOME_UNSPECIFIED, ACCEPTED):
                weights[number] = getattr(w, outcome_name(number))
        self.weights: tuple[float, ...] = tuple(weights)
        self.n_min = settings.n_min
        self.z = settings.z
        self.floor = settings.threshold_floor
        self.burst_errors = settings.burst_errors
        self.burst_min_ratio = settings.burst_min_ratio

    def threshold(self, baseline: float | None = None) -> float:
        """The bar the lower bound must clear (baseline adaptation comes with issue 3)."""
        del baseline
        return self.floor

    def evidence(self, counts: Sequence[int]) -> Evidence:
        events = sum(counts)
        weighted = sum(n * w for n, w in zip(counts, self.weights, strict=False) if n)
        ratio = min(weighted, events) / events if events else 0.0
        return Evidence(
            counts=tuple(counts),
            events=events,
            weighted_errors=weighted,
            ratio=ratio,
            lower_bound=wilson_lower_bound(weighted, events, self.z),
        )

    def evaluate(self, counts: Sequence[int], baseline: float | None = None) -> Decision:
        ev = self.evidence(counts)
        threshold = self.threshold(baseline)
        if ev.events >= self.n_min and ev.lower_bound > threshold:
            return Decision(True, "significance", threshold, ev)
        if ev.weighted_errors >= self.burst_errors and ev.ratio >= self.burst_min_ratio:
            return Decision(True, "burst", threshold, ev)
        return Decision(False, "", threshold, ev)
