"""Privacy on the embedded store: keyed identities, sealed addresses, Disclose, the audit
trail, the retention registry and its table, bounded buffers and the address scrubber."""

from __future__ import annotations

import asyncio
import contextlib
import io
import re
import time
from collections.abc import Sequence
from pathlib import Path

import grpc
import pytest
from pydantic import ValidationError
from structlog.testing import capture_logs

from penalty import keyed
from penalty.v1 import penalty_pb2 as pb
from penaltyd import reasons, retention
from penaltyd.engine import Engine
from penaltyd.keying import Keying
from penaltyd.metrics import Metrics
from penaltyd.reportbuffer import ReportBuffer
from penaltyd.settings import Settings
from penaltyd.store import redis as redis_store
from penaltyd.store.memory import MemoryStore
from penaltyd.validation import ClientRef, Validator
from serving.logs import AddressScrubber
from tests.harness import privacy
from tests.harness.builders import UNKNOWN, Clock, client
from tests.harness.inprocess import ServeFactory
from tests.harness.privacy import KEY, KEY2

REPO = Path(__file__).resolve().parents[3]
Kind = pb.PenaltyEvent.Kind


# --- tokens and seals


@pytest.mark.parametrize("length", [16, 32, 64, 100])
def test_the_contracts_hkdf_is_rfc_5869(length: int) -> None:
    # The contract derives subkeys with the stdlib (every component computes the same
    # tokens); it must agree with a well-kept implementation byte for byte.
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    key, info = KEY.encode(), b"penaltyd identity v1"
    want = HKDF(hashes.SHA256(), length, salt=None, info=info).derive(key)
    assert keyed.hkdf(key, info, length) == want


def test_tokens_are_deterministic_keyed_and_never_the_address() -> None:
    a, b = Keying(KEY.encode()), Keying(KEY2.encode())
    token = a.store_identity("203.0.113.7")
    assert token == Keying(KEY.encode()).store_identity("203.0.113.7")  # any replica, any time
    assert token != b.store_identity("203.0.113.7")  # another key, another token
    assert re.fullmatch(r"k[A-Za-z0-9_-]{22}", token)
    sub = a.store_identity("100.64.1.1#abcdef")
    assert sub.startswith(a.store_identity("100.64.1.1") + "#")  # one hash tag per address
    assert "abcdef" not in sub
    plain = Keying()
    assert plain.store_identity("203.0.113.7") == "203.0.113.7"  # unkeyed: unchanged
    assert plain.label("203.0.113.7") == "203.0.113.7"


def test_seals_open_with_the_current_or_previous_key_only() -> None:
    old = Keying(KEY2.encode())
    rotated = Keying(KEY.encode(), previous=KEY2.encode())
    stranger = Keying(b"another-key-of-at-least-32-characters!")
    sealed = old.label("2001:db8::/64")
    assert "2001" not in sealed
    assert sealed == old.label("2001:db8::/64")  # deterministic
    assert rotated.open(sealed) == "2001:db8::/64"  # during a rotation the old seals open
    assert stranger.open(sealed) is None
    assert rotated.open("s" + "A" * 40) is None  # forged: authentication fails
    assert rotated.open("not a seal") is None
    assert rotated.store_names("203.0.113.7") == [
        rotated.store_identity("203.0.113.7"),
        old.store_identity("203.0.113.7"),
    ]


def test_a_stored_reason_reveals_its_identity_and_renders_without_the_seal() -> None:
    k = Keying(KEY.encode())
    compact = "burst;40;40;0.912;0.500;2=40"
    stored = k.stored_reason(compact, "203.0.113.7")
    assert "203.0.113.7" not in stored
    assert k.reveal("ktoken", stored) == ("203.0.113.7", compact)
    assert reasons.render(stored) == reasons.render(compact)
    assert reasons.SEAL not in reasons.render(stored)
    assert Keying().reveal("203.0.113.7", compact) == ("203.0.113.7", compact)


# --- settings


def test_identity_keys_are_refused_when_short_or_set_twice(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="at least 32 characters"):
        Settings(identity_key="short")
    key_file = tmp_path / "key"
    key_file.write_text(KEY + "\n")
    with pytest.raises(ValidationError, match="set one of them"):
        Settings(identity_key=KEY, identity_key_file=str(key_file))
    assert Settings(identity_key_file=str(key_file)).identity_keys() == (KEY.encode(), None)
    with pytest.raises(OSError, match=r"identity_key_file .*/missing"):
        Settings(identity_key_file=str(tmp_path / "missing")).identity_keys()
    with pytest.raises(ValueError, match="needs identity_key"):
        Settings(identity_key_previous=KEY2).identity_keys()
    with pytest.raises(ValueError, match="same key"):
        Settings(identity_key=KEY, identity_key_previous=KEY).identity_keys()
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ValueError, match="empty"):
        Settings(identity_key_file=str(tmp_path / "empty")).identity_keys()


# --- the embedded store, keyed


def store_text(store: MemoryStore) -> str:
    """Everything the embedded store holds, as text (keys, values, the index)."""
    parts = [
        store._windows,
        store._penalties,
        store._shared.d,
        store._offences.d,
        store._lifts.d,
        list(store._index.iterate((0, ""), after=False)),
    ]
    return repr(parts)


async def test_a_keyed_embedded_store_holds_no_address_helo_or_sender(
    serve: ServeFactory,
) -> None:
    pd = await serve(None, identity_key=KEY, **privacy.PRIVACY_SETTINGS)
    store = pd.engine.store
    assert isinstance(store, MemoryStore)
    ran = await privacy.exercise(pd.service, pd.admin)
    assert all(v.tempfail for v in ran.penalized.values())
    held = store_text(store)
    for needle in privacy.needles():
        assert needle.decode("latin-1") not in held, needle
    # ...while every answer names the address: verdicts, listings, the watch stream.
    # On the address (bound to its one known client: issue 15's cold start).
    assert ran.penalized[privacy.ATTACKER_V4].identity == privacy.ATTACKER_V4
    assert ran.penalized[privacy.NAT].identity.startswith(privacy.NAT + "#")
    listed = await pd.admin.ListPenalties(pb.ListPenaltiesRequest(actor="t", note="n"))
    assert {p.identity.split("#")[0] for p in listed.penalties} == {
        privacy.ATTACKER_V4,
        "2001:db8:77:1::/64",
        privacy.NAT,
    }
    assert all("\x1e" not in p.reason and p.reason for p in listed.penalties)
    started = {e.penalty.identity for e in ran.events if e.kind == Kind.KIND_PENALTY_STARTED}
    assert privacy.ATTACKER_V4 in started
    lifted = [e.penalty.identity for e in ran.events if e.kind == Kind.KIND_PENALTY_LIFTED]
    assert lifted == [privacy.LIFTED]
    marked = [e.address for e in ran.events if e.kind == Kind.KIND_SHARED_MARKED]
    assert marked == [privacy.NAT]


@pytest.mark.parametrize(("auth", "warned"), [("none", True), ("reports", True), ("all", False)])
async def test_a_keyed_replica_says_when_watchers_are_not_authenticated(
    serve: ServeFactory, auth: str, warned: bool
) -> None:
    tokens = {} if auth == "none" else {"service_tokens": {"mx1": "s3cret-token"}}
    with capture_logs() as logs:
        await serve(MemoryStore(), identity_key=KEY, service_auth=auth, **tokens)
    events = [e["event"] for e in logs]
    assert ("watch_names_addresses_unauthenticated" in events) is warned
    assert any(e["event"] == "penaltyd_started" and e["identity_key"] for e in logs)


async def test_a_key_file_readable_by_others_is_named_at_start(
    serve: ServeFactory, tmp_path: Path
) -> None:
    key_file = tmp_path / "identity.key"
    key_file.write_text(KEY)
    for mode, warned in ((0o644, True), (0o400, False)):
        key_file.chmod(mode)
        with capture_logs() as logs:
            await serve(MemoryStore(), identity_key_file=str(key_file), service_auth="none")
        found = [e for e in logs if e["event"] == "identity_key_file_readable"]
        assert bool(found) is warned, mode
        if found:
            assert found[0]["mode"] == "0644"


async def test_keyed_checks_lifts_and_explain_work_by_address(serve: ServeFactory) -> None:
    pd = await serve(MemoryStore(), identity_key=KEY)
    assert (await privacy.attack(pd.service, client("203.0.113.9"))).tempfail
    assert (await pd.service.Check(pb.CheckRequest(client=client("203.0.113.9")))).tempfail
    ex = await pd.admin.Explain(pb.ExplainRequest(client=client("203.0.113.9")))
    assert ex.identity == "203.0.113.9"
    assert ex.verdict.tempfail
    lift = await pd.admin.Lift(pb.LiftRequest(client=client("203.0.113.9"), actor="a"))
    assert lift.lifted
    assert lift.identity == "203.0.113.9"
    assert not (await pd.service.Check(pb.CheckRequest(client=client("203.0.113.9")))).tempfail
    ex = await pd.admin.Explain(pb.ExplainRequest(client=client("203.0.113.9")))
    assert ex.last_lift.actor == "a"


def engine(key: str | None, previous: str | None, store: MemoryStore) -> Engine:
    settings = Settings(
        identity_key=key or "", identity_key_previous=previous or "", stats_flush_seconds=300
    )
    return Engine(settings, store, Metrics())


def ref(ip: str) -> ClientRef:
    return Validator(Settings()).client(pb.Client(ip=ip), "client")


async def test_a_rotated_key_still_answers_the_old_keys_penalties(clock: Clock) -> None:
    store = MemoryStore(clock=clock)
    old = engine(KEY2, None, store)
    errors = [(UNKNOWN, 1)]
    for _ in range(40):
        await old.report_many([(ref("203.0.113.50"), errors)])
    assert (await old.check(ref("203.0.113.50"))).penalty is not None
    new = engine(KEY, KEY2, store)
    answer = await new.check(ref("203.0.113.50"))
    assert answer.penalty is not None
    assert answer.identity == "203.0.113.50"
    page, _ = await new.list_penalties(None, 10)
    assert [p.identity for p in page] == ["203.0.113.50"]  # the old seal opens
    assert (await new.explain(ref("203.0.113.50"))).window.penalty is not None
    assert await new.lift(ref("203.0.113.50"), "ops", "rotation test") == ["203.0.113.50"]
    assert (await new.check(ref("203.0.113.50"))).penalty is None
    without = engine(KEY, None, store)  # once the old key is dropped
    for _ in range(40):
        await old.report_many([(ref("203.0.113.51"), errors)])
    assert (await without.check(ref("203.0.113.51"))).penalty is None


# --- Disclose and the audit trail


async def test_disclose_names_everything_held_about_an_address_and_nothing_else(
    serve: ServeFactory,
) -> None:
    pd = await serve(None, identity_key=KEY, **privacy.PRIVACY_SETTINGS)
    await privacy.exercise(pd.service, pd.admin)
    who = {"actor": "dpo", "note": "REQ-2026-17"}
    nat = await pd.admin.Disclose(pb.DiscloseRequest(client=client(privacy.NAT), **who))
    assert nat.keyed
    assert nat.identity == privacy.NAT
    assert nat.store == "memory"
    kinds = {(i.kind, i.identity.split("#")[0]) for i in nat.items}
    assert {"window", "penalty", "shared_mark", "offence_counter"} <= {k for k, _ in kinds}
    assert {a for _, a in kinds} == {privacy.NAT}  # nobody else's data
    subs = {i.identity for i in nat.items if "#" in i.identity}
    assert len(subs) == len(privacy.NAT_CLIENTS)  # every client behind it, by fingerprint
    assert all(i.expires_at_unix_ms > nat.at_unix_ms for i in nat.items)
    lifted = await pd.admin.Disclose(pb.DiscloseRequest(client=client(privacy.LIFTED), **who))
    assert any(
        i.kind == "last_lift" and "abuse-desk" in i.content and "TICKET-1" in i.content
        for i in lifted.items
    )
    allowed = await pd.admin.Disclose(pb.DiscloseRequest(client=client(privacy.ALLOWED), **who))
    assert [i.kind for i in allowed.items] == ["allow_entry"]
    nobody = await pd.admin.Disclose(pb.DiscloseRequest(client=client("198.18.0.1"), **who))
    assert list(nobody.items) == []
    assert nobody.not_itemized  # what cannot be read back per address is still named


@pytest.mark.parametrize("missing", ["actor", "note"])
async def test_disclose_requires_an_actor_and_a_case_reference(
    serve: ServeFactory, missing: str
) -> None:
    pd = await serve(MemoryStore())
    fields = {"actor": "dpo", "note": "REQ-1", missing: " "}
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await pd.admin.Disclose(pb.DiscloseRequest(client=client("203.0.113.1"), **fields))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert missing in (err.value.details() or "")


@pytest.mark.parametrize(
    ("call", "field"),
    [
        ("lift", "actor"),  # a terminal escape: retitles the next operator's window
        ("allow", "note"),  # a bidi override: "REQ-1" shown reversed
        ("disclose", "note"),  # a zero-width space: an "empty" case reference
    ],
)
async def test_operator_text_with_control_or_invisible_characters_is_refused(
    serve: ServeFactory, call: str, field: str
) -> None:
    pd = await serve(MemoryStore())
    bad = {"actor": "\x1b]0;pwned\x07", "note": "\u202eREQ-1"}[field]
    if call == "disclose":
        bad = "\u200b"
    who = {"actor": "ops", "note": "REQ-1", field: bad}
    requests = {
        "lift": lambda: pd.admin.Lift(pb.LiftRequest(client=client("203.0.113.1"), **who)),
        "allow": lambda: pd.admin.Allow(
            pb.AllowRequest(cidr="192.0.2.0/24", actor=who["actor"], note=who["note"])
        ),
        "disclose": lambda: pd.admin.Disclose(
            pb.DiscloseRequest(client=client("203.0.113.1"), **who)
        ),
    }
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await requests[call]()
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (err.value.details() or "").startswith(field)
    assert not (await pd.admin.ListAllowlist(pb.ListAllowlistRequest())).entries


async def test_every_admin_call_about_an_address_is_audited_and_counted(
    serve: ServeFactory,
) -> None:
    pd = await serve(MemoryStore())
    actor, note = "abuse-desk", "TICKET-9"
    who = {"actor": actor, "note": note}
    c = client("203.0.113.4")
    with capture_logs() as logs:
        await pd.admin.Explain(pb.ExplainRequest(client=c, **who))
        await pd.admin.Disclose(pb.DiscloseRequest(client=c, **who))
        await pd.admin.Lift(pb.LiftRequest(client=c, **who))
        await pd.admin.Allow(pb.AllowRequest(cidr="192.0.2.0/24", actor=actor, note=note))
        await pd.admin.RemoveAllow(pb.RemoveAllowRequest(cidr="192.0.2.0/24", **who))
        await pd.admin.ListPenalties(pb.ListPenaltiesRequest(actor=actor, note=note))
        await pd.admin.Stats(pb.StatsRequest())  # no data about an address: not audited
    audit = [e for e in logs if e["event"] == "audit"]
    assert [e["method"] for e in audit] == [
        "Explain",
        "Disclose",
        "Lift",
        "Allow",
        "RemoveAllow",
        "ListPenalties",
    ]
    assert all(e["actor"] == "abuse-desk" and e["note"] == "TICKET-9" for e in audit)
    assert all(e["outcome"] == "ok" for e in audit)
    assert audit[0]["identity"] == "203.0.113.4"
    assert audit[3]["cidr"] == "192.0.2.0/24"
    counted = pd.engine.metrics.audit_events
    assert all(counted.labels(e["method"])._value.get() == 1 for e in audit)


# --- bounded in time


async def test_buffered_reports_older_than_the_window_are_dropped_not_replayed() -> None:
    now = [0.0]
    metrics = Metrics()
    buffer: ReportBuffer[str] = ReportBuffer(100, metrics, max_age=600, clock=lambda: now[0])
    buffer.add(["old"])
    now[0] = 300
    buffer.add(["new"])
    now[0] = 601
    replayed: list[str] = []

    async def apply(chunk: Sequence[str]) -> None:
        replayed.extend(chunk)

    assert await buffer.replay(apply, 1.0) == 1
    assert replayed == ["new"]
    assert metrics.reports_dropped._value.get() == 1


async def test_the_watch_log_forgets_events_older_than_the_longest_penalty(
    serve: ServeFactory, clock: Clock
) -> None:
    pd = await serve(MemoryStore(clock=clock))
    hub = pd.engine.hub
    await privacy.attack(pd.service, client("203.0.113.20"))
    assert hub.first_seq == 1
    assert hub.seq >= 1
    later = time.monotonic() + 60  # a watcher a minute behind still catches up
    hub._clock = lambda: later
    hub.expire()
    assert hub.first_seq == 1
    hub._clock = lambda: 10_000_000.0  # far beyond penalty_seconds
    hub.expire()
    assert hub.first_seq == hub.seq + 1  # nothing held any longer
    assert all(slot == b"" for slot in hub._ring[: hub.seq + 1])


# --- logs


@pytest.mark.parametrize(
    ("text", "none"),
    [
        ("203.0.113.7", "-"),
        ("client 203.0.113.7#3fa2 refused", "client -#3fa2 refused"),
        ("ipv4:127.0.0.1:5432", "ipv4:-:5432"),
        ("2001:db8:77:1::/64", "-/64"),
        ("[2001:db8::1]:25", "[-]:25"),
        ("::ffff:198.51.100.9", "-"),
        ("2001:0db8:0000:0000:0000:0000:0000:0001", "-"),
        ("unknown[203.0.113.9]: 450", "unknown[-]: 450"),
        ("203.0.113.7#d5ce0a84e0", "-#-"),  # the fingerprint: a reversible hash
        ("2001:db8:77:1::/64#d5ce0a84e0 started", "-/64#- started"),
        ("took 12:30:45, version 1.2.3, id deadbeef, ratio 0.5", None),
    ],
)
def test_log_addresses_none_and_keyed_leave_no_address(text: str, none: str | None) -> None:
    assert AddressScrubber("none").scrub(text) == (text if none is None else none)
    keyed = AddressScrubber("keyed", KEY.encode())
    out = keyed.scrub(text)
    if none is None:
        assert out == text
    else:
        assert re.sub(r"~[A-Za-z0-9_-]{11}", "-", out) == none
        assert keyed.scrub(text) == out  # the same address, the same token: lines join


def test_the_scrubber_reaches_every_field() -> None:
    event = {
        "event": "x",
        "identity": "203.0.113.7",
        "lifted": ["203.0.113.7", "2001:db8::/64"],
        "nested": {"peer": "ipv6:[::1]:50051"},
        "count": 3,
    }
    out = AddressScrubber("none")(None, "info", event)
    assert out == {
        "event": "x",
        "identity": "-",
        "lifted": ["-", "-/64"],
        "nested": {"peer": "ipv6:[-]:50051"},
        "count": 3,
    }


def test_what_a_client_said_about_itself_is_replaced_whole() -> None:
    # A HELO name often spells the address, and a sender names a person: penalty-milter's
    # milter_tempfail and relaycheck-milter's milter_classified log them.
    event = {
        "event": "milter_tempfail",
        "helo": "host-203-0-113-21.dyn.example",
        "mail_from": "alice.smith@victim-corp.example",
        "seconds_left": 300,
    }
    assert AddressScrubber("none")(None, "info", event) == {
        "event": "milter_tempfail",
        "helo": "-",
        "mail_from": "-",
        "seconds_left": 300,
    }
    keyed = AddressScrubber("keyed", b"k" * 40)(None, "info", event)
    assert re.fullmatch(r"~[A-Za-z0-9_-]{11}", keyed["helo"])
    assert keyed["helo"] == AddressScrubber("keyed", b"k" * 40)(None, "info", event)["helo"]


# --- the retention registry


def test_docs_privacy_holds_the_generated_retention_tables() -> None:
    doc = (REPO / "docs" / "privacy.md").read_text()
    begin, end = "<!-- retention: begin -->\n", "<!-- retention: end -->"
    assert begin in doc, "docs/privacy.md lost its retention markers"
    assert end in doc, "docs/privacy.md lost its retention markers"
    embedded = doc.split(begin, 1)[1].split(end, 1)[0]
    assert embedded == retention.markdown(), (
        "docs/privacy.md is out of date: run .venv/bin/python -m penaltyd.retention --update"
    )


def test_the_redis_key_scheme_and_the_registry_name_the_same_keys() -> None:
    doc = redis_store.__doc__ or ""
    documented = set(re.findall(r"^\s{4}(<p>:\S+)", doc, re.M))
    registry = {k.pattern for k in retention.KEY_KINDS} | {retention.FEED}
    assert documented == registry


def test_rotation_lasts_the_longest_lifetime_of_a_key_naming_an_identity() -> None:
    s = Settings()
    assert retention.rotation_seconds(s) == s.shared_ttl_seconds + 1  # the shared index
    longer = Settings(escalation_multiplier=2, escalation_window_seconds=7 * 86_400)
    assert retention.rotation_seconds(longer) == 7 * 86_400  # offence counters, now written
    assert retention.rotation_seconds(Settings(shared_ttl_seconds=60)) == 2 * s.window_seconds


def test_report_items_name_the_store_keys_the_registry_knows() -> None:
    keys = [
        "pd:{203.0.113.7}:w",
        "pd:{kabc}:w:f00d",
        "pd:{2001:db8::/64}:h:3000",
        "pd:{kabc}:s",
        "pd:{kabc}:o",
        "pd:{kabc}:l:f00d",
        "pd:{idx3}:active",
        "pd:{sh0}:shared",
        "pd:{trk1}:3000",
        "pd:{bl2}:29999",
        "pd:{rep}:degraded",
        "pd:{rep}:probe:0a1b2c",
        "pd:{allow}:e:192.0.2.0/24",
        "pd:{allow}:idx",
    ]
    assert all(retention.kind_of(k, "pd") is not None for k in keys)
    assert retention.kind_of("pd:{203.0.113.7}:x", "pd") is None
    assert retention.kind_of("other:{203.0.113.7}:w", "pd") is None


def test_the_sidecars_log_secret_joins_lines_but_opens_nothing(tmp_path: Path) -> None:
    # An MX is told penaltyd's log secret (python -m penaltyd.keying --log-key), never
    # the identity key: the same log tokens as penaltyd's, and nothing else.
    from penaltyd import keying

    secret = Settings(identity_key=KEY).log_key()
    assert secret is not None
    assert KEY.encode() not in secret
    penaltyd_line = AddressScrubber("keyed", secret).scrub("penalty for 203.0.113.7")
    config = tmp_path / "penaltyd.toml"
    config.write_text(f'identity_key = "{KEY}"\n')
    exported = tmp_path / "log.key"
    with contextlib.redirect_stdout(io.StringIO()) as out:
        assert keying.main(["--log-key", "--config", str(config)]) == 0
    exported.write_text(out.getvalue())
    from serving.settings import read_key

    sidecar_secret = read_key("", str(exported), "log_key")
    assert sidecar_secret == secret
    assert AddressScrubber("keyed", sidecar_secret).scrub("penalty for 203.0.113.7") == (
        penaltyd_line
    )
    # ...and it is no identity key: neither store tokens nor seals follow from it.
    as_key = Keying(secret)
    assert as_key.store_identity("203.0.113.7") != Keying(KEY.encode()).store_identity(
        "203.0.113.7"
    )
    assert as_key.open(Keying(KEY.encode()).label("203.0.113.7")) is None


def test_penaltyctl_shows_stored_control_characters_escaped() -> None:
    # Text stored before validation refused it (or a HELO name in a reason) never reaches
    # an operator's terminal as an escape sequence.
    from penaltyclient.ctl.output import literal

    assert literal("a\x1b]0;pwned\x07b\u202eevil").plain == "a\\x1b]0;pwned\\x07b\\u202eevil"
    assert literal("plain note, ünïcode").plain == "plain note, ünïcode"


async def test_discloses_scan_one_at_a_time(serve: ServeFactory) -> None:
    # Each Disclose scans the keyspace: eight at once must not become eight scans at once.
    pd = await serve(MemoryStore())
    running, most = 0, 0
    real = pd.engine.disclose

    async def counted(ref: ClientRef) -> object:
        nonlocal running, most
        running += 1
        most = max(most, running)
        try:
            await asyncio.sleep(0)  # a scan yields to the loop
            return await real(ref)
        finally:
            running -= 1

    pd.engine.disclose = counted
    request = pb.DiscloseRequest(client=client("203.0.113.1"), actor="dpo", note="REQ-2")
    answers = await asyncio.gather(*(pd.admin.Disclose(request) for _ in range(8)))
    assert len(answers) == 8
    assert most == 1
