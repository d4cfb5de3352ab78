"""Settings precedence, validation and the command line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from penaltyd import cli
from penaltyd.settings import load_settings
from serving.settings import SettingsProblem


def test_defaults() -> None:
    s = load_settings()
    assert s.listen == "127.0.0.1:50051"
    assert s.store_kind == "memory"
    assert s.penalty_seconds == 300


def test_precedence_flag_env_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tmp_path / "penaltyd.toml"
    cfg.write_text(
        'listen = "127.0.0.1:1111"\nn_min = 7\npenalty_seconds = 120\n[weights]\nbad_helo = 0.1\n'
    )
    monkeypatch.setenv("PENALTYD_N_MIN", "9")
    monkeypatch.setenv("PENALTYD_WEIGHTS__AUTH_FAILED", "2.0")
    s = load_settings(cfg, listen="127.0.0.1:2222")
    assert s.listen == "127.0.0.1:2222"  # flag beats file
    assert s.n_min == 9  # env beats file
    assert s.penalty_seconds == 120  # file beats default
    assert s.weights.bad_helo == 0.1
    assert s.weights.auth_failed == 2.0


@pytest.mark.parametrize(
    ("knob", "value", "message"),
    [
        ("smtp_reply", "550 5.7.1 go away {seconds}", "4xx"),
        ("smtp_reply", "421 4.7.1 bye {seconds}", "421"),
        ("smtp_reply", "450 4.7.1 later", "{seconds}"),
        ("smtp_reply", "450 4.7.1 {seconds} {nope}", "only"),
        ("listen", "nowhere", "HOST:PORT"),
        ("redis_url", "http://x", "redis://"),
        ("bucket_seconds", 7, "multiple"),
    ],
)
def test_invalid_settings_name_the_knob(knob: str, value: object, message: str) -> None:
    overrides: dict[str, Any] = {knob: value}
    with pytest.raises(SettingsProblem) as info:
        load_settings(**overrides)
    assert knob in str(info.value)
    assert message in str(info.value)


def test_unknown_file_key_is_refused(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text("n_mni = 3\n")
    with pytest.raises(SettingsProblem, match="n_mni"):
        load_settings(cfg)


def test_print_config_redacts_password(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--print-config", "--redis-url", "redis://:s3cret@127.0.0.1:6379/0"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["redis_url"] == "redis://:***@127.0.0.1:6379/0"
    assert out["window_seconds"] == 600


def test_bad_config_exits_2(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert cli.main(["--print-config", "--listen", "bogus"]) == 2
    assert "listen" in capsys.readouterr().err
    assert cli.main(["--print-config", "--config", str(tmp_path / "missing.toml")]) == 2


def test_help_documents_every_flag() -> None:
    parser = cli.parser()
    text = parser.format_help()
    for action in parser._actions:
        for flag in action.option_strings:
            assert flag in text
        if action.option_strings and action.dest != "help":
            assert action.help, action.dest
    for flag in ("--listen", "--redis-url", "--print-config", "--config", "--metrics-listen"):
        assert flag in text
