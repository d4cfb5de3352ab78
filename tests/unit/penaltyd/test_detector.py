"""The detector's math and rules (pure: no I/O)."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from penaltyd import reasons
from penaltyd.detector import N_OUTCOMES, Detector, wilson_lower_bound
from penaltyd.settings import Settings
from tests.harness.builders import ACCEPTED, UNKNOWN

LOST = 10


def vec(**by: int) -> list[int]:
    out = [0] * N_OUTCOMES
    out[ACCEPTED] = by.get("accepted", 0)
    out[UNKNOWN] = by.get("unknown", 0)
    out[LOST] = by.get("lost", 0)
    return out


def test_wilson_known_value() -> None:
    # p = 0.5, n = 100, z = 1.96 -> 0.4038 (textbook value)
    assert wilson_lower_bound(50, 100, 1.96) == pytest.approx(0.4038, abs=1e-4)
    assert wilson_lower_bound(0, 0, 3) == 0
    assert wilson_lower_bound(0, 10, 3) == pytest.approx(0, abs=1e-12)


@given(st.integers(0, 10_000), st.integers(1, 10_000), st.floats(0.5, 5))
def test_wilson_is_below_the_ratio(errors: int, extra: int, z: float) -> None:
    n = errors + extra
    lb = wilson_lower_bound(errors, n, z)
    assert 0 <= lb <= errors / n + 1e-12


def test_dictionary_attack_fires_on_significance() -> None:
    d = Detector(Settings())
    decision = d.evaluate(vec(accepted=2, unknown=40))
    assert decision.fire
    assert decision.rule == "significance"
    assert decision.evidence.lower_bound > 0.5


def test_normal_ratio_never_fires() -> None:
    d = Detector(Settings())
    assert not d.evaluate(vec(accepted=198, unknown=2)).fire
    assert not d.evaluate(vec(accepted=99_000, unknown=1000)).fire  # a big ESP with 1% bounces


def test_small_samples_need_n_min() -> None:
    d = Detector(Settings())
    assert not d.evaluate(vec(unknown=19)).fire
    assert d.evaluate(vec(unknown=20)).fire


def test_stale_mailing_list_stays_under_the_floor() -> None:
    # 40% unknown recipients over 100 messages: a sloppy list, not an attack.
    assert not Detector(Settings()).evaluate(vec(accepted=60, unknown=40)).fire


def test_burst_rule() -> None:
    d = Detector(Settings(burst_errors=100, burst_min_ratio=0.25))
    # 30% errors: below the significance floor, but a burst of 150 errors.
    decision = d.evaluate(vec(accepted=350, unknown=150))
    assert decision.fire
    assert decision.rule == "burst"
    assert not d.evaluate(vec(accepted=1000, unknown=150)).fire  # 13%: below burst_min_ratio


def test_weights_apply() -> None:
    d = Detector(Settings())
    ev = d.evidence(vec(unknown=4, lost=4))
    assert ev.weighted_errors == 4 + 4 * 0.25
    assert ev.events == 8
    heavy = Detector(Settings(weights={"lost_connection": 1.0}))
    assert heavy.evidence(vec(lost=4)).weighted_errors == 4


def test_reason_round_trip() -> None:
    decision = Detector(Settings()).evaluate(vec(accepted=2, unknown=40))
    compact = reasons.encode(decision)
    assert len(compact) < 60
    text = reasons.render(compact)
    assert "unknown_recipient=40" in text
    assert "accepted=2" in text
    assert "threshold 0.500" in text
    assert reasons.render("free text") == "free text"
    assert math.isfinite(decision.evidence.ratio)


@given(
    st.lists(st.sampled_from([0, 0, 0, 0, 1, 1000]), min_size=N_OUTCOMES, max_size=N_OUTCOMES),
    st.booleans(),
)
def test_has_errors_is_any_weighted_outcome_seen(counts: list[int], lost_free: bool) -> None:
    """The report path's shortcut (events beyond the weightless outcomes) agrees with
    the definition, also when an operator weighs an error kind at 0."""
    settings = Settings(weights={"lost_connection": 0.0} if lost_free else {})
    d = Detector(settings)
    expected = any(n > 0 and w > 0 for n, w in zip(counts, d.weights, strict=True))
    assert d.has_errors(counts) is expected
