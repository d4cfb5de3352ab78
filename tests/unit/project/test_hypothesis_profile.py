"""The suite's Hypothesis profile has no wall-clock limit, and a test that brings one back
is caught (tests/harness/hypothesis_profile.py, checked for every test by
tests/conftest.py before it runs)."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.harness.hypothesis_profile import PROFILE, wall_clock_limits


def test_the_profile_is_loaded_without_wall_clock_limits() -> None:
    assert settings.get_profile(PROFILE) == settings.default
    assert settings.default.deadline is None
    assert HealthCheck.too_slow in settings.default.suppress_health_check


def test_a_test_choosing_its_examples_inherits_the_profile() -> None:
    @given(st.integers())
    @settings(max_examples=5)
    def prop(n: int) -> None:
        pass

    assert wall_clock_limits(prop) == []
    prop()  # and runs


def test_a_test_that_brings_a_wall_clock_limit_back_is_named() -> None:
    @given(st.integers())
    @settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
    def own_list(n: int) -> None:
        pass

    @given(st.integers())
    @settings(deadline=200)
    def own_deadline(n: int) -> None:
        pass

    assert wall_clock_limits(own_list) == ["health check too_slow not suppressed"]
    assert wall_clock_limits(own_deadline) == ["deadline=0:00:00.200000"]
    assert wall_clock_limits(test_a_test_that_brings_a_wall_clock_limit_back_is_named) == []
