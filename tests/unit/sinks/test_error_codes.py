"""sinks.error_codes, 8x8's delivery-receipt error codes: the table is 8x8's ("Messaging Apps Delivery
Receipt Error Codes", `8x8-docs/delivery-error-codes.md` next to the repository, when it is there: every
code, reason and description, dashes as ASCII) and `sinks.aggregates.error_meaning` answers from it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from sinks.aggregates import error_meaning
from sinks.error_codes import ERROR_CODES

ROOT = Path(__file__).resolve().parents[3]
DOCS = next((p / "shared" / "8x8-docs" for p in ROOT.parents if (p / "shared" / "8x8-docs").is_dir()), None)
ROW = re.compile(r"^\|\s*(\d+)\s*\|([^|]*)\|([^|]*)\|\s*$")


def unescape(cell: str) -> str:
    """A Markdown cell's text: `\\=` is `=`, `tracking\\_data` is `tracking_data`."""
    return re.sub(r"\\(.)", r"\1", cell.strip())


def documented() -> dict[int, tuple[str, str]]:
    if DOCS is None or not (DOCS / "delivery-error-codes.md").is_file():
        pytest.skip("8x8's docs (shared/8x8-docs/delivery-error-codes.md) are not next to the repository")
    text = (DOCS / "delivery-error-codes.md").read_text(encoding="utf-8")
    rows: dict[int, tuple[str, str]] = {}
    for line in text.replace("\u2014", "-").replace("\u2013", "-").splitlines():
        if m := ROW.match(line.strip()):
            code = int(m.group(1))
            assert code not in rows, f"code {code} twice in 8x8's table"
            rows[code] = (unescape(m.group(2)), unescape(m.group(3)))
    return rows


def test_the_table_is_8x8s_code_for_code() -> None:
    doc = documented()
    assert len(doc) > 90, "the table was not read"
    assert sorted(set(doc) - set(ERROR_CODES)) == [], "8x8 documents codes the table lacks"
    assert sorted(set(ERROR_CODES) - set(doc)) == [], "codes 8x8 does not document"
    assert {c: m for c, m in ERROR_CODES.items() if doc[c] != m} == {}


def test_entries_are_plain_text() -> None:
    for code, (reason, description) in ERROR_CODES.items():
        assert code > 0
        for text in (reason, description):
            assert text and text == text.strip() and text.isascii() and "|" not in text, (code, text)


@pytest.mark.parametrize(
    ("code", "reason"),
    [(1, "AbsentSubscriber"), (1022, "Message window expired"), (2008, "Not a Viber user")],
)
def test_error_meaning_reads_the_table(code: int, reason: str) -> None:
    meaning = error_meaning(code)
    assert meaning is not None and meaning[0] == reason and meaning == ERROR_CODES[code]


@pytest.mark.parametrize("code", [0, -1, 4, 999, 2011, 10**9])
def test_an_undocumented_code_has_no_meaning(code: int) -> None:
    assert error_meaning(code) is None
