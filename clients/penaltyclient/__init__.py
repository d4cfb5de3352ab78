"""penaltyclient: what runs on MX nodes.

- `AsyncPenaltyClient` / `PenaltyClient`: checks and reports with deadlines, retries,
  fail-open answers, client-side round robin and an optional in-process live replica;
  admin calls for tooling.
- `SessionReporter`: batched reports over one Session stream.
- Console scripts: `penalty-policyd` (Postfix policy server), `penalty-milter`,
  `penalty-logwatch`, `penaltyctl`.
"""

from penaltyclient.aio import AsyncPenaltyClient, PenaltydError, SessionReporter
from penaltyclient.replica import ReplicaState
from penaltyclient.sync import PenaltyClient

__all__ = [
    "AsyncPenaltyClient",
    "PenaltyClient",
    "PenaltydError",
    "ReplicaState",
    "SessionReporter",
]
