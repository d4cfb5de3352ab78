"""The decision: does a window of outcomes stand out? Pure math, no I/O (DESIGN.md s. 4).

The store only counts; this module decides, once, for every backend. Two rules:

- *significance*: at least `n_min` events, and the lower bound of the Wilson score
  interval of the weighted error ratio is above the threshold. The lower bound (not the
  raw ratio) is what keeps a small legitimate sender with three typos from ever firing:
  with few events the interval is wide and its lower bound low.
- *burst*: weighted errors in the window reach `burst_errors` while the raw error ratio
  is at least `burst_min_ratio`: many errors at a clearly elevated ratio, the shape of a
  guessing attack that mixes in enough valid recipients to stay under the threshold.

The threshold is the larger of `threshold_floor` and `baseline_multiplier` times the
fleet-wide baseline error ratio (once the fleet has seen `baseline_min_events` in the
window), so a noisy internet raises the bar instead of penalizing everyone; it never
rises above `threshold_max`, so no baseline, however pushed, switches enforcement off.

A *shared* address (NAT, CGNAT) is judged twice: each client behind it by the rules
above, on its own window; the whole address by the `shared_*` rules, which ask for much
stronger evidence, so one spammer among hundreds of users never defers its neighbours.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from penalty import outcomes
from penaltyd.settings import Settings

#: Outcome enum numbers index every per-outcome vector (0 is UNSPECIFIED, never stored).
N_OUTCOMES = outcomes.COUNT
#: The rules a penalty can start by (metrics create their series from this).
RULES = ("significance", "burst")
ACCEPTED = outcomes.ACCEPTED
outcome_name = outcomes.name


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
class Baseline:
    """The fleet-wide error ratio over the window (from all replicas' aggregates)."""

    events: int
    weighted_errors: float

    @property
    def ratio(self) -> float:
        return min(1.0, self.weighted_errors / self.events) if self.events else 0.0


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
        for name in outcomes.ERROR_NAMES:
            weights[outcomes.number(name)] = getattr(w, name)
        self.weights: tuple[float, ...] = tuple(weights)
        self.z = settings.z
        self.burst_min_ratio = settings.burst_min_ratio
        self.rules = {
            False: (settings.n_min, settings.threshold_floor, settings.burst_errors),
            True: (
                settings.shared_n_min,
                settings.shared_threshold_floor,
                settings.shared_burst_errors,
            ),
        }
        self.multiplier = settings.baseline_multiplier
        self.min_events = settings.baseline_min_events
        self.threshold_max = settings.threshold_max

    def threshold(self, baseline: Baseline | None = None, shared: bool = False) -> float:
        """The bar the lower bound must clear: the floor, raised by a noisy fleet, but never
        above `threshold_max` (nor below the floor): however the baseline was pushed, a
        client erring on nearly every command is still penalized (a pure-error client
        clears 0.8 after 37 events at z = 3)."""
        floor = self.rules[shared][1]
        if baseline is None or baseline.events < self.min_events:
            return floor
        return max(floor, min(self.threshold_max, self.multiplier * baseline.ratio))

    def weighted(self, counts: Sequence[tuple[int, int]]) -> float:
        """Weighted errors of (outcome, n) pairs: what a report adds to the baseline."""
        return sum(n * self.weights[o] for o, n in counts)

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

    def evaluate(
        self, counts: Sequence[int], baseline: Baseline | None = None, shared: bool = False
    ) -> Decision:
        ev = self.evidence(counts)
        n_min, _, burst = self.rules[shared]
        threshold = self.threshold(baseline, shared)
        if ev.events >= n_min and ev.lower_bound > threshold:
            return Decision(True, "significance", threshold, ev)
        if ev.weighted_errors >= burst and ev.ratio >= max(self.burst_min_ratio, threshold / 2):
            return Decision(True, "burst", threshold, ev)
        return Decision(False, "", threshold, ev)
