"""What ships: the wheel holds the contract, the foundation, the services and the
clients, and nothing of the test harness or the benchmarks."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

from tests.harness.paths import REPO

SHIPPED = {"penalty", "serving", "penaltyd", "relaycheck", "penaltyclient", "milterkit"}
SHIPPED |= {"relaycheckclient"}


def test_the_wheel_ships_no_test_harness(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(tmp_path), str(REPO)],
        check=True,
        capture_output=True,
    )  # fmt: skip
    (wheel,) = tmp_path.glob("penaltyd-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert tops == SHIPPED
    assert not [n for n in names if "/testing" in n or n.startswith(("tests/", "bench/"))]
    assert "penaltyd/store/lua/record.lua" in names  # data files ship with their package
    assert "penalty/v1/penalty_pb2.py" in names
