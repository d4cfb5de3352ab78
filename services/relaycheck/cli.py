"""`relaycheck`: the server, and the tools an abuse desk and an operator use.

    relaycheck serve [--listen HOST:PORT] [--redis-url URL] [--penaltyd HOST:PORT] ...
    relaycheck classify message.eml --customer ID [--client-ip IP] [--rcpt ADDR ...]
    relaycheck probe HOST[:PORT] [--budget SECONDS] [--step-timeout SECONDS] ...
    relaycheck customer upsert ID --relay-network CIDR --domain DOMAIN ...
    relaycheck customer get ID | --ip IP
    relaycheck customer delete ID

`classify` asks a running relaycheck (`--server`, default RELAYCHECK_ADDRESS or
127.0.0.1:50061) as a dry run (`no_report`: evidence read today does not penalize
anyone today; `--report` to report anyway), or, given the customer's networks and
domains on the command line (`--domain`, `--relay-network`, `--internal-network`),
judges offline with no server at all. `probe` runs the battery from this machine
unless `--server` asks relaycheck to run it. Every command prints for humans, or JSON
with `--json` (the protobuf answer, field names as in the .proto).

Exit codes: 0 success (probe: no test relayed), 1 probe: the host relays, 2 usage or
input error, 3 the server or the probed host could not be reached.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import json_format
from google.protobuf.message import Message

from relaycheck import __version__
from relaycheck.settings import load_settings
from serving.cli import add_serving_arguments, run_server

DEFAULT_SERVER = "127.0.0.1:50061"
EXIT_OK, EXIT_RELAYING, EXIT_USAGE, EXIT_UNREACHABLE = 0, 1, 2, 3


_FLAGS = {
    "id": "--customer",
    "relay_networks": "--relay-network",
    "internal_networks": "--internal-network",
    "domains": "--domain",
}


class UsageError(Exception):
    """Bad arguments or input: exit 2 with the message."""


def _server_default() -> str:
    return os.environ.get("RELAYCHECK_ADDRESS", DEFAULT_SERVER)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="relaycheck",
        description=(
            "Tell a customer's own mail from spam relayed through its open relay "
            "(Received-chain walk), and test relays with the RFC 2505 battery."
        ),
    )
    p.add_argument("--version", action="version", version=f"relaycheck {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("serve", help="run the gRPC service")
    add_serving_arguments(
        s,
        env_prefix="RELAYCHECK",
        default_listen="127.0.0.1:50061",
        redis_help="customers in Redis: a redis:// (or +sentinel, +cluster) URL",
    )
    s.add_argument(
        "--penaltyd",
        metavar="HOST:PORT",
        help="report relayed origins to this penaltyd (default: no reports)",
    )

    def client_options(a: argparse.ArgumentParser) -> None:
        a.add_argument("--json", action="store_true", help="print the answer as JSON")
        a.add_argument(
            "--token",
            default=os.environ.get("RELAYCHECK_ADMIN_TOKEN", ""),
            help="admin token for operator calls (env RELAYCHECK_ADMIN_TOKEN)",
        )
        a.add_argument("--timeout", type=float, default=10.0, help="seconds per call")

    c = sub.add_parser("classify", help="judge a message (.eml) for a customer")
    c.add_argument("message", help="the message or its headers (.eml); - for stdin")
    c.add_argument("--customer", metavar="ID", help="the customer (else found by --client-ip)")
    c.add_argument("--client-ip", default="", help="the customer relay's address, if known")
    c.add_argument("--mail-from", default="", help="envelope sender at the smart relay")
    c.add_argument("--rcpt", action="append", default=[], metavar="ADDR", help="envelope recipient")
    c.add_argument("--server", default=None, metavar="HOST:PORT", help="relaycheck to ask")
    c.add_argument("--report", action="store_true", help="let the server report a relayed origin")
    c.add_argument("--domain", action="append", default=[], help="offline: a customer domain")
    c.add_argument("--relay-network", action="append", default=[], help="offline: relay CIDR")
    c.add_argument("--internal-network", action="append", default=[], help="offline: internal CIDR")
    c.add_argument(
        "--own-host", action="append", default=[], help="offline: our smart relay's name"
    )
    client_options(c)

    pr = sub.add_parser("probe", help="run the RFC 2505 relay battery against a host")
    pr.add_argument("target", metavar="HOST[:PORT]")
    pr.add_argument("--step-timeout", type=float, default=5.0, help="seconds per command")
    pr.add_argument("--budget", type=float, default=60.0, help="seconds for the battery")
    pr.add_argument("--helo", default="relaycheck.invalid", help="our EHLO name")
    pr.add_argument("--local-domain", default="", help="a domain the host serves")
    pr.add_argument("--foreign-domain", default="relay-test.invalid")
    pr.add_argument("--test", action="append", default=[], help="run only these tests")
    pr.add_argument("--server", default=None, metavar="HOST:PORT", help="ask relaycheck to run it")
    client_options(pr)

    cu = sub.add_parser("customer", help="manage customers on a running relaycheck")
    cs = cu.add_subparsers(dest="action", required=True, metavar="ACTION")
    up = cs.add_parser("upsert", help="create or replace a customer")
    up.add_argument("id")
    up.add_argument("--relay-network", action="append", default=[], metavar="CIDR")
    up.add_argument("--internal-network", action="append", default=[], metavar="CIDR")
    up.add_argument("--domain", action="append", default=[])
    up.add_argument("--note", default="")
    get = cs.add_parser("get", help="show a customer (by id or by relay address)")
    get.add_argument("id", nargs="?", default="")
    get.add_argument("--ip", default="")
    de = cs.add_parser("delete", help="forget a customer")
    de.add_argument("id")
    for a in (up, get, de):
        a.add_argument("--server", default=None, metavar="HOST:PORT")
        client_options(a)
    return p


# --- output


def _as_dict(message: Message) -> dict[str, Any]:
    return json_format.MessageToDict(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )


def _print_classification(c: Any) -> None:
    from relaycheck.v1 import relaycheck_pb2 as pb

    verdict = pb.Verdict.Name(c.verdict).removeprefix("VERDICT_")
    print(f"verdict:   {verdict}" + (f"  (customer {c.customer_id})" if c.customer_id else ""))
    if c.verdict == pb.VERDICT_UNDETERMINED and c.leaning:
        print(
            f"leaning:   {pb.Verdict.Name(c.leaning).removeprefix('VERDICT_')} (weak evidence only)"
        )
    if c.degraded:
        print("degraded:  the customer store did not answer")
    if c.origin_ip:
        print(f"origin:    {c.origin_ip}")
    if c.HasField("entry_hop"):
        print(f"entry hop: Received line {c.entry_hop.index}: {c.entry_hop.raw[:200]}")
    print(
        f"hops:      {c.hops} Received lines read"
        + ("; reported to penaltyd" if c.reported else "")
    )
    print("evidence:")
    for e in c.evidence:
        where = "weak" if e.weak else (f"hop {e.hop}" if e.hop >= 0 else "-")
        print(f"  [{where}] {e.rule}: {e.detail}")


def _print_customer(c: Any) -> None:
    import datetime as dt

    def when(ms: int) -> str:
        return (
            dt.datetime.fromtimestamp(ms / 1000, dt.UTC).isoformat(timespec="seconds")
            if ms
            else "-"
        )

    print(f"customer:          {c.id}")
    print(f"relay networks:    {', '.join(c.relay_networks) or '-'}")
    print(f"internal networks: {', '.join(c.internal_networks) or '-'}")
    print(f"domains:           {', '.join(c.domains) or '-'}")
    if c.note:
        print(f"note:              {c.note}")
    print(f"updated:           {when(c.updated_at_unix_ms)}")
    print(f"expires:           {when(c.expires_at_unix_ms)}")


def _print_probe(r: Any) -> None:
    from relaycheck.v1 import relaycheck_pb2 as pb

    print(f"target:  {r.host}:{r.port}" + (f"  ({r.banner})" if r.banner else ""))
    if r.error:
        print(f"error:   {r.error}")
    if r.local_domain:
        print(f"local:   {r.local_domain}")
    for t in r.tests:
        result = pb.ProbeTest.Result.Name(t.result).removeprefix("RESULT_")
        codes = "/".join(str(c) for c in (t.mail_code, t.rcpt_code) if c)
        print(
            f"  {result:<8} {t.name:<22} MAIL <{t.mail_from}> RCPT <{t.rcpt_to}>"
            + (f"  {codes}" if codes else "")
        )
    relayed = [t.name for t in r.tests if t.result == pb.ProbeTest.RESULT_ACCEPTED]
    verdict = f"OPEN RELAY: {', '.join(relayed)} relayed" if relayed else "no test relayed"
    exhausted = " (budget exhausted)" if r.budget_exhausted else ""
    print(f"result:  {verdict} in {r.elapsed_ms} ms{exhausted}")


def _emit(message: Message, as_json: bool, human: Any) -> None:
    if as_json:
        print(json.dumps(_as_dict(message), indent=2))
    else:
        human(message)


# --- commands


def _read_message(path: str) -> bytes:
    try:
        data = sys.stdin.buffer.read() if path == "-" else Path(path).read_bytes()
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc}") from exc
    return data


async def _call(server: str, token: str, seconds: float, method: str, request: Message) -> Any:
    from relaycheck.v1 import relaycheck_pb2_grpc as pbg

    metadata = (("authorization", f"Bearer {token}"),) if token else ()
    async with grpc.aio.insecure_channel(server) as channel:
        stub = pbg.RelayCheckStub(channel)
        return await getattr(stub, method)(request, timeout=seconds, metadata=metadata)


async def _classify(args: argparse.Namespace) -> int:
    from relaycheck.api import classification
    from relaycheck.v1 import relaycheck_pb2 as pb

    headers = _read_message(args.message)
    offline = bool(args.domain or args.relay_network or args.internal_network or args.own_host)
    if not offline:
        if not args.customer and not args.client_ip:
            raise UsageError("give --customer ID (or --client-ip of the customer's relay)")
        request = pb.ClassifyRequest(
            customer_id=args.customer or "",
            client_ip=args.client_ip,
            mail_from=args.mail_from,
            rcpt_to=args.rcpt,
            headers=headers,
            no_report=not args.report,
        )
        answer = await _call(
            args.server or _server_default(), args.token, args.timeout, "Classify", request
        )
        _emit(answer, args.json, _print_classification)
        return EXIT_OK

    from relaycheck.chain import Envelope, WalkOptions, classify_headers, parse_client_ip
    from relaycheck.customers import BadCustomer, NetworkRules, build_customer
    from relaycheck.engine import Classified
    from relaycheck.headers import Limits

    try:
        customer = build_customer(
            args.customer or "offline",
            args.relay_network,
            args.internal_network,
            args.domain,
            rules=NetworkRules(0, 0),  # offline: whatever the operator says
        )
    except BadCustomer as exc:
        flag = _FLAGS.get(exc.field.split("[")[0], exc.field)
        raise UsageError(f"{flag}: {exc.message}") from exc
    client = parse_client_ip(args.client_ip)
    if args.client_ip and client is None:
        raise UsageError(f"--client-ip: not an IP address: {args.client_ip!r}")
    # An .eml on disk may be any size: the whole header block is read (not the body).
    options = WalkOptions(own_hostnames=tuple(args.own_host), limits=Limits(max_bytes=1 << 24))
    judgement = classify_headers(
        customer, headers, Envelope(client, "", args.mail_from, tuple(args.rcpt)), options
    )
    _emit(classification(Classified(judgement, customer.id)), args.json, _print_classification)
    return EXIT_OK


def _split_target(target: str) -> tuple[str, int]:
    if target.startswith("["):
        host, _, rest = target[1:].partition("]")
        port = rest.removeprefix(":")
    elif target.count(":") == 1:
        host, _, port = target.partition(":")
    else:
        host, port = target, ""
    if not host or (port and not (port.isdigit() and 0 < int(port) <= 65535)):
        raise UsageError(f"not HOST[:PORT]: {target!r}")
    return host, int(port or 25)


async def _probe(args: argparse.Namespace) -> int:
    from relaycheck.api import probe_message
    from relaycheck.probe import TEST_NAMES, run_battery
    from relaycheck.v1 import relaycheck_pb2 as pb

    host, port = _split_target(args.target)
    unknown = [t for t in args.test if t not in TEST_NAMES]
    if unknown:
        raise UsageError(f"unknown test(s) {unknown}; known: {', '.join(sorted(TEST_NAMES))}")
    if args.server:
        request = pb.ProbeRequest(
            host=host,
            port=port,
            step_timeout_ms=int(args.step_timeout * 1000),
            budget_ms=int(args.budget * 1000),
            helo=args.helo,
            local_domain=args.local_domain,
            foreign_domain=args.foreign_domain,
            tests=args.test,
        )
        result = await _call(args.server, args.token, args.budget + args.timeout, "Probe", request)
    else:
        report = await run_battery(
            host,
            port,
            step_timeout=args.step_timeout,
            budget=args.budget,
            helo=args.helo,
            local_domain=args.local_domain,
            foreign_domain=args.foreign_domain,
            tests=args.test,
        )
        result = probe_message(report)
    _emit(result, args.json, _print_probe)
    if result.relaying:
        return EXIT_RELAYING
    return EXIT_UNREACHABLE if result.error else EXIT_OK


async def _customer(args: argparse.Namespace) -> int:
    from relaycheck.v1 import relaycheck_pb2 as pb

    server = args.server or _server_default()
    if args.action == "upsert":
        request: Message = pb.Customer(
            id=args.id,
            relay_networks=args.relay_network,
            internal_networks=args.internal_network,
            domains=args.domain,
            note=args.note,
        )
        answer = await _call(server, args.token, args.timeout, "UpsertCustomer", request)
        _emit(answer, args.json, _print_customer)
    elif args.action == "get":
        request = pb.GetCustomerRequest(id=args.id, ip=args.ip)
        answer = await _call(server, args.token, args.timeout, "GetCustomer", request)
        _emit(answer, args.json, _print_customer)
    else:
        request = pb.DeleteCustomerRequest(id=args.id)
        answer = await _call(server, args.token, args.timeout, "DeleteCustomer", request)
        _emit(answer, args.json, lambda a: print("deleted" if a.deleted else "no such customer"))
    return EXIT_OK


def _serve(args: argparse.Namespace) -> int:
    from relaycheck.server import serve

    return run_server(
        "relaycheck",
        args,
        load_settings,
        serve,
        module="relaycheck",
        env_prefix="RELAYCHECK",
        penaltyd=args.penaltyd,
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.command == "serve":
        return _serve(args)
    runner = {"classify": _classify, "probe": _probe, "customer": _customer}[args.command]
    try:
        return asyncio.run(runner(args))
    except UsageError as exc:
        print(f"relaycheck {args.command}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except grpc.aio.AioRpcError as exc:
        print(f"relaycheck {args.command}: {exc.code().name}: {exc.details()}", file=sys.stderr)
        if exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
            return EXIT_UNREACHABLE
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
