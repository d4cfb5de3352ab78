"""Who may call PenaltyAdmin: the bearer token, or a loopback listener without one."""

from __future__ import annotations

import grpc
import pytest

from penalty.v1 import penalty_pb2 as pb
from penaltyd.store.memory import MemoryStore
from tests.harness.builders import check
from tests.harness.inprocess import ServeFactory

Kind = pb.PenaltyEvent.Kind


async def test_admin_needs_the_token(serve: ServeFactory) -> None:
    pd = await serve(MemoryStore(), admin_token="s3cret")
    for metadata in [(), (("authorization", "Bearer wrong"),), (("authorization", "s3cret"),)]:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await pd.admin.Stats(pb.StatsRequest(), metadata=metadata)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    ok = await pd.admin.Stats(pb.StatsRequest(), metadata=(("authorization", "Bearer s3cret"),))
    assert ok.store == "memory"
    assert not (await pd.service.Check(check("192.0.2.1"))).tempfail  # MX calls need no token


async def test_admin_without_token_is_loopback_only(serve: ServeFactory) -> None:
    pd = await serve(MemoryStore(), listen="0.0.0.0:0")
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await pd.admin.Stats(pb.StatsRequest())
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "admin_token" in info.value.details()
