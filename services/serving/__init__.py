"""The foundation penaltyd and relaycheck stand on; not a service itself.

Everything both services need to *serve* lives here once: gRPC wiring (`server`,
`codec`, `errors`, `gates`), the settings base and loader (`settings`), the command
line (`cli`), logs (`logs`), `/metrics` (`metrics`) and Redis plumbing (`redis`). The
contract (`proto/penalty`) imports none of it; services never import each other.
"""
