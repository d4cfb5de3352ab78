"""The SMTP reply of a penalty: a temporary refusal stating the exact time left
(DESIGN.md s. 7). The default text exists here once; penaltyd's `smtp_reply` setting
may replace it, and penaltyd tells live replicas the one it uses."""

from __future__ import annotations

DEFAULT_SMTP_REPLY = "450 4.7.1 too many SMTP errors from {ip}; try again in {seconds} seconds"


def render(template: str, ip: str, identity: str, seconds: int) -> str:
    """The reply for one client: `{ip}`, `{identity}` and `{seconds}` filled in."""
    return template.format(ip=ip, identity=identity, seconds=seconds)
