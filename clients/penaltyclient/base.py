"""What the asyncio and the blocking client share: configuration, stubs, the live
replica's state and the retry rule. Each subclass only brings its transport (a grpc.aio
or a blocking channel) and how it follows the watch stream (a task or a thread)."""

from __future__ import annotations

import os
import random
import time
from collections.abc import Callable, Sequence
from typing import Any

import grpc

from penalty.identity import IdentityRules
from penalty.v1 import penalty_pb2_grpc as pbg
from penaltyclient.replica import ReplicaState


def service_token_from_env() -> str:
    """The MX's PenaltyService token: `PENALTYD_TOKEN`, or the first line of the file
    named by `PENALTYD_TOKEN_FILE` (so every sidecar picks it up without a flag)."""
    token = os.environ.get("PENALTYD_TOKEN", "")
    path = os.environ.get("PENALTYD_TOKEN_FILE", "")
    if not token and path:
        with open(path, encoding="utf-8") as fh:
            token = fh.readline().strip()
    return token


#: How long a live replica keeps answering from its last state after its watch stream
#: ended for a reason that loses no change (the server recycling its connections).
KEEP_ANSWERING_SECONDS = 1.0


def keep_answering(code: grpc.StatusCode, details: str) -> float:
    """Seconds the replica may keep answering while it re-watches, after a stream end.

    penaltyd recycles connections every few minutes (`max_connection_age`) so clients
    rebalance: the stream ends UNAVAILABLE and nothing was missed, so the replica keeps
    answering while the next snapshot arrives (a fraction of a second) instead of sending
    every check to penaltyd meanwhile. An end that says changes may have been missed
    (penaltyd's feed resynced, the watcher fell behind) or any other error drops it at once.
    """
    if code == grpc.StatusCode.UNAVAILABLE and "feed" not in details:
        return KEEP_ANSWERING_SECONDS
    return 0.0


#: Only a refused or dropped connection is worth another try inside the deadline.
RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE})


class ClientBase:
    _make_channel: Callable[[str | Sequence[str], grpc.ChannelCredentials | None], Any]

    def __init__(
        self,
        target: str | Sequence[str],
        *,
        deadline: float = 0.2,
        retries: int = 2,
        backoff: float = 0.01,
        credentials: grpc.ChannelCredentials | None = None,
        admin_token: str = "",
        admin_deadline: float = 5.0,
        service_token: str | None = None,
        live_replica: bool = False,
        rules: IdentityRules | None = None,
    ) -> None:
        self.channel = type(self)._make_channel(target, credentials)
        self.service = pbg.PenaltyServiceStub(self.channel)
        self.admin = pbg.PenaltyAdminStub(self.channel)
        self.deadline = deadline
        self.retries = retries
        self.backoff = backoff
        self.admin_deadline = admin_deadline
        self._metadata = (("authorization", f"Bearer {admin_token}"),) if admin_token else ()
        token = service_token if service_token is not None else service_token_from_env()
        # Sent with every PenaltyService call when penaltyd requires it (`service_auth`).
        self._service_metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self.replica = ReplicaState(rules) if live_replica else None
        self.degraded_answers = 0
        self._last_warning = 0.0
        self._started()

    def _started(self) -> None:
        """Hook for what a transport starts at construction (the sync client's thread)."""

    def _retry_pause(self, code: grpc.StatusCode, attempt: int, end: float) -> float | None:
        """Seconds to wait before attempt `attempt + 1`, or None: give up (re-raise).

        Exponential backoff with jitter, only for `UNAVAILABLE`, only while the pause
        still ends inside the caller's deadline (`end`, monotonic)."""
        pause: float = self.backoff * (2 ** (attempt - 1)) * (0.5 + random.random())
        if code not in RETRYABLE or attempt > self.retries or time.monotonic() + pause >= end:
            return None
        return pause

    def _warn_once_in_a_while(self) -> bool:
        """Rate-limit the fail-open warning: one line every 5 s at most."""
        self.degraded_answers += 1
        now = time.monotonic()
        if now - self._last_warning > 5:
            self._last_warning = now
            return True
        return False
