"""The traffic simulator's quick scenario meets the issue's detection targets.

`make simulate` is the measurement; this is its regression guard. The quick scenario (30
simulated minutes, seed 1) runs the real engine and detector in process in a couple of
seconds, so a change to the rules, the weights, the defaults or the shared-address logic
that lets dictionary attacks through, defers legitimate mail or punishes a CGNAT
address's users fails here, in CI, with the simulator's figures in the message.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from bench import scenarios
from bench.simulate import DEFAULT_SEED, format_report, parse_overrides, simulate
from penaltyd.settings import Settings


@pytest.fixture(scope="module")
def quick() -> dict[str, Any]:
    """One quick run shared by the module's tests (it is deterministic)."""
    return asyncio.run(simulate(scenarios.QUICK, Settings(), DEFAULT_SEED))


def _why(result: dict[str, Any]) -> str:
    return "\n" + format_report(result)


def test_dictionary_attacks_stay_deferred_after_the_first_penalty(
    quick: dict[str, Any],
) -> None:
    h = quick["headline"]
    assert h["dictionary_attempts_after_first_penalty"] > 1000, _why(quick)
    assert h["dictionary_deferred_after_first_penalty_pct"] >= 95.0, _why(quick)


def test_legitimate_mail_is_almost_never_deferred(quick: dict[str, Any]) -> None:
    h = quick["headline"]
    assert h["legit_messages"] > 5000, _why(quick)
    assert h["legit_messages_deferred_pct"] < 0.1, _why(quick)


def test_no_cgnat_user_is_deferred_while_its_spammers_are(quick: dict[str, Any]) -> None:
    h = quick["headline"]
    assert h["cgnat_users_deferred"] == 0, _why(quick)
    spammers = next(r for r in quick["classes"] if r["class"] == scenarios.CGNAT_SPAMMER)
    assert spammers["clients_penalized"] == spammers["clients"], _why(quick)
    assert spammers["after_first_deferred_pct"] >= 95.0, _why(quick)


def test_ipv6_rotators_are_deferred_as_their_64(quick: dict[str, Any]) -> None:
    rotators = quick["headline"]["ipv6_rotators"]
    assert rotators, _why(quick)
    for r in rotators:
        assert r["addresses_used"] > 100, r  # really rotating
        # On the /64, or on its one client (cold start), never on a rotated address.
        assert {i.split("#")[0] for i in r["penalty_identities"]} == {r["prefix"]}, r


def test_all_targets_reported_met(quick: dict[str, Any]) -> None:
    assert all(t["met"] for t in quick["headline"]["targets"]), _why(quick)


def test_overrides_nest_and_parse_as_json() -> None:
    got = parse_overrides(["threshold_floor=0.4", "weights.bad_helo=0.25", "redis_url="])
    assert got == {"threshold_floor": 0.4, "weights": {"bad_helo": 0.25}, "redis_url": ""}
    assert Settings(**got).weights.bad_helo == 0.25
    with pytest.raises(ValueError, match="KEY=VALUE"):
        parse_overrides(["threshold_floor"])
