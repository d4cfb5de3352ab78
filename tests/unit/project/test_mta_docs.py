"""The README's MTA sections are the configuration the end-to-end tests run.

The Postfix test runs the README's three sidecar commands and pastes its `main.cf` lines
(only the addresses change), against an MX that leaves every error limit at Postfix's
default; the deploy examples (mx-sidecar.yaml, the systemd units and env files) are
wired the same way. The relaycheck test runs the README's `relaycheck serve` and
`relaycheck-milter` commands with docs/relaycheck.md's smart relay `main.cf` lines. The
Exim test pastes the README's ACL block into its Exim config (only the sidecar's port
changes); the Haraka test runs the shipped plugin with the shipped config file, which the
README must quote verbatim. These checks need no MTA installed.
"""

from __future__ import annotations

import re
import shlex
import tomllib
from collections.abc import Sequence

import yaml

from tests.e2e import exim, haraka, postfix
from tests.harness.mta import (
    RELAYCHECK_SECTION,
    exim_acl,
    fenced_blocks,
    readme_section,
    relaycheck_blocks,
)
from tests.harness.paths import REPO


def test_the_exim_test_runs_the_readme_acl_verbatim() -> None:
    acl = exim_acl()
    assert acl.count("inet:127.0.0.1:10040") == 1
    assert exim.acl_for(10040) == acl
    config = exim.CONFIGURE.format(root="/tmp/x", acl=exim.acl_for(10040))
    assert acl in config
    # After the recipient checks (each recipient asked about was accepted), then accept.
    before, after = config.split(acl)
    assert before.rstrip().endswith("require verify  = recipient")
    assert after.strip().startswith("accept")


def test_the_readme_acl_keeps_the_whole_reply_and_fails_open() -> None:
    acl = exim_acl()
    assert "{1s}" in acl  # the timeout ...
    assert "{action=DUNNO}}" in acl  # ... and the fail string: accepted
    assert r"message   = ${sg{$acl_m_pd}{\N^action=|\n\N}{}}" in acl  # code, X.Y.Z, text
    assert r"(\d\.\d\.\d )?" not in acl  # stripping the codes made Exim answer a bare 451


def test_the_readme_quotes_the_shipped_haraka_config() -> None:
    section = readme_section("Haraka")
    shipped = haraka.PLUGIN_INI.read_text()
    assert fenced_blocks(section, "ini") == [shipped]
    # The e2e test changes only the two addresses.
    assert haraka.plugin_ini(10040, "127.0.0.1:50051") == shipped
    install = fenced_blocks(section, "sh")
    assert len(install) == 1
    assert f"echo {haraka.PLUGINS_LINE} >> /etc/haraka/config/plugins" in install[0]
    assert "cp clients/haraka/penaltyd.js /etc/haraka/plugins/" in install[0]
    assert "cp clients/haraka/config/penaltyd.ini /etc/haraka/config/" in install[0]


def test_the_haraka_install_note_agrees_with_the_readme() -> None:
    note = (haraka.PLUGIN.parent / "README.md").read_text()
    install = fenced_blocks(note, "sh")[0]
    assert f"echo {haraka.PLUGINS_LINE} >> /etc/haraka/config/plugins" in install
    assert "cp penaltyd.js /etc/haraka/plugins/" in install
    assert "cp config/penaltyd.ini /etc/haraka/config/" in install


# --- Postfix: the README's wiring is what tests/e2e/test_postfix.py runs


def _parameters(main_cf: str) -> dict[str, str]:
    """`name = value` lines of main.cf text (comments and blank lines left out)."""
    out: dict[str, str] = {}
    for line in main_cf.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            name, _, value = line.partition("=")
            out[name.strip()] = value.strip()
    return out


def _flags(argv: Sequence[str]) -> list[str]:
    """The flags of a sidecar command, without the addresses (the values a site changes)."""
    out: list[str] = []
    skip = False
    for arg in argv[1:]:
        if skip:
            skip = False
        elif arg in ("--listen", "--penaltyd"):
            skip = True
        elif arg.startswith("--") and not arg.startswith(("--listen=", "--penaltyd=")):
            out.append(arg)
    return out


def test_the_postfix_test_runs_the_readme_wiring_verbatim() -> None:
    readme = postfix.readme_wiring()
    assert [argv[0] for argv in readme.commands] == list(postfix.SCRIPTS)
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    for script, module in postfix.SCRIPTS.items():  # what `python -m module` runs
        assert scripts[script] == f"{module}:main"
    # The test's wiring is the README's with the addresses replaced, and nothing else.
    same = postfix.wiring_for(10040, 10041, postfix.README_PENALTYD, postfix.README_MAILLOG)
    assert same == readme
    test = postfix.wiring_for(20040, 20041, "127.0.0.1:60051", "/tmp/x/maillog")
    assert test.main_cf == readme.main_cf.replace(":10040,", ":20040,").replace(
        ":10041\n", ":20041\n"
    )
    # The MX's own lines set nothing the README sets, and leave every error limit at
    # Postfix's default: the attacker test meets Postfix as operators run it.
    own = _parameters(postfix.BASE_CF + postfix.MX_CF)
    assert not set(own) & set(_parameters(readme.main_cf))
    untouched = {
        "smtpd_soft_error_limit",
        "smtpd_hard_error_limit",
        "smtpd_error_sleep_time",
        "smtpd_junk_command_limit",
        "smtpd_recipient_restrictions",
        "smtpd_relay_restrictions",
        "smtpd_reject_unlisted_recipient",
    }
    assert not set(own) & untouched
    assert not [name for name in own if name.startswith(("milter_", "smtpd_milter"))]
    source = (REPO / "tests" / "e2e" / "test_postfix.py").read_text()
    assert "Postfix(MX_CF + wiring_for(" in source
    assert "wiring.command(script)" in source


def test_the_readme_wiring_is_the_recommended_one() -> None:
    """The milter counts every recipient, the policy server only answers and stands right
    after reject_unauth_destination (before the recipient checks), the log watcher adds
    only what the log shows."""
    readme = postfix.readme_wiring()
    assert _flags(readme.command("penalty-policyd")) == ["--no-report-accepted"]
    assert _flags(readme.command("penalty-milter")) == []
    assert _flags(readme.command("penalty-logwatch")) == ["--no-rejects", "--no-accepted"]
    params = _parameters(readme.main_cf)
    restrictions = [
        r.strip() for r in re.split(r",(?![^{]*})", params["smtpd_recipient_restrictions"])
    ]
    assert restrictions[0] == "reject_unauth_destination"
    assert restrictions[1].startswith("check_policy_service { inet:127.0.0.1:10040,")
    assert "default_action=DUNNO" in restrictions[1]
    assert "try_limit=1" in restrictions[1]
    assert restrictions[2:] == ["reject_unlisted_recipient"]
    assert params["smtpd_milters"] == "inet:127.0.0.1:10041"
    assert params["milter_default_action"] == "accept"


#: The flags that say who reports what (the others are tuning: deadlines, timeouts).
WIRING_FLAGS = {"--no-report-accepted", "--no-accepted", "--no-rejects"}


def test_the_deploy_examples_are_wired_like_the_readme() -> None:
    """mx-sidecar.yaml, the systemd units and their sample env files run the sidecars
    with the README's flags and the README's main.cf lines (docs/deploy.md says so)."""
    readme = postfix.readme_wiring()
    objects = list(yaml.safe_load_all((REPO / "deploy/k8s/examples/mx-sidecar.yaml").read_text()))
    config = next(o for o in objects if o["kind"] == "ConfigMap")
    mx_main_cf = _parameters(config["data"]["main.cf.penaltyd"])
    assert {k: mx_main_cf[k] for k in _parameters(readme.main_cf)} == _parameters(readme.main_cf)
    pod = next(o for o in objects if o["kind"] == "Deployment")["spec"]["template"]["spec"]
    containers = {c["name"]: c for c in pod["containers"]}
    for script in postfix.SCRIPTS:
        argv = [*containers[script]["command"], *containers[script]["args"]]
        assert _flags(argv) == _flags(readme.command(script)), script
    etc, units = REPO / "deploy" / "etc" / "penaltyd", REPO / "deploy" / "systemd"
    for script, name, env in (
        ("penalty-policyd", "policyd", "POLICYD_OPTS"),
        ("penalty-milter", "milter", "MILTER_OPTS"),
        ("penalty-logwatch", "logwatch", "LOGWATCH_OPTS"),
    ):
        want = set(_flags(readme.command(script)))
        unit = (units / f"{script}.service").read_text()
        default = re.search(rf'"{env}=([^"]*)"', unit)
        sample = re.search(rf'^{env}="([^"]*)"', (etc / f"{name}.env").read_text(), re.M)
        for where, found in ((f"{script}.service", default), (f"{name}.env", sample)):
            assert found, f"{where} sets no {env}"
            flags = set(_flags(["x", *shlex.split(found.group(1))])) & WIRING_FLAGS
            assert flags == want, f"{where}: {sorted(flags)} != {sorted(want)}"


# --- relaycheck on the smart relay: tests/e2e/test_relaycheck.py runs the README's commands


def test_the_relaycheck_test_runs_the_readme_commands_and_the_documented_main_cf() -> None:
    commands, main_cf = relaycheck_blocks()
    assert [argv[:2] for argv in commands] == [
        ["relaycheck", "serve"],
        ["relaycheck-milter", "--listen"],
    ]
    same = postfix.relaycheck_wiring_for(50061, 10042, postfix.README_PENALTYD)
    assert (["relaycheck", *same.serve], ["relaycheck-milter", *same.milter]) == (
        commands[0],
        commands[1],
    )
    assert same.main_cf == main_cf
    params = _parameters(main_cf)
    assert params["smtpd_milters"] == "inet:127.0.0.1:10042"
    assert params["milter_default_action"] == "accept"
    # The README's one-line version of the smart relay's main.cf says the same.
    section = " ".join(readme_section(RELAYCHECK_SECTION, level=2).split())
    for name in ("smtpd_milters", "milter_default_action"):
        assert f"`{name} = {params[name]}`" in section
    assert not set(_parameters(postfix.SMART_RELAY_CF)) & set(params)
    source = (REPO / "tests" / "e2e" / "test_relaycheck.py").read_text()
    assert "relaycheck_wiring_for(" in source
    assert "+ wiring.main_cf" in source
