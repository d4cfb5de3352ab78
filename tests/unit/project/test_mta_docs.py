"""The README's Exim and Haraka sections are the configuration the end-to-end tests run.

The Exim test pastes the README's ACL block into its Exim config (only the sidecar's port
changes); the Haraka test runs the shipped plugin with the shipped config file, which the
README must quote verbatim. These checks need neither Exim nor Haraka installed.
"""

from __future__ import annotations

from tests.e2e import exim, haraka
from tests.harness.mta import exim_acl, fenced_blocks, readme_section


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
