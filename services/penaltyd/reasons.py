"""Penalty reasons: compact in the store, readable at the edge.

A penalty's reason is written once per penalty and read on every check that hits it, by
every replica, and kept in Redis for the whole penalty. Storing the rendered sentence
would cost ~200 bytes per active penalty; the compact form costs ~40 and renders to the
same sentence anywhere: ``rule;events;weighted;lower_bound;threshold;o=n,o=n``.

With `identity_key` the stored reason also carries the penalty's sealed identity after
`SEAL` (`penaltyd.keying`); rendering drops it.
"""

from __future__ import annotations

from functools import lru_cache

from penalty.outcomes import name as outcome_name
from penaltyd.detector import Decision

#: Between a penalty's compact reason and its sealed identity (never inside a reason).
SEAL = "\x1e"


def encode(decision: Decision) -> str:
    ev = decision.evidence
    counts = ",".join(f"{i}={n}" for i, n in enumerate(ev.counts) if n and i)
    return (
        f"{decision.rule};{ev.events};{ev.weighted_errors:g};{ev.lower_bound:.3f};"
        f"{decision.threshold:.3f};{counts}"
    )


def render(stored: str) -> str:
    """The human sentence for a stored reason; unknown formats pass through unchanged.

    Cached on the compact part: every penalty of a kind renders the same sentence, sealed
    identities apart, and a check that hits a penalty must not pay for the formatting."""
    return _render(stored.partition(SEAL)[0])


@lru_cache(maxsize=4096)
def _render(compact: str) -> str:
    parts = compact.split(";")
    if len(parts) != 6:
        return compact
    rule, events, weighted, lower, threshold, counts = parts
    try:
        detail = " ".join(
            f"{outcome_name(int(o))}={n}" for o, n in (c.split("=") for c in counts.split(",") if c)
        )
    except ValueError:
        return compact
    head = {
        "significance": "error ratio significantly above threshold",
        "burst": "burst of errors",
    }.get(rule, rule or "penalty")
    return (
        f"{head}: {weighted} weighted errors in {events} events, "
        f"Wilson lower bound {lower} > threshold {threshold} ({detail})"
        if rule == "significance"
        else f"{head}: {weighted} weighted errors in {events} events ({detail})"
    )
