"""deploy/etc/penaltyd/: the sample settings files are current, complete and load.

The TOML files are generated from the Settings classes (deploy/etc/generate.py): they
must equal a fresh rendering, name every setting once, and load through each service's
own loader both as shipped and with every default uncommented.
"""

from __future__ import annotations

import importlib
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from deploy.checks.config import ROOT
from deploy.etc import generate

SAMPLES = generate.OUT
COMMENTED = re.compile(r"^#(\[[a-z0-9_]+\]|[a-z0-9_]+ = .*)$")
SETTING = re.compile(r"^([a-z0-9_]+) = ")


def _loader(service: str) -> tuple[Any, Any]:
    """The service's Settings class and its load_settings."""
    module = importlib.import_module(f"{service}.settings")
    return module.Settings, module.load_settings


@pytest.fixture(autouse=True)
def _no_service_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """The loaders read PENALTYD_*/RELAYCHECK_* variables: none may leak in."""
    import os

    for name in list(os.environ):
        if name.startswith(("PENALTYD_", "RELAYCHECK_")):
            monkeypatch.delenv(name)


def test_the_samples_are_what_the_generator_writes() -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / "deploy" / "etc" / "generate.py"), "--check"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    for path, text in generate.targets().items():
        assert path.read_text() == text


@pytest.mark.parametrize("service", ["penaltyd", "relaycheck"])
def test_every_setting_appears_once_with_its_default(service: str, tmp_path: Path) -> None:
    settings_cls, load = _loader(service)
    text = (SAMPLES / f"{service}.toml").read_text()
    names: list[str] = []
    table = ""
    for line in text.splitlines():
        m = COMMENTED.match(line)
        body = m.group(1) if m else line
        if body.startswith("["):
            table = body.strip("[]")
            names.append(table)
            continue
        if found := SETTING.match(body):
            names.append(f"{table}.{found.group(1)}" if table else found.group(1))
    top = [n for n in names if "." not in n]
    assert sorted(top) == sorted(settings_cls.model_fields), "missing or repeated settings"
    nested = {n.split(".")[0] for n in names if "." in n}
    for name in nested:
        model = settings_cls.model_fields[name].annotation
        assert sorted(n.split(".")[1] for n in names if n.startswith(f"{name}.")) == sorted(
            model.model_fields
        )

    # As shipped: the defaults, plus the few values a plain host sets.
    shipped = load(SAMPLES / f"{service}.toml")
    expected = load(None, **generate.HOST_VALUES[service])
    assert shipped.model_dump() == expected.model_dump()

    # Every "#name = default" uncommented: still exactly those values, so each shown
    # default is the real one (and valid TOML in the real place).
    uncommented = "\n".join(
        m.group(1) if (m := COMMENTED.match(line)) else line for line in text.splitlines()
    )
    path = tmp_path / f"{service}.toml"
    path.write_text(uncommented)
    assert load(path).model_dump() == expected.model_dump()


@pytest.mark.parametrize("service", ["penaltyd", "relaycheck"])
def test_every_comment_is_the_sources_one_line_comment(service: str) -> None:
    """Spot checks that the comments come from the source, not from somewhere else."""
    text = (SAMPLES / f"{service}.toml").read_text()
    assert "# Prometheus /metrics HOST:PORT; empty disables it" in text  # serving base
    if service == "penaltyd":
        assert "# Wilson score z (3.0 ~ 99.87% one-sided)\n#z = 3.0" in text
        assert "# hang-ups; also flaky networks\n#lost_connection = 0.25" in text
    else:
        assert '# our EHLO name\n#probe_helo = "relaycheck.invalid"' in text


def test_the_loader_reads_secrets_from_the_environment_over_the_file(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """What the units rely on: the EnvironmentFile's PENALTYD_* win over penaltyd.toml."""
    _, load = _loader("penaltyd")
    monkeypatch.setenv("PENALTYD_REDIS_URL", "redis://:secret@127.0.0.1:6390/0")
    monkeypatch.setenv("PENALTYD_ADMIN_TOKEN", "t0ken")
    settings = load(SAMPLES / "penaltyd.toml")
    assert settings.redis_url == "redis://:secret@127.0.0.1:6390/0"
    assert settings.admin_token.get_secret_value() == "t0ken"
