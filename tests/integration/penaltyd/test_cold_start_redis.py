"""Cold start on a real redis-server (issue 15): the bound penalty lives in the address's
window hash like any other, so the Lua scripts carry it unchanged; the engine decides."""

from __future__ import annotations

from penalty.v1 import penalty_pb2 as pb
from penaltyd.store.redis import RedisStore
from tests.harness.builders import ACCEPTED, UNKNOWN
from tests.harness.inprocess import ServeFactory

CGNAT = "100.64.9.9"
BOT = pb.Client(ip=CGNAT, helo="bot.spam.example", mail_from="offers@spam.example")
USER = pb.Client(ip=CGNAT, helo="pc-1.home.example", mail_from="alice@home.example")
DISGUISED = pb.Client(ip=CGNAT, helo="mail.innocent.example", mail_from="a@innocent.example")


def report(client: pb.Client, outcome: pb.Outcome.ValueType) -> pb.ReportRequest:
    return pb.ReportRequest(client=client, counts=[pb.OutcomeCount(outcome=outcome, n=1)])


async def test_a_bound_penalty_on_redis(serve: ServeFactory, redis_url: str) -> None:
    pd = await serve(RedisStore(redis_url), identity_key="r" * 32)
    verdicts = [await pd.service.Report(report(BOT, UNKNOWN)) for _ in range(25)]
    fired = next(v for v in verdicts if v.tempfail)
    assert fired.identity == CGNAT
    assert fired.client
    assert "binds one client of the address" in fired.reason

    async def check(client: pb.Client) -> pb.Verdict:
        verdict: pb.Verdict = await pd.service.Check(pb.CheckRequest(client=client))
        return verdict

    assert (await check(BOT)).tempfail
    assert (await check(pb.Client(ip=CGNAT))).tempfail  # by address alone
    assert not (await check(USER)).tempfail
    for _ in range(5):
        assert not (await pd.service.Report(report(USER, ACCEPTED))).tempfail
    ex = await pd.admin.Explain(pb.ExplainRequest(client=USER))
    assert ex.distinct_sub_identities == 2
    # A spammer shedding HELO and sender: a newcomer, deferred on its few errors.
    answers = [await pd.service.Report(report(DISGUISED, UNKNOWN)) for _ in range(4)]
    assert answers[-1].tempfail
    assert answers[-1].identity.startswith(CGNAT + "#")
    assert (await check(DISGUISED)).tempfail
    assert not (await check(USER)).tempfail
