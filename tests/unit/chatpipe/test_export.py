"""`chatpipe export` without a store: arguments, the CSV and Parquet writers on in-memory rows, progress."""

from __future__ import annotations

import argparse
import csv
import io
from datetime import UTC, datetime, timedelta, timezone

import pyarrow.parquet as pq
import pytest
from hypothesis import given
from hypothesis import strategies as st

from chatpipe.cli import build_parser
from chatpipe.export import (
    BAR_WIDTH,
    CsvWriter,
    ParquetWriter,
    Progress,
    Source,
    check_range,
    csv_value,
    export,
    parse_time,
    progress_line,
)
from sinks.export_rows import kind_of

T0 = datetime(2026, 6, 9, 10, 0, 0, 123456, tzinfo=UTC)
COLUMNS = ("umid", "step", "fell_back", "status_at", "latitude", "detail")
KINDS = tuple(kind_of(c) for c in COLUMNS)
ROWS = [
    ("u-1", 1, True, T0, 1.5, "delivered_to_recipient"),
    ("u-2", 2, False, T0 + timedelta(hours=1), None, None),
    ('u,3 "quoted"\nline', None, None, None, -0.25, ""),
]


def parse(argv: list[str]) -> argparse.Namespace:
    return build_parser().parse_args(["export", *argv])


# --- arguments ---------------------------------------------------------------------------------


def test_export_is_a_chatpipe_command_with_its_defaults() -> None:
    args = parse(["--since", "2026-01-01", "--until", "2026-01-02T00:00:00Z", "--format", "csv"])
    assert args.since == datetime(2026, 1, 1, tzinfo=UTC)
    assert args.until == datetime(2026, 1, 2, tzinfo=UTC)
    assert (args.table, args.output, args.store, args.progress) == ("messages", None, None, "auto")
    assert args.func.__name__ == "cmd_export"


@pytest.mark.parametrize(
    "argv",
    [
        ["--until", "2026-01-02", "--format", "csv"],  # no --since
        ["--since", "2026-01-01", "--until", "2026-01-02"],  # no --format
        ["--since", "2026-01-01", "--until", "2026-01-02", "--format", "json"],
        ["--since", "2026-01-01", "--until", "2026-01-02", "--format", "csv", "--table", "users"],
        ["--since", "yesterday", "--until", "2026-01-02", "--format", "csv"],
        ["--since", "2026-01-01", "--until", "2026-01-02", "--format", "csv", "--batch", "0"],
    ],
)
def test_bad_arguments_exit_2(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        parse(argv)
    assert exc.value.code == 2


def test_times_with_an_offset_are_taken_to_utc_and_naive_ones_are_utc() -> None:
    assert parse_time("2026-01-01T02:00:00+02:00") == datetime(2026, 1, 1, tzinfo=UTC)
    assert parse_time("2026-01-01T00:00:00") == datetime(2026, 1, 1, tzinfo=UTC)
    assert parse_time("2026-01-01T00:00:00Z").tzinfo is not None


def test_an_empty_or_reversed_range_is_refused() -> None:
    with pytest.raises(ValueError, match="before"):
        check_range(T0, T0)
    with pytest.raises(ValueError, match="before"):
        check_range(T0, T0 - timedelta(seconds=1))
    check_range(T0, T0 + timedelta(microseconds=1))


def test_cmd_export_refuses_a_reversed_range_before_opening_the_store(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from chatpipe.cli import main

    code = main(
        [
            "export",
            "--since",
            "2026-01-02",
            "--until",
            "2026-01-01",
            "--format",
            "csv",
            "--store",
            "mysql://x",
        ],
        env={},
    )
    assert code == 2
    assert "must be before" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("store", "cause"),
    [("mysql://nowhere", "unsupported store URL"), ("sqlite:////nonexistent/dir/x.db", "unable to open")],
)
def test_unreadable_store_exits_2_naming_the_cause(
    store: str, cause: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from chatpipe.cli import main

    code = main(
        ["export", "--since", "2026-01-01", "--until", "2026-01-02", "--format", "csv", "--store", store],
        env={},
    )
    assert code == 2
    captured = capsys.readouterr()
    assert cause in captured.err and captured.out == ""


# --- writers -----------------------------------------------------------------------------------


def _csv(rows: list[tuple[object, ...]], columns: tuple[str, ...] = COLUMNS) -> str:
    out = io.StringIO()
    w = CsvWriter(out, columns)
    w.write(rows)
    w.close()
    return out.getvalue()


def test_csv_has_one_header_row_then_the_rows_in_order() -> None:
    text = _csv(ROWS)
    read = list(csv.reader(io.StringIO(text)))
    assert read[0] == list(COLUMNS)
    assert len(read) == 1 + len(ROWS)
    assert read[1] == ["u-1", "1", "true", "2026-06-09T10:00:00.123456Z", "1.5", "delivered_to_recipient"]
    assert read[2] == ["u-2", "2", "false", "2026-06-09T11:00:00.123456Z", "", ""]
    assert read[3][0] == ROWS[2][0]  # commas, quotes and newlines survive


def test_csv_without_rows_is_the_header_alone() -> None:
    assert _csv([]) == ",".join(COLUMNS) + "\n"


def test_csv_timestamps_are_utc_whatever_their_offset() -> None:
    plus2 = timezone(timedelta(hours=2))
    assert csv_value(datetime(2026, 1, 1, 2, 0, tzinfo=plus2)) == "2026-01-01T00:00:00.000000Z"


@given(
    st.lists(
        st.tuples(
            st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\r")),
            st.integers(-(2**63), 2**63 - 1),
        ),
        max_size=20,
    )
)
def test_csv_round_trips_any_text_and_integers(rows: list[tuple[str, int]]) -> None:
    read = list(csv.reader(io.StringIO(_csv(rows, ("umid", "step")), newline="")))
    assert [(r[0], int(r[1])) for r in read[1:]] == rows


def _parquet(batches: list[list[tuple[object, ...]]]) -> pq.ParquetFile:
    out = io.BytesIO()
    w = ParquetWriter(out, COLUMNS, KINDS)
    for b in batches:
        w.write(b)
    w.close()
    return pq.ParquetFile(io.BytesIO(out.getvalue()))


def test_parquet_is_typed_and_one_row_group_per_batch() -> None:
    f = _parquet([ROWS[:2], [], ROWS[2:]])
    assert f.metadata.num_row_groups == 2
    assert [str(t) for t in f.schema_arrow.types] == [
        "string", "int64", "bool", "timestamp[us, tz=UTC]", "double", "string"
    ]  # fmt: skip
    got = f.read().to_pylist()
    assert [tuple(r.values()) for r in got] == ROWS
    assert got[0]["status_at"] == T0


def test_parquet_without_rows_still_has_the_schema() -> None:
    f = _parquet([])
    assert f.metadata.num_rows == 0
    assert f.schema_arrow.names == list(COLUMNS)


def test_export_writes_every_batch_and_counts_rows() -> None:
    out = io.BytesIO()
    err = io.StringIO()
    progress = Progress(err, "export t", total=3, in_place=False)
    done = export(Source(COLUMNS, KINDS, 3, [ROWS[:1], ROWS[1:]]), "csv", out, progress)
    assert done == 3
    assert out.getvalue().decode().count("\n") == 5  # header + 3 rows, one holding a newline
    assert "3/3 rows" in err.getvalue() and "100%" in err.getvalue()


# --- progress ----------------------------------------------------------------------------------


def test_progress_line_with_and_without_a_total() -> None:
    line = progress_line("export messages", 5_000, 10_000, 2.0)
    assert f"[{'#' * (BAR_WIDTH // 2)}{'.' * (BAR_WIDTH // 2)}]" in line
    assert " 50%" in line and "5,000/10,000 rows" in line and "2,500 rows/s" in line
    assert progress_line("x", 7, None, 0.0) == "x  7 rows  0 rows/s"
    assert "100%" in progress_line("x", 0, 0, 1.0)


def test_progress_off_a_terminal_prints_a_line_every_few_seconds_and_a_last_one() -> None:
    now = [0.0]
    err = io.StringIO()
    p = Progress(err, "e", total=100, in_place=False, clock=lambda: now[0])
    for _ in range(10):
        now[0] += 1.0
        p.advance(10)
    p.finish()
    lines = err.getvalue().splitlines()
    assert len(lines) == 3  # at 5 s, at 10 s, and the final line
    assert lines[-1].endswith("10 rows/s") and "100/100" in lines[-1]


def test_progress_on_a_terminal_rewrites_in_place_and_never_when_disabled() -> None:
    err = io.StringIO()
    p = Progress(err, "e", total=2, in_place=True, clock=lambda: 1.0)
    p.advance(1)
    p.advance(1)
    p.finish()
    assert err.getvalue().count("\r") == 3 and err.getvalue().endswith("\n")
    quiet = io.StringIO()
    q = Progress(quiet, "e", total=2, in_place=False, enabled=False)
    q.advance(2)
    q.finish()
    assert quiet.getvalue() == "" and q.done == 2
