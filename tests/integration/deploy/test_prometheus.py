"""A real Prometheus scrapes a real penaltyd and relaycheck under a Redis stall: every
dashboard query and every alert expression, through Prometheus's HTTP API.

The parts are all real: a redis-server on a free loopback port, `penaltyd` and
`relaycheck serve` as child processes on it (their real CLIs, metrics on their own
ports), and Debian's `prometheus` scraping both every second with both rule files loaded:
the plain-host rules (deploy/prometheus/rules.yml, labels job/instance) and the
PrometheusRule's groups (deploy/k8s/base/prometheusrule.yaml, labels namespace/pod; the
scrape config gives each target the namespace and pod labels Kubernetes service discovery
would). The alerts' `for` durations (2 to 10 minutes) are shortened to FOR so a
minute-long test can see them fire; their expressions are unchanged.

Traffic (checks and reports to penaltyd, Classify to relaycheck, one Probe) flows in a
bounded loop; then Redis stalls: a separate connection issues `CLIENT PAUSE` of 55 ms
back to back (a bounded loop), longer than a report's 50 ms deadline. During the stall:
- PenaltydRedisLatencyHigh fires for op="report" (timeouts are observed at their
  deadline), and so do PenaltydDegraded and PenaltydFleetDegraded, in both rule sets; no
  other alert expression returns anything (checks are still answered from the in-process
  view, so PenaltydChecksFailingOpen stays quiet, and a penalized client still gets its
  tempfail);
- every query of deploy/grafana/penaltyd-dashboard.json returns data (Grafana's
  variables substituted as Grafana would), and the p99 store latency panel shows the
  stall (report latency at or above its 50 ms deadline).
Nothing here waits a fixed time: a scrape has no event, so each check polls the HTTP API
until it holds or its deadline passes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import re
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import redis.asyncio as aioredis
import yaml

from deploy.checks.config import ROOT
from deploy.prometheus import generate
from penalty.v1 import penalty_pb2_grpc as pbg
from relaycheck.v1 import relaycheck_pb2 as rpb
from relaycheck.v1 import relaycheck_pb2_grpc as rpbg
from tests.harness.builders import ACCEPTED, UNKNOWN, check, eventually, report
from tests.harness.ports import free_port, free_ports
from tests.harness.processes import PenaltydProcess, RelaycheckProcess
from tests.harness.prometheus import PrometheusServer
from tests.harness.redis import RedisServer

DASHBOARD = ROOT / "deploy" / "grafana" / "penaltyd-dashboard.json"
HOST_RULES = ROOT / "deploy" / "prometheus" / "rules.yml"

SCRAPE_S = 1  # scrape and evaluation interval (seconds)
FOR = "2s"  # every alert's `for`, shortened
NAMESPACE = "penaltyd"  # the namespace label the scrape config gives every target
# Grafana: $__interval is the panel's resolution, at least the data source's scrape
# interval; $__rate_interval = max($__interval + scrape interval, 4 * scrape interval).
GRAFANA_VARS = {
    "__rate_interval": f"{max(SCRAPE_S + SCRAPE_S, 4 * SCRAPE_S)}s",
    "__interval": f"{SCRAPE_S}s",
    "__range": "5m",
    "namespace": NAMESPACE,  # one selected value of the multi-value variable
}
PAUSE_MS = 55  # longer than report_timeout_ms (50): every report in a pause times out
STALL_MAX_S = 40.0  # the pause loop stops by itself after this, whatever the test does
TRAFFIC_MAX_S = 60.0
WAIT_S = 25.0  # how long any one condition may take to show in Prometheus

ACME = rpb.Customer(id="acme", relay_networks=["198.51.100.8/29"], domains=["acme.example"])
SPAM = (
    b"Received: from spam.example.net (unknown [203.0.113.66])\r\n"
    b"\tby mail.acme.example (Postfix) with ESMTP id 1 for <v@example.org>; date\r\n"
    b"From: ceo@acme.example\r\n\r\nbody\r\n"
)
EXPECTED_DURING_STALL = {"PenaltydDegraded", "PenaltydFleetDegraded", "PenaltydRedisLatencyHigh"}


# --- the rules and the dashboard, as the test's Prometheus and Grafana would see them


def _rule_sets() -> dict[str, dict[str, Any]]:
    """{"host": rules.yml, "k8s": the PrometheusRule's groups}, each a rule file with its
    group names suffixed and every `for` shortened to FOR."""
    sets = {
        "host": yaml.safe_load(HOST_RULES.read_text()),
        "k8s": {"groups": yaml.safe_load(generate.SOURCE.read_text())["spec"]["groups"]},
    }
    for name, doc in sets.items():
        for group in doc["groups"]:
            group["name"] = f"{group['name']}-{name}"
            for rule in group["rules"]:
                if "for" in rule:
                    rule["for"] = FOR
    return sets


def _grafana(expr: str) -> str:
    """A panel's query with the dashboard's variables substituted as Grafana does."""

    def var(m: re.Match[str]) -> str:
        name = m.group(1) or m.group(2)
        if name not in GRAFANA_VARS:
            raise AssertionError(f"dashboard variable ${name} has no test value: {expr}")
        return GRAFANA_VARS[name]

    return re.sub(r"\$\{(\w+)\}|\$(\w+)", var, expr)


def _dashboard() -> dict[str, Any]:
    board: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return board


def _dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, query) for every query of every panel, rows included."""
    out: list[tuple[str, str]] = []

    def walk(panels: list[dict[str, Any]]) -> None:
        for panel in panels:
            walk(panel.get("panels", []))
            for target in panel.get("targets", []):
                if target.get("expr"):
                    out.append((panel["title"], _grafana(target["expr"])))

    walk(_dashboard()["panels"])
    return out


def _finite(samples: list[dict[str, Any]]) -> list[float]:
    return [v for s in samples if math.isfinite(v := float(s["value"][1]))]


# --- the parts


@contextlib.contextmanager
def _services() -> Iterator[tuple[RedisServer, PenaltydProcess, RelaycheckProcess, list[str]]]:
    """Redis, penaltyd and relaycheck on it; the last item is their metrics addresses."""
    pd_metrics, rc_metrics, rc_port = (f"127.0.0.1:{p}" for p in free_ports(3))
    with RedisServer() as node:
        pd = PenaltydProcess("--redis-url", node.url, "--metrics-listen", pd_metrics)
        rc = RelaycheckProcess(
            "--redis-url", node.url, "--metrics-listen", rc_metrics,
            port=int(rc_port.rsplit(":", 1)[1]), env={"RELAYCHECK_PENALTYD": pd.address},
        )  # fmt: skip
        with pd, rc:
            yield node, pd, rc, [pd_metrics, rc_metrics]


class Counts(dict[str, int]):
    """What the traffic loop saw; `rounds(n)` waits for n more rounds to complete."""

    def __init__(self, *names: str) -> None:
        super().__init__(dict.fromkeys(names, 0))
        self.done = asyncio.Condition()

    async def round_done(self) -> None:
        self["rounds"] += 1
        async with self.done:
            self.done.notify_all()

    async def rounds(self, n: int, within: float) -> None:
        target = self["rounds"] + n
        async with asyncio.timeout(within), self.done:
            await self.done.wait_for(lambda: self["rounds"] >= target)


@contextlib.asynccontextmanager
async def _traffic(pd: PenaltydProcess, rc: RelaycheckProcess) -> AsyncIterator[Counts]:
    """Checks and reports to penaltyd, Classify to relaycheck, in a bounded loop paced at
    about 50 rounds a second; a new offender (a penalty) every tenth round, and a check of
    the first offender (a "veteran", penalized for 300 s) every round."""
    counts = Counts("rounds", "tempfail", "degraded", "veteran", "veteran_tempfail")
    stop = asyncio.Event()
    async with (
        grpc.aio.insecure_channel(pd.address) as pd_channel,
        grpc.aio.insecure_channel(rc.address) as rc_channel,
    ):
        penalty = pbg.PenaltyServiceStub(pd_channel)
        relay = rpbg.RelayCheckStub(rc_channel)
        await relay.UpsertCustomer(ACME, timeout=10)
        closed = free_port()  # nothing listens there: the battery ends with an error at once
        probe = rpb.ProbeRequest(host="127.0.0.1", port=closed, step_timeout_ms=500, budget_ms=1000)
        assert (await relay.Probe(probe, timeout=10)).error
        relayed = rpb.ClassifyRequest(
            client_ip="198.51.100.10", headers=SPAM, rcpt_to=["v@example.org"]
        )

        # The veteran: penalized before the loop starts, and in the in-process view.
        veteran = "192.0.2.1"

        async def penalized() -> bool:
            await penalty.Report(report(veteran, UNKNOWN, 30), timeout=5)
            return bool((await penalty.Check(check(veteran), timeout=5)).tempfail)

        await eventually(penalized, bool, within=WAIT_S)

        async def loop() -> None:
            started = time.monotonic()
            offender = ""
            while not stop.is_set() and time.monotonic() - started < TRAFFIC_MAX_S:
                i = counts["rounds"]
                clean = f"198.51.100.{i % 200}"
                if i % 10 == 0:
                    offender = f"203.0.{113 - (i // 2560) % 2}.{(i // 10) % 256}"
                    await penalty.Report(report(offender, UNKNOWN, 30), timeout=5)
                await penalty.Report(report(clean, ACCEPTED, 3), timeout=5)
                for ip in (offender, clean, veteran):
                    verdict = await penalty.Check(check(ip), timeout=5)
                    counts["tempfail"] += verdict.tempfail
                    counts["degraded"] += verdict.degraded
                counts["veteran"] += 1
                counts["veteran_tempfail"] += verdict.tempfail
                await relay.Classify(relayed, timeout=5)
                await counts.round_done()
                await asyncio.sleep(0.02)  # pacing, not synchronisation

        task = asyncio.create_task(loop())
        try:
            yield counts
        finally:
            stop.set()
            await task


@contextlib.asynccontextmanager
async def _stall(node: RedisServer) -> AsyncIterator[dict[str, int]]:
    """Redis stalls: CLIENT PAUSE of PAUSE_MS, issued again as soon as the last one ends
    (the pausing connection's own next command waits for it), on a connection of its own;
    stops when the block exits or after STALL_MAX_S."""
    counts = {"pauses": 0}
    stop = asyncio.Event()
    client = aioredis.Redis(port=node.port)

    async def loop() -> None:
        started = time.monotonic()
        while not stop.is_set() and time.monotonic() - started < STALL_MAX_S:
            await client.client_pause(PAUSE_MS)  # CLIENT PAUSE 55 ALL
            counts["pauses"] += 1
        await client.client_unpause()

    task = asyncio.create_task(loop())
    try:
        yield counts
    finally:
        stop.set()
        await task
        await client.aclose()


class Api:
    """The test's view of Prometheus's HTTP API, off the event loop."""

    def __init__(self, prom: PrometheusServer) -> None:
        self.prom = prom

    async def query(self, expr: str) -> list[dict[str, Any]]:
        return await asyncio.to_thread(self.prom.query, expr)

    async def until(self, expr: str, ok: Any = bool) -> list[dict[str, Any]]:
        """Poll the instant query until `ok(samples)` (a scrape has no event)."""

        async def probe() -> list[dict[str, Any]]:
            return await self.query(expr)

        result: list[dict[str, Any]] = await eventually(probe, ok, within=WAIT_S)
        return result

    async def get(self, path: str, **params: str) -> Any:
        return await asyncio.to_thread(self.prom.api, path, **params)


# --- the test


@pytest.mark.timeout(150)
async def test_dashboard_and_alerts_under_a_redis_stall(tmp_path: Path) -> None:
    t0 = time.monotonic()
    sets = _rule_sets()
    rule_files = []
    for name, doc in sets.items():
        rule_files.append(path := tmp_path / f"{name}-rules.yml")
        path.write_text(yaml.safe_dump(doc, sort_keys=False))
    with _services() as (node, pd, rc, (pd_metrics, rc_metrics)):
        jobs = {
            "penaltyd": [(pd_metrics, {"namespace": NAMESPACE, "pod": "penaltyd-0"})],
            "relaycheck": [(rc_metrics, {"namespace": NAMESPACE, "pod": "relaycheck-0"})],
        }
        with PrometheusServer(jobs, rule_files) as prom:
            api = Api(prom)
            await api.until("up == 1", lambda s: len(s) == 2)
            groups = (await api.get("rules"))["groups"]
            loaded = [r for g in groups for r in g["rules"]]
            assert len(loaded) == sum(len(g["rules"]) for d in sets.values() for g in d["groups"])
            assert {r["health"] for r in loaded} == {"ok"}, loaded

            # Checks are answered from the in-process view once it is synced: wait for
            # that, so no check of the test ever needs the store.
            await api.until("penaltyd_feed_synced == 1")
            async with _traffic(pd, rc) as traffic:
                # Before the stall: the traffic shows in Prometheus.
                await api.until(
                    "sum(penaltyd_penalties_started_total) > 0"
                    " and sum(penaltyd_reports_total) > 0"
                    " and sum(relaycheck_classifications_total) > 0"
                    " and sum(relaycheck_penaltyd_reports_total) > 0"
                    " and sum(relaycheck_probes_total) > 0"
                )
                assert traffic["veteran_tempfail"] == traffic["veteran"] > 0

                async with _stall(node) as stall:
                    stalled = time.monotonic()
                    await _the_stall_alerts_fire(api)
                    fired_after = time.monotonic() - stalled
                    await _every_alert_expression(api, sets)
                    await _every_dashboard_query(api)
                    await _latency_panel_shows_the_stall(api)
                    # Checks are still answered from the in-process view: the veteran
                    # keeps getting its tempfail, nothing answers degraded.
                    checked = traffic["veteran"]
                    await traffic.rounds(5, within=WAIT_S)
                    assert traffic["veteran"] >= checked + 4  # a round may be under way
                    assert traffic["veteran_tempfail"] == traffic["veteran"]
                    assert traffic["degraded"] == 0
                    assert (
                        await api.query('sum(penaltyd_checks_total{result="degraded"}) > 0') == []
                    )
                    assert await api.query('sum(penaltyd_store_timeouts_total{op="report"}) > 0')
                    pauses = stall["pauses"]
                assert pauses > 10
    print(
        f"alerts firing {fired_after:.1f} s into the stall; {traffic['rounds']} traffic "
        f"rounds, {pauses} pauses of {PAUSE_MS} ms; {time.monotonic() - t0:.1f} s in all"
    )


async def _the_stall_alerts_fire(api: Api) -> None:
    """The stall's alerts fire in both rule sets: the alerts API, then ALERTS."""
    want = {(a, s) for a in EXPECTED_DURING_STALL for s in ("host", "k8s")}

    async def firing() -> set[tuple[str, str]]:
        return {
            (a["labels"]["alertname"], "k8s" if "namespace" in a["labels"] else "host")
            for a in await asyncio.to_thread(api.prom.alerts)
            if a["state"] == "firing"
        }

    got = await eventually(firing, lambda f: f >= want, within=WAIT_S)
    assert {a for a, _ in got} == EXPECTED_DURING_STALL, got
    latency = await api.query('ALERTS{alertname="PenaltydRedisLatencyHigh", alertstate="firing"}')
    assert {s["metric"]["op"] for s in latency} == {"report"}, latency
    assert len(latency) == 2  # the plain-host rule and the Kubernetes one


async def _every_alert_expression(api: Api, sets: dict[str, dict[str, Any]]) -> None:
    """Each alert's expression through the query API: data for the stall's alerts (about
    this fleet), nothing for the others."""
    for rule_set, doc in sets.items():
        fleet_label = "namespace" if rule_set == "k8s" else "job"
        for rule in (r for g in doc["groups"] for r in g["rules"]):
            name, expr = rule["alert"], rule["expr"]
            if name in EXPECTED_DURING_STALL:
                got = await api.until(expr)
                assert {s["metric"][fleet_label] for s in got} == {NAMESPACE}, (rule_set, name)
            else:  # polled: a scrape the busy machine delayed may show for a moment
                await api.until(expr, lambda s: s == [])


async def _every_dashboard_query(api: Api) -> None:
    """Every panel's query returns data; a quantile a finite value (observations in its
    window). The namespace variable's own query finds the namespace."""
    queries = _dashboard_queries()
    assert len(queries) >= 20
    for _title, expr in queries:
        if "histogram_quantile" in expr:
            await api.until(expr, lambda s: bool(_finite(s)))
        else:
            await api.until(expr)
    (variable,) = [v for v in _dashboard()["templating"]["list"] if v["name"] == "namespace"]
    found = re.fullmatch(r"label_values\((\w+), *(\w+)\)", variable["definition"])
    assert found, variable["definition"]
    metric, label = found.groups()
    values = await api.get(f"label/{label}/values", **{"match[]": metric})
    assert values == [NAMESPACE]


async def _latency_panel_shows_the_stall(api: Api) -> None:
    """The p99 store latency panel, op="report": at or above the 50 ms deadline."""
    (expr,) = [e for title, e in _dashboard_queries() if title == "p99 store latency by op"]

    def report_at_deadline(samples: list[dict[str, Any]]) -> bool:
        return any(
            s["metric"].get("op") == "report" and float(s["value"][1]) >= 0.05 for s in samples
        )

    await api.until(expr, report_at_deadline)
