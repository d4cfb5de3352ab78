"""`penalty-logwatch`: follow the Postfix log and report what only the log shows.

Postfix never tells a policy server about its own rejections, and a milter never sees
postscreen, 501/503 syntax and sequence errors, AUTH failures or dropped connections
(DESIGN.md section 10). This follower reads the maillog, turns lines into outcomes with
`penaltyclient.logpatterns` (the pattern table, documented in `docs/logwatch.md`) and
sends them in batches over one `Session` stream (`SessionReporter`).

- Follows a file like `tail -F`: starts at the end (`--from-start` reads it all), finishes
  the old file and reopens when the name points at a new inode (rotation), seeks back to
  the start when the file shrinks (copytruncate); or reads stdin (`-`). It polls every
  `--poll-interval` seconds at EOF: no inotify, no busy loop.
- Never waits on penaltyd: reports are queued (bounded) and the drops counted; while
  penaltyd drains the queue, reading pauses at the high-water mark so a backfill
  (`--once`) is not dropped, but a stalled penaltyd is waited on at most once.
- Logs structlog JSON: a stats event every `--stats-interval` seconds and on exit.
- SIGTERM/SIGINT: stop reading, flush for up to `--flush-timeout` seconds, exit 0.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import stat
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import structlog

from penaltyclient.aio import AsyncPenaltyClient, SessionReporter
from penaltyclient.logpatterns import OUTCOME_NAMES, Tally, markdown_tables

log = structlog.get_logger("penalty-logwatch")

_CHUNK = 1 << 16
_STALL_SECONDS = 0.5  # how long reading waits for a penaltyd that stopped draining


def _decode(raw: bytes) -> str:
    # Postfix logs 8-bit client input as-is; a bad byte must not stop the watcher.
    return raw.decode("utf-8", "replace").rstrip("\r")


def _split(buf: bytes, data: bytes) -> tuple[list[str], bytes]:
    """Complete lines of `buf + data`, and the unterminated rest."""
    *complete, rest = (buf + data).split(b"\n")
    return [_decode(raw) for raw in complete], rest


class FileFollower:
    """`tail -F` for one path in asyncio, polling at EOF.

    - Rotation (the path names another inode): the old file is read to its end first,
      its unterminated last line is emitted, then the new file is read from its start.
      While the path is missing (renamed, not yet recreated) the old file is still read.
    - Truncation (the file is shorter than the read position): seek to 0. A file that is
      truncated and regrows past the old position within one poll looks unchanged; that
      is the price of polling, as for `tail -F`.
    - `once`: read to EOF (from the start) and stop; a missing file is an error.
    """

    def __init__(
        self, path: Path, *, from_start: bool = False, once: bool = False, poll: float = 0.2
    ) -> None:
        self.path = path
        self.from_start = from_start or once
        self.once = once
        self.poll = poll
        self.rotations = 0
        self.truncations = 0
        self.opened = asyncio.Event()  # set once the file is open (and positioned)
        self.waiting = asyncio.Event()  # set while the file does not exist yet

    async def _open_first(self) -> Any:
        waited = False
        while True:
            try:
                fh = self.path.open("rb")
            except FileNotFoundError:
                if self.once:
                    raise
                if not waited:
                    log.info("waiting for the log file", path=str(self.path))
                    waited = True
                    self.waiting.set()
                await asyncio.sleep(self.poll)
                continue
            if not self.from_start and not waited:  # a file that appeared later is all new
                fh.seek(0, os.SEEK_END)
            self.waiting.clear()
            self.opened.set()
            return fh

    def _replaced(self, fh: Any) -> bool:
        """Does the path now name another file than the one we hold?"""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return False  # renamed away, not yet recreated: keep reading the old one
        old = os.fstat(fh.fileno())
        return (st.st_dev, st.st_ino) != (old.st_dev, old.st_ino)

    async def lines(self) -> AsyncIterator[str]:
        fh = await self._open_first()
        buf = b""
        try:
            while True:
                data = fh.read(_CHUNK)
                if data:
                    complete, buf = _split(buf, data)
                    for line in complete:
                        yield line
                    await asyncio.sleep(0)  # let the reporter send while we backfill
                    continue
                if self.once:
                    break
                if self._replaced(fh):
                    complete, buf = _split(buf, fh.read())  # what was written before the switch
                    for line in complete:
                        yield line
                    if buf:
                        yield _decode(buf)
                    buf = b""
                    fh.close()
                    fh = self.path.open("rb")
                    self.rotations += 1
                    log.info("log file rotated; reading the new one", path=str(self.path))
                    continue
                if os.fstat(fh.fileno()).st_size < fh.tell():
                    fh.seek(0)
                    buf = b""  # its tail went with the truncation
                    self.truncations += 1
                    log.info("log file truncated; reading from its start", path=str(self.path))
                    continue
                await asyncio.sleep(self.poll)
            if buf:
                yield _decode(buf)
        finally:
            fh.close()


async def stdin_lines() -> AsyncIterator[str]:
    """Lines of stdin until EOF: a pipe without blocking the loop, or a redirected file."""
    fd = sys.stdin.fileno()
    if stat.S_ISREG(os.fstat(fd).st_mode):
        with os.fdopen(os.dup(fd), "rb") as fh:
            buf = b""
            while data := fh.read(_CHUNK):
                complete, buf = _split(buf, data)
                for line in complete:
                    yield line
                await asyncio.sleep(0)
            if buf:
                yield _decode(buf)
        return
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=1 << 20)
    transport, _ = await loop.connect_read_pipe(
        lambda: asyncio.StreamReaderProtocol(reader), sys.stdin
    )
    try:
        while True:
            try:
                raw = await reader.readline()
            except ValueError:  # a line over 1 MiB: not Postfix's; skip it
                continue
            if not raw:
                return
            yield _decode(raw.rstrip(b"\n"))
    finally:
        transport.close()


class Sink(Protocol):
    """Where reports go: a `SessionReporter`, or the dry run's tally."""

    def report(
        self,
        ip: str,
        counts: Mapping[int, int],
        helo: str = "",
        mail_from: str = "",
        fingerprint: str = "",
    ) -> bool: ...


class DryRun:
    """`--dry-run`: sum the reports per client instead of sending them."""

    def __init__(self) -> None:
        self.clients: dict[str, Counter[str]] = {}

    def report(
        self,
        ip: str,
        counts: Mapping[int, int],
        helo: str = "",
        mail_from: str = "",
        fingerprint: str = "",
    ) -> bool:
        tally = self.clients.setdefault(ip, Counter())
        for outcome, n in counts.items():
            tally[OUTCOME_NAMES[outcome]] += n
        return True


@dataclass(frozen=True, slots=True)
class Options:
    """Everything the command line sets (the defaults are the flags' defaults)."""

    path: str  # a file, or "-" for stdin
    penaltyd: str = "127.0.0.1:50051"
    from_start: bool = False
    once: bool = False
    no_rejects: bool = False
    no_accepted: bool = False
    ignore_loopback: bool = False
    dry_run: bool = False
    poll_interval: float = 0.2
    stats_interval: float = 60.0
    flush_timeout: float = 2.0
    max_queue: int = 50_000
    max_batch: int = 500
    batch_interval: float = 0.1


class LogWatch:
    """One watcher: a line source, the tally, and the sink; `run()` until EOF or `stop()`."""

    def __init__(self, options: Options) -> None:
        self.options = options
        self.tally = Tally(
            no_rejects=options.no_rejects,
            no_accepted=options.no_accepted,
            ignore_loopback=options.ignore_loopback,
        )
        self.follower: FileFollower | None = None
        if options.path != "-":
            self.follower = FileFollower(
                Path(options.path),
                from_start=options.from_start,
                once=options.once,
                poll=options.poll_interval,
            )
        self.client: AsyncPenaltyClient | None = None
        self.reporter: SessionReporter | None = None
        self.dry: DryRun | None = DryRun() if options.dry_run else None
        self.queued = 0  # reports the queue took
        self.refused = 0  # reports the full queue refused (also in reporter.dropped)
        self.lost_at_exit = 0  # queued, never acknowledged when the flush gave up
        self._stop = asyncio.Event()
        self._closed = False  # after exit, what is still queued counts as dropped
        self._stalled_at: int | None = None  # acked count when penaltyd stopped draining
        self._high_water = max(1, options.max_queue * 3 // 4)

    def stop(self) -> None:
        """Ask `run()` to stop reading, flush and return (signal handlers call this)."""
        self._stop.set()

    def stats(self) -> dict[str, Any]:
        """What the stats events carry (the fields are described in docs/logwatch.md)."""
        t = self.tally
        out: dict[str, Any] = {
            "lines": t.lines,
            "matched": dict(t.outcomes),
            "ignored": dict(t.ignored),
            "reports": t.reports,
        }
        if self.reporter is not None:
            r = self.reporter
            out |= {
                "reports_sent": r.acked,
                "reports_dropped": r.dropped + self.lost_at_exit,
                "reports_pending": 0 if self._closed else r.pending,
                "reports_rejected": r.rejected,
                "reconnects": r.reconnects,
            }
        if self.follower is not None:
            out |= {"rotations": self.follower.rotations, "truncations": self.follower.truncations}
        return out

    def _lines(self) -> AsyncIterator[str]:
        return self.follower.lines() if self.follower is not None else stdin_lines()

    async def _admit(self) -> None:
        """Pause reading while penaltyd drains a full queue; never wait on a stalled one.

        Live, the log is slower than penaltyd and this never waits. A backfill reads far
        faster than reports are sent: without the pause most of it would be dropped.
        """
        r = self.reporter
        if r is None or r.pending < self._high_water:
            return
        if self._stalled_at is not None and r.acked == self._stalled_at:
            return  # penaltyd is still not draining: fail open, let the queue drop
        self._stalled_at = None
        acked, since = r.acked, time.monotonic()
        while r.pending >= self._high_water:
            await asyncio.sleep(0.01)
            if r.acked != acked:
                acked, since = r.acked, time.monotonic()
            elif time.monotonic() - since > _STALL_SECONDS:
                self._stalled_at = r.acked
                log.warning("penaltyd is not taking reports; dropping beyond the queue")
                return

    async def _consume(self, sink: Sink) -> None:
        async for line in self._lines():
            report = self.tally.feed(line)
            if report is None:
                continue
            if sink.report(report.ip, report.counts, helo=report.helo, mail_from=report.mail_from):
                self.queued += 1
            else:
                self.refused += 1
            await self._admit()

    async def _periodic_stats(self) -> None:
        while True:
            await asyncio.sleep(self.options.stats_interval)
            log.info("logwatch stats", **self.stats())

    async def run(self) -> None:
        """Read until EOF (stdin, `--once`) or `stop()`, then flush and close.

        Raises `FileNotFoundError` for a missing file with `--once`; penaltyd being down
        is never an error (the reports are dropped and counted).
        """
        o = self.options
        sink: Sink
        if self.dry is not None:
            sink = self.dry
        else:
            self.client = AsyncPenaltyClient(o.penaltyd)
            self.reporter = self.client.reporter(
                max_batch=o.max_batch, interval=o.batch_interval, max_queue=o.max_queue
            )
            self.reporter.start()
            sink = self.reporter
        log.info(
            "logwatch started",
            path=o.path,
            penaltyd=None if o.dry_run else o.penaltyd,
            from_start=o.from_start or o.once,
            once=o.once,
            no_rejects=o.no_rejects,
            no_accepted=o.no_accepted,
            ignore_loopback=o.ignore_loopback,
        )
        consumer = asyncio.create_task(self._consume(sink), name="logwatch-read")
        stopper = asyncio.create_task(self._stop.wait(), name="logwatch-stop")
        ticker = asyncio.create_task(self._periodic_stats(), name="logwatch-stats")
        try:
            await asyncio.wait({consumer, stopper}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (consumer, stopper, ticker):
                task.cancel()
            for task in (stopper, ticker):
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            try:
                with contextlib.suppress(asyncio.CancelledError):
                    await consumer  # re-raises what stopped the reading, if anything
            finally:
                await self._close()

    def _unsettled(self) -> int:
        """Queued reports neither acknowledged by penaltyd nor dropped by the reporter."""
        r = self.reporter
        if r is None:
            return 0
        return max(0, self.queued - r.acked - (r.dropped - self.refused))

    async def _drain(self, within: float) -> bool:
        """Wait until every queued report is acknowledged or dropped, or `within` passes.

        Counted from our own queue tally rather than `SessionReporter.flush()`'s
        `sent`/`acked` figures, which a failed stream write can leave wrong; this way an
        early "flushed" can never hide lost reports.
        """
        assert self.reporter is not None
        await self.reporter.flush(within=0)  # wakes the writer without waiting
        end = time.monotonic() + within
        while self._unsettled():
            if time.monotonic() > end:
                return False
            await asyncio.sleep(0.01)
        return True

    async def _close(self) -> None:
        if self.reporter is not None and self.client is not None:
            flushed = await self._drain(self.options.flush_timeout)
            await self.reporter.close(within=0)
            self.lost_at_exit = self._unsettled()
            self._closed = True
            if not flushed:
                log.warning(
                    "penaltyd did not take every report before exit", lost=self.lost_at_exit
                )
            await self.client.close()
        final = self.stats()
        if self.dry is not None:
            final["clients"] = {ip: dict(c) for ip, c in self.dry.clients.items()}
        log.info("logwatch stopped", **final)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="penalty-logwatch",
        description=(
            "Follow a Postfix log and report to penaltyd what only the log shows: "
            "postscreen verdicts, 501/503 syntax and sequence errors, AUTH failures, lost "
            "connections, rejects, and the disconnect summary (the accepted-commands "
            "denominator). Patterns and decisions: docs/logwatch.md."
        ),
        epilog=(
            "Follows like `tail -F` (rotation and truncation survive). penaltyd being down "
            "never blocks or stops the watcher: reports are queued (bounded) and drops are "
            "counted in the stats log. SIGTERM/SIGINT flush and exit 0."
        ),
    )
    p.add_argument(
        "path",
        nargs="?",
        metavar="PATH|-",
        help="the Postfix log file to follow (e.g. /var/log/mail.log), or - for stdin "
        "(read until EOF)",
    )
    p.add_argument(
        "--penaltyd",
        metavar="HOST:PORT[,HOST:PORT]",
        default="127.0.0.1:50051",
        help="penaltyd replica(s) to report to, balanced round robin; or one "
        "dns:///name:port target (default 127.0.0.1:50051)",
    )
    p.add_argument(
        "--from-start",
        action="store_true",
        help="read the file from its beginning instead of its end, then keep following",
    )
    p.add_argument(
        "--once",
        action="store_true",
        help="read the whole file to EOF and exit (implies --from-start; for backfills and tests)",
    )
    p.add_argument(
        "--no-rejects",
        action="store_true",
        help="skip smtpd `reject: RCPT` lines and unexplained unknown commands, for MX "
        "nodes that run penalty-milter (it reports those itself)",
    )
    p.add_argument(
        "--no-accepted",
        action="store_true",
        help="do not report the disconnect summary's accepted commands, for MX nodes where "
        "penalty-policyd or penalty-milter reports accepted recipients (one denominator "
        "source, never two)",
    )
    p.add_argument(
        "--ignore-loopback",
        action="store_true",
        help="report nothing for 127.0.0.0/8 and ::1 (default: loopback clients count "
        "like any other)",
    )
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="do not contact penaltyd; the exit log event lists each client's outcomes",
    )
    p.add_argument(
        "--patterns",
        action="store_true",
        help="print the pattern table (Markdown) and exit",
    )
    p.add_argument(
        "--poll-interval",
        type=float,
        default=0.2,
        metavar="SECONDS",
        help="how often to look for new lines, rotation and truncation at EOF (default 0.2)",
    )
    p.add_argument(
        "--stats-interval",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="log a stats event this often (default 60); one is always logged on exit",
    )
    p.add_argument(
        "--flush-timeout",
        type=float,
        default=2.0,
        metavar="SECONDS",
        help="on exit, wait this long for penaltyd to take queued reports (default 2)",
    )
    p.add_argument(
        "--max-queue",
        type=int,
        default=50_000,
        metavar="N",
        help="reports queued while penaltyd is slow or down; beyond it they are dropped "
        "and counted (default 50000)",
    )
    p.add_argument(
        "--batch-size",
        type=int,
        default=500,
        metavar="N",
        help="reports per Session message; must not exceed penaltyd's max_batch "
        "(default 500; penaltyd's default limit is 1000)",
    )
    p.add_argument(
        "--log-level",
        choices=["debug", "info", "warning", "error"],
        default="info",
        help="log threshold (default info)",
    )
    return p


class _ToStructlog(logging.Handler):
    """The client library logs with stdlib logging; emit its events as JSON lines too."""

    def emit(self, record: logging.LogRecord) -> None:
        structlog.get_logger(record.name).log(record.levelno, record.getMessage())


def _configure_logs(level: str) -> None:
    from penalty import logs

    logs.configure(level)
    root = logging.getLogger()
    root.handlers[:] = [_ToStructlog()]
    root.setLevel(getattr(logging, level.upper()))
    logging.getLogger("grpc").setLevel(logging.WARNING)


async def _main(options: Options) -> int:
    watch = LogWatch(options)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, watch.stop)
    try:
        await watch.run()
    except FileNotFoundError as exc:
        log.error("cannot read the log file", path=options.path, error=str(exc))
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.patterns:
        sys.stdout.write(markdown_tables())
        return 0
    if args.path is None:
        parser().error("PATH is required (a log file, or - for stdin)")
    for name in ("poll_interval", "stats_interval", "flush_timeout", "max_queue", "batch_size"):
        if getattr(args, name) <= 0:
            parser().error(f"--{name.replace('_', '-')} must be positive")
    options = Options(
        path=args.path,
        penaltyd=args.penaltyd,
        from_start=args.from_start,
        once=args.once,
        no_rejects=args.no_rejects,
        no_accepted=args.no_accepted,
        ignore_loopback=args.ignore_loopback,
        dry_run=args.dry_run,
        poll_interval=args.poll_interval,
        stats_interval=args.stats_interval,
        flush_timeout=args.flush_timeout,
        max_queue=args.max_queue,
        max_batch=args.batch_size,
    )
    if not options.dry_run:
        from penaltyclient.channel import grpc_target

        try:
            grpc_target(options.penaltyd)
        except ValueError as exc:
            parser().error(f"--penaltyd: {exc}")
    _configure_logs(args.log_level)
    return asyncio.run(_main(options))


if __name__ == "__main__":
    sys.exit(main())
