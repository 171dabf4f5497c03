"""Safe schema evolution: every topic schema stays compatible with every released version of itself.

Released versions live under `schemas/history/<stem>/v<N>.avsc` (`<stem>` is the `.avsc` file name without
its suffix), each the self-contained JSON (named types inlined, as registered) of one release. `v1` is the
first release; `release()` appends the next version of every schema that changed.

Compatibility level: FULL (new readers read old data *and* old readers read new data) unless the `.avsc`
says otherwise with a top-level attribute, e.g.

    {"type": "record", "name": "MessageState", "chatpipe.compatibility": "BACKWARD", ...}

Any level of `schemas.compat.LEVELS` is accepted; `NONE` switches the check off. Whatever the level, the
current schema is checked against *every* released version, not only the last one (as the registry's
`*_TRANSITIVE` levels do), because a consumer built with any release may still be running.

`check_history` and `release` are pure apart from reading (and, for `release`, writing) schema files;
`register_all`, `cmd_check`, `cmd_register` are the shell used by `chatpipe schemas check|register`.
"""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from schemas import compat
from schemas.catalog import SCHEMA_DIR, TOPICS, render_schema
from schemas.errors import SchemaError, TransientError

LEVEL_KEY = "chatpipe.compatibility"
DEFAULT_LEVEL = "FULL"
HISTORY = "history"
_VERSION = re.compile(r"^v([1-9][0-9]*)\.avsc$")


@dataclass(frozen=True, slots=True)
class Problem:
    """One reason a schema breaks a released version.

    `schema` is the `.avsc` file name, `version` the released version it breaks (None when the schema itself
    is unusable), `field` the dotted field path when the problem is inside a field.
    """

    schema: str
    version: int | None
    level: str
    field: str | None
    message: str

    def __str__(self) -> str:
        against = f" vs released v{self.version}" if self.version is not None else ""
        return f"{self.schema}{against} ({self.level}): {self.message}"


# --- reading schemas -------------------------------------------------------------------------------


def schema_files() -> list[str]:
    """The `.avsc` files of chatpipe's topics, once each, in catalogue order."""
    return list(dict.fromkeys(spec.schema_file for spec in TOPICS))


def current_schemas(schema_dir: Path = SCHEMA_DIR) -> dict[str, Any]:
    """The self-contained schema (parsed JSON) of every topic `.avsc` in `schema_dir`, by file name.

    For the package's own directory this is exactly `json.loads(catalog.load_schema(file))`.
    """
    return {name: json.loads(render_schema(name, Path(schema_dir))) for name in schema_files()}


def released_versions(schema_dir: Path, schema_file: str) -> dict[int, Any]:
    """Released versions of one schema (parsed JSON) by version number, oldest first."""
    folder = Path(schema_dir) / HISTORY / Path(schema_file).stem
    found: dict[int, Any] = {}
    if folder.is_dir():
        for path in folder.iterdir():
            m = _VERSION.match(path.name)
            if m:
                found[int(m.group(1))] = json.loads(path.read_text())
    return dict(sorted(found.items()))


def level_of(schema: Any) -> str:
    """The compatibility level a schema declares (`chatpipe.compatibility`), FULL by default."""
    level = schema.get(LEVEL_KEY, DEFAULT_LEVEL) if isinstance(schema, dict) else DEFAULT_LEVEL
    return str(level).upper()


# --- checking --------------------------------------------------------------------------------------


def check_schema(name: str, current: Any, released: dict[int, Any]) -> list[Problem]:
    """Problems of one schema against its released versions (pure)."""
    level = level_of(current)
    if level not in compat.LEVELS:
        expected = ", ".join(compat.LEVELS)
        return [
            Problem(name, None, level, None, f"unknown {LEVEL_KEY} {level!r}; expected one of {expected}")
        ]
    base = level.removesuffix("_TRANSITIVE")
    try:
        compat.validate(current)
    except compat.SchemaError as exc:
        return [Problem(name, None, level, None, f"not a valid Avro schema: {exc}")]
    problems: list[Problem] = []
    for version, old in released.items():
        directions: list[tuple[bool, Any, Any]] = []
        if base in ("BACKWARD", "FULL"):
            directions.append((False, current, old))
        if base in ("FORWARD", "FULL"):
            directions.append((True, old, current))
        for forward, reader, writer in directions:
            try:
                found = compat.check(reader, writer)
            except compat.SchemaError as exc:
                problems.append(Problem(name, version, level, None, f"released schema is invalid: {exc}"))
                break
            problems += [Problem(name, version, level, i.field, _explain(i, version, forward)) for i in found]
    return problems


def _explain(found: compat.Incompatibility, version: int, forward: bool) -> str:
    """The checker's message from the point of view of someone editing the current schema."""
    message = found.message
    if found.field and f"field {found.field!r}" not in message:
        message = f"field {found.field!r}: {message}"
    if not forward:
        message = message.replace(" added to reader without a default", " added without a default")
        return f"the new schema cannot read v{version} data: {message}"
    message = message.replace(
        " added to reader without a default", f" removed or renamed, and v{version} has no default for it"
    )
    return f"v{version} consumers cannot read new data: {message}"


def check_history(schema_dir: Path = SCHEMA_DIR) -> list[Problem]:
    """Every topic schema checked, at its level, against every released version under `history/`.

    Empty when all is well. A schema with no released version yet has nothing to break.
    """
    problems: list[Problem] = []
    for name, schema in current_schemas(schema_dir).items():
        problems += check_schema(name, schema, released_versions(schema_dir, name))
    return problems


def release(schema_dir: Path = SCHEMA_DIR) -> list[Path]:
    """Snapshot every topic schema that differs from its last released version as the next `v<N>.avsc`.

    Returns the files written (none when nothing changed). Raises `SchemaError` listing the problems, and
    writes nothing, when a schema breaks a released version: release a compatible schema, or a new topic.
    """
    schema_dir = Path(schema_dir)
    problems = check_history(schema_dir)
    if problems:
        raise SchemaError("not releasing incompatible schemas:\n" + "\n".join(map(str, problems)))
    written: list[Path] = []
    for name, schema in current_schemas(schema_dir).items():
        released = released_versions(schema_dir, name)
        if released and schema == released[max(released)]:
            continue
        path = schema_dir / HISTORY / Path(name).stem / f"v{max(released, default=0) + 1}.avsc"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(schema, indent=2) + "\n")
        written.append(path)
    return written


# --- shell: registry and command line ---------------------------------------------------------------


def register_all(registry_url: str) -> dict[str, int]:
    """Register every topic's value subject (`<topic>-value`); subject -> schema id.

    Raises `SchemaError` when the registry refuses a schema as incompatible, `TransientError` when it is
    unreachable.
    """
    from schemas.codec import Codecs

    return Codecs.connect(registry_url).register_all()


def cmd_check(args: Sequence[str] | None = None) -> int:
    """`chatpipe schemas check [--schema-dir DIR]`: one line per subject, one per problem; 1 if any."""
    parser = argparse.ArgumentParser(prog="chatpipe schemas check", description=cmd_check.__doc__)
    parser.add_argument("--schema-dir", type=Path, default=SCHEMA_DIR, help="directory of the .avsc files")
    opts = parser.parse_args(args)
    problems = check_history(opts.schema_dir)
    current = current_schemas(opts.schema_dir)
    broken = {p.schema for p in problems}
    for spec in TOPICS:
        released = released_versions(opts.schema_dir, spec.schema_file)
        against = f"v{', v'.join(map(str, released))}" if released else "nothing released yet"
        verdict = "INCOMPATIBLE" if spec.schema_file in broken else "ok"
        level = level_of(current[spec.schema_file])
        print(f"{verdict:<12} {spec.subject}  {spec.schema_file}  {level} vs {against}")
    for problem in problems:
        print(f"  {problem}")
    return 1 if problems else 0


def cmd_register(url: str) -> int:
    """`chatpipe schemas register --url URL`: register every subject; 0 ok, 1 incompatible, 2 unreachable."""
    from schemas.codec import Codecs

    codecs = {c.spec.name: c for c in Codecs.connect(url).all()}
    status = 0
    for codec in (codecs[spec.name] for spec in TOPICS):
        try:
            print(f"ok           {codec.spec.subject}  id={codec.schema_id}")
        except SchemaError as exc:
            print(f"INCOMPATIBLE {codec.spec.subject}  {exc}")
            status = max(status, 1)
        except TransientError as exc:
            print(f"UNREACHABLE  {codec.spec.subject}  {exc}")
            return 2
    return status


def cmd_release(args: Sequence[str] | None = None) -> int:
    """`chatpipe schemas release [--schema-dir DIR]` (maintainers): snapshot changed schemas into history."""
    parser = argparse.ArgumentParser(prog="chatpipe schemas release", description=cmd_release.__doc__)
    parser.add_argument("--schema-dir", type=Path, default=SCHEMA_DIR, help="directory of the .avsc files")
    opts = parser.parse_args(args)
    try:
        written = release(opts.schema_dir)
    except SchemaError as exc:
        print(exc)
        return 1
    for path in written:
        print(f"released {path}")
    if not written:
        print("nothing changed since the last release")
    return 0
