"""Penalty reasons: compact in the store, readable at the edge.

A penalty's reason is written once per penalty and read on every check that hits it, by
every replica, and kept in Redis for the whole penalty. Storing the rendered sentence
would cost ~200 bytes per active penalty; the compact form costs ~40 and renders to the
same sentence anywhere: ``rule;events;weighted;lower_bound;threshold;o=n,o=n``, and for a
penalty its reputation decided (or a clean history held back), ``;history`` with the
long-horizon figures: ``ie/iw/ib/ne/nw/nb/bar/h`` (identity events, weighted errors,
bound; the neighbourhood's; the long-horizon bar; history b, c or -).

With `identity_key` the stored reason also carries the penalty's sealed identity after
`SEAL` (`penaltyd.keying`); rendering drops it.

A penalty *bound* to one client of its address (cold start: the address's only known
client earned it) carries that client's marks after `BIND`, before any seal
(`penalty.identity.same_client`): checks from clients that differ in every known mark
pass. In the store the marks are the store's form (keyed tokens with `identity_key`);
the seal then holds the plain marks too, for the watch feed.
"""

from __future__ import annotations

from functools import lru_cache

from penalty.outcomes import name as outcome_name
from penaltyd.detector import Decision
from penaltyd.store import base as store_base

#: Between a penalty's compact reason and its sealed identity (never inside a reason).
SEAL = "\x1e"
#: Between a penalty's compact reason and the marks of the one client it binds (defined
#: with the store, which replaces a bound penalty by an unbound one).
BIND = store_base.BIND

_BOUND_NOTE = "; binds one client of the address: others (another HELO and sender) pass"


def bound(stored: str) -> str:
    """The marks of the client a stored penalty binds ("": the whole address), as stored."""
    return stored.partition(SEAL)[0].partition(BIND)[2]


def bind(compact: str, marks: str) -> str:
    """A compact reason bound to the client with `marks` (as the store names them)."""
    return f"{compact}{BIND}{marks}" if marks else compact


def encode(decision: Decision) -> str:
    ev = decision.evidence
    counts = ",".join(f"{i}={n}" for i, n in enumerate(ev.counts) if n and i)
    head = (
        f"{decision.rule};{ev.events};{ev.weighted_errors:g};{ev.lower_bound:.3f};"
        f"{decision.threshold:.3f};{counts}"
    )
    st = decision.standing
    if st is None or (st.history == "" and not st.bad_neighbourhood):
        return head
    i, n = st.identity, st.neighbourhood
    ie, iw = (i.events, i.weighted_errors) if i else (0.0, 0.0)
    ne, nw = (n.events, n.weighted_errors) if n else (0.0, 0.0)
    h = {"bad": "b", "clean": "c"}.get(st.history, "-")
    return (
        f"{head};{ie:.0f}/{iw:.0f}/{st.identity_bound:.3f}/{ne:.0f}/{nw:.0f}/"
        f"{st.neighbourhood_bound:.3f}/{st.threshold:.3f}/{h}"
    )


def _history(text: str) -> str:
    try:
        ie, iw, ib, ne, nw, nb, bar, h = text.split("/")
    except ValueError:
        return text
    out = []
    if h in ("b", "c"):
        word = "bad" if h == "b" else "clean (more evidence needed)"
        out.append(f"history {word}: {iw} weighted errors in {ie} events, bound {ib} vs {bar}")
    if float(ne or 0):
        out.append(f"neighbourhood: {nw} weighted errors in {ne} events, bound {nb} vs {bar}")
    return "; ".join(out)


def render(stored: str) -> str:
    """The human sentence for a stored reason; unknown formats pass through unchanged.

    Cached on the compact part: every penalty of a kind renders the same sentence, sealed
    identities apart, and a check that hits a penalty must not pay for the formatting."""
    compact, sep, _ = stored.partition(SEAL)[0].partition(BIND)
    return _render(compact) + _BOUND_NOTE if sep else _render(compact)


@lru_cache(maxsize=4096)
def _render(compact: str) -> str:
    parts = compact.split(";")
    if len(parts) not in (6, 7):
        return compact
    rule, events, weighted, lower, threshold, counts = parts[:6]
    history = f"; {_history(parts[6])}" if len(parts) == 7 else ""
    try:
        detail = " ".join(
            f"{outcome_name(int(o))}={n}" for o, n in (c.split("=") for c in counts.split(",") if c)
        )
    except ValueError:
        return compact
    head = {
        "significance": "error ratio significantly above threshold",
        "burst": "burst of errors",
        "reputation": "fresh errors from an address with a bad history",
        "neighbourhood": "errors from an address in a misbehaving neighbourhood",
        "newcomer": "errors from a new client behind an address penalized for another",
    }.get(rule, rule or "penalty")
    return (
        f"{head}: {weighted} weighted errors in {events} events, "
        f"Wilson lower bound {lower} > threshold {threshold} ({detail}){history}"
        if rule == "significance"
        else f"{head}: {weighted} weighted errors in {events} events ({detail}){history}"
    )
