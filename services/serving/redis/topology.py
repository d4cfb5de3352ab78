"""Redis topologies from one URL: a single node, Sentinel, or Cluster (DESIGN.md s. 5, 11).

- ``redis://[:password@]host:port/db`` (also ``rediss://``, ``unix://``): one node.
- ``redis+sentinel://[:password@]host:port[,host:port...]/service[/db]``: ask the
  sentinels for the master of `service`; a failover is followed on reconnect.
- ``redis+cluster://[:password@]host:port[,host:port...]``: a Redis Cluster; the listed
  nodes are only the seeds, the slot map is discovered.

`connect` returns the command client and a separate client for a store's feed (pub/sub),
whose connection must never retry silently (a reconnect may have missed events). Every
store of every service connects through here, so each runs on every topology.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit

import hiredis
import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.connection import Connection
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import NoBackoff

from serving.errors import StoreMisconfigured
from serving.redis.lane import LaneRedis

COMMON: dict[str, Any] = {
    # No per-read socket timeout: it halves redis-py's throughput (DESIGN.md s. 12a);
    # deadlines are enforced once per operation by the engine.
    "socket_timeout": None,
    "socket_connect_timeout": 0.5,
    "health_check_interval": 0,
    "decode_responses": False,
}


class HiredisPackingConnection(Connection):
    """redis-py's asyncio connection packs commands in pure Python even when hiredis is
    installed; packing EVALSHA arguments was a quarter of penaltyd's CPU under Session
    report load. hiredis packs them in C (the sync client already does this)."""

    def pack_command(self, *args: Any) -> list[bytes]:
        if isinstance(args[0], str) and " " in args[0]:  # e.g. "SCRIPT LOAD": send words apart
            args = (*args[0].split(), *args[1:])
        return [hiredis.pack_command(args)]


@dataclass(frozen=True, slots=True)
class Topology:
    kind: str  # "single", "sentinel" or "cluster"
    hosts: tuple[tuple[str, int], ...] = ()
    service: str = ""
    db: int = 0
    password: str | None = None
    username: str | None = None
    # Single EVALSHAs and short pipelines go on a `serving.redis.lane.Lane`, whose single
    # flight lets concurrent calls share round trips by themselves (a plain redis:// node).
    lane: bool = False


def parse(url: str) -> Topology:
    """Raises StoreMisconfigured naming what is wrong with the URL."""
    parts = urlsplit(url)
    scheme = parts.scheme
    if scheme in ("redis", "rediss", "unix"):
        return Topology("single")
    if scheme not in ("redis+sentinel", "redis+cluster"):
        raise StoreMisconfigured(f"unknown redis URL scheme {scheme!r}")
    netloc = parts.netloc.rpartition("@")[2]
    hosts = []
    for item in filter(None, netloc.split(",")):
        host, sep, port = item.rpartition(":")
        if not sep or not port.isdigit():
            raise StoreMisconfigured(f"{scheme}: {item!r} is not HOST:PORT")
        hosts.append((host.strip("[]"), int(port)))
    if not hosts:
        raise StoreMisconfigured(f"{scheme}: no HOST:PORT given")
    auth = parts.netloc.rpartition("@")[0] if "@" in parts.netloc else ""
    user, _, password = auth.partition(":")
    path = [p for p in parts.path.split("/") if p]
    if scheme == "redis+cluster":
        if path:
            raise StoreMisconfigured("redis+cluster: a Cluster has no database number or service")
        return Topology(
            "cluster",
            tuple(hosts),
            password=unquote(password) or None,
            username=unquote(user) or None,
        )
    if not path:
        raise StoreMisconfigured(
            "redis+sentinel: the master's service name is missing (…/SERVICE[/DB])"
        )
    db = path[1] if len(path) > 1 else "0"
    if not db.isdigit():
        raise StoreMisconfigured(f"redis+sentinel: database {db!r} is not a number")
    return Topology(
        "sentinel", tuple(hosts), path[0], int(db), unquote(password) or None, unquote(user) or None
    )


def connect(url: str, max_connections: int) -> tuple[Topology, Any, Any]:
    """(topology, command client, feed client). Connects lazily: nothing is sent yet."""
    topo = parse(url)
    client: Any
    feed: Any
    command_retry = Retry(NoBackoff(), 1)  # covers the stale pooled connection after a restart
    feed_retry = Retry(NoBackoff(), 0)
    if topo.kind == "single":
        fast: dict[str, Any] = {}
        plain = urlsplit(url).scheme == "redis"  # TLS and unix sockets keep their own classes
        if plain:
            fast["connection_class"] = HiredisPackingConnection
        pool = aioredis.BlockingConnectionPool.from_url(
            url, max_connections=max_connections, timeout=None, **COMMON, **fast
        )
        if plain:  # single script calls (a unary Report) on a lean lane (`serving.redis.lane`)
            client = LaneRedis(connection_pool=pool, retry=command_retry)
            client.attach_lane()
            topo = dataclasses.replace(topo, lane=True)
        else:
            client = aioredis.Redis(connection_pool=pool, retry=command_retry)
        feed = aioredis.Redis.from_url(url, retry=feed_retry, **COMMON)
        return topo, client, feed
    auth: dict[str, Any] = {"password": topo.password, "username": topo.username}
    if topo.kind == "sentinel":
        sentinel = Sentinel(  # type: ignore[no-untyped-call]  # redis-py leaves it unannotated
            list(topo.hosts),
            sentinel_kwargs={"socket_connect_timeout": 0.5, "socket_timeout": 0.5},
            **COMMON,
        )
        client = sentinel.master_for(
            topo.service, db=topo.db, max_connections=max_connections, retry=command_retry, **auth
        )
        feed = sentinel.master_for(topo.service, db=topo.db, retry=feed_retry, **auth)
        return topo, client, feed
    nodes = [ClusterNode(h, p) for h, p in topo.hosts]
    kw: dict[str, Any] = {k: v for k, v in COMMON.items() if k != "health_check_interval"} | auth
    client = RedisCluster(startup_nodes=nodes, max_connections=max_connections, **kw)
    feed = RedisCluster(startup_nodes=nodes, **kw)
    return topo, client, feed
