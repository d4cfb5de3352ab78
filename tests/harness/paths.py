"""Where things are: the repository, its test data, and the shared data beside it."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TEST_DATA = REPO / "tests" / "data"
#: `../shared/data` (a real Postfix 3.7 log and more), beside the repository.
SHARED_DATA = REPO.parent / "shared" / "data"
