"""The README's reference lists are the code's: every metric penaltyd exports (with its
labels) and every field of `Verdict`, so neither list can fall behind the code."""

from __future__ import annotations

import re

from penalty.v1 import penalty_pb2 as pb
from penaltyd.metrics import Metrics
from tests.harness.mta import readme_section

#: Exposition names carry a suffix the registry's family names leave out.
SUFFIX = {"counter": "_total", "info": "_info"}


def _exported() -> dict[str, set[str]]:
    """penaltyd's metric names as scraped, each with its label names."""
    metrics = Metrics()
    metrics.methods(["PenaltyService/Check"])  # per-RPC series exist once methods are named
    out: dict[str, set[str]] = {}
    for family in metrics.registry.collect():
        if not family.name.startswith("penaltyd_"):
            continue
        labels = {k for sample in family.samples for k in sample.labels if k != "le"}
        out[family.name + SUFFIX.get(family.type, "")] = labels
    return out


def _metrics_bullet() -> str:
    operations = readme_section("Operations", level=2)
    match = re.search(r"^- \*\*Metrics\*\*(.*?)(?=^- \*\*)", operations, re.M | re.S)
    assert match, "README.md's Operations section has no Metrics bullet"
    return match.group(1)


def test_the_readme_lists_every_metric_penaltyd_exports_with_its_labels() -> None:
    listed = {
        name: set(filter(None, (labels or "").split(",")))
        for name, labels in re.findall(
            r"`(penaltyd_[a-z_]+)(?:\{([a-z_,]*)\})?`", _metrics_bullet()
        )
    }
    exported = _exported()
    assert sorted(listed) == sorted(exported)
    for name, labels in listed.items():
        assert labels == exported[name], name
    bullet = _metrics_bullet()
    assert "`process_*`" in bullet
    assert "`python_*`" in bullet


def test_the_readme_verdict_lists_every_field() -> None:
    api = readme_section("The API (`proto/penalty/v1/penalty.proto`)", level=2)
    match = re.search(r"`Verdict\{([^}]*)\}`", api)
    assert match, "README.md's API section does not list the Verdict fields"
    listed = [f.strip() for f in match.group(1).split(",")]
    assert listed == [f.name for f in pb.Verdict.DESCRIPTOR.fields]
