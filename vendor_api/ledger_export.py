"""`vendor-admin export-ledger`: every ledger entry of every key, once, to a billing system.

Each account's ledger is a Redis stream (`vendor:{digest}:ledger`: create, debit, refund, replay,
top_up, revoke). An exporter, named by its consumer (`--consumer`, default `billing`), keeps one
cursor per account in Redis (`vendor:{digest}:export`, field = consumer): the id of the last
entry it has written. A pass reads, per account, the entries after the cursor in batches; writes
a batch; makes it durable (flush, and fsync for a file); and only then moves the cursor
(`lua/export_commit.lua`, which may also trim). So:

- a killed exporter loses nothing: what was written but not committed is read again;
- to a file (`--out`), it writes nothing twice either: on start the file's last complete event
  (a torn last line from a kill is cut off first) moves that account's cursor up to it, and only
  the batch in progress can be past its cursor, since cursors move after every batch (so a file
  belongs to one consumer: appending two consumers' exports to one file would skip events);
- to stdout, the window between a write and its commit can repeat a batch after a kill: every
  event has a stable id (`ledger_events.py`), so the consumer deduplicates (OpenMeter does by
  `id` + `source`).

`--trim` removes the entries every consumer has exported (XTRIM MINID), so the ledger's memory
stays bounded by what is not yet exported. One exporter per consumer at a time: a lock
(`vendor:{export}:lock:<consumer>`, renewed per batch, expiring `--lock-ttl` seconds, default
30, after its holder died) refuses a second one. `--since` reads from a given point without a cursor or a lock (a backfill
of what is still in Redis); it cannot trim.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import sys
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Protocol, TextIO

from .accounts import NAMES_KEY, AccountKeys
from .errors import Conflict, InvalidRequest, MeteringUnavailable
from .ledger_events import (
    LedgerEntry, csv_header, event_id_of_line, format_cloudevents, format_csv, split_event_id,
)
from .lua_scripts import lua_source
from .redis_calls import fail_closed, retry_once
from .redis_client import RedisClient

FORMATS = ("cloudevents", "csv")
_RENEW_LOCK = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""
_RELEASE_LOCK = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


def lock_key(consumer: str) -> str:
    return f"vendor:{{export}}:lock:{consumer}"


@dataclass(frozen=True)
class ExportOptions:
    consumer: str = "billing"
    fmt: str = "cloudevents"
    source: str = "vendor-api"
    type_prefix: str = "vendor.ledger"
    trim: bool = False
    since: str | None = None
    batch: int = 1000
    lock_ttl_s: float = 30.0
    interval_s: float = 5.0

    @property
    def lock_ttl_ms(self) -> int:
        return int(self.lock_ttl_s * 1000)

    def validate(self) -> "ExportOptions":
        if self.fmt not in FORMATS:
            raise InvalidRequest(f"--format must be one of {', '.join(FORMATS)}; got {self.fmt!r}")
        if not self.consumer or not all(c.isascii() and (c.isalnum() or c in "-_.") for c in self.consumer):
            raise InvalidRequest("--consumer must be letters, digits, '-', '_' or '.'")
        if self.trim and self.since is not None:
            raise InvalidRequest("--trim needs the stored cursor: it cannot be used with --since (a backfill)")
        if not 1 <= self.batch <= 100_000:
            raise InvalidRequest("--batch must be from 1 to 100000")
        if not self.lock_ttl_s >= 2 * self.interval_s:
            raise InvalidRequest("--lock-ttl must be at least twice --interval, or the lock lapses between passes")
        if self.since is not None:
            parse_since(self.since)
        return self


def parse_since(text: str) -> str:
    """`--since` as an XRANGE start: a stream id `MS-SEQ` (exclusive: entries after it, as a
    cursor), `0` (everything still in Redis), milliseconds since the epoch or an ISO 8601 time
    (inclusive: entries at or after it)."""
    text = text.strip()
    if text.count("-") == 1 and all(part.isdigit() for part in text.split("-")):
        return "(" + text
    if text.isdigit():
        return f"{int(text)}-0"
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise InvalidRequest(f"--since must be a ledger cursor (MS-SEQ), milliseconds or an ISO 8601 time; got {text!r}")
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return f"{int(moment.timestamp() * 1000)}-0"


class Sink(Protocol):
    def last_event_id(self) -> str | None: ...

    def write(self, text: str) -> None:
        """Return only once `text` is as durable as this sink can make it."""


class StreamSink:
    """stdout (or any text stream): at-least-once; the consumer deduplicates by event id."""

    def __init__(self, stream: TextIO, fmt: str) -> None:
        self.stream = stream
        if fmt == "csv":
            self.write(csv_header())

    def last_event_id(self) -> str | None:
        return None

    def write(self, text: str) -> None:
        self.stream.write(text)
        self.stream.flush()


class FileSink:
    """An append-only file, fsynced after every batch. Opening it cuts a torn last line (a kill
    mid-write) and remembers the last complete event, from which the exporter resumes."""

    def __init__(self, path: Path, fmt: str) -> None:
        self.path, self.fmt = Path(path), fmt
        self._last: str | None = None
        if self.path.exists() and self.path.stat().st_size:
            data = self.path.read_bytes()
            if not data.endswith(b"\n"):
                data = data[: data.rfind(b"\n") + 1]
                with self.path.open("r+b") as f:
                    f.truncate(len(data))
                    os.fsync(f.fileno())
            lines = data.decode().splitlines()
            self._last = event_id_of_line(lines[-1], fmt) if lines else None
        self._file = self.path.open("a", encoding="utf-8")
        if fmt == "csv" and self.path.stat().st_size == 0:
            self.write(csv_header())

    def last_event_id(self) -> str | None:
        return self._last

    def write(self, text: str) -> None:
        self._file.write(text)
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        self._file.close()


class LedgerExporter:
    def __init__(self, client: RedisClient, sink: Sink, options: ExportOptions) -> None:
        """`client`: the vendor's Redis (a meter's or a key admin's `.redis`); the exporter reads
        the ledgers and its cursors directly, outside the request path."""
        self.redis, self.sink, self.options = client, sink, options.validate()
        self._commit = self.redis.register_script(lua_source("export_commit.lua"))
        self._renew = self.redis.register_script(_RENEW_LOCK)
        self._release = self.redis.register_script(_RELEASE_LOCK)
        self._token = secrets.token_hex(16)
        self.exported = 0  #: events written by this exporter
        self.trimmed = 0   #: ledger entries it removed

    # ------------------------------------------------------------------ the lock
    @fail_closed
    async def acquire(self) -> None:
        """Refuse to run beside another exporter of the same consumer (both would write)."""
        if self.options.since is not None:
            return
        if not await self.redis.set(lock_key(self.options.consumer), self._token, nx=True, px=self.options.lock_ttl_ms):
            raise Conflict(f"another exporter for consumer {self.options.consumer!r} is running (its lock expires "
                           f"{self.options.lock_ttl_s:g} s after it stops renewing it)")

    @fail_closed
    @retry_once
    async def _keep_lock(self) -> None:
        if self.options.since is None and not await self._renew(keys=[lock_key(self.options.consumer)],
                                                                 args=[self._token, self.options.lock_ttl_ms]):
            raise Conflict(f"this exporter lost its lock for consumer {self.options.consumer!r} (paused past "
                           f"{self.options.lock_ttl_s:g} s?); stopped so that two exporters do not write")

    async def release(self) -> None:
        if self.options.since is None:
            try:
                await self._release(keys=[lock_key(self.options.consumer)], args=[self._token])
            except Exception:  # noqa: BLE001 - the lock expires by itself
                pass

    # ------------------------------------------------------------------ cursors
    @fail_closed
    @retry_once
    async def _accounts(self) -> list[tuple[str, str]]:
        names = await self.redis.hgetall(NAMES_KEY)
        return sorted((name.decode(), digest.decode()) for name, digest in names.items())

    @fail_closed
    @retry_once
    async def _cursor(self, digest: str) -> str | None:
        raw = await self.redis.hget(AccountKeys(digest).export_cursors, self.options.consumer)
        return raw.decode() if raw is not None else None

    @fail_closed
    @retry_once
    async def _commit_cursor(self, digest: str, stream_id: str) -> None:
        """Idempotent (the cursor only moves forward), so safe to retry."""
        keys = AccountKeys(digest)
        _, trimmed = await self._commit(keys=[keys.ledger, keys.export_cursors],
                                        args=[self.options.consumer, stream_id, "1" if self.options.trim else "0"])
        self.trimmed += int(trimmed)

    @fail_closed
    @retry_once
    async def _read(self, digest: str, start: str) -> list[tuple[bytes, dict[bytes, bytes]]]:
        return await self.redis.xrange(AccountKeys(digest).ledger, min=start, count=self.options.batch)

    async def resume_from_sink(self) -> None:
        """The sink's last event is exported even if the exporter died before committing it."""
        last = self.sink.last_event_id()
        if last is None or self.options.since is not None:
            return
        prefix, stream_id = split_event_id(last)
        for _, digest in await self._accounts():
            if digest.startswith(prefix):
                await self._commit_cursor(digest, stream_id)
                return

    # ------------------------------------------------------------------ passes
    async def export_once(self) -> int:
        """One pass over every account; returns the events written."""
        written = 0
        fixed_start = parse_since(self.options.since) if self.options.since is not None else None
        for name, digest in await self._accounts():
            cursor = await self._cursor(digest) if fixed_start is None else None
            start = fixed_start or ("(" + cursor if cursor else "-")
            wrote_here = False
            while True:
                entries = await self._read(digest, start)
                if not entries:
                    if self.options.trim and cursor and not wrote_here:
                        await self._commit_cursor(digest, cursor)  # trims what other consumers exported since
                    break
                wrote_here = True
                batch = [LedgerEntry(digest, name, eid.decode(), {k.decode(): v.decode() for k, v in fields.items()})
                         for eid, fields in entries]
                await self._keep_lock()
                render = format_cloudevents if self.options.fmt == "cloudevents" else format_csv
                self.sink.write(render(batch, self.options.source, self.options.type_prefix))
                written += len(batch)
                last = batch[-1].stream_id
                if fixed_start is None:
                    await self._commit_cursor(digest, last)
                start = "(" + last
                if len(entries) < self.options.batch:
                    break
        self.exported += written
        return written

    async def follow(self, stop: asyncio.Event) -> None:
        """Pass after pass until `stop` is set. Redis being unreachable skips a pass (reported on
        stderr), it does not end the loop: the cursors make the next pass pick up the rest."""
        while not stop.is_set():
            try:
                await self._keep_lock()
                await self.export_once()
            except MeteringUnavailable as exc:
                print(f"vendor-admin export-ledger: {exc.message}; retrying in {self.options.interval_s:g}s",
                      file=sys.stderr)
            try:
                await asyncio.wait_for(stop.wait(), self.options.interval_s)
            except asyncio.TimeoutError:
                pass
