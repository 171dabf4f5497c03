"""No module of chatpipe's packages uses another module's private members (issue 18: "No module outside a
package calls its private members; the store's public interface covers every use").

Every module of `chatpipe/ ingest/ processors/ sinks/ schemas/` is parsed with `ast`; a finding is
- `from x import _y` (a private name of another module) or an import of a private module (`x._y`);
- `obj._y` (reading, writing or calling) on anything but `self` or `cls`, including another library's
  objects, and `getattr(obj, "_y")` / `setattr` / `hasattr` / `delattr` with a private name.
Dunder names (`__init__`, `__name__`) are not private. What a module does with its own private names is
its business (`_helper()` at module level is a plain name, never a finding).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
PACKAGES = ("chatpipe", "ingest", "processors", "sinks", "schemas")

#: modules allowed any private access, each with why
ALLOWED_MODULES: dict[str, str] = {
    # by design the one module that reads and replaces other libraries' internals (Faust, mode, aiokafka,
    # aiohttp), each with its upstream issue, a test that fails when it stops taking effect, and a
    # version guard (its docstring)
    "chatpipe/runtime/patches.py": "fences every use of another library's internals",
}
#: single accesses allowed (module, the finding's expression), each with why
ALLOWED_ACCESSES: dict[tuple[str, str], str] = {
    # CPython's C counting loop behind `Counter.update`, on a plain dict, with the pure-Python loop as the
    # fallback where it is missing; `tests/unit/test_aggregates.py` holds bulk counting equal to one by
    # one (Counter.update on a Counter would reach the same loop through public API)
    ("sinks/aggregates.py", "getattr(collections, '_count_elements', _count_each)"): "speed, with a fallback",
}
#: `KafkaError.<name>` allowed: confluent-kafka's documented error codes for librdkafka's local errors,
#: public constants whose names start with an underscore (`KafkaError._PARTITION_EOF`, ...)
KAFKA_LOCAL_ERRORS = frozenset({"_PARTITION_EOF", "_FATAL", "_MSG_TIMED_OUT", "_TIMED_OUT"})
ATTRIBUTE_FUNCTIONS = frozenset({"getattr", "setattr", "hasattr", "delattr"})


def is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def allowed_attribute(node: ast.Attribute) -> bool:
    base = node.value
    if isinstance(base, ast.Name):
        if base.id in ("self", "cls"):
            return True
        if base.id == "KafkaError" and node.attr in KAFKA_LOCAL_ERRORS:
            return True
    return False


def violations(source: str, name: str = "<module>") -> list[str]:
    """`name:line: what` for each private access of `source` (see the module docstring)."""
    found: list[str] = []
    for node in ast.walk(ast.parse(source, name)):
        where = f"{name}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if any(is_private(part) for part in module.split(".")):
                found.append(f"{where}: import from the private module {module}")
            found += [f"{where}: from {module} import {a.name}" for a in node.names if is_private(a.name)]
        elif isinstance(node, ast.Import):
            found += [
                f"{where}: import {a.name}" for a in node.names if any(map(is_private, a.name.split(".")))
            ]
        elif private_attribute(node):
            found.append(f"{where}: {ast.unparse(node)}")
    return found


def private_attribute(node: ast.AST) -> bool:
    """`obj._y` (but not an allowed one) or `getattr(obj, "_y")` and its kin."""
    if isinstance(node, ast.Attribute):
        return is_private(node.attr) and not allowed_attribute(node)
    return (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Name)
        and node.func.id in ATTRIBUTE_FUNCTIONS
        and len(node.args) >= 2
        and isinstance(node.args[1], ast.Constant)
        and isinstance(node.args[1].value, str)
        and is_private(node.args[1].value)
    )


def modules() -> list[Path]:
    return sorted(p for package in PACKAGES for p in (ROOT / package).rglob("*.py"))


def test_no_module_uses_another_modules_private_members() -> None:
    assert len(modules()) > 50  # the packages were found
    found = [
        v
        for path in modules()
        if (rel := path.relative_to(ROOT).as_posix()) not in ALLOWED_MODULES
        for v in violations(path.read_text(encoding="utf-8"), rel)
        if (rel, v.split(": ", 1)[1]) not in ALLOWED_ACCESSES
    ]
    assert found == [], "private members used across modules:\n" + "\n".join(found)


def test_every_allowance_is_still_needed() -> None:
    for rel in ALLOWED_MODULES:
        assert violations((ROOT / rel).read_text(encoding="utf-8"), rel), f"{rel} no longer needs it"
    for rel, expression in ALLOWED_ACCESSES:
        found = [v.split(": ", 1)[1] for v in violations((ROOT / rel).read_text(encoding="utf-8"), rel)]
        assert expression in found, f"{rel}: {expression} is gone: drop its allowance"


@pytest.mark.parametrize(
    "source",
    [
        "from sinks.api import _error",
        "from sinks.api import answer, _text as text",
        "from faust.stores._rocksdb import Store",
        "import mode.utils._queues",
        "store._run(lambda conn: None)",
        "x = request.app._state",
        "self.spool._commit(items, True)",
        "type(self)._cache.clear()",
        "err._PARTITION_EOF",
        "Consumer._add_gap = patched",
        "getattr(store, '_conn')",
        "setattr(Fetcher.close, '_chatpipe_patched', True)",
    ],
)
def test_a_private_access_is_found(source: str) -> None:
    assert len(violations(source)) == 1


@pytest.mark.parametrize(
    "source",
    [
        "self._conn.execute('SELECT 1')",
        "cls._instances.clear()",
        "_helper(1)",
        "KafkaError._PARTITION_EOF",
        "from sinks.api import answer",
        "x.__class__.__name__",
        "getattr(cls, '__dataclass_params__', None)",
        "getattr(settings, name)",
    ],
)
def test_public_and_own_members_are_not_findings(source: str) -> None:
    assert violations(source) == []
