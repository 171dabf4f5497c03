"""docs/operations.md stays true: it explains every metric the services export and every alert, cites
benchmark scripts and tests that exist for its capacity figures, names only real settings, and its
internal links resolve."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from chatpipe.runtime.config import Settings, env_name
from tests.unit.repo.test_ops_prometheus import EXPORTED

ROOT = Path(__file__).resolve().parents[3]
DOC = (ROOT / "docs" / "operations.md").read_text(encoding="utf-8")


def section(title: str) -> str:
    return DOC.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0]


def test_every_exported_metric_is_explained() -> None:
    families = {re.sub(r"_(total|created|bucket|sum|count)$", "", n) for n in EXPORTED}
    table = section("Metrics")
    assert [f for f in sorted(families) if f"`{f}`" not in table and f"`{f}_total`" not in table] == []


def test_every_alert_is_explained() -> None:
    rules = yaml.safe_load((ROOT / "ops" / "prometheus" / "alerts.yml").read_text(encoding="utf-8"))
    names = [r["alert"] for g in rules["groups"] for r in g["rules"]]
    table = section("Alerts")
    assert [n for n in names if f"`{n}`" not in table] == []


def test_capacity_figures_cite_scripts_that_exist() -> None:
    capacity = section("Capacity planning")
    cited = set(re.findall(r"`((?:bench|tests)/[\w/]+\.py)", capacity))
    for script in ("bench/ingest.py", "bench/processors.py", "bench/sinks.py", "bench/e2e.py"):
        assert script in cited, f"the capacity figures must cite {script}"
    for path in cited:
        assert (ROOT / path).is_file(), path
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    for path in cited:
        if path.startswith("bench/"):
            assert f"`{path}`" in readme, f"{path} is not in the README's Benchmarks table"


def test_every_file_cited_exists() -> None:
    for path in set(
        re.findall(r"`((?:bench|tests|ops|chatpipe|schemas|sinks|ingest|processors)/[\w./-]+)", DOC)
    ):
        path = path.split()[0].rstrip(".")
        assert (ROOT / path).exists(), path


def test_only_real_settings_are_named() -> None:
    known = {env_name(f) for f in Settings.__dataclass_fields__}
    named = set(re.findall(r"\bCHATPIPE_[A-Z0-9_]*[A-Z0-9]\b", DOC))
    assert named - known == set()


def test_internal_links_resolve() -> None:
    anchors = {
        re.sub(r"[^a-z0-9 -]", "", h.lower()).replace(" ", "-") for h in re.findall(r"^#+ (.+)$", DOC, re.M)
    }
    for link in re.findall(r"\]\(#([^)]+)\)", DOC):
        assert link in anchors, link
