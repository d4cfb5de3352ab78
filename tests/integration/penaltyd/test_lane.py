"""`serving.redis.lane`: single EVALSHAs on one pipelined connection, with redis-py's
errors and its one retry after the server closed the connection."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError

from penalty.v1 import penalty_pb2 as pb
from penaltyd.engine import Engine
from penaltyd.server import make_store
from penaltyd.settings import Settings
from penaltyd.store.base import ReportItem
from penaltyd.store.redis import RedisStore
from penaltyd.validation import Validator
from serving.errors import StoreMisconfigured, StoreUnavailable
from serving.redis.errors import mapped_errors
from serving.redis.lane import LANE_PIPELINE_BYTES, LANE_PIPELINE_COMMANDS, Lane, LaneRedis
from serving.redis.topology import connect
from tests.harness.redis import RedisServer

SCRIPT = "return {KEYS[1], ARGV[1], redis.call('INCR', KEYS[1])}"


@pytest.fixture
async def own_redis() -> AsyncIterator[RedisServer]:
    server = RedisServer().start()
    yield server
    server.stop()


def _sha(server: RedisServer) -> str:
    return str(redis.Redis(port=server.port).script_load(SCRIPT))


@pytest.fixture
async def lane_and_sha(own_redis: RedisServer) -> AsyncIterator[tuple[Lane, str]]:
    """A lane on a Redis of the test's own (it may be paused or have its clients killed),
    with SCRIPT loaded."""
    lane = Lane("127.0.0.1", own_redis.port)
    try:
        yield lane, _sha(own_redis)
    finally:
        lane.close()


async def test_single_node_clients_send_evalsha_on_the_lane(redis_url: str) -> None:
    _, client, feed = connect(redis_url, 8)
    assert isinstance(client, LaneRedis)
    try:
        sha = await client.script_load(SCRIPT)
        replies = await asyncio.gather(*(client.evalsha(sha, 1, "k", i) for i in range(50)))
        # replies in order of the calls, as redis-py would return them (bytes, ints)
        assert [r[1] for r in replies] == [str(i).encode() for i in range(50)]
        assert sorted(r[2] for r in replies) == list(range(1, 51))
        assert replies[0][0] == b"k"
        assert client.lane.connects == 1
        # pipelines and other commands still go through redis-py
        pipe = client.pipeline(transaction=False)
        pipe.evalsha(sha, 1, "k", "p")
        assert (await pipe.execute())[0][2] == 51
        assert await client.get("k") == b"51"
    finally:
        await client.aclose()
        await feed.aclose()
    assert client.lane.closed


async def test_errors_are_redis_pys(redis_url: str) -> None:
    _, client, feed = connect(redis_url, 8)
    try:
        with pytest.raises(NoScriptError):
            await client.evalsha("0" * 40, 0)
        sha = await client.script_load("return redis.error_reply('WRONG no')")
        with pytest.raises(ResponseError, match="no"):
            await client.evalsha(sha, 0)
        with pytest.raises(StoreMisconfigured):
            async with mapped_errors():
                await client.evalsha(sha, 0)
        ok = await client.script_load("return 7")
        assert await client.evalsha(ok, 0) == 7  # the stream is still in step
    finally:
        await client.aclose()
        await feed.aclose()


async def test_a_restarted_redis_is_met_with_one_retry(
    own_redis: RedisServer, lane_and_sha: tuple[Lane, str]
) -> None:
    lane, sha = lane_and_sha
    assert (await lane.execute("EVALSHA", sha, 1, "k", "a"))[2] == 1
    redis.Redis(port=own_redis.port).client_kill_filter(_type="normal", skipme=True)
    # the killed connection is noticed (or the write on it fails) and the call goes on a
    # new one
    assert (await lane.execute("EVALSHA", sha, 1, "k", "b"))[2] == 2
    assert lane.connects == 2


async def test_a_dead_redis_fails_the_call_and_a_later_one_reconnects() -> None:
    first = RedisServer().start()
    lane = Lane("127.0.0.1", first.port)
    again: RedisServer | None = None
    try:
        sha = _sha(first)
        await lane.execute("EVALSHA", sha, 1, "k", "a")
        first.stop()
        await asyncio.sleep(0.05)
        with pytest.raises(RedisConnectionError):
            await lane.execute("EVALSHA", sha, 1, "k", "b")
        with pytest.raises(StoreUnavailable):
            async with mapped_errors():
                await lane.execute("EVALSHA", sha, 1, "k", "b")
        again = RedisServer(port=first.port).start()
        sha = _sha(again)
        assert (await lane.execute("EVALSHA", sha, 1, "k", "c"))[1] == b"c"
    finally:
        lane.close()
        if again is not None:
            again.stop()


async def test_callers_that_gave_up_keep_the_stream_in_step(
    own_redis: RedisServer, lane_and_sha: tuple[Lane, str]
) -> None:
    """A paused Redis: calls time out (their deadline); once it answers again, the late
    replies go to nobody and the next call gets its own reply."""
    lane, sha = lane_and_sha
    await lane.execute("EVALSHA", sha, 1, "k", "warm")
    own_redis.pause()
    try:
        for i in range(3):
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(0.05):
                    await lane.execute("EVALSHA", sha, 1, "k", f"late{i}")
    finally:
        own_redis.resume()
    assert (await lane.execute("EVALSHA", sha, 1, "k", "mine"))[1] == b"mine"


async def test_auth_and_database_are_sent_on_connect() -> None:
    with RedisServer(extra=["--requirepass", "s3cret"]) as server:
        admin = redis.Redis(port=server.port, password="s3cret")
        sha = str(admin.script_load(SCRIPT))
        lane = Lane("127.0.0.1", server.port, db=3, password="s3cret")
        try:
            await lane.execute("EVALSHA", sha, 1, "k", "x")
            assert redis.Redis(port=server.port, password="s3cret", db=3).get("k") == b"1"
        finally:
            lane.close()
        wrong = Lane("127.0.0.1", server.port, password="nope")
        try:
            with pytest.raises(StoreMisconfigured):
                async with mapped_errors():
                    await wrong.execute("EVALSHA", sha, 1, "k", "x")
        finally:
            wrong.close()


async def test_calls_made_while_a_batch_is_on_the_wire_leave_together(
    lane_and_sha: tuple[Lane, str],
) -> None:
    """Single flight: a call finding nothing on the wire is written at once; calls made
    while one is on the wire are written together, in one write, when its reply is in."""
    lane, sha = lane_and_sha
    for i in range(3):  # one at a time: each written at once, alone
        assert (await lane.execute("EVALSHA", sha, 1, "k", f"alone{i}"))[1] == b"alone%d" % i
    proto = lane._proto
    assert proto is not None
    assert (proto.writes, proto.commands) == (3, 3)
    replies = await asyncio.gather(*(lane.execute("EVALSHA", sha, 1, "k", i) for i in range(50)))
    assert [r[1] for r in replies] == [str(i).encode() for i in range(50)]
    assert [r[2] for r in replies] == list(range(4, 54))  # applied in call order
    # the first of the 50 alone, the 49 made meanwhile in one write behind it
    assert (proto.writes, proto.commands) == (5, 53)


async def test_calls_queued_behind_a_stalled_batch_leave_when_it_returns(
    own_redis: RedisServer, lane_and_sha: tuple[Lane, str]
) -> None:
    """A paused Redis: what queued behind the batch on the wire is sent once that batch
    is answered; callers that gave up meanwhile get nothing, the others their replies."""
    lane, sha = lane_and_sha
    await lane.execute("EVALSHA", sha, 1, "k", "warm")
    own_redis.pause()
    try:
        on_wire = asyncio.ensure_future(lane.execute("EVALSHA", sha, 1, "k", "wire"))
        queued = asyncio.ensure_future(lane.execute("EVALSHA", sha, 1, "k", "queued"))
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.05):
                await lane.execute("EVALSHA", sha, 1, "k", "gave-up")
    finally:
        own_redis.resume()
    assert (await on_wire)[1] == b"wire"
    assert (await queued)[1] == b"queued"
    mine = await lane.execute("EVALSHA", sha, 1, "k", "mine")
    assert mine[1] == b"mine"
    assert mine[2] == 5  # warm, wire, queued, gave-up (applied, nobody read it), mine


async def test_short_pipelines_go_on_the_lane_with_redis_pys_replies(redis_url: str) -> None:
    """A short non-transactional pipeline is one write on the lane; what it returns is
    what redis-py's pipeline returns (its reply callbacks, its errors)."""
    _, client, feed = connect(redis_url, 8)
    assert isinstance(client, LaneRedis)
    plain = redis.asyncio.Redis.from_url(redis_url)
    try:
        sha = await client.script_load(SCRIPT)
        await client.delete("lp", "lz")

        def fill(pipe: Any) -> None:
            pipe.evalsha(sha, 1, "lp", "a")
            pipe.set("lp:s", "v", px=10_000)
            pipe.zadd("lz", {"m1": 1.5, "m2": 2})
            pipe.zrangebyscore("lz", 0, "+inf", withscores=True)
            pipe.hset("lp:h", mapping={"f": 1})
            pipe.hgetall("lp:h")
            pipe.execute_command("PTTL", "lp:s")

        ours = client.pipeline(transaction=False)
        fill(ours)
        writes = client.lane._proto.writes if client.lane._proto else 0
        got = await ours.execute()
        proto = client.lane._proto
        assert proto is not None
        assert proto.writes == writes + 1  # the seven commands in one write
        await client.delete("lz", "lp:h")
        theirs = plain.pipeline(transaction=False)
        fill(theirs)
        want = await theirs.execute()
        assert [type(x) for x in got] == [type(x) for x in want]
        assert got[0][:2] == want[0][:2] == [b"lp", b"a"]
        assert got[1:4] == want[1:4] == [True, 2, [(b"m1", 1.5), (b"m2", 2.0)]]
        assert got[5] == want[5] == {b"f": b"1"}
        assert 0 < got[6] <= 10_000
        assert len(ours) == 0  # reset after execute, like redis-py's
    finally:
        await client.aclose()
        await feed.aclose()
        await plain.aclose()


async def test_lane_pipeline_errors_are_redis_pys(redis_url: str) -> None:
    _, client, feed = connect(redis_url, 8)
    try:
        ok = await client.script_load("return 7")
        pipe = client.pipeline(transaction=False)
        pipe.evalsha(ok, 0)
        pipe.evalsha("0" * 40, 0)
        pipe.evalsha(ok, 0)
        with pytest.raises(NoScriptError, match="Command # 2"):
            await pipe.execute()
        pipe.evalsha(ok, 0)
        pipe.evalsha("0" * 40, 0)
        got = await pipe.execute(raise_on_error=False)
        assert got[0] == 7
        assert isinstance(got[1], NoScriptError)
        pipe.hset("lp:h", "f", 1)
        pipe.incr("lp:h")  # a hash: WRONGTYPE
        with pytest.raises(StoreMisconfigured):
            async with mapped_errors():
                await pipe.execute()
        assert await client.evalsha(ok, 0) == 7  # the stream is still in step
    finally:
        await client.aclose()
        await feed.aclose()


async def test_what_the_lane_does_not_carry_keeps_redis_pys_pipeline(redis_url: str) -> None:
    """Transactions and long pipelines are redis-py's own (and still answer)."""
    _, client, feed = connect(redis_url, 8)
    try:
        await client.execute_command("PING")  # the lane connects on its first use only
        await client.evalsha(await client.script_load("return 1"), 0)
        proto = client.lane._proto
        assert proto is not None
        before = proto.writes
        tx = client.pipeline(transaction=True)
        tx.set("lp:t", 1).incr("lp:t")
        assert await tx.execute() == [True, 2]
        long = client.pipeline(transaction=False)
        for i in range(LANE_PIPELINE_COMMANDS + 1):
            long.set(f"lp:n{i}", i, px=10_000)
        assert await long.execute() == [True] * (LANE_PIPELINE_COMMANDS + 1)
        big = client.pipeline(transaction=False)
        big.set("lp:big", "x" * (LANE_PIPELINE_BYTES + 1), px=10_000)
        assert await big.execute() == [True]
        assert proto.writes == before  # none of them went on the lane
    finally:
        await client.aclose()
        await feed.aclose()


def test_mapped_errors_maps_in_a_plain_with_too() -> None:
    with pytest.raises(StoreUnavailable, match="redis unavailable"), mapped_errors():
        raise RedisConnectionError("gone")
    with pytest.raises(StoreMisconfigured, match="credentials"), mapped_errors():
        raise redis.exceptions.AuthenticationError("no")
    with pytest.raises(StoreUnavailable, match="LOADING"), mapped_errors():
        raise ResponseError("LOADING Redis is loading the dataset in memory")
    with pytest.raises(KeyError), mapped_errors():  # not redis's: passes as it is
        raise KeyError("x")


async def test_unary_reports_on_the_lane_skip_the_coalescer_and_share_writes(
    redis_url: str,
) -> None:
    """On a plain node the engine sends each unary report on its own (no Coalescer
    hand-off): concurrent ones still share writes, through the lane's single flight, and
    each gets its own answer; the penalty the 20th error starts answers them all."""
    # A deadline no loaded test machine misses: what is tested is the sharing, not speed.
    settings = Settings(redis_url=redis_url, report_timeout_ms=10_000)
    engine = Engine(settings, make_store(settings))
    await engine.start()
    try:
        assert engine._direct
        store = engine.store
        assert isinstance(store, RedisStore)
        validator = Validator(settings)
        warm = validator.check(pb.CheckRequest(client=pb.Client(ip="198.51.100.9")))
        await engine.report(warm, [(pb.OUTCOME_ACCEPTED, 1)])  # connected, scripts loaded
        proto = store._client.lane._proto
        assert proto is not None
        writes, commands = proto.writes, proto.commands
        ref = validator.check(pb.CheckRequest(client=pb.Client(ip="203.0.113.9")))
        answers = await asyncio.gather(
            *(engine.report(ref, [(pb.OUTCOME_UNKNOWN_RECIPIENT, 1)]) for _ in range(40))
        )
        assert engine._reports is not None
        assert engine._reports.batches == 0  # nothing went through the Coalescer
        # the 40 records: the first written alone, the 39 made meanwhile in one write
        # behind it (then the penalty's start, on the lane too)
        assert proto.commands - commands >= 40
        assert proto.writes - writes < 10
        assert not any(a.degraded for a in answers)
        assert answers[-1].penalty is not None  # the last ones see the penalty
        assert (await engine.check(ref)).penalty is not None
    finally:
        await engine.close()


async def test_the_embedded_store_skips_the_coalescer_too() -> None:
    """The embedded store never suspends (`Store.in_process`): nothing could queue behind
    a call, so reports go to it directly, each answered; the 20th error's own answer is
    the penalty it starts."""
    settings = Settings()
    engine = Engine(settings, make_store(settings))
    await engine.start()
    try:
        assert engine.store.in_process
        assert engine._direct
        ref = Validator(settings).check(pb.CheckRequest(client=pb.Client(ip="203.0.113.9")))
        answers = await asyncio.gather(
            *(engine.report(ref, [(pb.OUTCOME_UNKNOWN_RECIPIENT, 1)]) for _ in range(40))
        )
        assert engine._reports is not None
        assert engine._reports.batches == 0  # nothing went through the Coalescer
        assert not any(a.degraded for a in answers)
        assert answers[18].penalty is None
        assert all(a.penalty is not None for a in answers[19:])  # the 20th already
    finally:
        await engine.close()


async def test_a_burst_after_a_script_flush_loads_each_script_once(redis_url: str) -> None:
    """Concurrent calls that meet NOSCRIPT together share one SCRIPT LOAD per script
    (not an EVAL of the source each) and are then answered on the lane."""
    settings = Settings(redis_url=redis_url)
    store = make_store(settings)
    assert isinstance(store, RedisStore)
    await store.start()
    admin = redis.asyncio.Redis.from_url(redis_url)
    try:
        await admin.script_flush()
        await admin.config_resetstat()
        items = [ReportItem(f"198.51.100.{i}", [(pb.OUTCOME_ACCEPTED, 1)]) for i in range(40)]
        windows = await asyncio.gather(*(store.record([item]) for item in items))
        assert [w.counts[pb.OUTCOME_ACCEPTED] for (w,) in windows] == [1] * 40
        stats = await admin.info("commandstats")
        loads = stats.get("cmdstat_script|load", {}).get("calls", 0)
        assert loads == len(store._scripts._by_name)  # each script once, for all 40 calls
        assert "cmdstat_eval" not in stats  # no call sent a script's source
    finally:
        await admin.aclose()
        await store.close()
