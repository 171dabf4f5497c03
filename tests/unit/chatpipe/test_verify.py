"""The `verify` command shell: it refuses a truth file it cannot read (its parser is checked, next to
`simulate`'s, in test_simulate.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from chatpipe.verify import main


def test_verify_exits_2_when_the_truth_cannot_be_read(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["--truth", str(tmp_path / "absent.jsonl")]) == 2
    (tmp_path / "bad.jsonl").write_text('{"type": "message"}\n')
    assert main(["--truth", str(tmp_path / "bad.jsonl")]) == 2
    assert "cannot read the truth" in capsys.readouterr().err
