"""The Dockerfile (deploy/Dockerfile), read as text: no Docker daemon is needed.

A small parser joins continuation lines; the rules then ask for a multi-stage build with
pinned base images, and a runtime stage that is python:3.11-slim, runs as a numeric
non-root USER, copies its build from the builder, installs nothing, has no HEALTHCHECK
(Kubernetes probes gRPC health), and has the ENTRYPOINT and ports the manifests expect.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .config import DOCKERFILE, ROOT
from .findings import Problem, rel
from .images import pinned

RUNTIME_BASE = "python:3.11-slim"
ENTRYPOINT = ["penaltyd"]
PORTS = ("50051", "9150")  # gRPC, metrics
INSTALLS = re.compile(
    r"\b(apt-get|apt|yum|dnf|microdnf)\b[^;&|]*\binstall\b|\bapk\s+add\b|\bpip\d*\s+install\b"
    r"|\bpip\s+(\S+\s+)*install\b"
)

# Reports a problem at a line (0: the whole file).
AddAt = Callable[[int, str], None]


@dataclass
class Instruction:
    line: int
    keyword: str
    args: str


@dataclass
class Stage:
    """A FROM line, its base image with ARG defaults filled in, and what follows it."""

    start: Instruction
    image: str
    alias: str | None
    body: list[Instruction] = field(default_factory=list)


def _instruction(line: int, text: str) -> Instruction:
    keyword, _, args = text.partition(" ")
    return Instruction(line, keyword.upper(), args.strip())


def parse_dockerfile(text: str) -> list[Instruction]:
    """Instructions with continuation lines joined; comments and blank lines dropped."""
    out: list[Instruction] = []
    buf = ""
    start = 0
    for n, raw in enumerate(text.splitlines(), 1):
        stripped = raw.strip()
        if not buf and (not stripped or stripped.startswith("#")):
            continue
        if buf and stripped.startswith("#"):
            continue  # comment lines inside a continuation are skipped by Docker too
        if not buf:
            start = n
        if stripped.endswith("\\"):
            buf += stripped[:-1] + " "
            continue
        out.append(_instruction(start, buf + stripped))
        buf = ""
    if buf:
        out.append(_instruction(start, buf))
    return out


def stages(instructions: list[Instruction]) -> list[Stage]:
    """The build stages; ARGs before the first FROM fill in the base images."""
    args: dict[str, str] = {}
    out: list[Stage] = []
    for ins in instructions:
        if ins.keyword == "ARG" and not out:
            name, _, default = ins.args.partition("=")
            args[name.strip()] = default.strip().strip("\"'")
        elif ins.keyword == "FROM":
            words = [w for w in ins.args.split() if not w.startswith("--")]
            image = re.sub(
                r"\$\{?(\w+)\}?",
                lambda m: args.get(m.group(1), m.group(0)),
                words[0] if words else "",
            )
            alias = words[2] if len(words) >= 3 and words[1].upper() == "AS" else None
            out.append(Stage(ins, image, alias))
        elif out:
            out[-1].body.append(ins)
    return out


def check_dockerfile(path: Path = DOCKERFILE, context: Path = ROOT) -> tuple[str, list[Problem]]:
    """Multi-stage, pinned bases, non-root numeric USER, a lean runtime stage."""
    where = rel(path)
    problems: list[Problem] = []

    def add(line: int, message: str) -> None:
        problems.append(Problem(where, f"line {line}" if line else "", "", message))

    try:
        instructions = parse_dockerfile(path.read_text())
    except OSError as exc:
        return "", [Problem(where, "", "", f"cannot read: {exc}")]
    built = stages(instructions)
    if len(built) < 2:
        add(
            0,
            "expected a multi-stage build (a builder and a runtime stage), "
            f"found {len(built)} FROM",
        )
    _check_bases(built, add)
    if not built:
        return "", problems
    final = built[-1]
    users = _check_runtime(final, add)
    _check_sources(instructions, context, add)
    _check_interface(final, add)
    user_line = users[-1].args if users else "-"
    return f"{len(built)} stages, runtime FROM {final.image}, USER {user_line}", problems


def _check_bases(built: list[Stage], add: AddAt) -> None:
    """Every base image is pinned, or an earlier stage."""
    aliases: set[str] = set()
    for stage in built:
        if stage.image in aliases:
            pass  # FROM an earlier stage
        elif "$" in stage.image:
            add(stage.start.line, f"base image {stage.image!r} uses an ARG without a default")
        elif why := pinned(stage.image):
            add(stage.start.line, why)
        if stage.alias:
            aliases.add(stage.alias)


def _check_runtime(final: Stage, add: AddAt) -> list[Instruction]:
    """The runtime stage's base, USER, COPY --from, installs and HEALTHCHECK; its USERs."""
    line = final.start.line
    if not final.image.startswith(RUNTIME_BASE):
        add(line, f"runtime stage should be {RUNTIME_BASE}*, got {final.image!r}")
    users = [i for i in final.body if i.keyword == "USER"]
    if not users:
        add(line, "the runtime stage has no USER line: it would run as root")
    else:
        user = users[-1].args.split(":", 1)[0]
        if user in ("root", "0"):
            add(users[-1].line, "USER is root")
        elif not user.isdigit():
            add(users[-1].line, f"USER {user!r}: use a numeric uid so runAsNonRoot can verify it")
    if not any(i.keyword == "COPY" and "--from=" in i.args for i in final.body):
        add(line, "the runtime stage copies nothing from the builder (COPY --from=)")
    for ins in final.body:
        if ins.keyword == "RUN" and INSTALLS.search(ins.args):
            add(ins.line, "the runtime stage installs packages: build in the builder stage")
        if ins.keyword == "HEALTHCHECK" and ins.args.upper() != "NONE":
            add(ins.line, "no HEALTHCHECK: Kubernetes probes gRPC health natively")
    return users


def _check_sources(instructions: list[Instruction], context: Path, add: AddAt) -> None:
    """No ADD from a URL; every COPY source (from the context) exists."""
    for ins in instructions:
        if ins.keyword == "ADD" and re.search(r"https?://", ins.args):
            add(ins.line, "ADD from a URL: download in a RUN step with a checksum, or COPY")
        if ins.keyword == "COPY" and "--from=" not in ins.args:
            sources = [w for w in ins.args.split() if not w.startswith("--")][:-1]
            for src in sources:
                if not any(ch in src for ch in "*?[") and not (context / src).exists():
                    add(ins.line, f"COPY source {src!r} does not exist in the build context")


def _check_interface(final: Stage, add: AddAt) -> None:
    """The runtime stage's exec-form ENTRYPOINT and EXPOSEd ports."""
    entry = [i for i in final.body if i.keyword == "ENTRYPOINT"]
    if not entry:
        add(final.start.line, "the runtime stage has no ENTRYPOINT")
    else:
        try:
            value = json.loads(entry[-1].args)
        except json.JSONDecodeError:
            value = None
        if value != ENTRYPOINT:
            add(
                entry[-1].line,
                f'expected ENTRYPOINT ["penaltyd"] (exec form), got {entry[-1].args}',
            )
    exposed = {p.split("/")[0] for i in final.body if i.keyword == "EXPOSE" for p in i.args.split()}
    for port in PORTS:
        if port not in exposed:
            add(final.start.line, f"the runtime stage does not EXPOSE {port}")
