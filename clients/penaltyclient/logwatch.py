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
- Reads regular files only: the path is checked with `stat` before it is opened, opened
  with `O_NONBLOCK` (a FIFO swapped in meanwhile cannot block the event loop) and checked
  again with `fstat`. A line longer than `MAX_LINE_BYTES` is skipped up to its newline
  without being kept; lines are split in linear time.
- Never waits on penaltyd: reports are queued (bounded) and the drops counted; while
  penaltyd drains the queue, reading pauses at the high-water mark so a backfill
  (`--once`) is not dropped, but a stalled penaltyd is waited on at most once.
- `--state-dir`: what penaltyd has not taken by exit is spooled there and sent on the
  next start, and the read position is kept, so a restart neither loses reports nor
  skips the lines written while it was down.
- Logs structlog JSON: a stats event every `--stats-interval` seconds and on exit.
- SIGTERM/SIGINT: stop reading, flush for up to `--flush-timeout` seconds, spool the
  rest (with `--state-dir`), exit 0.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import contextlib
import fcntl
import hashlib
import json
import os
import signal
import stat
import sys
import tempfile
import time
import zlib
from collections import Counter
from collections.abc import AsyncGenerator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import structlog
from google.protobuf.message import DecodeError

from penalty import outcomes
from penalty.identity import MAX_COUNT, InvalidAddress, bound_client, parse_ip
from penalty.v1 import penalty_pb2 as pb
from penaltyclient.aio import AsyncPenaltyClient, SessionReporter
from penaltyclient.logpatterns import Tally, markdown_tables
from penaltyclient.stdlog import route_stdlib_logs
from serving.cli import add_log_address_arguments, log_address_options
from serving.logs import RateLimitedLog

log = structlog.get_logger("penalty-logwatch")

_CHUNK = 1 << 16
_STALL_SECONDS = 0.5  # how long reading waits for a penaltyd that stopped draining

#: Longest line kept, in bytes (without its newline). Postfix cuts its records at 2000
#: characters, so a longer line is not Postfix's; it is skipped up to its next newline
#: without being kept in memory, counted (`lines_too_long`) and logged once a minute.
MAX_LINE_BYTES = 16 * 1024
_LONG_LINE_LOG_INTERVAL = 60.0

SPOOL_NAME = "spool"  # in --state-dir: reports penaltyd had not taken at exit
POSITION_NAME = "position.json"  # in --state-dir: where reading stopped
LOCK_NAME = "lock"  # in --state-dir: one watcher per state directory
_SPOOL_MAGIC = "penalty-logwatch-spool 1"
# One record: "%08x %s\n" % (crc32, base64(ReportRequest)). A bounded report (ip 64, HELO
# 255, sender 512, fingerprint 128 characters, ten counts) is under 4 KiB in UTF-8.
_MAX_SPOOL_LINE = 8 * 1024
_MAX_POSITION_BYTES = 4096
_HEAD_BYTES = 256  # the start of the file, hashed, tells a reused inode from ours


class LogwatchError(Exception):
    """A reason not to start: the message says what is wrong (exit code 2)."""


class NotRegularFile(LogwatchError):
    """The path names a FIFO, a device, a directory or a socket, not a log file."""

    def __init__(self, path: str, kind: str) -> None:
        super().__init__(f"{path}: not a regular file ({kind})")
        self.path = path
        self.kind = kind


def _kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISFIFO, "FIFO"),
        (stat.S_ISCHR, "character device"),
        (stat.S_ISBLK, "block device"),
        (stat.S_ISDIR, "directory"),
        (stat.S_ISSOCK, "socket"),
        (stat.S_ISLNK, "symbolic link"),
        (stat.S_ISREG, "regular file"),
    ):
        if test(mode):
            return name
    return "unknown file type"


def open_regular(path: Path | str, *, follow_symlinks: bool = True) -> Any:
    """Open a regular file for reading, never blocking: anything else raises.

    `stat` first, so a FIFO or a device is never opened; `O_NONBLOCK`, so a FIFO put in
    its place between the `stat` and the `open` returns at once instead of waiting for a
    writer (and with it the event loop and the SIGTERM handler); `fstat` on what was
    opened, to refuse that FIFO too. Raises `FileNotFoundError`, `NotRegularFile` or
    another `OSError`.
    """
    st = os.stat(path, follow_symlinks=follow_symlinks)
    if not stat.S_ISREG(st.st_mode):
        raise NotRegularFile(str(path), _kind(st.st_mode))
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY
    if not follow_symlinks:
        flags |= os.O_NOFOLLOW
    fd = os.open(path, flags)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise NotRegularFile(str(path), _kind(st.st_mode))
        return open(fd, "rb", buffering=0, closefd=True)
    except BaseException:
        os.close(fd)
        raise


def _decode(raw: bytes | bytearray) -> str:
    # Postfix logs 8-bit client input as-is; a bad byte must not stop the watcher.
    return raw.decode("utf-8", "replace").rstrip("\r")


class LongLines:
    """Counts the lines skipped for their length; warns at most once a minute."""

    def __init__(self, source: str, *, limit: int = MAX_LINE_BYTES) -> None:
        self.source = source
        self.limit = limit
        self.count = 0
        self._warn = RateLimitedLog(log, interval=_LONG_LINE_LOG_INTERVAL)

    def skipped(self) -> None:
        self.count += 1
        self._warn.warning(
            "skipped a line longer than the limit", source=self.source, limit_bytes=self.limit
        )


class LineSplitter:
    """Complete lines of a byte stream, in linear time and bounded memory.

    The search for a newline starts where the last one stopped (`bytearray.find`), so a
    long unterminated line is scanned once, not once per chunk as `(buf + data).split()`
    did (quadratic). A line longer than `max_line` bytes is skipped up to its newline:
    it is never kept whole, only counted (`LongLines`). At most `max_line` bytes wait
    for their newline. `offset` is the stream position after the last line consumed
    (emitted or skipped): where reading can resume.
    """

    def __init__(
        self, long_lines: LongLines, *, max_line: int = MAX_LINE_BYTES, offset: int = 0
    ) -> None:
        self.max_line = max_line
        self.offset = offset
        self._long = long_lines
        self._buf = bytearray()  # the stream from `offset` on: an unterminated line
        self._scanned = 0  # bytes of _buf known to hold no newline
        self._skipping = False  # inside a line over max_line: drop it up to its newline

    def feed(self, data: bytes) -> list[tuple[str, int]]:
        """The lines `data` completes, each with the stream offset just after it."""
        out: list[tuple[str, int]] = []
        start = 0
        if self._skipping:
            i = data.find(b"\n")
            if i < 0:
                self.offset += len(data)
                return out
            self._skipping = False
            start = i + 1
            self.offset += start
        buf = self._buf
        buf += memoryview(data)[start:]
        pos = 0
        while (i := buf.find(b"\n", self._scanned)) >= 0:
            if i - pos > self.max_line:
                self._long.skipped()
            else:
                out.append((_decode(buf[pos:i]), self.offset + i + 1))
            pos = self._scanned = i + 1
        self.offset += pos
        del buf[:pos]
        if len(buf) > self.max_line:  # too long already: stop keeping it
            self._long.skipped()
            self.offset += len(buf)
            buf.clear()
            self._skipping = True
        self._scanned = len(buf)
        return out

    def finish(self) -> str | None:
        """The unterminated rest of the stream (at EOF or a rotation), if any."""
        rest = None
        if self._buf:
            rest = _decode(self._buf)
            self.offset += len(self._buf)
        self.reset(self.offset)
        return rest

    def reset(self, offset: int = 0) -> None:
        """Forget the unterminated rest (the file was truncated); continue at `offset`."""
        self._buf.clear()
        self._scanned = 0
        self._skipping = False
        self.offset = offset


@dataclass(frozen=True, slots=True)
class Position:
    """Where reading stopped: which file (device, inode, a hash of its first bytes) and
    the offset after the last line whose reports were made."""

    path: str
    dev: int
    ino: int
    offset: int
    head_len: int
    head_sha256: str
    saved_at: float  # unix time


def _head_hash(fd: int, length: int) -> str:
    return hashlib.sha256(os.pread(fd, length, 0)).hexdigest()


class FileFollower:
    """`tail -F` for one path in asyncio, polling at EOF.

    - Regular files only (`open_regular`): a path that is not one when the follower
      starts raises `NotRegularFile`; one that becomes something else later (the path
      replaced by a FIFO, a symlink to a device) is refused with a log line while the
      old file is still read, and waited on until a regular file is there again.
    - Rotation (the path names another regular file): the old file is read to its end
      first, its unterminated last line is emitted, then the new file is read from its
      start. While the path is missing (renamed, not yet recreated) the old file is
      still read.
    - Truncation (the file is shorter than the read position): seek to 0. A file that is
      truncated and regrows past the old position within one poll looks unchanged; that
      is the price of polling, as for `tail -F`.
    - `resume`: a `Position` saved by the last run; if it names this file (same inode,
      same first bytes, not shorter), reading starts there instead of at the end. If the
      path names another file, it was rotated meanwhile and is read from its start.
    - `once`: read to EOF (from the start) and stop; a missing file is an error.
    - `checkpoint` (once the lines are closed): the `Position` after the last line
      emitted.
    """

    def __init__(
        self,
        path: Path,
        *,
        from_start: bool = False,
        once: bool = False,
        poll: float = 0.2,
        resume: Position | None = None,
    ) -> None:
        self.path = path
        self.from_start = from_start or once
        self.once = once
        self.poll = poll
        self.resume = resume
        self.rotations = 0
        self.truncations = 0
        self.long_lines = LongLines(str(path))
        self.checkpoint: Position | None = None
        self.opened = asyncio.Event()  # set once the file is open (and positioned)
        self.waiting = asyncio.Event()  # set while the file does not exist yet
        self.refusing = asyncio.Event()  # set while the path is not a regular file
        self._refused: tuple[int, int, str] | None = None  # the last refusal logged
        self._offset = 0  # after the last line emitted, in the file being read

    def _refuse(self, what: str, key: tuple[int, int, str], **fields: Any) -> None:
        """Log a refusal once per file met at the path (not once per poll)."""
        self.refusing.set()
        if key != self._refused:
            self._refused = key
            log.warning(what, path=str(self.path), **fields)

    def _start_at(self, fh: Any) -> int:
        """Where a resumed run starts reading the file it just opened."""
        r = self.resume
        assert r is not None
        st = os.fstat(fh.fileno())
        if (st.st_dev, st.st_ino) != (r.dev, r.ino):
            log.info("the log was rotated while stopped; reading it from its start")
            return 0
        if st.st_size < r.offset or _head_hash(fh.fileno(), r.head_len) != r.head_sha256:
            log.info("the log was truncated or replaced while stopped; reading it from its start")
            return 0
        log.info(
            "resuming where the last run stopped", offset=r.offset, backlog=st.st_size - r.offset
        )
        return r.offset

    async def _open_first(self) -> Any:
        waited = False
        while True:
            try:
                fh = open_regular(self.path)
            except FileNotFoundError:
                if self.once:
                    raise
                if not waited:
                    log.info("waiting for the log file", path=str(self.path))
            except (NotRegularFile, OSError) as exc:
                if not waited:
                    raise  # the path given on the command line is unusable
                self._refuse(
                    "the log path is unusable; waiting for a regular file",
                    (0, 0, str(exc)),
                    error=str(exc),
                )
            else:
                if waited:
                    pass  # a file that appeared later is all new: read it from its start
                elif self.resume is not None and not self.from_start:
                    fh.seek(self._start_at(fh))
                elif not self.from_start:
                    fh.seek(0, os.SEEK_END)
                self.waiting.clear()
                self.refusing.clear()
                self.opened.set()
                return fh
            waited = True
            self.waiting.set()
            await asyncio.sleep(self.poll)

    def _replacement(self, fh: Any) -> Any | None:
        """The regular file the path now names if it is not the one we hold, opened."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return None  # renamed away, not yet recreated: keep reading the old one
        except OSError as exc:
            self._refuse("cannot stat the log path", (0, 0, str(exc)), error=str(exc))
            return None
        old = os.fstat(fh.fileno())
        if (st.st_dev, st.st_ino) == (old.st_dev, old.st_ino):
            self._refused = None
            self.refusing.clear()
            return None
        if not stat.S_ISREG(st.st_mode):
            self._refuse(
                "the log path is not a regular file; still reading the old one, waiting "
                "for a regular file",
                (st.st_dev, st.st_ino, ""),
                kind=_kind(st.st_mode),
            )
            return None
        try:
            new = open_regular(self.path)
        except FileNotFoundError:
            return None
        except (NotRegularFile, OSError) as exc:  # replaced again since the stat
            self._refuse("cannot open the new log file", (st.st_dev, st.st_ino, ""), error=str(exc))
            return None
        self._refused = None
        self.refusing.clear()
        return new

    def _save(self, fh: Any) -> None:
        with contextlib.suppress(OSError, ValueError):
            st = os.fstat(fh.fileno())
            head_len = min(self._offset, _HEAD_BYTES)
            self.checkpoint = Position(
                path=str(self.path),
                dev=st.st_dev,
                ino=st.st_ino,
                offset=self._offset,
                head_len=head_len,
                head_sha256=_head_hash(fh.fileno(), head_len),
                saved_at=time.time(),
            )

    async def lines(self) -> AsyncGenerator[str, None]:
        fh = await self._open_first()
        new: Any = None
        self._offset = fh.tell()
        split = LineSplitter(self.long_lines, offset=self._offset)
        try:
            while True:
                data = fh.read(_CHUNK)
                if data:
                    for line, end in split.feed(data):
                        self._offset = end
                        yield line
                    self._offset = split.offset
                    await asyncio.sleep(0)  # let the reporter send while we backfill
                    continue
                if self.once:
                    break
                new = self._replacement(fh)
                if new is not None:
                    while data := fh.read(_CHUNK):  # what was written before the switch
                        for line, end in split.feed(data):
                            self._offset = end
                            yield line
                        await asyncio.sleep(0)
                    rest = split.finish()
                    self._offset = split.offset
                    if rest is not None:
                        yield rest
                    fh.close()
                    fh, new = new, None
                    self._offset = 0
                    split = LineSplitter(self.long_lines)
                    self.rotations += 1
                    log.info("log file rotated; reading the new one", path=str(self.path))
                    continue
                if os.fstat(fh.fileno()).st_size < fh.tell():
                    fh.seek(0)
                    split.reset(0)  # its tail went with the truncation
                    self._offset = 0
                    self.truncations += 1
                    log.info("log file truncated; reading from its start", path=str(self.path))
                    continue
                await asyncio.sleep(self.poll)
            rest = split.finish()
            self._offset = split.offset
            if rest is not None:
                yield rest
        finally:
            self._save(fh)
            fh.close()
            if new is not None:
                new.close()


class StdinReader:
    """Lines of stdin until EOF: a pipe, socket or terminal without blocking the loop, or
    a redirected regular file; split like a file (`LineSplitter`)."""

    def __init__(self) -> None:
        self.long_lines = LongLines("stdin")

    async def lines(self) -> AsyncGenerator[str, None]:
        fd = sys.stdin.fileno()
        mode = os.fstat(fd).st_mode
        split = LineSplitter(self.long_lines)
        if stat.S_ISREG(mode):
            with os.fdopen(os.dup(fd), "rb", buffering=0) as fh:
                while data := fh.read(_CHUNK):
                    for line, _ in split.feed(data):
                        yield line
                    await asyncio.sleep(0)
        elif stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode) or stat.S_ISCHR(mode):
            loop = asyncio.get_running_loop()
            reader = asyncio.StreamReader(limit=_CHUNK)
            transport, _ = await loop.connect_read_pipe(
                lambda: asyncio.StreamReaderProtocol(reader), sys.stdin
            )
            try:
                while data := await reader.read(_CHUNK):
                    for line, _ in split.feed(data):
                        yield line
            finally:
                transport.close()
        else:
            raise NotRegularFile("-", _kind(mode))
        rest = split.finish()
        if rest is not None:
            yield rest


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
            tally[outcomes.NAMES[outcome]] += n
        return True


# --- the state directory: the spool and the read position


def _atomic_write(path: Path, chunks: Sequence[bytes]) -> None:
    """Write a file whole or not at all: a temporary file (mode 0600), fsync, rename."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with open(fd, "wb") as fh:
            for chunk in chunks:
                fh.write(chunk)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):
        dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


def spool_records(requests: Sequence[pb.ReportRequest]) -> list[bytes]:
    """The spool's records: `%08x %s\\n` % (CRC-32 of the message, base64 of it)."""
    out = []
    for r in requests:
        raw = r.SerializeToString()
        record = b"%08x %s\n" % (zlib.crc32(raw), base64.b64encode(raw))
        if len(record) <= _MAX_SPOOL_LINE:
            out.append(record)
    return out


def write_spool(path: Path, requests: Sequence[pb.ReportRequest], now: float) -> int:
    """Write `requests` to the spool file atomically; how many were written."""
    records = spool_records(requests)
    header = f"{_SPOOL_MAGIC} {int(now)} {len(records)}\n".encode()
    _atomic_write(path, [header, *records])
    return len(records)


def _valid_report(r: pb.ReportRequest) -> bool:
    """A report as `SessionReporter.report` makes them: what penaltyd accepts."""
    c = r.client
    try:
        parse_ip(c.ip)
    except InvalidAddress:
        return False
    if bound_client(c.helo, c.mail_from, c.fingerprint) != (c.helo, c.mail_from, c.fingerprint):
        return False
    if not 0 < len(r.counts) <= len(outcomes.NAMES):
        return False
    return all(n.outcome in outcomes.NAMES and 0 < n.n <= MAX_COUNT for n in r.counts)


@dataclass(slots=True)
class SpoolRead:
    """What `read_spool` found: the reports to send again and what was wrong."""

    requests: list[pb.ReportRequest]
    bad: int = 0  # records skipped: truncated, corrupt, or not a valid report
    saved_at: float | None = None  # when the spool was written (None: no usable header)
    problem: str = ""  # why the file as a whole was not used, if it was not


def read_spool(path: Path, *, limit: int) -> SpoolRead:
    """The reports in a spool file, at most `limit`, reading at most what `limit`
    records can take; tolerant of a truncated or corrupt file (bad records are skipped
    and counted). Raises `FileNotFoundError` if there is none, `OSError` if unreadable."""
    out = SpoolRead([])
    long_lines = LongLines(str(path), limit=_MAX_SPOOL_LINE)
    split = LineSplitter(long_lines, max_line=_MAX_SPOOL_LINE)
    budget = (limit + 1) * (_MAX_SPOOL_LINE + 1)
    lines: list[str] = []
    data = b""
    with open_regular(path, follow_symlinks=False) as fh:
        while len(lines) <= limit and budget > 0 and (data := fh.read(min(_CHUNK, budget))):
            budget -= len(data)
            lines += [line for line, _ in split.feed(data)]
        if not data and (rest := split.finish()) is not None:
            lines.append(rest)  # a truncated last record: it will not pass its CRC
    out.bad += long_lines.count
    if not lines:
        out.problem = "empty"
        return out
    fields = lines[0].split(" ")
    if len(fields) != 4 or " ".join(fields[:2]) != _SPOOL_MAGIC:
        out.problem = "not a penalty-logwatch spool (bad header)"
        out.bad += len(lines) - 1
        return out
    with contextlib.suppress(ValueError):
        out.saved_at = float(fields[2])
    records = lines[1 : limit + 1]
    with contextlib.suppress(ValueError):  # records the header announces that are not there
        out.bad += max(0, min(int(fields[3]), limit) - len(records) - long_lines.count)
    for line in records:
        crc, _, b64 = line.partition(" ")
        try:
            raw = base64.b64decode(b64, validate=True)
            if len(crc) != 8 or int(crc, 16) != zlib.crc32(raw):
                raise ValueError("CRC mismatch")
            request = pb.ReportRequest.FromString(raw)
        except (ValueError, binascii.Error, DecodeError):
            out.bad += 1
            continue
        if _valid_report(request):
            out.requests.append(request)
        else:
            out.bad += 1
    out.bad += max(0, len(lines) - 1 - limit)
    return out


def write_position(path: Path, position: Position) -> None:
    _atomic_write(path, [json.dumps({"version": 1, **asdict(position)}).encode() + b"\n"])


def read_position(path: Path) -> Position:
    """The saved position; raises `FileNotFoundError`, `OSError` or `ValueError`."""
    with open_regular(path, follow_symlinks=False) as fh:
        raw = fh.read(_MAX_POSITION_BYTES + 1)
    if len(raw) > _MAX_POSITION_BYTES:
        raise ValueError("too large")
    data = json.loads(raw)
    if not isinstance(data, dict) or data.pop("version", None) != 1:
        raise ValueError("not a version 1 position")
    position = Position(**data)
    types: dict[str, type | tuple[type, ...]] = {
        "path": str,
        "head_sha256": str,
        "saved_at": (int, float),
    }
    for name, value in asdict(position).items():
        if not isinstance(value, types.get(name, int)) or isinstance(value, bool):
            raise ValueError(f"bad {name}")
    if position.offset < 0 or not 0 <= position.head_len <= min(position.offset, _HEAD_BYTES):
        raise ValueError("bad offset")
    return position


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
    state_dir: str | None = None
    resume_within: float = 600.0


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
        self.stdin: StdinReader | None = None
        if options.path != "-":
            self.follower = FileFollower(
                Path(options.path),
                from_start=options.from_start,
                once=options.once,
                poll=options.poll_interval,
            )
        else:
            self.stdin = StdinReader()
        self.client: AsyncPenaltyClient | None = None
        self.reporter: SessionReporter | None = None
        self.dry: DryRun | None = DryRun() if options.dry_run else None
        # The state directory is for what is sent: a dry run neither reads nor writes it.
        self.state_dir: Path | None = None
        if options.state_dir is not None and not options.dry_run:
            self.state_dir = Path(options.state_dir)
        self.queued = 0  # reports the queue took
        self.refused = 0  # reports the queue refused (full, or no count left)
        self.lost_at_exit = 0  # never acknowledged, and not spooled, at exit
        self.spooled = 0  # written to the spool at exit
        self.replayed = 0  # taken from the spool at start
        self.spool_skipped = 0  # spool records that were unusable (corrupt, truncated)
        self._stop = asyncio.Event()
        self._closed = False  # after exit, nothing is pending any more
        self._stalled_at: int | None = None  # progress count when penaltyd stopped draining
        self._high_water = max(1, options.max_queue * 3 // 4)
        self._lock_fd: int | None = None  # the state directory's lock, while running

    def stop(self) -> None:
        """Ask `run()` to stop reading, flush and return (signal handlers call this)."""
        self._stop.set()

    def stats(self) -> dict[str, Any]:
        """What the stats events carry (the fields are described in docs/logwatch.md)."""
        t = self.tally
        source = self.follower or self.stdin
        out: dict[str, Any] = {
            "lines": t.lines,
            "lines_too_long": source.long_lines.count if source is not None else 0,
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
                "reports_expired": r.expired,
                "reports_spooled": self.spooled,
                "reports_replayed": self.replayed,
                "reconnects": r.reconnects,
            }
        if self.follower is not None:
            out |= {"rotations": self.follower.rotations, "truncations": self.follower.truncations}
        return out

    def _lines(self) -> AsyncGenerator[str, None]:
        if self.follower is not None:
            return self.follower.lines()
        assert self.stdin is not None
        return self.stdin.lines()

    def _progress(self) -> int:
        """Reports penaltyd has answered for, stored or refused."""
        r = self.reporter
        return 0 if r is None else r.acked + r.rejected

    async def _admit(self) -> None:
        """Pause reading while penaltyd drains a full queue; never wait on a stalled one.

        Live, the log is slower than penaltyd and this never waits. A backfill reads far
        faster than reports are sent: without the pause most of it would be dropped.
        """
        r = self.reporter
        if r is None or r.pending < self._high_water:
            return
        if self._stalled_at is not None and self._progress() == self._stalled_at:
            return  # penaltyd is still not draining: fail open, let the queue drop
        self._stalled_at = None
        done, since = self._progress(), time.monotonic()
        while r.pending >= self._high_water:
            await asyncio.sleep(0.01)
            if self._progress() != done:
                done, since = self._progress(), time.monotonic()
            elif time.monotonic() - since > _STALL_SECONDS:
                self._stalled_at = self._progress()
                log.warning("penaltyd is not taking reports; dropping beyond the queue")
                return

    async def _consume(self, sink: Sink) -> None:
        # aclosing: when the reading is cancelled between two lines, the follower still
        # runs its `finally` now (closing the file, noting the position).
        async with contextlib.aclosing(self._lines()) as lines:
            async for line in lines:
                report = self.tally.feed(line)
                if report is None:
                    continue
                if sink.report(
                    report.ip, report.counts, helo=report.helo, mail_from=report.mail_from
                ):
                    self.queued += 1
                else:
                    self.refused += 1
                await self._admit()

    async def _periodic_stats(self) -> None:
        while True:
            await asyncio.sleep(self.options.stats_interval)
            log.info("logwatch stats", **self.stats())

    def _prepare_state_dir(self) -> None:
        """Create the state directory if needed and lock it: two watchers sharing one
        would both replay its spool."""
        assert self.state_dir is not None
        try:
            self.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            if not self.state_dir.is_dir():
                raise NotADirectoryError(str(self.state_dir))
            fd = os.open(
                self.state_dir / LOCK_NAME,
                os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK,
                0o600,
            )
        except OSError as exc:
            raise LogwatchError(f"--state-dir {self.state_dir}: {exc}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            raise LogwatchError(
                f"--state-dir {self.state_dir}: in use by another penalty-logwatch"
            ) from exc
        self._lock_fd = fd

    def _too_old(self, saved_at: float | None, what: str) -> bool:
        """Saved too long ago (or at an unknown time) to count as fresh events now."""
        age = None if saved_at is None else time.time() - saved_at
        if age is not None and -60 <= age <= self.options.resume_within:
            return False
        log.warning(
            f"the {what} is too old to use; discarded",
            age_seconds=None if age is None else round(age),
            resume_within=self.options.resume_within,
        )
        return True

    def _replay_spool(self) -> None:
        """Queue again what the last run could not deliver, then remove the spool."""
        assert self.state_dir is not None
        assert self.reporter is not None
        path = self.state_dir / SPOOL_NAME
        try:
            found = read_spool(path, limit=self.reporter.max_queue)
        except FileNotFoundError:
            return
        except (OSError, LogwatchError) as exc:
            log.error("cannot read the spool; it is left in place", path=str(path), error=str(exc))
            return
        self.spool_skipped = found.bad
        if found.problem:
            log.error("the spool is unusable; removed", path=str(path), problem=found.problem)
        elif not self._too_old(found.saved_at, "spool"):
            # The time on disk counts towards the reporter's max_age: a report is not made
            # young again by a restart.
            age = time.time() - found.saved_at if found.saved_at else 0.0
            for request in found.requests:
                if self.reporter.enqueue(request, age):
                    self.replayed += 1
            if found.bad:
                log.warning("skipped unusable spool records", path=str(path), skipped=found.bad)
            log.info("re-queued the reports spooled by the last run", reports=self.replayed)
        try:
            path.unlink()
        except OSError as exc:
            log.error("cannot remove the spool", path=str(path), error=str(exc))

    def _load_position(self) -> Position | None:
        """The position the last run saved (then removed: it is only valid once)."""
        assert self.state_dir is not None
        assert self.follower is not None
        path = self.state_dir / POSITION_NAME
        try:
            position = read_position(path)
        except FileNotFoundError:
            return None
        except (OSError, ValueError, TypeError, LogwatchError) as exc:
            log.warning("ignoring the saved read position", path=str(path), error=str(exc))
            return None
        finally:
            with contextlib.suppress(OSError):
                path.unlink()
        if position.path != str(self.follower.path):
            log.info("the saved read position is for another log; ignored", saved=position.path)
            return None
        return None if self._too_old(position.saved_at, "saved read position") else position

    async def run(self) -> None:
        """Read until EOF (stdin, `--once`) or `stop()`, then flush and close.

        Raises `FileNotFoundError` for a missing file with `--once`, `NotRegularFile` for
        a path (or stdin) that is not a file one can follow, `LogwatchError` for an
        unusable `--state-dir`; penaltyd being down is never an error (the reports are
        spooled with `--state-dir`, else dropped and counted).
        """
        o = self.options
        if self.state_dir is not None:
            self._prepare_state_dir()
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
            if self.state_dir is not None:
                self._replay_spool()
                if self.follower is not None and not (o.once or o.from_start):
                    self.follower.resume = self._load_position()
        log.info(
            "logwatch started",
            path=o.path,
            penaltyd=None if o.dry_run else o.penaltyd,
            from_start=o.from_start or o.once,
            once=o.once,
            no_rejects=o.no_rejects,
            no_accepted=o.no_accepted,
            ignore_loopback=o.ignore_loopback,
            state_dir=None if self.state_dir is None else str(self.state_dir),
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

    def _spool(self, left: list[pb.ReportRequest]) -> int:
        """Keep what penaltyd did not take for the next start; how many were kept."""
        assert self.state_dir is not None
        assert self.reporter is not None
        path = self.state_dir / SPOOL_NAME
        try:
            if not left:
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()  # nothing to replay (and no stale spool either)
                return 0
            return write_spool(path, left[: self.reporter.max_queue], time.time())
        except OSError as exc:
            log.error("cannot write the spool", path=str(path), error=str(exc))
            return 0

    def _save_position(self) -> None:
        assert self.state_dir is not None
        assert self.follower is not None
        position = self.follower.checkpoint
        if position is None and not self.follower.opened.is_set():
            position = self.follower.resume  # never got to use it: keep it for next time
        if position is None:
            return
        path = self.state_dir / POSITION_NAME
        try:
            write_position(path, position)
        except OSError as exc:
            log.error("cannot save the read position", path=str(path), error=str(exc))

    async def _close(self) -> None:
        if self.reporter is not None and self.client is not None:
            await self.reporter.flush(within=self.options.flush_timeout)
            # close() stops the writer and gives batches still in flight back, so
            # pending_requests() is everything penaltyd has not acknowledged.
            await self.reporter.close(within=0)
            left = self.reporter.pending_requests()
            if self.state_dir is not None:
                self.spooled = self._spool(left)
            self.lost_at_exit = len(left) - self.spooled
            self._closed = True
            if left:
                log.warning(
                    "penaltyd did not take every report before exit",
                    spooled=self.spooled,
                    lost=self.lost_at_exit,
                )
            await self.client.close()
        if self.state_dir is not None and self.follower is not None and not self.options.once:
            self._save_position()
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the lock
            self._lock_fd = None
        final = self.stats()
        if self.reporter is not None:
            # What became of the reports penaltyd had not taken: spooled, or lost with us
            # (also counted in reports_dropped), as the other sidecars' stop lines say.
            final["reports_pending_dropped"] = self.lost_at_exit
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
            "Follows like `tail -F` (rotation and truncation survive); reads regular files "
            "only, and skips lines over 16 KiB. penaltyd being down never blocks or stops "
            "the watcher: reports are queued (bounded) and drops are counted in the stats "
            "log. SIGTERM/SIGINT flush, spool the rest (--state-dir) and exit 0. Exit "
            "code 2: the log path (or --state-dir) cannot be used."
        ),
    )
    p.add_argument(
        "path",
        nargs="?",
        metavar="PATH|-",
        help="the Postfix log file to follow (e.g. /var/log/mail.log; a regular file, "
        "not a FIFO or a device), or - for stdin (read until EOF)",
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
        "--state-dir",
        metavar="DIR",
        default=None,
        help="keep state across restarts here (created 0700 if missing; a systemd unit "
        "uses StateDirectory=penalty-logwatch, i.e. /var/lib/penalty-logwatch): reports "
        "penaltyd has not taken within --flush-timeout at exit are spooled and sent on "
        "the next start, and the read position is kept so that lines written while "
        "stopped are read. Default: none (what is not sent at exit is lost)",
    )
    p.add_argument(
        "--resume-within",
        type=float,
        default=600.0,
        metavar="SECONDS",
        help="use a spool or read position from --state-dir only if it was saved less "
        "than this long ago: older events would count as fresh in penaltyd's window "
        "(default 600, penaltyd's default window)",
    )
    p.add_argument(
        "--log-level",
        choices=["debug", "info", "warning", "error"],
        default="info",
        help="log threshold (default info)",
    )
    add_log_address_arguments(p, env_prefix="PENALTYD")
    return p


def _configure_logs(args: argparse.Namespace) -> None:
    """JSON logs as the flags say (addresses included), the client library's too.

    Raises OSError/ValueError naming an unreadable or short --log-key-file."""
    from serving import logs

    how = log_address_options(args)
    key = how["log_key"]() if how["log_addresses"] == "keyed" else None
    logs.configure(args.log_level, how["log_addresses"], key)
    route_stdlib_logs(args.log_level)


async def _main(options: Options) -> int:
    watch = LogWatch(options)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, watch.stop)
    try:
        await watch.run()
    except NotRegularFile as exc:
        log.error("refusing to read the log: not a regular file", path=exc.path, kind=exc.kind)
        return 2
    except LogwatchError as exc:
        log.error("cannot start", error=str(exc))
        return 2
    except OSError as exc:
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
    for name in (
        "poll_interval",
        "stats_interval",
        "flush_timeout",
        "max_queue",
        "batch_size",
        "resume_within",
    ):
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
        state_dir=args.state_dir,
        resume_within=args.resume_within,
    )
    if not options.dry_run:
        from penaltyclient.channel import grpc_target

        try:
            grpc_target(options.penaltyd)
        except ValueError as exc:
            parser().error(f"--penaltyd: {exc}")
    try:
        _configure_logs(args)
    except (OSError, ValueError) as exc:
        print(f"penalty-logwatch: {exc}", file=sys.stderr)
        return 2
    return asyncio.run(_main(options))


if __name__ == "__main__":
    sys.exit(main())
