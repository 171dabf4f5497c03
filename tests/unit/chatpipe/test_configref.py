"""The configuration reference (docs/configuration.md) and the README's configuration table agree with
the settings object (chatpipe/runtime/config.py): every variable, its type, its default, its meaning."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from chatpipe.configref import MEANINGS, format_default, render, rows
from chatpipe.runtime.config import Settings, env_name

ROOT = Path(__file__).resolve().parents[3]
CODE_DEFAULTS = {env_name(f.name): format_default(f.default) for f in dataclasses.fields(Settings)}


def test_every_setting_has_a_meaning_and_every_meaning_a_setting() -> None:
    fields = {f.name for f in dataclasses.fields(Settings)}
    assert sorted(fields - set(MEANINGS)) == [], "add these fields' meanings to chatpipe/configref.py"
    assert sorted(set(MEANINGS) - fields) == [], "these meanings name no field of Settings"


def test_docs_configuration_md_is_the_generated_reference() -> None:
    text = (ROOT / "docs" / "configuration.md").read_text(encoding="utf-8")
    assert text == render(), "regenerate: chatpipe config reference --output docs/configuration.md"


def test_reference_rows_are_the_settings_defaults() -> None:
    for variable, _type, default, _meaning in rows():
        assert CODE_DEFAULTS[variable] == default
    # the reference is what from_env reads: an environment with each documented default changes nothing
    env = {v: d for v, _t, d, _m in rows() if d not in ("unset", "empty")}
    assert Settings.from_env(env) == Settings()


def readme_table() -> list[tuple[list[str], list[str]]]:
    """(variables, default parts) of every row of the README's configuration table."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Configuration", 1)[1].split("\n## ", 1)[0]
    found = []
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 3 or not cells[0].startswith("`CHATPIPE_"):
            continue
        variables = re.findall(r"`(CHATPIPE_[A-Z0-9_]+)`", cells[0])
        found.append((variables, [p.strip() for p in cells[-1].split(" / ")]))
    return found


def test_readme_table_names_only_real_variables() -> None:
    table = readme_table()
    assert len(table) >= 10
    for variables, _defaults in table:
        for v in variables:
            assert v in CODE_DEFAULTS, f"README names {v}, which Settings does not read"


def test_readme_defaults_written_as_values_are_the_codes() -> None:
    """A default cell written as a literal (`6`, `127.0.0.1` / `8080`) must be the code's default; prose
    (`dev`: the embedded broker, masked) is not checked."""
    checked = 0
    for variables, defaults in readme_table():
        if len(defaults) != len(variables):
            continue
        for v, d in zip(variables, defaults, strict=True):
            m = re.fullmatch(r"`([^`]*)`", d)
            if m:
                assert m.group(1) == CODE_DEFAULTS[v], f"README says {v} defaults to {d}"
                checked += 1
    assert checked >= 10


@pytest.mark.parametrize("field", ["insecure", "api_keys", "api_keys_file", "read_api_key"])
def test_security_settings_are_documented_in_the_readme(field: str) -> None:
    assert f"`{env_name(field)}`" in (ROOT / "README.md").read_text(encoding="utf-8")
