"""Channels to the penaltyd fleet: one target string, client-side round robin.

`"10.0.0.5:50051"` is one replica; `"10.0.0.5:50051,10.0.0.6:50051"` a static list
(IP literals, balanced by grpc's `ipv4:`/`ipv6:` resolver); `"dns:///penaltyd:50051"` a
name whose A/AAAA records are the replicas (a Kubernetes headless Service). Calls are
spread with `round_robin`, so every replica takes its share of checks.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Sequence
from typing import Any

import grpc

SERVICE_CONFIG = json.dumps({"loadBalancingConfig": [{"round_robin": {}}]})

OPTIONS: list[tuple[str, Any]] = [
    ("grpc.service_config", SERVICE_CONFIG),
    ("grpc.enable_retries", 0),  # we retry ourselves, inside the caller's deadline
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 2_000),
]


def _split(address: str) -> tuple[str, str]:
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"not HOST:PORT: {address!r}")
    return host.strip("[]"), port


def grpc_target(targets: str | Sequence[str]) -> str:
    """Turn "a:1,b:2" (or a list) into a grpc target that balances over all of them."""
    parts = [
        t.strip()
        for t in (targets.split(",") if isinstance(targets, str) else targets)
        if t.strip()
    ]
    if not parts:
        raise ValueError("no penaltyd address given")
    if len(parts) == 1:
        return parts[0]
    if any("://" in p for p in parts):
        raise ValueError("a dns:/// target names all replicas itself; give it alone")
    versions = set()
    for p in parts:
        host, _ = _split(p)
        try:
            versions.add(ipaddress.ip_address(host).version)
        except ValueError as exc:
            raise ValueError(
                f"several addresses must be IP literals ({host!r} is not); "
                "for names use one dns:///name:port target"
            ) from exc
    if versions == {4}:
        return "ipv4:" + ",".join(parts)
    if versions == {6}:
        return "ipv6:" + ",".join(f"[{_split(p)[0]}]:{_split(p)[1]}" for p in parts)
    raise ValueError("mix of IPv4 and IPv6 replicas: use a dns:/// target")


def aio_channel(
    targets: str | Sequence[str], credentials: grpc.ChannelCredentials | None = None
) -> grpc.aio.Channel:
    target = grpc_target(targets)
    if credentials is None:
        return grpc.aio.insecure_channel(target, options=OPTIONS)
    return grpc.aio.secure_channel(target, credentials, options=OPTIONS)


def sync_channel(
    targets: str | Sequence[str], credentials: grpc.ChannelCredentials | None = None
) -> grpc.Channel:
    target = grpc_target(targets)
    if credentials is None:
        return grpc.insecure_channel(target, options=OPTIONS)
    return grpc.secure_channel(target, credentials, options=OPTIONS)
