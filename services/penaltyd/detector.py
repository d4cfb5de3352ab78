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

*Reputation* (issue 15) is the longer memory: decayed counters over hours of the address
and of its network neighbourhood (IPv4 /24, IPv6 /48), judged against a long-horizon bar
that adapts to the fleet (`reputation_baseline_multiplier` x the typical address's ratio,
at least `reputation_threshold_floor`) with its own Wilson z. It moves the window's bar:

- *bad history* (the address's long-horizon bound above that bar): one fresh weighted
  error is enough (rule `reputation`), so a moderate spammer that no 10-minute window
  convicts is deferred on its history, and an attacker coming back after its penalty
  is deferred on its first new error;
- *long clean history* (`reputation_clean_events` decayed events at a ratio under half
  the bar): `n_min` and the burst limit are multiplied by `reputation_clean_factor`, so a
  big sender's burst of bounces is not mistaken for an attack;
- *bad neighbourhood* (the network's bound above the bar): an address needs only
  `neighbourhood_n_min` events with `neighbourhood_min_errors` weighted errors of its own
  at `neighbourhood_min_ratio` (rule `neighbourhood`): a botnet spread over a /24.

Reputation never applies to a whole address whose clients are told apart (shared rules).

A *newcomer* (a client that appears behind an address whose penalty binds another of its
clients, `Engine._plan`) needs as little evidence as in a bad neighbourhood (rule
`newcomer`): what a spammer that changes its HELO and sender to shed its penalty meets.

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
from penaltyd.store.base import Reputation

#: Outcome enum numbers index every per-outcome vector (0 is UNSPECIFIED, never stored).
N_OUTCOMES = outcomes.COUNT
#: The rules a penalty can start by (metrics create their series from this).
RULES = ("significance", "burst", "reputation", "neighbourhood", "newcomer")
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
class Standing:
    """What the long memory says about a client, and how it moves the window's bar."""

    identity: Reputation | None
    neighbourhood: Reputation | None
    threshold: float  # the long-horizon bar (adaptive)
    identity_bound: float  # Wilson lower bound of the identity's long-horizon ratio
    neighbourhood_bound: float
    history: str  # "bad", "clean" or "" (too little, or in between)
    bad_neighbourhood: bool

    def describe(self) -> str:
        """How the bar moved, in words (Explain, reasons)."""
        parts = []
        rep, nb = self.identity, self.neighbourhood
        if rep is not None and rep.events:
            parts.append(
                f"identity history {rep.events:.0f} events at ratio {rep.ratio:.3f} "
                f"(bound {self.identity_bound:.3f}, bar {self.threshold:.3f}): "
                + {
                    "bad": "bad, one fresh error suffices",
                    "clean": "clean, more evidence needed",
                }.get(self.history, "neutral")
            )
        if nb is not None and nb.events:
            parts.append(
                f"neighbourhood {nb.events:.0f} events at ratio {nb.ratio:.3f} "
                f"(bound {self.neighbourhood_bound:.3f}): "
                + ("misbehaving, little evidence per address" if self.bad_neighbourhood else "ok")
            )
        return "; ".join(parts) or "no history"


@dataclass(frozen=True, slots=True)
class Decision:
    fire: bool
    rule: str  # one of RULES, or ""
    threshold: float
    evidence: Evidence
    standing: Standing | None = None  # the reputation that moved the bar, if any
    n_min: int = 0  # the events the significance rule asked for
    burst: float = 0.0  # the burst limit it applied


class Detector:
    """Evaluates windows against the configured rules; cheap enough for every report."""

    def __init__(self, settings: Settings) -> None:
        w = settings.weights
        weights = [0.0] * N_OUTCOMES
        for name in outcomes.ERROR_NAMES:
            weights[outcomes.number(name)] = getattr(w, name)
        self.weights: tuple[float, ...] = tuple(weights)
        # Outcomes that weigh nothing (accepted, and any an operator set to 0): a window
        # holds an error exactly when it holds more events than these account for.
        self._weightless: tuple[int, ...] = tuple(i for i, x in enumerate(weights) if not x)
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
        self.rep_z = settings.reputation_z
        self.rep_min_events = settings.reputation_min_events
        self.rep_floor = settings.reputation_threshold_floor
        self.rep_multiplier = settings.reputation_baseline_multiplier
        self.clean_events = settings.reputation_clean_events
        self.clean_factor = settings.reputation_clean_factor
        self.nb_min_events = settings.neighbourhood_min_events
        self.nb_n_min = settings.neighbourhood_n_min
        self.nb_min_errors = settings.neighbourhood_min_errors
        self.nb_min_ratio = settings.neighbourhood_min_ratio

    def threshold(self, baseline: Baseline | None = None, shared: bool = False) -> float:
        """The bar the lower bound must clear: the floor, raised by a noisy fleet, but never
        above `threshold_max` (nor below the floor): however the baseline was pushed, a
        client erring on nearly every command is still penalized (a pure-error client
        clears 0.8 after 37 events at z = 3)."""
        floor = self.rules[shared][1]
        if baseline is None or baseline.events < self.min_events:
            return floor
        return max(floor, min(self.threshold_max, self.multiplier * baseline.ratio))

    def reputation_threshold(
        self, baseline: Baseline | None = None, typical: float | None = None
    ) -> float:
        """The long-horizon bar: `reputation_baseline_multiplier` x the *typical* address's
        long-horizon error ratio (the first quartile over the addresses the replica recently
        saw, `penaltyd.reputation.FleetDistribution`: robust to the attackers among them,
        who are a minority of addresses though they may send most of the errors), never under
        `reputation_threshold_floor` nor over the window's threshold. Legitimate senders
        sit at 0-12 % errors; the bar sits above them, where the fixed 0.5 floor let
        moderate spammers (30-45 %) pass. Until the typical ratio is known (too few
        addresses seen), the fleet's event-weighted ratio stands in for it."""
        if typical is None:
            ok = baseline is not None and baseline.events >= self.min_events
            typical = baseline.ratio if ok and baseline is not None else 0.0
        bar = max(self.rep_floor, self.rep_multiplier * typical)
        return min(bar, self.threshold(baseline))

    def standing(
        self,
        identity: Reputation | None,
        neighbourhood: Reputation | None,
        baseline: Baseline | None = None,
        typical: float | None = None,
    ) -> Standing:
        """Bad history: enough long-horizon events with the bound above the bar, or a
        penalty already (decayed count at least one half) at a ratio above it."""
        bar = self.reputation_threshold(baseline, typical)
        z = self.rep_z
        history, ib = "", 0.0
        if identity is not None and identity.events > 0:
            ib = wilson_lower_bound(identity.weighted_errors, identity.events, z)
            significant = identity.events >= self.rep_min_events and ib > bar
            if significant or (identity.penalties >= 0.5 and identity.ratio > bar):
                history = "bad"
            elif identity.events >= self.clean_events and identity.ratio < bar / 2:
                history = "clean"
        bad_nb, nbb = False, 0.0
        if neighbourhood is not None and neighbourhood.events >= self.nb_min_events:
            nbb = wilson_lower_bound(neighbourhood.weighted_errors, neighbourhood.events, z)
            bad_nb = nbb > bar
        return Standing(identity, neighbourhood, bar, ib, nbb, history, bad_nb)

    def has_errors(self, counts: Sequence[int]) -> bool:
        """Whether the counts hold any weighted error: without one no rule can fire."""
        free, n = 0, len(counts)
        for i in self._weightless:  # one or two entries: cheaper than a pass over all
            if i < n:
                free += counts[i]
        return sum(counts) > free

    def judge(
        self, counts: Sequence[int], baseline: Baseline | None, standing: Standing | None
    ) -> Decision:
        """`evaluate` for one client judged alone, with its reputation as evidence."""
        if standing is None:
            return self.evaluate(counts, baseline)
        ev = self.evidence(counts)
        n_min, _, burst = self.rules[False]
        threshold = self.threshold(baseline)
        if standing.history == "clean":
            n_min = math.ceil(n_min * self.clean_factor)
            burst *= self.clean_factor
        if ev.events >= n_min and ev.lower_bound > threshold:
            return Decision(True, "significance", threshold, ev, standing, n_min, burst)
        if ev.weighted_errors >= burst and ev.ratio >= max(self.burst_min_ratio, threshold / 2):
            return Decision(True, "burst", threshold, ev, standing, n_min, burst)
        if standing.history == "bad" and ev.weighted_errors > 0:
            return Decision(True, "reputation", standing.threshold, ev, standing, n_min, burst)
        if standing.bad_neighbourhood and self._few_errors_enough(ev):
            return Decision(True, "neighbourhood", standing.threshold, ev, standing, n_min, burst)
        return Decision(False, "", threshold, ev, standing, n_min, burst)

    def newcomer(self, counts: Sequence[int], baseline: Baseline | None) -> Decision:
        """A client new behind an address whose penalty binds another client (cold start)
        on little evidence of its own: the neighbourhood rule's few errors (rule
        `newcomer`). A user of a carrier-grade NAT (a few % errors) never gets there; a
        spammer that changed its HELO and sender to shed the penalty does in a few RCPTs."""
        ev = self.evidence(counts)
        n_min, _, burst = self.rules[False]
        fire = self._few_errors_enough(ev)
        return Decision(
            fire, "newcomer" if fire else "", self.threshold(baseline), ev, None, n_min, burst
        )

    def _few_errors_enough(self, ev: Evidence) -> bool:
        """The little evidence a suspect needs (rules `neighbourhood` and `newcomer`)."""
        return (
            ev.events >= self.nb_n_min
            and ev.weighted_errors >= self.nb_min_errors
            and ev.ratio >= self.nb_min_ratio
        )

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
            return Decision(True, "significance", threshold, ev, None, n_min, burst)
        if ev.weighted_errors >= burst and ev.ratio >= max(self.burst_min_ratio, threshold / 2):
            return Decision(True, "burst", threshold, ev, None, n_min, burst)
        return Decision(False, "", threshold, ev, None, n_min, burst)
