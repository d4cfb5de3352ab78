"""The test harness: real servers for tests and benchmarks, never shipped.

- `ports`: free loopback ports (Cluster-safe), waiting for a listener.
- `redis`: a throwaway redis-server, a Cluster and a Sentinel set on free ports.
- `processes`: a service's real CLI as a child process (penaltyd, relaycheck).
- `inprocess`: an in-process penaltyd or relaycheck bound to port 0, with stubs.
- `tls`: throwaway certificates (self-signed; a CA with server and client certs).
- `builders`: small request builders and `eventually` for conditions of other processes.

Fixtures live in the conftests and use these; tests import helpers from here, never
from a conftest.
"""
