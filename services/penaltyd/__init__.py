"""penaltyd: statistical SMTP error penalties for a fleet of mail exchangers.

Data flows one way (DESIGN.md section 1): MX events become reports, reports update
windows (`store`), windows produce penalties (`detector`), penalties flow out through
checks (`api`) and the feed (`feed`). `server` wires it to grpc.aio; `settings` is the
one typed configuration object.
"""

__version__ = "0.1.0"
