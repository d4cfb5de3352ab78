"""`serving.redis.lane`: single EVALSHAs on one pipelined connection, with redis-py's
errors and its one retry after the server closed the connection."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
import redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError

from serving.errors import StoreMisconfigured, StoreUnavailable
from serving.redis.errors import mapped_errors
from serving.redis.lane import Lane, LaneRedis
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


async def test_a_restarted_redis_is_met_with_one_retry(own_redis: RedisServer) -> None:
    lane = Lane("127.0.0.1", own_redis.port)
    try:
        sha = _sha(own_redis)
        assert (await lane.execute("EVALSHA", sha, 1, "k", "a"))[2] == 1
        redis.Redis(port=own_redis.port).client_kill_filter(_type="normal", skipme=True)
        await asyncio.sleep(0.05)
        # the killed connection is noticed and the call goes on a new one
        assert (await lane.execute("EVALSHA", sha, 1, "k", "b"))[2] == 2
        assert lane.connects == 2
    finally:
        lane.close()


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


async def test_callers_that_gave_up_keep_the_stream_in_step(own_redis: RedisServer) -> None:
    """A paused Redis: calls time out (their deadline); once it answers again, the late
    replies go to nobody and the next call gets its own reply."""
    lane = Lane("127.0.0.1", own_redis.port)
    try:
        sha = _sha(own_redis)
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
    finally:
        lane.close()


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
