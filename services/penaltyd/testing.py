"""A throwaway penaltyd process for tests and benchmarks.

The generic helpers (free ports, redis-server, Cluster and Sentinel sets, a service's
CLI as a child process) are shared with relaycheck in `penalty.testing`; only what is
penaltyd's own lives here. Nothing here is imported by the service itself.
"""

from __future__ import annotations

from penalty.testing import ServiceProcess, free_port


class PenaltydProcess(ServiceProcess):
    """`penaltyd` as a child process (the real CLI), for multi-replica tests and benches."""

    def __init__(
        self, *args: str, env: dict[str, str] | None = None, port: int | None = None
    ) -> None:
        port = port or free_port()
        super().__init__("penaltyd", ["--listen", f"127.0.0.1:{port}", *args], port, env)
