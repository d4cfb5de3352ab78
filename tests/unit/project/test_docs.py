"""The README's configuration table documents every setting (and nothing that isn't one)."""

from __future__ import annotations

import re

from penaltyd.settings import Settings, Weights
from tests.harness.paths import REPO

ROOT = REPO


def test_readme_documents_every_setting() -> None:
    readme = (ROOT / "README.md").read_text()
    table = set(re.findall(r"^\| `([a-z_0-9.*]+)` \|", readme, re.M))
    expected = {n for n in Settings.model_fields if n != "weights"} | {"weights.*"}
    assert table == expected
    for weight in Weights.model_fields:
        assert f"`{weight}`" in readme


def test_readme_has_the_two_command_quick_start() -> None:
    readme = (ROOT / "README.md").read_text()
    quick = readme.split("## Quick start", 1)[1].split("##", 1)[0]
    assert "make run" in quick
    assert "make test" in quick
    assert "make test" in (ROOT / ".ci" / "run").read_text()
