"""relaycheck: tells a customer's own mail from spam relayed through its open relay (issue 5).

An ISP's smart relay carries its customers' outbound mail; a customer whose server is an
open relay passes strangers' spam on. relaycheck reads the `Received:` chain of each
message the way DESIGN.md section 9 says (`chain`, on `headers`), answers whose mail it
is over gRPC (`api`, `engine`, `server`), reports relayed origins to penaltyd
(`report`), lets a Postfix smart relay ask at end of headers (`milter`) and tests relays
with the RFC 2505 battery (`probe`). Customers live in `store` (embedded or Redis).
"""

__version__ = "0.1.0"
