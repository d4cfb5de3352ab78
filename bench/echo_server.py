"""The Python gRPC ceiling: `PenaltyService` with the same messages and zero work.

Every penaltyd figure is judged against what a bare grpc.aio + uvloop servicer does on
the same machine in the same run, because the per-call cost of grpc.aio itself (~300 µs
of CPU, DESIGN.md s. 12a) is the ceiling no servicer logic can beat. This one parses the
same requests with the same generated code and answers a constant `Verdict`, on a server
built as penaltyd's (`serving.server.grpc_server`: the same options) with the same
methods registered as penaltyd registers them (Check, Report, Session): whatever penaltyd
does on top of that is its own cost.

Run as a child process by `bench`: ``python -m bench.echo_server --listen 127.0.0.1:PORT``.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from collections.abc import AsyncIterator

import grpc
import uvloop

from penalty.v1 import penalty_pb2
from penaltyd.settings import Settings
from serving.server import grpc_server

SERVICE = "penalty.v1.PenaltyService"

#: Built once: the echo answers every call with the same object (no per-call work).
VERDICT = penalty_pb2.Verdict(identity="198.51.100.10")
#: A tempfail of the size penaltyd sends (its reason and reply texts), for checks of the
#: address the bench penalizes: a bigger response costs grpc more, and the ceiling for
#: the penalized path must pay that too.
PENALIZED_IP = "203.0.113.7"
TEMPFAIL = penalty_pb2.Verdict(
    tempfail=True,
    seconds_left=287,
    expires_at_unix_ms=1_800_000_000_000,
    identity=PENALIZED_IP,
    reason="error ratio significantly above threshold: 40 weighted errors in 40 events, "
    "Wilson lower bound 0.816 > threshold 0.500 (unknown_recipient=40)",
    smtp_reply=f"450 4.7.1 too many SMTP errors from {PENALIZED_IP}; try again in 287 seconds",
)


class EchoService:
    """Answers without looking at the request beyond what grpc already parsed.

    Not derived from the generated servicer base: that would oblige it to implement every
    method the contract grows (streams it has no use for); only the measured ones exist.
    """

    async def Check(
        self, request: penalty_pb2.CheckRequest, context: grpc.aio.ServicerContext
    ) -> penalty_pb2.Verdict:
        return TEMPFAIL if request.client.ip == PENALIZED_IP else VERDICT

    async def Report(
        self, request: penalty_pb2.ReportRequest, context: grpc.aio.ServicerContext
    ) -> penalty_pb2.Verdict:
        return VERDICT

    async def Session(
        self,
        request_iterator: AsyncIterator[penalty_pb2.SessionRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[penalty_pb2.SessionResponse]:
        """One constant verdict per check and report: the streaming ceiling at that batch size."""
        async for request in request_iterator:
            yield penalty_pb2.SessionResponse(
                id=request.id,
                reports=[VERDICT] * len(request.reports),
                checks=[
                    TEMPFAIL if c.client.ip == PENALIZED_IP else VERDICT for c in request.checks
                ],
            )


def register(echo: EchoService, server: grpc.aio.Server) -> None:
    """Register as the generated `add_PenaltyServiceServicer_to_server` does.

    Same (de)serialisers (the generated message classes), and registered as well as
    generic handlers, as penaltyd's server does, so grpc takes the same fast path.
    """
    handlers = {
        "Check": grpc.unary_unary_rpc_method_handler(
            echo.Check,
            request_deserializer=penalty_pb2.CheckRequest.FromString,
            response_serializer=penalty_pb2.Verdict.SerializeToString,
        ),
        "Report": grpc.unary_unary_rpc_method_handler(
            echo.Report,
            request_deserializer=penalty_pb2.ReportRequest.FromString,
            response_serializer=penalty_pb2.Verdict.SerializeToString,
        ),
        "Session": grpc.stream_stream_rpc_method_handler(
            echo.Session,
            request_deserializer=penalty_pb2.SessionRequest.FromString,
            response_serializer=penalty_pb2.SessionResponse.SerializeToString,
        ),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    server.add_registered_method_handlers(SERVICE, handlers)


def _server(own_options: bool) -> grpc.aio.Server:
    """The grpc.aio server penaltyd builds (`serving.server.grpc_server` with penaltyd's
    default settings: the same options, e.g. its write buffer bound and connection age),
    so that the ceiling differs from penaltyd by the servicer alone; `own_options`: the
    three options the echo had before it used penaltyd's (for comparison)."""
    if own_options:
        return grpc.aio.server(
            options=[
                ("grpc.so_reuseport", 0),
                ("grpc.keepalive_permit_without_calls", 1),
                ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
            ]
        )
    return grpc_server(Settings())


async def serve(listen: str, *, own_options: bool = False) -> None:
    """Serve until SIGTERM/SIGINT, on a server built as penaltyd's is (`_server`)."""
    server = _server(own_options)
    register(EchoService(), server)
    server.add_insecure_port(listen)
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"echo_server listening on {listen}", flush=True)
    await stop.wait()
    await server.stop(0.5)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.echo_server", description=__doc__)
    parser.add_argument("--listen", required=True, metavar="HOST:PORT")
    parser.add_argument(
        "--own-options", action="store_true", help="the echo's three options, not penaltyd's"
    )
    args = parser.parse_args(argv)
    uvloop.run(serve(args.listen, own_options=args.own_options))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
