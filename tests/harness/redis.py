"""Real redis-servers on free loopback ports: one node, a Cluster, a Sentinel set.

Integration tests and `make bench` talk to a real `redis-server` (never a mock),
started and stopped here so every test and bench uses one implementation. A Cluster
node also listens on its port + 10000 (the cluster bus), so its ports come from
`free_cluster_ports`.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Self

from tests.harness.ports import free_port, free_ports, wait_port
from tests.harness.processes import terminate


class RedisServer:
    """A redis-server child process on 127.0.0.1:<port>, no persistence."""

    def __init__(self, port: int | None = None, extra: Sequence[str] = ()) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server not found: `make test` installs Debian's redis-server")
        self.binary = binary
        self.port = port or free_port()
        self.extra = list(extra)
        self.dir = tempfile.mkdtemp(prefix="penaltyd-redis-")
        self.proc: subprocess.Popen[bytes] | None = None
        self.binary_args: list[str] = []  # e.g. a sentinel.conf path, before the options
        self.log_path = os.path.join(self.dir, "redis.log")

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        self.proc = subprocess.Popen(
            [
                self.binary,
                *self.binary_args,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                self.dir,
                "--logfile",
                "",
                "--loglevel",
                "warning",
                *self.extra,
            ],
            stdout=open(self.log_path, "ab"),  # noqa: SIM115  (the child owns it)
            stderr=subprocess.STDOUT,
        )
        try:
            wait_port("127.0.0.1", self.port, proc=self.proc)
        except (RuntimeError, TimeoutError) as exc:
            tail = Path(self.log_path).read_text(errors="replace")[-600:]
            raise RuntimeError(f"redis-server on {self.port}: {exc}\n{tail}") from exc
        return self

    def kill(self) -> None:
        """SIGKILL: the store vanishes as in a crash."""
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def pause(self) -> None:
        """SIGSTOP: connections stay open but nothing answers (a hung store)."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)  # a paused server must see the SIGTERM
            terminate(self.proc, 5)
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@contextlib.contextmanager
def redis_server(extra: Sequence[str] = ()) -> Iterator[RedisServer]:
    with RedisServer(extra=extra) as server:
        yield server


def free_cluster_ports(n: int) -> list[int]:
    """`n` distinct ports below 55536 whose cluster-bus twins (port + 10000) are free too."""
    for _ in range(50):
        ports = free_ports(n)
        try:
            for port in ports:
                with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                    s.bind(("127.0.0.1", port + 10000))
        except OSError:
            continue
        return ports
    raise RuntimeError("no free ports for a cluster")


def _pairs(flat: Any) -> dict[bytes, Any]:
    """CLUSTER SHARDS rows come as flat key/value lists (RESP2) or dicts."""
    return flat if isinstance(flat, dict) else dict(zip(flat[::2], flat[1::2], strict=True))


class _ServerGroup:
    """Several servers started as one: a start that fails part-way stops what it started."""

    def start(self) -> Self:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc: object) -> None:
        self.stop()


class RedisClusterServers(_ServerGroup):
    """A real Redis Cluster on loopback: `masters` masters with one replica each."""

    def __init__(self, masters: int = 3) -> None:
        opts = ["--cluster-enabled", "yes", "--cluster-node-timeout", "1000"]
        self.nodes = [
            RedisServer(port, extra=[*opts, "--cluster-config-file", f"nodes-{port}.conf"])
            for port in free_cluster_ports(2 * masters)
        ]
        self.masters = masters

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(
            f"127.0.0.1:{n.port}" for n in self.nodes[: self.masters]
        )

    def start(self) -> Self:
        for node in self.nodes:
            node.start()
        subprocess.run(
            ["redis-cli", "--cluster", "create", *[f"127.0.0.1:{n.port}" for n in self.nodes],
             "--cluster-replicas", "1", "--cluster-yes"],
            check=True, capture_output=True, timeout=60,
        )  # fmt: skip
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            info = subprocess.run(
                ["redis-cli", "-p", str(self.nodes[0].port), "cluster", "info"],
                capture_output=True,
                text=True,
            ).stdout
            if (
                "cluster_state:ok" in info
                and all(self._ok(n.port) for n in self.nodes)
                and self._synced()
            ):
                return self
            time.sleep(0.1)
        raise TimeoutError("redis cluster did not converge")

    def _synced(self) -> bool:
        """Every replica has finished its initial sync (so WAIT can be relied on)."""
        import redis

        for node in self.nodes:
            r = redis.Redis(port=node.port)
            info = r.info("replication")
            r.close()
            if info.get("role") == "slave" and info.get("master_link_status") != "up":
                return False
        return True

    @staticmethod
    def _ok(port: int) -> bool:
        out = subprocess.run(
            ["redis-cli", "-p", str(port), "cluster", "info"], capture_output=True, text=True
        )
        return "cluster_state:ok" in out.stdout

    def master_for(self, key: str) -> RedisServer:
        """The live node currently serving `key`'s slot (as the cluster says)."""
        import redis

        for probe in self.nodes:
            if probe.proc is None or probe.proc.poll() is not None:
                continue
            r = redis.Redis(port=probe.port, socket_timeout=2)
            try:
                slot = int(r.cluster("KEYSLOT", key))
                shards: Any = r.execute_command("CLUSTER SHARDS")  # type: ignore[no-untyped-call]  # redis-py
            finally:
                r.close()
            for row in shards:
                shard = _pairs(row)
                ranges = shard[b"slots"]
                if not any(ranges[k] <= slot <= ranges[k + 1] for k in range(0, len(ranges), 2)):
                    continue
                for node in map(_pairs, shard[b"nodes"]):
                    if node[b"role"] == b"master" and node[b"health"] == b"online":
                        return next(n for n in self.nodes if n.port == int(node[b"port"]))
        raise LookupError(f"no live master serves {key}")

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


class RedisSentinelServers(_ServerGroup):
    """A master, a replica and three sentinels watching them, on loopback."""

    def __init__(self, service: str = "penaltyd") -> None:
        self.service = service
        master, replica, *self.sentinel_ports = free_ports(5)
        self.master = RedisServer(master)
        self.replica = RedisServer(replica)
        self.sentinels: list[RedisServer] = []

    @property
    def url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{p}" for p in self.sentinel_ports)
        return f"redis+sentinel://{hosts}/{self.service}/0"

    def start(self) -> Self:
        self.master.start()
        self.replica.extra = ["--replicaof", "127.0.0.1", str(self.master.port)]
        self.replica.start()
        import redis

        deadline = time.monotonic() + 20
        replica = redis.Redis(port=self.replica.port)
        while replica.info("replication").get("master_link_status") != "up":
            if time.monotonic() > deadline:
                raise TimeoutError("the replica never synced with the master")
            time.sleep(0.05)
        replica.close()
        for port in self.sentinel_ports:
            conf = Path(tempfile.mkdtemp(prefix="penaltyd-sentinel-")) / "sentinel.conf"
            conf.write_text(
                f"port {port}\nbind 127.0.0.1\n"
                f"sentinel monitor {self.service} 127.0.0.1 {self.master.port} 2\n"
                f"sentinel down-after-milliseconds {self.service} 1000\n"
                f"sentinel failover-timeout {self.service} 5000\n"
                f"sentinel parallel-syncs {self.service} 1\n"
            )
            node = RedisServer(port)
            node.extra = ["--sentinel"]
            node.binary_args = [str(conf)]
            self.sentinels.append(node.start())
        return self

    def stop(self) -> None:
        for node in [*self.sentinels, self.replica, self.master]:
            node.stop()
