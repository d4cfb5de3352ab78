"""penalty-policyd beside the Postfix policy servers operators use today, on one load.

The peers are Debian's packages (`make peers-deps` installs them with their services
kept stopped and disabled): policyd-rate-limit, postgrey and postfwd2. Each runs on a
free loopback port with its own configuration in a temp dir, as a child of this process
(postfwd2 cannot stay in the foreground, see `Postfwd2`), and all four are driven by the
same C load generator as `bench.policyd_bench` (`bench/policy_load.c`): 32 persistent
connections, one request in flight each, 10 % of requests from the 50 addresses
198.18.0.1-50, the rest from 255 others (`GOOD_ADDRS` says why not more). Rounds are
interleaved (penalty-policyd, policyd-rate-limit, postgrey, postfwd2, then again), each
one load run: 8 s of warm-up on the connections it then measures for 10 s, with the
same seed for every server in a round; the table shows medians.

What each is asked to do with that load, and answers:

- penalty-policyd: live replica on, penaltyd on the embedded store with the 50 addresses
  penalized (`bench.policyd_bench.stack`; penalties last an hour instead of 300 s, so
  they outlive the run), accepted recipients reported (the default). DUNNO, or
  `450 4.7.1 too many SMTP errors from <ip>; try again in <n> seconds`.
- policyd-rate-limit: every client address counted in sqlite `:memory:` (one window of
  a minute, with a limit this load never reaches; `--rate-limit` for the others of
  `RATE_LIMIT_MODES`) and a limit of 0 for the 50: DUNNO, or
  `450 4.7.1 rate limit reached, retry later` for the 50.
- postgrey: greylisting (DB in a temp dir, on tmpfs unless `--postgrey-db-on-disk`,
  Debian's whitelists). It has no notion of a penalized client: a (client /24, sender,
  recipient) triplet not seen before gets DEFER_IF_PERMIT, which is nearly every request
  of this load (100,000 recipients); the load generator counts those as "other".
- postfwd2: Debian's default options and one rule, client_address in a file of the 50
  addresses: DUNNO, or `450 4.7.1 too many SMTP errors from <ip>`.

CPU per request is the server's processes' utime+stime over the measured load, children
included (postfwd2 forks a cache daemon and a pre-forked pool; a child that exits is
counted through its parent's cutime), divided by the answers counted. For
penalty-policyd that is policyd alone; penaltyd's share is shown beside it.

    .venv/bin/python -m bench.peers                 # 3 interleaved rounds of 10 s
    .venv/bin/python -m bench.peers --quick         # 1 round of 2 s: a smoke run
    .venv/bin/python -m bench.peers --only penalty-policyd,postfwd2 --rounds 5
    .venv/bin/python -m bench.peers --only penalty-policyd,policyd-rate-limit --fixed-rate 1.2

Saturation is not "at that load": 32 connections that each ask again the moment they
are answered keep every server at 100 % of what it can do, so a saturated p99 is mostly
queueing behind the other 31 connections (and whatever the machine does meanwhile).
`--fixed-rate F` adds, after the saturated rounds, `rounds` more of penalty-policyd at a
fixed offered rate of F x policyd-rate-limit's median req/s of this run (the load
generator's `-R`: every connection due to ask every 32/rate s, still one request in
flight, latency counted from when a request was due, so a stall is not hidden by the
generator waiting for it), interleaved with the floor (`bench.policy_floor`: a uvloop
server answering DUNNO with no work) at the same rate: what the machine itself allowed.
"""

from __future__ import annotations

import argparse
import contextlib
import grp
import ipaddress
import os
import pwd
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from unittest import mock

import yaml

from bench.cpu import wait_quiet
from bench.policyd_bench import (
    RESULTS,
    build,
    children_cpu_s,
    finish,
    load,
    machine_busy_s,
    penalized_address,
    proc_cpu_s,
    stack,
)
from bench.report import machine_info, write_json
from bench.runner import _signals_as_interrupt
from tests.harness.ports import free_port, wait_port

BASE = "penalty-policyd"
PEERS = ("policyd-rate-limit", "postgrey", "postfwd2")
SERVERS = (BASE, *PEERS)
DEBIAN_PACKAGES = {
    "policyd-rate-limit": "policyd-rate-limit",
    "postgrey": "postgrey",
    "postfwd2": "postfwd",
}
# The users Debian's packages run each daemon as (postfwd: RUNAS in /etc/default/postfwd).
SERVICE_USERS = {
    "policyd-rate-limit": "policyd-rate-limit",
    "postgrey": "postgrey",
    "postfwd2": "postfw",
}
# Debian's /etc/default/postfwd ARGS (less --daemon, implied), what operators start with.
POSTFWD_DEBIAN_ARGS = ("--summary=600", "--cache=600", "--cache-rdomain-only", "--cache-no-size")
POSTGREY_WHITELISTS = Path("/etc/postgrey")
# The good clients of the load: policy_load.c draws 10.<j>>16>.<j>>8&255>.<(j&255)+1>, so
# with more than 255 of them every 256th address ends in .256, which postgrey 1.37 dies
# on (NetAddr::IP returns undef, line 350) and policyd-rate-limit drops the connection
# for. 255 is the largest pool of valid addresses it can draw.
GOOD_ADDRS = 255
TEMPFAIL_TEXT = "450 4.7.1 too many SMTP errors from"
# penaltyd's penalties last 300 s by default: shorter than a run of 5 rounds.
PENALTY_SECONDS = 3600
_TICK = os.sysconf("SC_CLK_TCK")


# --- configuration files -----------------------------------------------------------------


def penalized_list(count: int) -> str:
    """The penalized addresses as policy_load.c draws them, one a line."""
    return "".join(f"{penalized_address(i)}\n" for i in range(count))


#: What policyd-rate-limit counts: "minute" (the default) every client address, in one
#: window of a minute; "debian" every client address in Debian's two windows (a minute
#: and a day: each COUNT then reads all of a client's rows of the day); "penalized-only"
#: only the 50 addresses' networks are limited, every other client is answered without
#: touching the database (its server loop alone).
RATE_LIMIT_MODES = {"minute": (60,), "debian": (60, 86400), "penalized-only": (60,)}


def rate_limit_config(
    *, port: int, pidfile: Path, penalized: int, mode: str = "minute"
) -> dict[str, Any]:
    """policyd-rate-limit's settings: limits by client address, the penalized at 0.

    Limits no client of this load reaches, so they get DUNNO; a limit of 0 mails for each
    penalized address, so it always gets the fail action (a 450, as penalty-policyd's).
    """
    addrs = [penalized_address(i) for i in range(penalized)]
    if mode == "penalized-only":
        nets = [str(n) for n in ipaddress.collapse_addresses(map(ipaddress.IPv4Network, addrs))]
    else:
        nets = ["0.0.0.0/0", "::/0"]
    return {
        "debug": False,  # Debian's file says True: every request copied to stderr
        "pidfile": str(pidfile),
        "backend": 0,
        "sqlite_config": {"database": ":memory:"},
        "SOCKET": ["127.0.0.1", port],
        "limits": [[1_000_000_000, window] for window in RATE_LIMIT_MODES[mode]],
        "limits_by_id": {addr: [[0, 60]] for addr in addrs},
        "limit_by_sasl": False,
        "limit_by_sender": False,
        "limit_by_ip": True,
        "limited_networks": nets,
        "success_action": "DUNNO",
        "fail_action": "450 4.7.1 rate limit reached, retry later",
        "db_error_action": "DUNNO",
        "report": False,
        "delay_to_close": 300,
    }


def rate_limit_yaml(**kwargs: Any) -> str:
    return yaml.safe_dump(rate_limit_config(**kwargs), sort_keys=False)


def postfwd_rules(list_path: Path) -> str:
    """One postfwd rule: a client address in the list file gets a 450, the rest DUNNO."""
    return (
        f"id=PENALIZED; client_address=file:{list_path}; action={TEMPFAIL_TEXT} $$client_address\n"
    )


def postgrey_args(*, port: int, dbdir: Path, whitelists: Path, user: str, group: str) -> list[str]:
    """postgrey in the foreground (no --daemonize): logs to stderr, DB in `dbdir`."""
    return [
        f"--inet=127.0.0.1:{port}",
        f"--dbdir={dbdir}",
        f"--user={user}",
        f"--group={group}",
        f"--whitelist-clients={whitelists / 'whitelist_clients'}",
        f"--whitelist-recipients={whitelists / 'whitelist_recipients'}",
    ]


def postfwd_args(*, port: int, rules: Path, state: Path, user: str, group: str) -> list[str]:
    """postfwd2 on its own port, cache socket and pidfile in `state` (not /var/tmp)."""
    return [
        "-f",
        str(rules),
        "--server_socket",
        f"tcp:127.0.0.1:{port}",
        "--cache_socket",
        f"unix::{state / 'cache.sock'}",  # proto:host:path, no host
        "--pidfile",
        str(state / "master.pid"),
        "-u",
        user,
        "-g",
        group,
        *POSTFWD_DEBIAN_ARGS,
    ]


# --- CPU of a process tree ---------------------------------------------------------------


def _stat(pid: int) -> list[str] | None:
    """/proc/<pid>/stat after the command name, or None if the process is gone."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()
    except OSError:
        return None


def tree_pids(root: int) -> list[int]:
    """`root` and every live descendant."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        fields = _stat(int(entry)) if entry.isdigit() else None
        if fields is not None:
            children.setdefault(int(fields[1]), []).append(int(entry))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, ()))
    return found


def tree_cpu(root: int) -> tuple[float, float]:
    """(user, system) seconds of a process tree, reaped children included (cutime)."""
    user = system = 0.0
    for pid in tree_pids(root):
        fields = _stat(pid)
        if fields is not None:
            user += (int(fields[11]) + int(fields[13])) / _TICK
            system += (int(fields[12]) + int(fields[14])) / _TICK
    return user, system


# --- the servers -------------------------------------------------------------------------


@dataclass
class Server:
    name: str
    port: int
    pid: Callable[[], int]  # the root of the server's process tree
    backend_pid: int | None = None  # penaltyd behind penalty-policyd
    log: Path | None = None

    def log_tail(self, chars: int = 2000) -> str:
        if self.log is None or not self.log.exists():
            return ""
        return self.log.read_text(errors="replace")[-chars:]


def run_as(name: str) -> tuple[str, str, int, int]:
    """(user, group, uid, gid) to run a peer as: Debian's service user when we are root,
    else whoever we are."""
    uid = os.getuid()
    if uid == 0:
        with contextlib.suppress(KeyError):
            pw = pwd.getpwnam(SERVICE_USERS[name])
            return pw.pw_name, grp.getgrgid(pw.pw_gid).gr_name, pw.pw_uid, pw.pw_gid
    gid = os.getgid()
    return pwd.getpwuid(uid).pw_name, grp.getgrgid(gid).gr_name, uid, gid


@contextlib.contextmanager
def _workdir(name: str, uid: int, gid: int, parent: str | None = None) -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix=f"peers-{name}-", dir=parent))
    try:
        path.chmod(0o755)
        if os.getuid() == 0:
            os.chown(path, uid, gid)
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


@contextlib.contextmanager
def _foreground(
    name: str, argv: list[str], port: int, work: Path, uid: int, gid: int
) -> Iterator[Server]:
    log, root = work / f"{name}.log", os.getuid() == 0
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=work,
            user=uid if root else None,
            group=gid if root else None,
            extra_groups=[] if root else None,
        )
    try:
        try:
            wait_port("127.0.0.1", port, timeout=20, proc=proc)
        except (RuntimeError, TimeoutError) as exc:
            raise RuntimeError(f"{name} did not start: {exc}\n{log.read_text()[-2000:]}") from exc
        yield Server(name, port, lambda: proc.pid, log=log)
    finally:
        _stop(proc)


@contextlib.contextmanager
def policyd_rate_limit(penalized: int, mode: str = "minute") -> Iterator[Server]:
    """`policyd-rate-limit -f FILE` stays in the foreground (its systemd unit: Type=simple)."""
    _user, _group, uid, gid = run_as("policyd-rate-limit")
    port = free_port()
    with _workdir("policyd-rate-limit", uid, gid) as work:
        config = work / "policyd-rate-limit.yaml"
        config.write_text(
            rate_limit_yaml(port=port, pidfile=work / "prl.pid", penalized=penalized, mode=mode)
        )
        argv = ["/usr/bin/policyd-rate-limit", "-f", str(config)]
        with _foreground("policyd-rate-limit", argv, port, work, uid, gid) as server:
            yield server


@contextlib.contextmanager
def postgrey(on_disk: bool = False) -> Iterator[Server]:
    """postgrey runs in the foreground unless given --daemonize (postgrey(8))."""
    user, group, uid, gid = run_as("postgrey")
    port = free_port()
    shm = "/dev/shm" if not on_disk and os.access("/dev/shm", os.W_OK) else None
    with _workdir("postgrey", uid, gid, parent=shm) as work:
        whitelists = work / "whitelists"
        whitelists.mkdir()
        for name in ("whitelist_clients", "whitelist_recipients"):  # Debian's, copied
            source = POSTGREY_WHITELISTS / name
            (whitelists / name).write_text(source.read_text() if source.exists() else "")
        dbdir = work / "db"
        dbdir.mkdir()
        if os.getuid() == 0:
            os.chown(dbdir, uid, gid)
        args = postgrey_args(port=port, dbdir=dbdir, whitelists=whitelists, user=user, group=group)
        with _foreground("postgrey", ["/usr/sbin/postgrey", *args], port, work, uid, gid) as server:
            yield server


class Postfwd2:
    """postfwd2's master always daemonizes (Net::Server::Daemonize: fork, setsid, the
    parent exits; its --nodaemon reads requests from stdin instead of listening), so it
    cannot be a foreground child. It is started with its pidfile and cache socket in a
    temp dir, followed through the pidfile (the master leads its own session and process
    group), and stopped with SIGTERM to that group, SIGKILL after 10 s."""

    def __init__(self, penalized: int) -> None:
        self.penalized = penalized
        self.master = 0

    @contextlib.contextmanager
    def run(self) -> Iterator[Server]:
        user, group, uid, gid = run_as("postfwd2")
        port = free_port()
        with _workdir("postfwd2", uid, gid) as work:
            listed = work / "penalized.txt"
            listed.write_text(penalized_list(self.penalized))
            rules = work / "postfwd.cf"
            rules.write_text(postfwd_rules(listed))
            args = postfwd_args(port=port, rules=rules, state=work, user=user, group=group)
            log = work / "postfwd2.log"
            try:
                with open(log, "ab") as out:
                    subprocess.run(
                        ["/usr/sbin/postfwd2", *args],
                        stdin=subprocess.DEVNULL,
                        stdout=out,
                        stderr=subprocess.STDOUT,
                        timeout=30,
                        check=True,
                    )
                self.master = self._await_master(work / "master.pid", port, log)
                yield Server("postfwd2", port, lambda: self.master, log=log)
            finally:
                self.stop()

    def _await_master(self, pidfile: Path, port: int, log: Path) -> int:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError, ValueError):
                master = int(pidfile.read_text().strip())
                self.master = master
                wait_port("127.0.0.1", port, timeout=max(deadline - time.monotonic(), 0.1))
                return master
            time.sleep(0.05)  # another process's pidfile: nothing to await
        raise RuntimeError(f"postfwd2 did not start:\n{log.read_text()[-2000:]}")

    def _group(self) -> list[int]:
        """Live processes of the master's session (its daemons and their children)."""
        pids = []
        for entry in os.listdir("/proc"):
            fields = _stat(int(entry)) if entry.isdigit() else None
            if fields is not None and int(fields[3]) == self.master and fields[0] != "Z":
                pids.append(int(entry))
        return pids

    def stop(self) -> None:
        if not self.master:
            return
        for sig, wait in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
            if not self._group():
                break
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.master, sig)
            deadline = time.monotonic() + wait
            while self._group() and time.monotonic() < deadline:
                time.sleep(0.05)  # processes we are not the parent of: poll
        self.master = 0


@contextlib.contextmanager
def penalty_policyd(penalized: int) -> Iterator[Server]:
    """`bench.policyd_bench.stack`: penaltyd (embedded store, its defaults but for the
    length of a penalty: PENALTY_SECONDS, so the 50 stay penalized however long the run)
    and penalty-policyd on it, live replica on, accepted recipients reported."""
    with contextlib.ExitStack() as stack_:
        with mock.patch.dict(os.environ, {"PENALTYD_PENALTY_SECONDS": str(PENALTY_SECONDS)}):
            pd, policyd = stack_.enter_context(stack(penalized_addrs=penalized))
        yield Server(
            BASE, policyd.port, lambda: policyd.pid, backend_pid=pd.pid, log=Path(policyd.log_path)
        )


FLOOR = "floor (uvloop, no work)"


@contextlib.contextmanager
def policy_floor() -> Iterator[Server]:
    """`bench.policy_floor`: DUNNO to everything, no work (the machine's own latency)."""
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="policy-floor-") as work:
        log = Path(work) / "floor.log"
        with open(log, "ab") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "bench.policy_floor", "--listen", f"127.0.0.1:{port}"],
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=Path(__file__).resolve().parent.parent,
            )
        try:
            wait_port("127.0.0.1", port, timeout=20, proc=proc)
            yield Server(FLOOR, port, lambda: proc.pid, log=log)
        finally:
            _stop(proc)


# --- one round ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Load:
    connections: int = 32
    seconds: float = 10.0
    warmup: float = 8.0
    penalized_pct: float = 10.0
    penalized_addrs: int = 50
    good_addrs: int = GOOD_ADDRS
    rate: float = 0.0  # a fixed offered rate (requests/s, all connections); 0: saturation

    def args(self) -> list[str]:
        return [
            *(["-R", f"{self.rate:.0f}"] if self.rate else []),
            "-c",
            str(self.connections),
            "-x",
            str(self.penalized_pct),
            "-P",
            str(self.penalized_addrs),
            "-G",
            str(self.good_addrs),
        ]


def connected(port: int) -> int:
    """Established IPv4 connections to `port` seen from the client side (/proc/net/tcp)."""
    count = 0
    with open("/proc/net/tcp") as fh:
        next(fh)
        for line in fh:
            fields = line.split()
            if fields[3] == "01" and int(fields[2].rsplit(":", 1)[1], 16) == port:
                count += 1
    return count


def ask(port: int, client_address: str, recipient: str = "probe@example.org") -> str:
    """One RCPT policy request on a new connection; the answer without `action=`."""
    request = (
        "request=smtpd_access_policy\nprotocol_state=RCPT\nprotocol_name=ESMTP\n"
        f"client_address={client_address}\nclient_name=unknown\nhelo_name=mail.example.net\n"
        f"sender=newsletter@example.net\nrecipient={recipient}\ninstance=probe.1\n\n"
    )
    with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
        conn.sendall(request.encode())
        answer = b""
        while not answer.endswith(b"\n\n"):
            chunk = conn.recv(4096)
            if not chunk:
                break
            answer += chunk
    return answer.decode(errors="replace").strip().removeprefix("action=")


def sample_answers(port: int) -> dict[str, str]:
    """What a server answers a good client and a penalized one (recorded in the JSON)."""
    return {"good": ask(port, "10.0.0.1"), "penalized": ask(port, penalized_address(0))}


def _cpu_s(pid: int | None) -> float:
    return sum(tree_cpu(pid)) if pid else 0.0


def measure(binary: Path, server: Server, shape: Load, seed: int) -> dict[str, Any]:
    """One load run: connections opened and warmed for `shape.warmup` seconds (answers
    not counted), then `shape.seconds` measured; answers, latency and the server's CPU
    over the measured part.

    The warm-up is inside the load generator's run (`-w`), not a run of its own, so the
    connections of the measured part are the warmed ones: policyd-rate-limit listens
    with a backlog of 5, and 32 connections opened at once wait out SYN retransmits
    (1 s each) for several seconds. How many were up when the measured part began is
    recorded (`connected_at_start`).
    """
    root = server.pid()
    kids0 = children_cpu_s()
    proc = load(
        binary,
        server.port,
        *shape.args(),
        "-d",
        str(shape.seconds),
        "-w",
        str(shape.warmup),
        "-s",
        str(seed),
    )
    time.sleep(shape.warmup)  # the generator's clock opens the window: follow it
    ready = connected(server.port)
    (u0, s0), back0, gen0 = tree_cpu(root), _cpu_s(server.backend_pid), proc_cpu_s(proc.pid)
    busy0, me0, t0 = machine_busy_s(), time.process_time(), time.monotonic()
    result = finish(proc, shape.seconds + 60)
    wall = time.monotonic() - t0
    (u1, s1), processes = tree_cpu(root), len(tree_pids(root))
    back = _cpu_s(server.backend_pid) - back0
    busy, loadgen = machine_busy_s() - busy0, children_cpu_s() - kids0 - gen0
    cpu, n = (u1 - u0) + (s1 - s0), max(result["requests"], 1)
    ours = cpu + back + loadgen + (time.process_time() - me0)
    result.update(
        server=server.name,
        seed=seed,
        connected_at_start=ready,
        processes=processes,
        server_cpu_s=round(cpu, 3),
        server_cores=round(cpu / wall, 3),
        cpu_us_per_request=round(cpu / n * 1e6, 2),
        user_us_per_request=round((u1 - u0) / n * 1e6, 2),
        kernel_us_per_request=round((s1 - s0) / n * 1e6, 2),
        backend_us_per_request=round(back / n * 1e6, 2) if server.backend_pid else None,
        backend_cores=round(back / wall, 3) if server.backend_pid else None,
        loadgen_cores=round(loadgen / wall, 3),
        foreign_cores=round(max(busy - ours, 0.0) / wall, 3),
    )
    return result


# --- summary, ratios, table --------------------------------------------------------------

MEDIANS = (
    "req_per_s",
    "p50_us",
    "p99_us",
    "p999_us",
    "max_us",
    "cpu_us_per_request",
    "backend_us_per_request",
    "foreign_cores",
)


def summarize(rounds: Sequence[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per server: medians of its rounds and the shares of what it answered."""
    out: dict[str, dict[str, Any]] = {}
    for name in dict.fromkeys(r["server"] for r in rounds):
        mine = [r for r in rounds if r["server"] == name]
        total = max(sum(r["requests"] for r in mine), 1)
        row: dict[str, Any] = {"rounds": len(mine)}
        for key in MEDIANS:
            values = [r[key] for r in mine if r.get(key) is not None]
            row[key] = float(statistics.median(values)) if values else None
        for kind in ("dunno", "tempfail", "other"):
            row[f"{kind}_share"] = sum(r[kind] for r in mine) / total
        row["errors"] = sum(r["errors"] for r in mine)
        out[name] = row
    return out


def ratios(summary: dict[str, dict[str, Any]], base: str = BASE) -> dict[str, dict[str, float]]:
    """Per peer: penalty-policyd's req/s over the peer's, and the peer's CPU per request
    over penalty-policyd's (both > 1 where penalty-policyd does better)."""
    ref = summary[base]
    out: dict[str, dict[str, float]] = {}
    for name, row in summary.items():
        if name == base:
            continue
        out[name] = {
            "req_per_s": ref["req_per_s"] / row["req_per_s"] if row["req_per_s"] else float("inf"),
            "cpu_per_request": (
                row["cpu_us_per_request"] / ref["cpu_us_per_request"]
                if ref["cpu_us_per_request"]
                else float("inf")
            ),
        }
    return out


def _ms(us: float | None) -> str:
    return "-" if us is None else f"{us / 1000:.2f} ms"


def _answers(row: dict[str, Any]) -> str:
    parts = [f"{row['dunno_share']:.0%} DUNNO", f"{row['tempfail_share']:.0%} 4xx"]
    if row["other_share"]:
        parts.append(f"{row['other_share']:.0%} other")
    if row["errors"]:
        parts.append(f"{row['errors']} errors")
    return ", ".join(parts)


def format_table(summary: dict[str, dict[str, Any]], base: str = BASE) -> str:
    x = ratios(summary, base) if base in summary else {}
    head = ("server", "req/s", "p50", "p99", "CPU µs/req", f"{base} ÷ peer req/s", "answers")
    rows = [head]
    for name, row in summary.items():
        cpu = f"{row['cpu_us_per_request']:.1f}"
        if row.get("backend_us_per_request") is not None:
            cpu += f" (+{row['backend_us_per_request']:.1f} penaltyd)"
        ratio = f"{x[name]['req_per_s']:.1f}x" if name in x else "-"
        rows.append(
            (
                name,
                f"{row['req_per_s']:,.0f}",
                _ms(row["p50_us"]),
                _ms(row["p99_us"]),
                cpu,
                ratio,
                _answers(row),
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = []
    for i, r in enumerate(rows):
        cells = [
            c.ljust(w) if j in (0, 6) else c.rjust(w)
            for j, (c, w) in enumerate(zip(r, widths, strict=True))
        ]
        lines.append("  ".join(cells).rstrip())
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def format_fixed(fixed: dict[str, Any]) -> str:
    """The fixed-rate rounds: per server the medians, and each round's p99."""
    lines = [
        f"fixed offered rate {fixed['rate']:,.0f} req/s ({fixed['factor']:g} x "
        f"policyd-rate-limit), medians of {len(fixed['rounds']) // 2} round(s):"
    ]
    for name, row in fixed["summary"].items():
        p99s = ", ".join(_ms(r["p99_us"]) for r in fixed["rounds"] if r["server"] == name)
        cpu = f"{row['cpu_us_per_request']:.1f} µs/req"
        if row.get("backend_us_per_request") is not None:
            cpu += f" (+{row['backend_us_per_request']:.1f} penaltyd)"
        lines.append(
            f"  {name:<26} {row['req_per_s']:>8,.0f} req/s  p50 {_ms(row['p50_us'])}  "
            f"p99 {_ms(row['p99_us'])} (rounds {p99s})  p99.9 {_ms(row['p999_us'])}  "
            f"max {_ms(row['max_us'])}  {cpu}  others used {row['foreign_cores'] or 0:.2f} cores"
        )
    return "\n".join(lines)


# --- the run -----------------------------------------------------------------------------


def _versions() -> dict[str, str]:
    out = {}
    for server, package in DEBIAN_PACKAGES.items():
        done = subprocess.run(
            ["dpkg-query", "-W", "-f=${Version}", package],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
        out[server] = done.stdout.strip() or "not installed"
    return out


def missing() -> list[str]:
    """The peers whose programs are not installed (`make peers-deps` installs them)."""
    paths = {
        "policyd-rate-limit": "/usr/bin/policyd-rate-limit",
        "postgrey": "/usr/sbin/postgrey",
        "postfwd2": "/usr/sbin/postfwd2",
    }
    return [name for name, path in paths.items() if not os.access(path, os.X_OK)]


def run(
    shape: Load,
    *,
    rounds: int = 3,
    servers: Sequence[str] = SERVERS,
    rate_limit_mode: str = "minute",
    postgrey_on_disk: bool = False,
    fixed_rate: float = 0.0,
    say: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Start every server, then `rounds` interleaved rounds; every round and the medians.
    With `fixed_rate` F, then `rounds` rounds of penalty-policyd and the floor at F x
    policyd-rate-limit's median req/s (`out["fixed"]`)."""
    if fixed_rate and not {BASE, "policyd-rate-limit"} <= set(servers):
        raise ValueError("--fixed-rate needs penalty-policyd and policyd-rate-limit")
    binary = build()
    starters: dict[str, Callable[[], contextlib.AbstractContextManager[Server]]] = {
        BASE: lambda: penalty_policyd(shape.penalized_addrs),
        "policyd-rate-limit": lambda: policyd_rate_limit(shape.penalized_addrs, rate_limit_mode),
        "postgrey": lambda: postgrey(postgrey_on_disk),
        "postfwd2": Postfwd2(shape.penalized_addrs).run,
    }
    out: dict[str, Any] = {
        "machine": machine_info(),
        "versions": _versions(),
        "load": vars(shape) | {"generator": "bench/policy_load.c", "depth": 1},
        "rate_limit_mode": rate_limit_mode,
        "postgrey_db": "disk" if postgrey_on_disk else "tmpfs",
        "rounds": [],
    }
    with contextlib.ExitStack() as stack_:
        started: list[Server] = []
        for name in servers:
            started.append(stack_.enter_context(starters[name]()))
            out.setdefault("answers", {})[name] = answers = sample_answers(started[-1].port)
            say(f"started {name} on 127.0.0.1:{started[-1].port}: {answers}")
        for i in range(rounds):
            for server in started:
                try:
                    r = measure(binary, server, shape, seed=i + 1)
                except Exception as exc:
                    raise RuntimeError(
                        f"{server.name} round {i + 1}: {exc}\n{server.log_tail()}"
                    ) from exc
                r["round"] = i + 1
                out["rounds"].append(r)
                _say_round(say, i + 1, server, r, shape)
        if fixed_rate:
            base = [r["req_per_s"] for r in out["rounds"] if r["server"] == "policyd-rate-limit"]
            fixed = Load(**(vars(shape) | {"rate": fixed_rate * statistics.median(base)}))
            floor = stack_.enter_context(policy_floor())
            by_name = {s.name: s for s in started}
            out["fixed"] = {"factor": fixed_rate, "rate": fixed.rate, "rounds": []}
            say(f"fixed rate: {fixed_rate:g} x policyd-rate-limit = {fixed.rate:,.0f} req/s")
            for i in range(rounds):
                for server in (by_name[BASE], floor):
                    r = measure(binary, server, fixed, seed=i + 1)
                    r["round"] = i + 1
                    out["fixed"]["rounds"].append(r)
                    _say_round(say, i + 1, server, r, fixed)
            out["fixed"]["summary"] = summarize(out["fixed"]["rounds"])
    out["summary"] = summarize(out["rounds"])
    if BASE in out["summary"]:
        out["ratios"] = ratios(out["summary"])
    return out


def _say_round(
    say: Callable[[str], None], i: int, server: Server, r: dict[str, Any], shape: Load
) -> None:
    late = f"  late {r.get('late', 0)}" if shape.rate else ""
    say(
        f"round {i} {server.name:<18} {r['req_per_s']:>9,.0f} req/s  "
        f"conn {r['connected_at_start']}/{shape.connections}  "
        f"p50 {r['p50_us']:>6} µs  p99 {r['p99_us']:>7} µs  "
        f"{r['cpu_us_per_request']:>6.1f} µs CPU/req ({r['processes']} proc, "
        f"{r['server_cores']:.2f} cores; load {r['loadgen_cores']:.2f}, "
        f"foreign {r['foreign_cores']:.2f})  dunno {r['dunno']} 4xx {r['tempfail']} "
        f"other {r['other']} errors {r['errors']}{late}"
    )


def main(argv: list[str] | None = None) -> int:
    summary = (__doc__ or "").split("\n\n")[0]
    p = argparse.ArgumentParser(prog="python -m bench.peers", description=summary)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--warmup", type=float, default=8.0, help="seconds before each measurement")
    p.add_argument("--quick", action="store_true", help="1 round of 2 s (a smoke run)")
    p.add_argument("--connections", type=int, default=32)
    p.add_argument(
        "--good-addrs",
        type=int,
        default=GOOD_ADDRS,
        help="good client addresses (more than 255 makes invalid ones, see GOOD_ADDRS)",
    )
    p.add_argument("--only", default=",".join(SERVERS), help="comma-separated subset")
    p.add_argument(
        "--postgrey-db-on-disk",
        action="store_true",
        help="postgrey's DB in TMPDIR instead of /dev/shm (an fsync per new triplet)",
    )
    p.add_argument(
        "--rate-limit", choices=RATE_LIMIT_MODES, default="minute", help="see RATE_LIMIT_MODES"
    )
    p.add_argument(
        "--wait-quiet",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="first wait up to SECONDS for 3 s in a row of an idle machine",
    )
    p.add_argument(
        "--fixed-rate",
        type=float,
        default=0.0,
        metavar="F",
        help="then penalty-policyd and the floor at F x policyd-rate-limit's req/s",
    )
    p.add_argument("--json", type=Path, default=None, help="also write the JSON here")
    args = p.parse_args(argv)
    servers = [s for s in SERVERS if s in args.only.split(",")]
    absent = [s for s in missing() if s in servers]
    if absent:
        print(f"not installed: {', '.join(absent)} (run `make peers-deps`)", file=sys.stderr)
        return 2
    rounds, seconds = (1, 2.0) if args.quick else (args.rounds, args.seconds)
    shape = Load(args.connections, seconds, args.warmup, good_addrs=args.good_addrs)
    with _signals_as_interrupt():
        if args.wait_quiet > 0:
            busy = wait_quiet(args.wait_quiet, 0.1, print)
            print(f"other processes use {busy:.0%} of the CPU")
        out = run(
            shape,
            rounds=rounds,
            servers=servers,
            rate_limit_mode=args.rate_limit,
            postgrey_on_disk=args.postgrey_db_on_disk,
            fixed_rate=args.fixed_rate,
        )
    out["quick"] = args.quick
    print(
        f"\nmedians of {rounds} interleaved round(s) of {seconds:g} s, "
        f"{shape.connections} connections x 1 in flight:"
    )
    print(format_table(out["summary"]))
    if "fixed" in out:
        print("\n" + format_fixed(out["fixed"]))
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
    paths = [RESULTS / f"peers-{stamp}.json", RESULTS / "peers-latest.json"]
    write_json(out, paths + ([args.json] if args.json else []))
    print(f"JSON: {paths[0]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
