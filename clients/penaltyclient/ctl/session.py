"""The session of one `penaltyctl` invocation: the global options, one client, and the
mapping of every failure to an exit code.

Every command goes through `Session`: it opens the blocking `PenaltyClient` the way the
options say (address, token, TLS, deadline), turns each gRPC error into one readable
stderr line and the exit code a script can branch on (never a traceback), and prints the
command's result as JSON or as rich text, whichever was asked for.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import grpc
import typer
from google.protobuf.message import Message
from rich.console import Console, RenderableType

from penaltyclient.aio import PenaltydError
from penaltyclient.ctl.exits import Code, fail
from penaltyclient.ctl.output import console, emit, literal
from penaltyclient.ctl.parsing import check_target
from penaltyclient.sync import PenaltyClient


@dataclass
class Session:
    """Global options, kept on the typer context for every command."""

    address: str
    token: str
    json: bool
    timeout: float
    tls: bool
    tls_ca: Path | None
    tls_cert: Path | None
    tls_key: Path | None

    @classmethod
    def of(cls, ctx: typer.Context, json_out: bool) -> Session:
        """The global options, with a command's own `--json` (accepted on either side)."""
        obj = ctx.find_object(cls)
        assert obj is not None, "the app callback sets ctx.obj"
        if json_out:
            obj.json = True
        return obj

    # --- output: one call per result, JSON or human as asked

    @property
    def out(self) -> Console:
        return console()

    def emit(self, message: Message) -> None:
        """One JSON document (or one JSON line, in streams) on stdout."""
        emit(message)

    def show(self, message: Message, human: RenderableType) -> None:
        """A command's result: `message` as JSON with --json, else `human` as rich text."""
        if self.json:
            self.emit(message)
        else:
            self.out.print(human)

    def conclude(self, message: Message, done: bool, did: str, nothing: str) -> NoReturn:
        """The result of a change that may find nothing to change (lift, unallow): print
        it, then exit 0 if it was done or 1 (nothing to do) if not."""
        self.show(message, literal(did, "green") if done else literal(nothing, "yellow"))
        raise typer.Exit(int(Code.OK if done else Code.NOTHING))

    # --- the client and its failures

    def credentials(self) -> grpc.ChannelCredentials | None:
        """TLS when asked for (or implied by a CA/cert file); None means plaintext."""
        if not (self.tls or self.tls_ca or self.tls_cert or self.tls_key):
            return None
        if bool(self.tls_cert) != bool(self.tls_key):
            fail(Code.USAGE, "--tls-cert and --tls-key go together (mutual TLS)")
        try:
            ca = self.tls_ca.read_bytes() if self.tls_ca else None
            cert = self.tls_cert.read_bytes() if self.tls_cert else None
            key = self.tls_key.read_bytes() if self.tls_key else None
        except OSError as exc:
            fail(Code.USAGE, f"cannot read TLS file: {exc}")
        return grpc.ssl_channel_credentials(
            root_certificates=ca, private_key=key, certificate_chain=cert
        )

    @contextlib.contextmanager
    def client(self) -> Iterator[PenaltyClient]:
        """A client for one command; every failure leaves as a readable line and exit code."""
        creds = self.credentials()
        try:
            check_target(self.address)
            client = PenaltyClient(
                self.address,
                deadline=self.timeout,
                admin_deadline=self.timeout,
                admin_token=self.token,
                credentials=creds,
            )
        except ValueError as exc:
            fail(Code.USAGE, f"--penaltyd {self.address!r}: {exc}")
        try:
            yield client
        except PenaltydError as exc:
            self.rpc_failed(exc.code, exc.details)
        except grpc.RpcError as exc:  # pragma: no cover - the client wraps these
            self.rpc_failed(exc.code(), exc.details() or "")
        except ValueError as exc:  # protobuf refuses an out-of-range field before sending
            fail(Code.USAGE, str(exc))
        finally:
            client.close()

    def rpc_failed(self, code: grpc.StatusCode, details: str) -> NoReturn:
        """Leave with the exit code for a gRPC status (INVALID_ARGUMENT is bad input)."""
        if code == grpc.StatusCode.INVALID_ARGUMENT:
            fail(Code.USAGE, f"refused by penaltyd: {details}")
        if code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
            # PERMISSION_DENIED means the server has no token set: giving one cannot help.
            missing = code == grpc.StatusCode.UNAUTHENTICATED and not self.token
            hint = " (no token given: --token or PENALTYD_ADMIN_TOKEN)" if missing else ""
            fail(Code.AUTH, f"{code.name}: {details}{hint}")
        if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
            fail(
                Code.UNAVAILABLE,
                f"penaltyd at {self.address} did not answer ({code.name}: {details})",
            )
        fail(Code.ERROR, f"penaltyd error {code.name}: {details}")
