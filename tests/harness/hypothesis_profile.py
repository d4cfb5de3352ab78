"""One Hypothesis profile for the whole suite, and the check that no test undoes it.

Examples are bounded by count, never by wall-clock time: no per-example `deadline` and no
`too_slow` health check ("input generation is slow"), so a busy machine (CI sharing two
cores with other work) makes a property test slower, never red. Each test's own
`@settings` still chooses its number of examples; a test that passes its own
`suppress_health_check` list replaces the profile's, so it must name `too_slow` again
(or start from `settings.default.suppress_health_check`). tests/conftest.py loads the
profile and fails, before it runs, any test whose settings bring a wall-clock limit back.
"""

from __future__ import annotations

import hypothesis
from hypothesis import HealthCheck

PROFILE = "penaltyd"
#: The health checks that measure wall-clock time.
WALL_CLOCK_CHECKS = (HealthCheck.too_slow,)


def load() -> None:
    hypothesis.settings.register_profile(
        PROFILE, deadline=None, suppress_health_check=WALL_CLOCK_CHECKS, print_blob=True
    )
    hypothesis.settings.load_profile(PROFILE)


def wall_clock_limits(test: object) -> list[str]:
    """What in a Hypothesis test's effective settings depends on the machine's speed
    (empty for a test that is not a Hypothesis test)."""
    settings = getattr(test, "_hypothesis_internal_use_settings", None)
    if not isinstance(settings, hypothesis.settings):
        return []
    limits = []
    if settings.deadline is not None:
        limits.append(f"deadline={settings.deadline}")
    limits += [
        f"health check {check.name} not suppressed"
        for check in WALL_CLOCK_CHECKS
        if check not in settings.suppress_health_check
    ]
    return limits
