"""bench.peers: the peers' configuration files, the process-tree CPU, the table and ratios.

No peer is installed or started here: the generators are checked against what each
program reads (policyd-rate-limit's YAML keys and its limit rule, postfwd's rule syntax,
the command lines), and the summary on made-up rounds.
"""

from __future__ import annotations

import ipaddress
import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from bench import peers, policyd_bench
from bench.policyd_bench import penalized_address
from tests.harness.ports import free_port, wait_port

DUNNO_ANSWER = b"action=DUNNO\n\n"


def _rate_limit(mode: str = "minute") -> dict[str, Any]:
    text = peers.rate_limit_yaml(
        port=12345, pidfile=Path("/tmp/x/prl.pid"), penalized=50, mode=mode
    )
    config: dict[str, Any] = yaml.safe_load(text)
    return config


def _limits_for(config: dict[str, Any], ip: str) -> list[list[int]] | None:
    """The limits policyd-rate-limit applies to a client address, as its policyd.py does
    (no SASL user, no sender limit): None when the address is not limited at all."""
    addr = ipaddress.ip_address(ip)
    if not any(addr in ipaddress.ip_network(net) for net in config["limited_networks"]):
        return None
    limits: list[list[int]] = config["limits_by_id"].get(ip, config["limits"])
    return limits


def _answer(config: dict[str, Any], ip: str, already: int) -> str:
    """policyd-rate-limit's action with `already` mails counted in every window."""
    limits = _limits_for(config, ip) or []
    failed = any(already >= mails for mails, _window in limits)
    return str(config["fail_action"] if failed else config["success_action"])


def test_rate_limit_config_is_what_policyd_rate_limit_reads() -> None:
    config = _rate_limit()
    assert config["SOCKET"] == ["127.0.0.1", 12345]  # a [ip, port] pair: TCP
    assert config["backend"] == 0
    assert config["sqlite_config"] == {"database": ":memory:"}
    assert config["pidfile"] == "/tmp/x/prl.pid"
    assert config["debug"] is False
    assert (config["limit_by_sasl"], config["limit_by_sender"], config["limit_by_ip"]) == (
        False,
        False,
        True,
    )
    assert config["success_action"] == "DUNNO"  # upper case: the load generator's DUNNO
    assert config["fail_action"].startswith("450 4.7.1 ")  # counted as a 4xx, like ours


def test_rate_limit_answers_dunno_to_the_load_and_450_to_the_penalized() -> None:
    config = _rate_limit()
    penalized = [penalized_address(i) for i in range(50)]
    assert sorted(config["limits_by_id"]) == sorted(penalized)
    for ip in penalized:
        assert _answer(config, ip, already=0).startswith("450 ")
    # every good client is counted (limited), and stays under its limits
    for ip in ("10.0.0.1", "10.0.0.255", "198.18.0.51"):
        assert _limits_for(config, ip) == [[1_000_000_000, 60]]
        assert _answer(config, ip, already=1_000_000) == "DUNNO"


def test_rate_limit_modes() -> None:
    assert [w for _n, w in _rate_limit("debian")["limits"]] == [60, 86400]
    only = _rate_limit("penalized-only")
    for i in range(50):
        assert _limits_for(only, penalized_address(i)) == [[0, 60]]
    for ip in ("10.0.0.1", "198.18.0.51", "198.18.1.1"):
        assert _limits_for(only, ip) is None  # never touches the database
        assert _answer(only, ip, already=0) == "DUNNO"


def test_penalized_list_is_what_the_load_generator_draws() -> None:
    lines = peers.penalized_list(50).splitlines()
    assert lines[0] == "198.18.0.1"
    assert lines[-1] == "198.18.0.50"
    assert len(set(lines)) == 50
    assert peers.penalized_list(251).splitlines()[-1] == "198.18.1.1"  # 250 a /24


def test_postfwd_rule() -> None:
    rule = peers.postfwd_rules(Path("/tmp/w/penalized.txt"))
    assert rule.endswith("\n")
    assert rule.count("\n") == 1  # one rule; no match: postfwd's default DUNNO
    items = dict(part.strip().split("=", 1) for part in rule.strip().split(";"))
    assert items["id"] == "PENALIZED"
    assert items["client_address"] == "file:/tmp/w/penalized.txt"
    assert items["action"] == "450 4.7.1 too many SMTP errors from $$client_address"


def test_command_lines() -> None:
    grey = peers.postgrey_args(
        port=4321, dbdir=Path("/d/db"), whitelists=Path("/d/wl"), user="u", group="g"
    )
    assert "--inet=127.0.0.1:4321" in grey
    assert "--dbdir=/d/db" in grey
    assert "--whitelist-clients=/d/wl/whitelist_clients" in grey
    assert not any(a in grey for a in ("-d", "--daemonize"))  # the foreground
    fwd = peers.postfwd_args(port=4322, rules=Path("/s/cf"), state=Path("/s"), user="u", group="g")
    pairs = dict(zip(fwd[::2], fwd[1::2], strict=False))
    assert pairs["-f"] == "/s/cf"
    assert pairs["--server_socket"] == "tcp:127.0.0.1:4322"
    assert pairs["--cache_socket"] == "unix::/s/cache.sock"  # not /var/tmp
    assert pairs["--pidfile"] == "/s/master.pid"
    assert (pairs["-u"], pairs["-g"]) == ("u", "g")
    assert fwd[-len(peers.POSTFWD_DEBIAN_ARGS) :] == list(peers.POSTFWD_DEBIAN_ARGS)


def test_tree_cpu_counts_children_that_have_exited() -> None:
    me = os.getpid()
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        assert child.pid in peers.tree_pids(me)
    finally:
        child.kill()
        child.wait()
    before = sum(peers.tree_cpu(me))
    burn = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.3: pass"
    subprocess.run([sys.executable, "-c", burn], check=True, timeout=30)
    assert sum(peers.tree_cpu(me)) - before >= 0.25  # the reaped child's, via cutime


def test_connected_counts_established_client_sockets() -> None:
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        assert peers.connected(port) == 0
        with socket.create_connection(("127.0.0.1", port)):
            assert peers.connected(port) == 1


def _round(server: str, rps: float, p50: int, cpu: float, **kw: Any) -> dict[str, Any]:
    base = {"server": server, "req_per_s": rps, "p50_us": p50, "p99_us": p50 * 4,
            "cpu_us_per_request": cpu, "backend_us_per_request": None,
            "requests": 1000, "dunno": 900, "tempfail": 100, "other": 0, "errors": 0}  # fmt: skip
    return base | kw


ROUNDS = [
    _round("penalty-policyd", 30_000, 900, 22.0, backend_us_per_request=10.0),
    _round("postgrey", 4_000, 7_000, 200.0, dunno=0, tempfail=0, other=1000),
    _round("penalty-policyd", 20_000, 1_100, 26.0, backend_us_per_request=14.0),
    _round("postgrey", 5_000, 6_000, 190.0, dunno=0, tempfail=0, other=1000),
    _round("penalty-policyd", 27_000, 1_000, 24.0, backend_us_per_request=12.0),
    _round("postgrey", 3_000, 8_000, 210.0, dunno=0, tempfail=0, other=998, errors=2),
]


def test_summary_takes_medians_and_answer_shares() -> None:
    summary = peers.summarize(ROUNDS)
    assert list(summary) == ["penalty-policyd", "postgrey"]  # in order of appearance
    ours = summary["penalty-policyd"]
    assert (ours["rounds"], ours["req_per_s"], ours["p50_us"]) == (3, 27_000, 1_000)
    assert (ours["cpu_us_per_request"], ours["backend_us_per_request"]) == (24.0, 12.0)
    assert (ours["dunno_share"], ours["tempfail_share"], ours["other_share"]) == (0.9, 0.1, 0.0)
    grey = summary["postgrey"]
    assert grey["req_per_s"] == 4_000
    assert grey["backend_us_per_request"] is None
    assert grey["other_share"] == pytest.approx(2998 / 3000)
    assert grey["errors"] == 2


def test_ratios_are_penalty_policyd_over_the_peer() -> None:
    x = peers.ratios(peers.summarize(ROUNDS))
    assert list(x) == ["postgrey"]
    assert x["postgrey"]["req_per_s"] == pytest.approx(27_000 / 4_000)
    assert x["postgrey"]["cpu_per_request"] == pytest.approx(200.0 / 24.0)
    dead = peers.summarize([*ROUNDS, _round("postfwd2", 0.0, 0, 0.0)])
    assert peers.ratios(dead)["postfwd2"]["req_per_s"] == float("inf")


def test_table() -> None:
    table = peers.format_table(peers.summarize(ROUNDS)).splitlines()
    assert table[0].split()[:5] == ["server", "req/s", "p50", "p99", "CPU"]
    assert set(table[1]) <= {"-", " "}
    ours, grey = table[2], table[3]
    assert ours.startswith("penalty-policyd")
    assert "27,000" in ours
    assert "24.0 (+12.0 penaltyd)" in ours
    assert "90% DUNNO, 10% 4xx" in ours
    assert grey.startswith("postgrey")
    assert "4,000" in grey
    assert "7.00 ms" in grey  # p50 in ms
    assert "6.8x" in grey  # 27,000 / 4,000
    assert "100% other, 2 errors" in grey
    # without penalty-policyd in the run there is no ratio, and no failure
    alone = peers.format_table(peers.summarize(ROUNDS[1::2])).splitlines()
    assert alone[2].startswith("postgrey")
    assert "x " not in alone[2]


def test_fixed_rate_load_args_and_table() -> None:
    assert peers.Load(rate=18_000.4).args()[:2] == ["-R", "18000"]
    assert "-R" not in peers.Load().args()
    rounds = [
        _round("penalty-policyd", 18_000, 300, 28.0, p99_us=2_500, backend_us_per_request=14.0),
        _round(peers.FLOOR, 18_000, 80, 12.0, p99_us=900),
    ]
    fixed = {"factor": 1.2, "rate": 18_000.0, "rounds": rounds, "summary": peers.summarize(rounds)}
    text = peers.format_fixed(fixed)
    assert "fixed offered rate 18,000 req/s (1.2 x policyd-rate-limit)" in text
    ours = text.splitlines()[1]
    assert "penalty-policyd" in ours
    assert "p99 2.50 ms (rounds 2.50 ms)" in ours
    assert "28.0 µs/req (+14.0 penaltyd)" in ours


def test_the_floor_and_the_generators_fixed_rate_mode(tmp_path: Path) -> None:
    """bench.policy_floor answers DUNNO per request, however the bytes are split; the
    load generator's -R mode drives it and says what it offered."""
    binary = policyd_bench.build(tmp_path)
    port = free_port()
    floor = subprocess.Popen(
        [sys.executable, "-m", "bench.policy_floor", "--listen", f"127.0.0.1:{port}"]
    )
    try:
        wait_port("127.0.0.1", port, proc=floor)
        with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
            conn.sendall(b"request=smtpd_access_policy\nprotocol_state=RCPT\n\nrequest=smtpd_")
            conn.sendall(b"access_policy\n\n")
            got = b""
            while got.count(b"\n\n") < 2:
                got += conn.recv(4096)
            assert got == DUNNO_ANSWER * 2
        out = subprocess.run(
            [str(binary), "-p", str(port), "-c", "4", "-R", "400", "-d", "0.5", "-w", "0"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        )
        result = json.loads(out.stdout)
        assert result["offered_per_s"] == 400
        assert result["requests"] > 0
        assert result["dunno"] == result["requests"]
        assert result["errors"] == 0
        assert "late" in result
    finally:
        floor.terminate()
        floor.wait(10)
