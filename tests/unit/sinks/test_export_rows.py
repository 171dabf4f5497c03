"""The exported tables (`sinks/export_rows.py`): their columns under each PII policy, and column kinds."""

from __future__ import annotations

from sinks.export_rows import CLEAR_ONLY_COLUMNS, TABLES, kind_of
from sinks.rows import MESSAGE_COLUMNS, PiiPolicy


def test_message_tables_have_a_umid_column_and_clear_only_columns_follow_the_policy() -> None:
    for table in TABLES.values():
        assert table.columns[0] == ("sub_account_id" if table.name == "aggregates" else "umid")
        masked = table.exported_columns(PiiPolicy())
        assert not set(masked) & CLEAR_ONLY_COLUMNS
        assert table.exported_columns(PiiPolicy(clear=True)) == table.columns
    masked = TABLES["messages"].exported_columns(PiiPolicy())
    assert "msisdn" not in masked and {"msisdn_masked", "msisdn_hash"} <= set(masked)
    assert set(MESSAGE_COLUMNS) - set(masked) == {"msisdn"}


def test_column_kinds() -> None:
    columns = ("umid", "step", "fell_back", "status_at", "latitude", "detail")
    assert [kind_of(c) for c in columns] == ["string", "int", "bool", "timestamp", "float", "string"]
