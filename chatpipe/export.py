"""`chatpipe export`: stream a store table, or the analytics aggregates, to CSV or Parquet.

    chatpipe export --since ISO --until ISO --format csv|parquet
                    [--table messages|steps|events|inbound|aggregates] [--output FILE] [--store URL]
                    [--batch N] [--progress auto|always|never]

Reads the store named by `CHATPIPE_STORE_URL` (or `--store`) and writes to stdout unless `--output FILE`
is given (written to `FILE.part` and renamed when complete, so a failed export leaves no half file).
One header row (CSV) or one schema (Parquet); message tables have a `umid` column. Rows are those whose
time is in `[since, until)` (which time: `sinks.export_rows`), ordered by primary key.

Streaming in constant memory: rows are fetched `--batch` at a time (a server-side cursor on PostgreSQL)
and each batch is written at once (one Parquet row group per batch). A progress bar goes to stderr
(`--progress auto`: rewritten in place on a terminal, a line every few seconds otherwise).

PII: the store keeps numbers masked (with a keyed hash for joins) and content masked; the columns only a
clear policy fills are exported only when `CHATPIPE_PII_CLEAR` is on (`sinks.export_rows`).
CSV: timestamps as fixed-width ISO 8601 UTC (`2026-01-01T00:00:00.000000Z`), booleans `true`/`false`,
NULL as an empty field. Parquet: typed columns (timestamp[us, UTC], bool, int64, double, string).
Exit 0 on success, 2 for bad arguments or a store that cannot be read.
"""

from __future__ import annotations

import argparse
import csv
import io
import os
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any, Protocol

from chatpipe.proof.shell import SubParsers
from chatpipe.runtime.config import Settings
from sinks.export_rows import TABLES, Kind
from sinks.rows import fixed_iso

__all__ = ["add_export_parser", "cmd_export", "main"]

FORMATS = ("csv", "parquet")
TABLE_NAMES = tuple(TABLES)
DEFAULT_BATCH = 10_000
PROGRESS_EVERY_S = 5.0
BAR_WIDTH = 30


# --- arguments -------------------------------------------------------------------------------------


def parse_time(text: str) -> datetime:
    """An ISO 8601 date or time as an aware UTC datetime; a time without offset is taken as UTC."""
    try:
        value = datetime.fromisoformat(text.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an ISO 8601 time: {text!r}") from None
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1: {text}")
    return value


def _arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--since", type=parse_time, required=True, help="ISO 8601 start (inclusive), UTC if naive")
    p.add_argument("--until", type=parse_time, required=True, help="ISO 8601 end (exclusive), UTC if naive")
    p.add_argument("--format", choices=FORMATS, required=True, help="csv or parquet")
    p.add_argument(
        "--table",
        choices=TABLE_NAMES,
        default="messages",
        help="messages (one row per message, default), steps (one per fallback step), events (every "
        "status event), inbound (inbound messages), aggregates (the hourly outbound aggregates: per "
        "subaccount, hour, channel, country and fallback path, messages by outcome)",
    )
    p.add_argument("--output", type=Path, help="write to FILE instead of stdout")
    p.add_argument("--store", help="store URL (default: CHATPIPE_STORE_URL)")
    p.add_argument(
        "--batch",
        type=_positive_int,
        default=DEFAULT_BATCH,
        help=f"rows fetched and written at a time; a Parquet row group each (default {DEFAULT_BATCH})",
    )
    p.add_argument(
        "--progress",
        choices=("auto", "always", "never"),
        default="auto",
        help="progress bar on stderr: auto (in place on a terminal, a line every few seconds otherwise)",
    )


def check_range(since: datetime, until: datetime) -> None:
    if not since < until:
        raise ValueError(f"--since ({fixed_iso(since)}) must be before --until ({fixed_iso(until)})")


# --- writers ---------------------------------------------------------------------------------------


class Writer(Protocol):
    def write(self, rows: Sequence[tuple[Any, ...]]) -> None: ...

    def close(self) -> None:
        """Finish the output (the Parquet footer); does not close the stream."""


def csv_value(value: Any) -> Any:
    """One CSV field: NULL empty, timestamps fixed ISO UTC, booleans true/false, the rest as is."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, datetime):
        return fixed_iso(value)
    return value


class CsvWriter:
    """RFC 4180 CSV (`\\n` line ends) with one header row, written as soon as the writer exists."""

    def __init__(self, stream: IO[str], columns: Sequence[str]) -> None:
        self._csv = csv.writer(stream, lineterminator="\n")
        self._csv.writerow(columns)

    def write(self, rows: Sequence[tuple[Any, ...]]) -> None:
        self._csv.writerows([[csv_value(v) for v in row] for row in rows])

    def close(self) -> None:
        pass


def arrow_type(kind: Kind) -> Any:
    import pyarrow as pa

    return {
        "string": pa.string(),
        "int": pa.int64(),
        "float": pa.float64(),
        "bool": pa.bool_(),
        "timestamp": pa.timestamp("us", tz="UTC"),
    }[kind]


class ParquetWriter:
    """Parquet with a typed schema; every `write` is one row group, so memory holds one batch only."""

    def __init__(self, stream: IO[bytes], columns: Sequence[str], kinds: Sequence[Kind]) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        self._pa = pa
        self.schema = pa.schema([pa.field(c, arrow_type(k)) for c, k in zip(columns, kinds, strict=True)])
        self._writer = pq.ParquetWriter(stream, self.schema, compression="zstd")

    def write(self, rows: Sequence[tuple[Any, ...]]) -> None:
        if not rows:
            return
        pa = self._pa
        arrays = [pa.array([row[i] for row in rows], type=field.type) for i, field in enumerate(self.schema)]
        self._writer.write_table(pa.Table.from_arrays(arrays, schema=self.schema))

    def close(self) -> None:
        self._writer.close()


def make_writer(fmt: str, binary: IO[bytes], columns: Sequence[str], kinds: Sequence[Kind]) -> tuple[
    Writer, Callable[[], None]
]:  # fmt: skip
    """The writer of `fmt` over the binary stream, and what flushes it (the CSV text layer)."""
    if fmt == "parquet":
        return ParquetWriter(binary, columns, kinds), binary.flush
    text = io.TextIOWrapper(binary, encoding="utf-8", newline="", write_through=False)

    def flush() -> None:
        text.flush()
        text.detach()  # leave the binary stream open (stdout)

    return CsvWriter(text, columns), flush


# --- progress --------------------------------------------------------------------------------------


def progress_line(label: str, done: int, total: int | None, elapsed: float) -> str:
    """`label [#####.....]  50%  5,000/10,000 rows  1,234 rows/s`; without a total: no bar."""
    rate = done / elapsed if elapsed > 0 else 0.0
    tail = f"{done:,}{'' if total is None else f'/{total:,}'} rows  {rate:,.0f} rows/s"
    if total is None:
        return f"{label}  {tail}"
    share = 1.0 if total == 0 else min(done / total, 1.0)
    filled = round(share * BAR_WIDTH)
    return f"{label} [{'#' * filled}{'.' * (BAR_WIDTH - filled)}] {share * 100:3.0f}%  {tail}"


@dataclass
class Progress:
    """Reports rows written on `stream`: in place (`\\r`) on a terminal, else a line every
    PROGRESS_EVERY_S seconds; always a final line. `clock` is injected (monotonic seconds)."""

    stream: IO[str]
    label: str
    total: int | None
    in_place: bool
    enabled: bool = True
    clock: Callable[[], float] = time.monotonic

    def __post_init__(self) -> None:
        self.done = 0
        self.started = self.clock()
        self._last = self.started

    def advance(self, rows: int) -> None:
        self.done += rows
        if not self.enabled:
            return
        now = self.clock()
        if self.in_place or now - self._last >= PROGRESS_EVERY_S:
            self._last = now
            self._emit(now, final=False)

    def finish(self) -> None:
        if self.enabled:
            self._emit(self.clock(), final=True)

    def _emit(self, now: float, final: bool) -> None:
        line = progress_line(self.label, self.done, self.total, now - self.started)
        if self.in_place:
            self.stream.write("\r" + line + ("\n" if final else ""))
        else:
            self.stream.write(line + "\n")
        self.stream.flush()


# --- the command -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Source:
    """What to export: the header, the value kinds, the row count (None: unknown) and the batches."""

    columns: tuple[str, ...]
    kinds: tuple[Kind, ...]
    total: int | None
    batches: Iterable[Sequence[tuple[Any, ...]]]


def export(source: Source, fmt: str, binary: IO[bytes], progress: Progress) -> int:
    """Write every batch of `source` to `binary` in `fmt`; returns the rows written."""
    writer, flush = make_writer(fmt, binary, source.columns, source.kinds)
    for rows in source.batches:
        writer.write(rows)
        progress.advance(len(rows))
    writer.close()
    flush()
    progress.finish()
    return progress.done


@dataclass
class Opened:
    """An export's source and what ends its read (the stream, then the store)."""

    source: Source
    close: Callable[[], None]


def open_source(
    url: str, settings: Settings, table: str, since: datetime, until: datetime, batch: int
) -> Opened:
    """The table's rows in range, counted first (`Store.stream` on the store opened read-only)."""
    from sinks.connect import open_store
    from sinks.worker import pii_policy

    store = open_store(url, pii_policy(settings), read_only=True)
    try:
        stream = store.stream(table, since, until, batch=batch)
    except BaseException:
        store.close()
        raise

    def close() -> None:
        try:
            stream.close()
        finally:
            store.close()

    return Opened(Source(stream.columns, stream.kinds, stream.total, stream), close)


def cmd_export(settings: Settings, args: argparse.Namespace, env: dict[str, str]) -> int:
    try:
        check_range(args.since, args.until)
    except ValueError as exc:
        print(f"chatpipe export: {exc}", file=sys.stderr)
        return 2
    url = args.store or settings.store_url
    try:
        opened = open_source(url, settings, args.table, args.since, args.until, args.batch)
    except Exception as exc:  # a store that cannot be opened or read
        print(f"chatpipe export: cannot read the store: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    progress = Progress(
        sys.stderr,
        f"export {args.table}",
        opened.source.total,
        in_place=sys.stderr.isatty() and args.progress != "never",
        enabled=args.progress != "never",
    )
    try:
        if args.output is None:
            try:
                export(opened.source, args.format, sys.stdout.buffer, progress)
            except BrokenPipeError:  # `| head`: the reader has what it wanted
                devnull = os.open(os.devnull, os.O_WRONLY)
                os.dup2(devnull, sys.stdout.fileno())
                return 0
        else:
            part = args.output.with_name(args.output.name + ".part")
            try:
                with part.open("wb") as f:
                    export(opened.source, args.format, f, progress)
                part.replace(args.output)
            except BaseException:
                part.unlink(missing_ok=True)
                raise
    except Exception as exc:
        print(f"\nchatpipe export: failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    finally:
        opened.close()
    return 0


def add_export_parser(sub: SubParsers) -> argparse.ArgumentParser:
    """Register `export` on `chatpipe`'s sub-command parsers."""
    p = sub.add_parser(
        "export",
        help="stream a store table or the analytics aggregates to CSV or Parquet",
        description=__doc__.split("\n\n")[0],
    )
    _arguments(p)
    p.set_defaults(func=cmd_export)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    from chatpipe.proof.shell import run_alone

    return run_alone("chatpipe export", __doc__, _arguments, cmd_export, argv)


if __name__ == "__main__":
    sys.exit(main())
