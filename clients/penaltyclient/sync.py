"""The blocking client, for scripts and threaded MTAs' helpers.

Same behaviour as `AsyncPenaltyClient`: deadlines, retries inside the deadline, fail-open
`check`/`report`, raised errors for admin calls, and an optional live replica fed by a
daemon thread that follows `WatchPenalties`.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Iterator
from typing import Any

import grpc

from penalty.v1 import penalty_pb2 as pb
from penaltyclient.aio import Counts, PenaltydError, client_msg, outcome_counts
from penaltyclient.base import ClientBase, keep_answering
from penaltyclient.channel import sync_channel

log = logging.getLogger("penaltyclient")


class PenaltyClient(ClientBase):
    _make_channel = staticmethod(sync_channel)
    _watch: Any = None

    def _started(self) -> None:
        self._closed = threading.Event()
        if self.replica is not None:
            threading.Thread(target=self._follow, name="penalty-live-replica", daemon=True).start()

    def __enter__(self) -> PenaltyClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._closed.set()
        if self._watch is not None:
            self._watch.cancel()
        self.channel.close()

    def _call(self, method: Any, request: Any) -> Any:
        end = time.monotonic() + self.deadline
        attempt = 0
        while True:
            try:
                return method(
                    request,
                    timeout=max(end - time.monotonic(), 0.001),
                    metadata=self._service_metadata or None,
                )
            except grpc.RpcError as exc:
                attempt += 1
                pause = self._retry_pause(exc.code(), attempt, end)
                if pause is None:
                    raise
                time.sleep(pause)

    def _guarded(self, what: str, method: Any, request: Any) -> pb.Verdict:
        try:
            verdict: pb.Verdict = self._call(method, request)
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.INVALID_ARGUMENT:
                raise PenaltydError(exc.code(), exc.details() or "") from exc
            if self._warn_once_in_a_while():
                log.warning("penaltyd %s failed (%s): answering no penalty", what, exc.code().name)
            return pb.Verdict(degraded=True)
        return verdict

    def check(
        self, ip: str, helo: str = "", mail_from: str = "", fingerprint: str = ""
    ) -> pb.Verdict:
        if self.replica is not None:
            local = self.replica.check(ip, helo, mail_from, fingerprint)
            if local is not None:
                return local
        return self._guarded(
            "check",
            self.service.Check,
            pb.CheckRequest(client=client_msg(ip, helo, mail_from, fingerprint)),
        )

    def report(
        self, ip: str, counts: Counts, helo: str = "", mail_from: str = "", fingerprint: str = ""
    ) -> pb.Verdict:
        req = pb.ReportRequest(
            client=client_msg(ip, helo, mail_from, fingerprint), counts=outcome_counts(counts)
        )
        return self._guarded("report", self.service.Report, req)

    def wait_synced(self, within: float = 5.0) -> bool:
        end = time.monotonic() + within
        while self.replica is not None and not self.replica.synced:
            if time.monotonic() > end:
                return False
            time.sleep(0.01)
        return True

    def _follow(self) -> None:
        assert self.replica is not None
        backoff = 0.05
        while not self._closed.is_set():
            keep = 0.0
            try:
                self._watch = self.service.WatchPenalties(
                    pb.WatchRequest(chunked_snapshot=True), metadata=self._service_metadata or None
                )
                for event in self._watch:
                    self.replica.apply(event)
                    backoff = 0.05
            except grpc.RpcError as exc:
                if self._closed.is_set():
                    return
                keep = keep_answering(exc.code(), exc.details() or "")
                log.info("penalty watch ended (%s); re-watching", exc.code().name)
            except ValueError:  # the channel was closed under us
                return
            self.replica.reset(keep)
            self._closed.wait(backoff * (0.5 + random.random()))
            backoff = min(backoff * 2, 2.0)

    # --- admin

    def _admin(self, method: Any, request: Any) -> Any:
        try:
            return method(request, timeout=self.admin_deadline, metadata=self._metadata)
        except grpc.RpcError as exc:
            raise PenaltydError(exc.code(), exc.details() or "") from exc

    def explain(
        self,
        ip: str,
        helo: str = "",
        mail_from: str = "",
        fingerprint: str = "",
        *,
        actor: str = "",
        note: str = "",
    ) -> pb.Explanation:
        result: pb.Explanation = self._admin(
            self.admin.Explain,
            pb.ExplainRequest(
                client=client_msg(ip, helo, mail_from, fingerprint), actor=actor, note=note
            ),
        )
        return result

    def reputation(
        self, ip: str = "", network: str = "", *, actor: str = "", note: str = ""
    ) -> pb.ReputationAnswer:
        """An address's reputation and its neighbourhood's, or one network's (audited)."""
        req = pb.ReputationRequest(actor=actor, note=note, network=network)
        if ip:
            req.client.CopyFrom(pb.Client(ip=ip))
        result: pb.ReputationAnswer = self._admin(self.admin.Reputation, req)
        return result

    def worst_neighbourhoods(
        self, limit: int = 20, *, actor: str = "", note: str = ""
    ) -> pb.WorstNeighbourhoodsResponse:
        """The neighbourhoods with the most (decayed) weighted errors, worst first."""
        req = pb.WorstNeighbourhoodsRequest(limit=limit, actor=actor, note=note)
        result: pb.WorstNeighbourhoodsResponse = self._admin(self.admin.WorstNeighbourhoods, req)
        return result

    def disclose(self, ip: str, *, actor: str, note: str) -> pb.Disclosure:
        """Everything penaltyd holds about `ip` and every client behind it (a data
        request: `actor` and `note`, the case reference, are required and audited)."""
        result: pb.Disclosure = self._admin(
            self.admin.Disclose,
            pb.DiscloseRequest(client=pb.Client(ip=ip), actor=actor, note=note),
        )
        return result

    def lift(
        self, ip: str, actor: str = "", note: str = "", helo: str = "", mail_from: str = ""
    ) -> pb.LiftResponse:
        result: pb.LiftResponse = self._admin(
            self.admin.Lift,
            pb.LiftRequest(client=client_msg(ip, helo, mail_from), actor=actor, note=note),
        )
        return result

    def stats(self) -> pb.StatsResponse:
        result: pb.StatsResponse = self._admin(self.admin.Stats, pb.StatsRequest())
        return result

    def allow(
        self, cidr: str, ttl_seconds: int = 0, note: str = "", actor: str = ""
    ) -> pb.AllowEntry:
        result: pb.AllowEntry = self._admin(
            self.admin.Allow,
            pb.AllowRequest(cidr=cidr, ttl_seconds=ttl_seconds, note=note, actor=actor),
        )
        return result

    def remove_allow(self, cidr: str, actor: str = "", note: str = "") -> bool:
        return bool(
            self._admin(
                self.admin.RemoveAllow, pb.RemoveAllowRequest(cidr=cidr, actor=actor, note=note)
            ).removed
        )

    def allowlist(self) -> list[pb.AllowEntry]:
        return list(self._admin(self.admin.ListAllowlist, pb.ListAllowlistRequest()).entries)

    def penalties(
        self, page_size: int = 500, *, actor: str = "", note: str = ""
    ) -> Iterator[pb.Penalty]:
        token = ""
        while True:
            page = self._admin(
                self.admin.ListPenalties,
                pb.ListPenaltiesRequest(
                    page_size=page_size, page_token=token, actor=actor, note=note
                ),
            )
            yield from page.penalties
            token = page.next_page_token
            if not token:
                return

    def watch(self) -> Iterator[pb.PenaltyEvent]:
        try:
            yield from self.service.WatchPenalties(
                pb.WatchRequest(), metadata=self._service_metadata or None
            )
        except grpc.RpcError as exc:
            raise PenaltydError(exc.code(), exc.details() or "") from exc
