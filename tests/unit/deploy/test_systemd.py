"""deploy/systemd/*.service: valid for systemd, hardened, and consistent with the programs.

`systemd-analyze verify` needs no running systemd (this suite runs in containers where
PID 1 is not systemd): it loads each unit as systemd would and reports unknown keys,
unparsable values and missing executables. The units name the installed layout
(/opt/penaltyd/bin/...), so each is verified as a copy whose ExecStart points at this
venv's console script of the same name; everything else is verified as shipped.
`systemd-analyze security --offline=yes` scores the sandbox without a running manager.

systemd-analyze comes from Debian's `systemd` package (`make deps` installs it).
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest

from deploy.checks.config import ROOT

UNITS_DIR = ROOT / "deploy" / "systemd"
ETC_DIR = ROOT / "deploy" / "etc" / "penaltyd"
INSTALLED_BIN = "/opt/penaltyd/bin/"
VENV_BIN = Path(sys.executable).parent
UNITS = sorted(UNITS_DIR.glob("*.service"))
# Highest acceptable `systemd-analyze security` exposure (0.0 best, 10.0 worst; 2.0 is
# the top of the "OK" band).
MAX_EXPOSURE = 2.0

# The sandbox every unit has (key -> the value it must have, or None: present, any value).
REQUIRED = {
    "DynamicUser": "yes",
    "NoNewPrivileges": "yes",
    "ProtectSystem": "strict",
    "ProtectHome": "yes",
    "PrivateTmp": "yes",
    "PrivateDevices": "yes",
    "CapabilityBoundingSet": "",
    "AmbientCapabilities": "",
    "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX",
    "MemoryDenyWriteExecute": "yes",
    "SystemCallArchitectures": "native",
    "RestrictSUIDSGID": "yes",
    "RestrictNamespaces": "yes",
    "LockPersonality": "yes",
    "Restart": "on-failure",
    "KillSignal": "SIGTERM",
    "TimeoutStopSec": None,
    "EnvironmentFile": None,
    "UMask": "0077",
}

# Variables an env file may set beyond the unit's ExecStart ones: read by the program.
SECRETS = {
    "PENALTYD_TOKEN",
    "PENALTYD_TOKEN_FILE",
    "PENALTYD_ADMIN_TOKEN",
    "PENALTYD_REDIS_URL",
    "RELAYCHECK_ADMIN_TOKEN",
    "RELAYCHECK_REDIS_URL",
}

# Seconds each program may spend stopping after SIGTERM, by its own defaults (the
# settings' grace_seconds, the sidecars' drain/flush flags); TimeoutStopSec must exceed
# it by MARGIN.
MARGIN = 3.0


def _stop_budget() -> dict[str, float]:
    from penaltyd.settings import Settings as PenaltydSettings
    from relaycheck.settings import Settings as RelaycheckSettings

    return {
        "penaltyd": PenaltydSettings.model_fields["grace_seconds"].default,
        # + up to 2 s flushing queued penaltyd reports (docs/relaycheck.md, "Shutdown").
        "relaycheck": RelaycheckSettings.model_fields["grace_seconds"].default + 2.0,
        "penalty-policyd": 0.25 + 1.0,  # the check deadline, then the reporter's close
        "penalty-milter": 5.0 + 2.0,  # --drain-seconds + --flush-seconds
        "penalty-logwatch": 2.0,  # --flush-timeout, then the spool is written
        "relaycheck-milter": 5.0,  # --drain-seconds
    }


@dataclass
class Unit:
    path: Path
    entries: list[tuple[str, str, str]]  # (section, key, value), in file order

    def values(self, key: str, section: str = "Service") -> list[str]:
        return [v for s, k, v in self.entries if s == section and k == key]

    def value(self, key: str, section: str = "Service") -> str:
        found = self.values(key, section)
        assert found, f"{self.path.name}: no {key}= in [{section}]"
        return found[-1]

    @property
    def exec_start(self) -> list[str]:
        return shlex.split(self.value("ExecStart"))

    @property
    def program(self) -> str:
        return Path(self.exec_start[0]).name


def parse_unit(path: Path) -> Unit:
    """A unit file's (section, key, value) entries; keys may repeat, as in systemd."""
    entries: list[tuple[str, str, str]] = []
    section = ""
    pending = ""
    for raw in path.read_text().splitlines():
        line = pending + raw.strip()
        pending = ""
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        entries.append((section, key.strip(), value.strip()))
    return Unit(path, entries)


@pytest.fixture(scope="module")
def systemd_analyze() -> str:
    found = shutil.which("systemd-analyze")
    if found is None:
        pytest.fail("systemd-analyze not found: `make deps` installs Debian's systemd package")
    return found


def _verifiable_copy(unit: Unit, directory: Path) -> Path:
    """The unit with ExecStart's /opt/penaltyd/bin/ replaced by this venv's bin directory."""
    text = unit.path.read_text()
    assert unit.exec_start[0].startswith(INSTALLED_BIN), unit.exec_start
    binary = VENV_BIN / unit.program
    assert binary.exists(), f"{unit.path.name}: {binary} is not a console script of this venv"
    copy = directory / unit.path.name
    copy.write_text(text.replace(INSTALLED_BIN, f"{VENV_BIN}/"))
    return copy


def test_there_is_a_unit_for_every_long_running_console_script() -> None:
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    daemons = set(scripts) - {"penaltyctl"}  # the operator's CLI, not a service
    programs = {parse_unit(p).program for p in UNITS}
    assert programs == daemons
    assert {p.stem for p in UNITS} == daemons


@pytest.mark.parametrize("path", UNITS, ids=lambda p: p.name)
def test_systemd_analyze_verify_passes(path: Path, systemd_analyze: str, tmp_path: Path) -> None:
    copy = _verifiable_copy(parse_unit(path), tmp_path)
    done = subprocess.run(
        [systemd_analyze, "verify", "--man=no", "--generators=no", str(copy)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    # Warnings about other units on this machine are not ours; ours name the file or unit.
    ours = [
        line
        for line in (done.stdout + done.stderr).splitlines()
        if str(copy) in line or line.startswith(f"{path.name}:")
    ]
    assert not ours, "\n".join(ours)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize("path", UNITS, ids=lambda p: p.name)
def test_security_exposure_is_low(path: Path, systemd_analyze: str, tmp_path: Path) -> None:
    copy = _verifiable_copy(parse_unit(path), tmp_path)
    done = subprocess.run(
        [
            systemd_analyze,
            "security",
            "--offline=yes",
            "--no-pager",
            f"--threshold={int(MAX_EXPOSURE * 10)}",
            str(copy),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    level = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", done.stdout)
    assert level is not None, done.stdout + done.stderr
    assert done.returncode == 0, f"exposure {level.group(1)} > {MAX_EXPOSURE}:\n{done.stdout}"


@pytest.mark.parametrize("path", UNITS, ids=lambda p: p.name)
def test_every_unit_is_sandboxed(path: Path) -> None:
    unit = parse_unit(path)
    for key, expected in REQUIRED.items():
        value = unit.value(key)
        if expected is not None:
            assert value == expected, f"{path.name}: {key}={value!r}, expected {expected!r}"
    filters = unit.values("SystemCallFilter")
    assert "@system-service" in filters
    assert any(f.startswith("~") and "@privileged" in f for f in filters)
    assert unit.value("EnvironmentFile").startswith("-/etc/penaltyd/")
    assert unit.value("WantedBy", "Install") == "multi-user.target"


@pytest.mark.parametrize("path", UNITS, ids=lambda p: p.name)
def test_stop_timeout_covers_the_programs_own_drain(path: Path) -> None:
    unit = parse_unit(path)
    timeout = float(unit.value("TimeoutStopSec").removesuffix("s"))
    budget = _stop_budget()[unit.program]
    assert timeout >= budget + MARGIN, f"{path.name}: {timeout} s < {budget} s + {MARGIN} s"


def test_descriptor_limits_cover_the_connection_limits() -> None:
    from penaltyclient.policyd import DEFAULT_MAX_CONNECTIONS, FD_RESERVE

    policyd = parse_unit(UNITS_DIR / "penalty-policyd.service")
    assert int(policyd.value("LimitNOFILE")) >= DEFAULT_MAX_CONNECTIONS + FD_RESERVE
    # setrlimit (raising the soft limit at start) is in @resources: not filtered out.
    assert not any("@resources" in f for f in policyd.values("SystemCallFilter"))
    milter = parse_unit(UNITS_DIR / "penalty-milter.service")
    assert int(milter.value("LimitNOFILE")) >= 1000 + 50  # --max-connections + docs/milter.md


def test_logwatch_keeps_state_and_reads_the_log_as_adm() -> None:
    unit = parse_unit(UNITS_DIR / "penalty-logwatch.service")
    assert unit.value("StateDirectory") == "penalty-logwatch"
    assert unit.value("StateDirectoryMode") == "0700"
    assert "adm" in unit.value("SupplementaryGroups").split()
    argv = unit.exec_start
    assert argv[argv.index("--state-dir") + 1] == "/var/lib/penalty-logwatch"
    # PrivateUsers= would leave the adm group unmapped inside the service.
    assert not unit.values("PrivateUsers")


def _env_file(path: Path) -> dict[str, str]:
    """NAME=value lines as systemd reads them (double quotes removed)."""
    out: dict[str, str] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, _, value = line.partition("=")
        out[name] = value[1:-1] if value[:1] == value[-1:] == '"' else value
    return out


@pytest.mark.parametrize("path", UNITS, ids=lambda p: p.name)
def test_exec_start_variables_have_defaults_and_the_env_file_sets_real_flags(path: Path) -> None:
    """Every $VAR in ExecStart has a default in Environment= (the env file is optional),
    the sample env file exists, and the argument list it yields parses with the program's
    own parser."""
    unit = parse_unit(path)
    defaults: dict[str, str] = {}
    for line in unit.values("Environment"):
        for word in shlex.split(line):
            name, _, value = word.partition("=")
            defaults[name] = value
    command = unit.value("ExecStart")
    used = set(re.findall(r"\$\{?([A-Z_]+)\}?", command))
    assert used <= set(defaults), f"{path.name}: no default for {sorted(used - set(defaults))}"
    env_path = ETC_DIR / unit.value("EnvironmentFile").removeprefix("-/etc/penaltyd/")
    assert env_path.exists(), f"{path.name}: no sample {env_path}"
    env = {**defaults, **_env_file(env_path)}
    unknown = set(_env_file(env_path)) - set(defaults) - SECRETS
    assert not unknown, f"{env_path.name} sets variables {path.name} does not use: {unknown}"

    def expand(word: str) -> list[str]:
        if re.fullmatch(r"\$[A-Z_]+", word):  # unbraced: split into words
            return env[word[1:]].split()
        return [re.sub(r"\$\{([A-Z_]+)\}", lambda m: env[m.group(1)], word)]

    argv = [w for word in shlex.split(command)[1:] for w in expand(word)]
    parsers = {
        "penalty-policyd": "penaltyclient.policyd",
        "penalty-milter": "penaltyclient.milter",
        "penalty-logwatch": "penaltyclient.logwatch",
        "relaycheck-milter": "relaycheckclient.milter",
        "relaycheck": "relaycheck.cli",
        "penaltyd": "penaltyd.cli",
    }
    module = __import__(parsers[unit.program], fromlist=["parser"])
    try:
        module.parser().parse_args(argv)
    except SystemExit as exc:
        pytest.fail(f"{path.name}: {unit.program} refuses {argv}: exit {exc.code}")
