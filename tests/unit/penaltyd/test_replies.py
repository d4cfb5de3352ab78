"""`Replies`: a tempfail verdict is rendered once per penalty, address and second left."""

from __future__ import annotations

from penalty.replies import DEFAULT_SMTP_REPLY
from penaltyd import api
from penaltyd.api import Replies
from penaltyd.engine import Answer
from penaltyd.store.base import Penalty

REASON = "burst;30;30;0.900;0.500;2=30"


def penalty(remaining_ms: int, expires_at_ms: int = 1_000_000) -> Penalty:
    return Penalty("203.0.113.7", remaining_ms, expires_at_ms, REASON)


def test_the_same_penalty_and_second_answer_one_rendered_verdict() -> None:
    replies = Replies(DEFAULT_SMTP_REPLY)
    first = replies.verdict(Answer("203.0.113.7", penalty(287_400)), "203.0.113.7")
    again = replies.verdict(Answer("203.0.113.7", penalty(287_100)), "203.0.113.7")
    assert again is first  # same second left (288): not rendered again
    assert first.tempfail
    assert first.seconds_left == 288
    assert first.smtp_reply.endswith("from 203.0.113.7; try again in 288 seconds")
    assert first.reason.startswith("burst of errors")


def test_every_field_of_the_reply_stays_exact() -> None:
    replies = Replies(DEFAULT_SMTP_REPLY)
    a = replies.verdict(Answer("203.0.113.7", penalty(287_400)), "203.0.113.7")
    later = replies.verdict(Answer("203.0.113.7", penalty(286_900)), "203.0.113.7")
    assert later.seconds_left == 287
    assert "287 seconds" in later.smtp_reply
    mapped = replies.verdict(Answer("203.0.113.7", penalty(287_400)), "::ffff:203.0.113.7")
    assert mapped is not a
    assert "from ::ffff:203.0.113.7;" in mapped.smtp_reply  # the address as the MX gave it
    degraded = replies.verdict(Answer("203.0.113.7", penalty(287_400), degraded=True), "x")
    assert degraded.degraded
    renewed = replies.verdict(
        Answer("203.0.113.7", penalty(287_400, expires_at_ms=2_000_000)), "203.0.113.7"
    )
    assert renewed.expires_at_unix_ms == 2_000_000


def test_the_cache_is_bounded() -> None:
    replies = Replies(DEFAULT_SMTP_REPLY)
    for i in range(api.VERDICT_CACHE + 10):
        replies.verdict(Answer("203.0.113.7", penalty(1_000 * (i + 1))), "203.0.113.7")
    assert len(replies._tempfail) <= api.VERDICT_CACHE


def test_a_pass_is_not_cached() -> None:
    replies = Replies(DEFAULT_SMTP_REPLY)
    v = replies.verdict(Answer("198.51.100.10", None), "198.51.100.10")
    assert not v.tempfail
    assert v.identity == "198.51.100.10"
    assert not replies._tempfail
