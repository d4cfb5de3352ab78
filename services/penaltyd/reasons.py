"""Penalty reasons: compact in the store, readable at the edge.

A penalty's reason is written once per penalty and read on every check that hits it, by
every replica, and kept in Redis for the whole penalty. Storing the rendered sentence
would cost ~200 bytes per active penalty; the compact form costs ~40 and renders to the
same sentence anywhere: ``rule;events;weighted;lower_bound;threshold;o=n,o=n``.
"""

from __future__ import annotations

from penalty.outcomes import name as outcome_name
from penaltyd.detector import Decision


def encode(decision: Decision) -> str:
    ev = decision.evidence
    counts = ",".join(f"{i}={n}" for i, n in enumerate(ev.counts) if n and i)
    return (
        f"{decision.rule};{ev.events};{ev.weighted_errors:g};{ev.lower_bound:.3f};"
        f"{decision.threshold:.3f};{counts}"
    )


def render(compact: str) -> str:
    """The human sentence for a compact reason; unknown formats pass through unchanged."""
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
