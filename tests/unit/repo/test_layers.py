"""The import contracts of `pyproject.toml` ([tool.importlinter]): imports go one way (entry points >
tools > services in dataflow order > shared runtime > schemas) and no package's modules import each other
in a cycle. The second test shows the contracts can fail: the same check over a copy of the tree with one
wrong import added."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
PACKAGES = ("chatpipe", "ingest", "processors", "sinks", "schemas")
LAYERS = "entry points > tools"
CYCLES = "no import cycles"


def lint_imports(tree: Path) -> subprocess.CompletedProcess[str]:
    """`lint-imports` over the packages under `tree`, with the contracts of the repo's pyproject.toml."""
    code = "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())"
    return subprocess.run(
        [sys.executable, "-c", code, "--config", str(tree / "pyproject.toml"), "--no-cache", "--no-logo"],
        cwd=tree,
        env={"PYTHONPATH": str(tree), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=300,
    )


def copy_tree(dest: Path) -> Path:
    for package in PACKAGES:
        skip = shutil.ignore_patterns("__pycache__", "static")
        shutil.copytree(ROOT / package, dest / package, ignore=skip)
    shutil.copy(ROOT / "pyproject.toml", dest / "pyproject.toml")
    return dest


def test_the_contracts_are_kept() -> None:
    result = lint_imports(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "BROKEN" not in result.stdout
    assert result.stdout.count("KEPT") == 2, result.stdout


@pytest.mark.parametrize(
    ("module", "wrong_import", "contract", "named"),
    [
        # the runtime below the services reaching up into one
        ("chatpipe/runtime/topics.py", "import sinks.store", LAYERS, "chatpipe.runtime.topics"),
        # an upstream stage importing a downstream one (ingest is before processors)
        ("ingest/parse.py", "import processors.state", LAYERS, "ingest.parse"),
        # two modules of one package importing each other (schemas.models imports schemas.frozen)
        ("schemas/frozen.py", "import schemas.models", CYCLES, "No cycles are allowed in schemas."),
    ],
)
def test_a_wrong_import_breaks_a_contract(
    tmp_path: Path, module: str, wrong_import: str, contract: str, named: str
) -> None:
    tree = copy_tree(tmp_path)
    target = tree / module
    target.write_text(target.read_text() + f"\n{wrong_import}  # deliberately wrong\n")
    result = lint_imports(tree)
    assert result.returncode != 0, result.stdout
    broken = result.stdout.split("Broken contracts", 1)[-1]
    assert contract in broken, result.stdout
    assert named in broken, result.stdout
