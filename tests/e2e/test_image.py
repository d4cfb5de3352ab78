"""The container image `make image` builds: its servers start as the image says and answer.

Runs the image with `buildah run --isolation chroot` (the container shares this machine's
network, so its loopback listener is this test's), as the image's USER, with the image's
environment and virtualenv, and asks gRPC health. Needs the image: `make image-test`
builds it (`make image-base`, `make image`) and runs this file; without the image (or
without buildah) the tests are skipped with the reason. Timings: docs/deploy.md,
"Building the image here".
"""

from __future__ import annotations

import contextlib
import os
import selectors
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from deploy.checks.config import K8S
from tests.harness.ports import free_ports

BUILDAH = shutil.which("buildah")
START_TIMEOUT = 60.0


def _image() -> str:
    """The image name the manifests use (base kustomization `images:`), as `make image` tags."""
    spec = yaml.safe_load((K8S / "base" / "kustomization.yaml").read_text())
    entry = next(i for i in spec["images"] if i["name"] == "penaltyd")
    return f"{entry['newName']}:{entry['newTag']}"


IMAGE = _image()


def _built() -> bool:
    if BUILDAH is None or os.geteuid() != 0:
        return False
    done = subprocess.run(
        [BUILDAH, "inspect", "--type", "image", IMAGE],
        capture_output=True,
        timeout=60,
        check=False,
    )
    return done.returncode == 0


pytestmark = pytest.mark.skipif(
    not _built(), reason=f"image {IMAGE} not built here: `make image-test` builds and tests it"
)


@pytest.fixture
def container() -> Iterator[str]:
    assert BUILDAH is not None
    name = subprocess.run(
        [BUILDAH, "from", "--pull-never", IMAGE],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout.strip()
    try:
        yield name
    finally:
        subprocess.run([BUILDAH, "rm", name], capture_output=True, timeout=60, check=False)


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _process_running(root: int, program: str) -> int:
    """The pid of the descendant of `root` whose command line runs `program`."""
    for pid in _descendants(root):
        with contextlib.suppress(OSError):
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            if any(a.endswith(program.encode()) for a in argv[:2]) and b"python" in argv[0]:
                return pid
    raise AssertionError(f"no {program} process under {root}")


def _uid(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            return int(line.split()[1])
    raise AssertionError("no Uid line")


@contextlib.contextmanager
def run(container: str, *argv: str) -> Iterator[tuple[subprocess.Popen[str], list[str]]]:
    """`buildah run` of argv in the container; yields once `*_started` is logged."""
    assert BUILDAH is not None
    proc = subprocess.Popen(
        [BUILDAH, "run", "--isolation", "chroot", container, "--", *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    lines: list[str] = []
    assert proc.stdout is not None
    try:
        deadline = time.monotonic() + START_TIMEOUT
        with selectors.DefaultSelector() as sel:
            sel.register(proc.stdout, selectors.EVENT_READ)
            while (left := deadline - time.monotonic()) > 0 and sel.select(left):
                line = proc.stdout.readline()
                if not line:
                    break
                lines.append(line)
                if '_started"' in line:
                    break
            else:
                pytest.fail("no start line:\n" + "".join(lines))
        if not lines or '_started"' not in lines[-1]:
            pytest.fail(f"{argv[0]} did not start in the image:\n" + "".join(lines))
        yield proc, lines
    finally:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)


def _serving(address: str, service: str) -> str:
    with grpc.insecure_channel(address) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=10, wait_for_ready=True
        )
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))


def _stop_gracefully(proc: subprocess.Popen[str], pid: int, lines: list[str]) -> None:
    """SIGTERM to the server itself (buildah run does not forward signals): it drains,
    logs its stop line and exits 0, and so does buildah run."""
    os.kill(pid, signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    text = "".join(lines) + out
    assert proc.returncode == 0, text
    assert '_stopped"' in text, text


@pytest.mark.timeout(180)
def test_penaltyd_in_the_image_serves_grpc_health_as_uid_10001(container: str) -> None:
    grpc_port, metrics_port = free_ports(2)
    address = f"127.0.0.1:{grpc_port}"
    # The image listens on 0.0.0.0 by default (PENALTYD_LISTEN): loopback only here.
    with run(
        container,
        "penaltyd",
        "--listen",
        address,
        "--metrics-listen",
        f"127.0.0.1:{metrics_port}",
    ) as (proc, lines):
        assert _serving(address, "") == "SERVING"
        assert _serving(address, "penalty.v1.PenaltyService") == "SERVING"
        pid = _process_running(proc.pid, "/opt/penaltyd/bin/penaltyd")
        assert _uid(pid) == 10001
        _stop_gracefully(proc, pid, lines)


@pytest.mark.timeout(180)
def test_relaycheck_in_the_image_serves_grpc_health(container: str) -> None:
    (grpc_port,) = free_ports(1)
    address = f"127.0.0.1:{grpc_port}"
    with run(container, "relaycheck", "serve", "--listen", address) as (proc, lines):
        assert _serving(address, "") == "SERVING"
        pid = _process_running(proc.pid, "/opt/penaltyd/bin/relaycheck")
        _stop_gracefully(proc, pid, lines)


@pytest.mark.timeout(120)
def test_every_console_script_is_in_the_image(container: str) -> None:
    assert BUILDAH is not None
    for script in ("penalty-policyd", "penalty-milter", "penalty-logwatch", "penaltyctl"):
        done = subprocess.run(
            [BUILDAH, "run", "--isolation", "chroot", container, "--", script, "--help"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert done.returncode == 0, f"{script}: {done.stdout}{done.stderr}"
