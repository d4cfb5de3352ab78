"""Bad input: INVALID_ARGUMENT naming the field, nothing stored, the server unaffected."""

from __future__ import annotations

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from penalty.v1 import penalty_pb2 as pb
from penaltyd.settings import Settings
from penaltyd.store.memory import MemoryStore
from penaltyd.validation import Validator
from serving.errors import BadField
from tests.harness.builders import UNKNOWN, check, client, report
from tests.harness.inprocess import Served, ServeFactory


def counted(ip: str, *pairs: tuple[int, int]) -> pb.ReportRequest:
    return pb.ReportRequest(
        client=client(ip),
        counts=[pb.OutcomeCount(outcome=o, n=n) for o, n in pairs],  # type: ignore[arg-type]  # enum int
    )


BAD_REPORTS = [
    (pb.ReportRequest(), "client"),
    (report("", UNKNOWN), "client.ip"),
    (report("256.1.1.1", UNKNOWN), "client.ip"),
    (report("010.1.1.1", UNKNOWN), "client.ip"),
    (report(" 203.0.113.7", UNKNOWN), "client.ip"),
    (report("fe80::1%eth0", UNKNOWN), "client.ip"),
    (report("203.0.113.0/24", UNKNOWN), "client.ip"),
    (pb.ReportRequest(client=client("203.0.113.7")), "counts"),
    (counted("203.0.113.7", (0, 1)), "counts[0].outcome"),
    (counted("203.0.113.7", (UNKNOWN, 1), (99, 1)), "counts[1].outcome"),
    (counted("203.0.113.7", (UNKNOWN, 0)), "counts[0].n"),
    (counted("203.0.113.7", (UNKNOWN, 100_001)), "counts[0].n"),
    (counted("203.0.113.7", *[(UNKNOWN, 1)] * 33), "counts"),
]


@pytest.fixture
async def pd(serve: ServeFactory) -> Served:
    return await serve(MemoryStore(), max_message_bytes=4096)


@pytest.mark.parametrize(("request_", "field"), BAD_REPORTS)
async def test_bad_report_names_the_field_and_stores_nothing(
    pd: Served, request_: pb.ReportRequest, field: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await pd.service.Report(request_)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details().startswith(f"{field}: ")
    store = pd.engine.store
    assert isinstance(store, MemoryStore)
    assert store._windows == {}


@pytest.mark.parametrize(
    ("request_", "field"),
    [
        (pb.CheckRequest(), "client"),
        (check("1.2.3"), "client.ip"),
        (check("::ffff:1.2.3.999"), "client.ip"),
    ],
)
async def test_bad_check_names_the_field(pd: Served, request_: pb.CheckRequest, field: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await pd.service.Check(request_)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details().startswith(f"{field}: ")


async def test_oversized_message_is_invalid_argument(pd: Served) -> None:
    big = pb.ReportRequest(
        client=client("203.0.113.7", helo="h" * 200, mail_from="m" * 500),
        counts=[pb.OutcomeCount(outcome=UNKNOWN, n=1)] * 30,
    )
    big.client.fingerprint = "f" * 128
    payload = big.SerializeToString() * 6
    call = pd.channel.unary_unary("/penalty.v1.PenaltyService/Report")
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call(payload)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details().startswith("message: ")
    assert "exceeds the limit of 4096" in info.value.details()


async def test_oversized_session_batch(serve: ServeFactory) -> None:
    pd = await serve(MemoryStore(), max_batch=10)
    call = pd.service.Session()
    await call.write(pb.SessionRequest(id=3, checks=[check("203.0.113.7")] * 11))
    resp = await call.read()
    assert resp.error.field == "checks"
    assert "more than 10" in resp.error.message
    await call.done_writing()


async def test_bad_admin_input(pd: Served) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await pd.admin.ListPenalties(pb.ListPenaltiesRequest(page_token="garbage!"))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details().startswith("page_token: ")
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await pd.admin.ListPenalties(pb.ListPenaltiesRequest(page_size=5000))
    assert info.value.details().startswith("page_size: ")
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await pd.admin.Explain(pb.ExplainRequest(client=client("nope")))
    assert info.value.details().startswith("client.ip: ")


@pytest.mark.parametrize("method", ["Check", "Report"])
@given(payload=st.binary(max_size=300))
@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
async def test_random_bytes_never_internal(pd: Served, method: str, payload: bytes) -> None:
    call = pd.channel.unary_unary(f"/penalty.v1.PenaltyService/{method}")
    try:
        await call(payload)
    except grpc.aio.AioRpcError as exc:
        assert exc.code() == grpc.StatusCode.INVALID_ARGUMENT, exc.details()
        assert ": " in exc.details()


# --- properties of the validator over generated request messages

ips = st.one_of(
    st.ip_addresses().map(str),
    st.text(max_size=50),
    st.sampled_from(["", "1.2.3.4 ", "::ffff:10.0.0.1", "2001:db8::1%1", "1.2.3.4/8", "0x7f.1"]),
)
outcomes = st.integers(min_value=-5, max_value=20)
ns = st.integers(min_value=0, max_value=2**32 - 1)
clients = st.builds(
    pb.Client,
    ip=ips,
    helo=st.text(max_size=300),
    mail_from=st.text(max_size=600),
    fingerprint=st.text(max_size=150),
)


@st.composite
def report_requests(draw: st.DrawFn) -> pb.ReportRequest:
    req = pb.ReportRequest()
    if draw(st.integers(0, 9)):  # mostly with a client, sometimes without
        req.client.CopyFrom(draw(clients))
    for o, n in draw(st.lists(st.tuples(outcomes, ns), max_size=40)):
        c = req.counts.add()
        c.outcome = o  # type: ignore[assignment]  # proto3 keeps unknown enum numbers
        c.n = n
    return req


VALIDATOR = Validator(Settings())
FIELD_PREFIXES = ("client", "client.ip", "counts")


@given(report_requests())
@settings(max_examples=400)
def test_validator_accepts_exactly_the_well_formed(req: pb.ReportRequest) -> None:
    try:
        identity, merged = VALIDATOR.report(req)
    except BadField as err:
        assert err.field.split("[")[0] in FIELD_PREFIXES
        assert err.message
        return
    assert identity
    assert merged
    assert all(1 <= o <= 10 and n >= 1 for o, n in merged)
    assert sum(n for _, n in merged) == sum(c.n for c in req.counts)


@given(
    st.lists(report_requests(), max_size=5),
    st.lists(st.builds(pb.CheckRequest, client=clients), max_size=5),
)
@settings(max_examples=200)
def test_session_validation_is_all_or_nothing(
    reports: list[pb.ReportRequest], checks: list[pb.CheckRequest]
) -> None:
    msg = pb.SessionRequest(id=1, reports=reports, checks=checks)
    try:
        got_checks, got_reports = VALIDATOR.session(msg)
    except BadField as err:
        head = err.field.split(".")[0]
        assert head.startswith(("reports[", "checks[")) or head == "checks"
        return
    assert len(got_checks) == len(checks)
    assert len(got_reports) == len(reports)


@given(report_requests())
@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
async def test_service_stores_nothing_for_rejected_reports(
    pd: Served, req: pb.ReportRequest
) -> None:
    store = pd.engine.store
    assert isinstance(store, MemoryStore)

    def snapshot() -> dict[str, dict[int, tuple[int, ...]]]:
        return store.window_buckets()

    before = snapshot()
    try:
        VALIDATOR.report(req)
        valid = True
    except BadField:
        valid = False
    try:
        await pd.service.Report(req)
        assert valid
    except grpc.aio.AioRpcError as exc:
        assert not valid
        assert exc.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert snapshot() == before
