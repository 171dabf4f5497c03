"""The static checks run in the suite: mypy over every pure module ([tool.mypy] `files` in pyproject.toml,
with its strictness) and `ruff check` over the repository, each as its own subprocess; their errors fail
the test, printed as the tool prints them. mypy keeps its cache in the repository's `.mypy_cache`
(git-ignored), so a run after the first takes a second or two."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
CONFIG = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))

needs_mypy = pytest.mark.skipif(
    importlib.util.find_spec("mypy") is None, reason="mypy is not installed (pip install -e '.[test]')"
)
needs_ruff = pytest.mark.skipif(
    importlib.util.find_spec("ruff") is None, reason="ruff is not installed (pip install -e '.[test]')"
)


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=240, check=False
    )


def mypy(*args: str) -> subprocess.CompletedProcess[str]:
    return run("mypy", "--config-file", "pyproject.toml", "--cache-dir", ".mypy_cache", *args)


def test_mypy_checks_the_modules_that_exist() -> None:
    files = CONFIG["tool"]["mypy"]["files"]
    assert files, "[tool.mypy] lists no files"
    assert [f for f in files if not (ROOT / f).is_file()] == [], "[tool.mypy] files that do not exist"


@needs_mypy
def test_the_pure_modules_pass_mypy() -> None:
    done = mypy()  # the files and options of [tool.mypy]
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"in {len(CONFIG['tool']['mypy']['files'])} source files" in done.stdout, done.stdout


@needs_mypy
def test_mypy_as_configured_fails_on_a_type_error_and_on_an_unannotated_function(tmp_path: Path) -> None:
    """So the test above can fail: the configuration is read, and its strictness holds."""
    bad = tmp_path / "bad.py"
    bad.write_text("def wrong(x: int) -> str:\n    return x\n\n\ndef untyped(x):\n    return x\n")
    # a cache of its own: the test above may run at the same time on another xdist worker
    done = mypy("--cache-dir", str(tmp_path / "mypy-cache"), str(bad))
    assert done.returncode == 1, done.stdout + done.stderr
    assert "bad.py:2: error: Incompatible return value type" in done.stdout, done.stdout
    assert "bad.py:5: error: Function is missing a type annotation" in done.stdout, done.stdout


@needs_ruff
def test_ruff_check_passes() -> None:
    done = run("ruff", "check", "--no-cache", ".")
    assert done.returncode == 0, done.stdout + done.stderr


@needs_ruff
def test_ruff_format_is_applied() -> None:
    done = run("ruff", "format", "--check", "--no-cache", ".")
    assert done.returncode == 0, done.stdout + done.stderr
