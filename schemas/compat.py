"""Avro schema compatibility: can a reader with schema R read data written with schema W?

Pure: no I/O, no clock. Follows the schema-resolution rules of the Avro specification (the same rules
Confluent Schema Registry applies through Avro's Java `SchemaCompatibility`):

- primitives match themselves; promotions int->long/float/double, long->float/double, float->double,
  string<->bytes;
- records, enums and fixed match when their unqualified names are equal or the writer's full name is one
  of the reader's aliases; fixed sizes must be equal;
- a reader field missing from the writer needs a default; a writer field missing from the reader is skipped;
- a writer enum symbol missing from the reader is an error unless the reader enum has a `default`;
- every branch of a writer union must be readable by the reader (by some branch when the reader is a union);
  a non-union writer must be readable by some branch of a reader union;
- logical types are compared by their underlying type.

Recursive named types are handled by assuming a (reader, writer) pair compatible while it is being checked.

`check` raises `SchemaError` (a `ValueError`) when either schema is not a valid Avro schema.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = [
    "LEVELS",
    "Incompatibility",
    "SchemaError",
    "check",
    "check_compatibility",
    "validate",
]

PRIMITIVES = frozenset({"null", "boolean", "int", "long", "float", "double", "bytes", "string"})
NAMED = frozenset({"record", "error", "enum", "fixed"})
LEVELS = (
    "BACKWARD",
    "BACKWARD_TRANSITIVE",
    "FORWARD",
    "FORWARD_TRANSITIVE",
    "FULL",
    "FULL_TRANSITIVE",
    "NONE",
)
# writer type -> reader types that can read it (besides itself)
PROMOTIONS: dict[str, frozenset[str]] = {
    "int": frozenset({"long", "float", "double"}),
    "long": frozenset({"float", "double"}),
    "float": frozenset({"double"}),
    "string": frozenset({"bytes"}),
    "bytes": frozenset({"string"}),
}


class SchemaError(ValueError):
    """The schema is not a valid Avro schema (unknown type, undefined name, malformed JSON)."""


@dataclass(frozen=True, slots=True)
class Incompatibility:
    """One reason the reader cannot read the writer's data.

    `path` locates the problem in the reader schema (`/fields/status/fields/state`, `/items`, `/values`,
    `/symbols`, `/size`, `/name`, `/<union branch index>`); `field` is the dotted record-field path
    (`status.state`) or None when the problem is not inside a field.
    """

    path: str
    field: str | None
    message: str


# --- normalisation: every named type gets its full name, references become full-name strings ---------


@dataclass(frozen=True, slots=True)
class _Schema:
    root: Any
    names: dict[str, dict[str, Any]]


def _full_name(name: str, namespace: str | None) -> str:
    if "." in name or not namespace:
        return name
    return f"{namespace}.{name}"


def _parse(schema: Any) -> _Schema:
    if isinstance(schema, str) and schema not in PRIMITIVES:
        stripped = schema.strip()
        if stripped[:1] in ("{", "[", '"'):
            try:
                schema = json.loads(stripped)
            except json.JSONDecodeError as exc:
                raise SchemaError(f"schema is not valid JSON: {exc}") from exc
    names: dict[str, dict[str, Any]] = {}
    return _Schema(_normalize(schema, None, names), names)


def _normalize(node: Any, namespace: str | None, names: dict[str, dict[str, Any]]) -> Any:
    if isinstance(node, str):
        if node in PRIMITIVES:
            return {"type": node}
        full = _full_name(node, namespace)
        if full in names:
            return full
        if node in names:  # a full name without dots (null namespace) used inside a namespace
            return node
        raise SchemaError(f"undefined type name {node!r}")
    if isinstance(node, list):
        return [_normalize(branch, namespace, names) for branch in node]
    if not isinstance(node, dict) or "type" not in node:
        raise SchemaError(f"not a schema: {node!r}")
    kind = node["type"]
    if isinstance(kind, (dict, list)):
        return _normalize(kind, namespace, names)
    if not isinstance(kind, str):
        raise SchemaError(f"not a schema: {node!r}")
    if kind in PRIMITIVES:
        return {"type": kind}
    if kind == "array":
        if "items" not in node:
            raise SchemaError("array without 'items'")
        return {"type": "array", "items": _normalize(node["items"], namespace, names)}
    if kind == "map":
        if "values" not in node:
            raise SchemaError("map without 'values'")
        return {"type": "map", "values": _normalize(node["values"], namespace, names)}
    if kind in NAMED:
        return _normalize_named(node, kind, namespace, names)
    return _normalize(kind, namespace, names)  # {"type": "com.example.Named"}


def _normalize_named(
    node: dict[str, Any], kind: str, namespace: str | None, names: dict[str, dict[str, Any]]
) -> str:
    name = node.get("name")
    if not isinstance(name, str) or not name:
        raise SchemaError(f"{kind} without a name")
    own_ns = node.get("namespace", namespace) if "." not in name else name.rsplit(".", 1)[0]
    full = _full_name(name, own_ns or None)
    if full in names:
        raise SchemaError(f"type name {full!r} defined twice")
    short = full.rsplit(".", 1)[-1]
    aliases = frozenset(_full_name(a, own_ns or None) for a in node.get("aliases", ()))
    out: dict[str, Any] = {
        "type": "record" if kind == "error" else kind,
        "name": full,
        "short": short,
        "aliases": aliases,
    }
    names[full] = out  # before the children, so that a record may refer to itself
    if kind in ("record", "error"):
        if not isinstance(node.get("fields"), list):
            raise SchemaError(f"record {full!r} without a 'fields' list")
        out["fields"] = [
            {
                "name": field["name"],
                "aliases": tuple(field.get("aliases", ())),
                "has_default": "default" in field,
                "type": _normalize(field["type"], own_ns or None, names),
            }
            for field in node["fields"]
        ]
    elif kind == "enum":
        symbols = node.get("symbols")
        if not isinstance(symbols, list):
            raise SchemaError(f"enum {full!r} without a 'symbols' list")
        out["symbols"] = tuple(symbols)
        out["default"] = node.get("default")
    else:
        if not isinstance(node.get("size"), int):
            raise SchemaError(f"fixed {full!r} without an integer 'size'")
        out["size"] = node["size"]
    return full


# --- comparison -----------------------------------------------------------------------------------


def _describe(node: Any) -> str:
    if isinstance(node, list):
        return "union[" + ", ".join(_describe(b) for b in node) + "]"
    if node["type"] in NAMED:
        return f"{node['type']} {node['name']}"
    return str(node["type"])


class _Checker:
    def __init__(self, reader: _Schema, writer: _Schema) -> None:
        self.reader = reader
        self.writer = writer
        self.in_progress: set[tuple[str, str]] = set()

    def deref(self, node: Any, schema: _Schema) -> Any:
        return schema.names[node] if isinstance(node, str) else node

    def compatible(self, reader: Any, writer: Any) -> bool:
        return not list(self.compare(reader, writer, "", None))

    def compare(self, r: Any, w: Any, path: str, field: str | None) -> Iterator[Incompatibility]:
        r = self.deref(r, self.reader)
        w = self.deref(w, self.writer)
        if isinstance(w, list):
            for index, branch in enumerate(w):
                yield from self.compare(r, branch, f"{path}/{index}", field)
            return
        if isinstance(r, list):
            if not any(self.compatible(branch, w) for branch in r):
                yield Incompatibility(
                    path or "/",
                    field,
                    f"{_where(field)}writer type {_describe(w)} matches no branch of reader {_describe(r)}",
                )
            return
        rt, wt = r["type"], w["type"]
        if rt != wt:
            if rt not in PROMOTIONS.get(wt, ()):
                yield Incompatibility(
                    path or "/",
                    field,
                    f"{_where(field)}reader type {_describe(r)} cannot read writer type {_describe(w)}",
                )
            return
        if rt == "array":
            yield from self.compare(r["items"], w["items"], f"{path}/items", field)
        elif rt == "map":
            yield from self.compare(r["values"], w["values"], f"{path}/values", field)
        elif rt in NAMED:
            yield from self.compare_named(r, w, path, field)

    def compare_named(
        self, r: dict[str, Any], w: dict[str, Any], path: str, field: str | None
    ) -> Iterator[Incompatibility]:
        if r["short"] != w["short"] and w["name"] not in r["aliases"]:
            yield Incompatibility(
                f"{path}/name",
                field,
                f"{_where(field)}reader {r['type']} name "
                f"{r['name']!r} does not match writer name {w['name']!r}",
            )
            return
        key = (r["name"], w["name"])
        if key in self.in_progress:
            return
        self.in_progress.add(key)
        try:
            if r["type"] == "record":
                yield from self.compare_records(r, w, path, field)
            elif r["type"] == "enum":
                missing = [s for s in w["symbols"] if s not in r["symbols"]]
                if missing and r["default"] is None:
                    yield Incompatibility(
                        f"{path}/symbols",
                        field,
                        f"{_where(field)}writer symbols "
                        f"{missing} missing from reader enum {r['name']!r} (no default)",
                    )
            elif r["size"] != w["size"]:
                yield Incompatibility(
                    f"{path}/size",
                    field,
                    f"{_where(field)}fixed {r['name']!r} size {r['size']} in reader, {w['size']} in writer",
                )
        finally:
            self.in_progress.discard(key)

    def compare_records(
        self, r: dict[str, Any], w: dict[str, Any], path: str, field: str | None
    ) -> Iterator[Incompatibility]:
        writer_fields = {f["name"]: f for f in w["fields"]}
        for rf in r["fields"]:
            name = rf["name"]
            dotted = f"{field}.{name}" if field else name
            wf = writer_fields.get(name) or next(
                (writer_fields[a] for a in rf["aliases"] if a in writer_fields), None
            )
            if wf is None:
                if not rf["has_default"]:
                    yield Incompatibility(
                        f"{path}/fields/{name}", dotted, f"field {dotted!r} added to reader without a default"
                    )
                continue
            yield from self.compare(rf["type"], wf["type"], f"{path}/fields/{name}", dotted)


def _where(field: str | None) -> str:
    return f"field {field!r}: " if field else ""


def validate(schema: Any) -> None:
    """Raise `SchemaError` unless `schema` is structurally valid Avro with every name defined."""
    _parse(schema)


def check(reader: Any, writer: Any) -> list[Incompatibility]:
    """Why a reader with schema `reader` cannot read data written with `writer` (empty: it can).

    Schemas are Avro JSON as parsed dicts/lists/primitive names, or JSON text. Raises `SchemaError` for an
    invalid schema.
    """
    r, w = _parse(reader), _parse(writer)
    return list(_Checker(r, w).compare(r.root, w.root, "", None))


def check_compatibility(new: Any, previous_list: Sequence[Any], level: str) -> list[Incompatibility]:
    """Incompatibilities of `new` against `previous_list` (oldest first) under a registry level.

    BACKWARD: `new` reads the latest previous; FORWARD: the latest previous reads `new`; FULL: both;
    `*_TRANSITIVE`: the same against every previous schema; NONE: always compatible. Messages are prefixed
    with the direction and the index of the previous schema in `previous_list`. Raises `ValueError` for an
    unknown level and `SchemaError` for an invalid schema.
    """
    level = level.upper()
    if level not in LEVELS:
        raise ValueError(f"unknown compatibility level {level!r}; expected one of {', '.join(LEVELS)}")
    if level == "NONE" or not previous_list:
        return []
    indexes = range(len(previous_list)) if level.endswith("_TRANSITIVE") else [len(previous_list) - 1]
    base = level.removesuffix("_TRANSITIVE")
    found: list[Incompatibility] = []
    for index in reversed(indexes):
        old = previous_list[index]
        if base in ("BACKWARD", "FULL"):
            found += _prefixed(check(new, old), f"new schema cannot read data written with previous #{index}")
        if base in ("FORWARD", "FULL"):
            found += _prefixed(check(old, new), f"previous #{index} cannot read data written with new schema")
    return found


def _prefixed(found: list[Incompatibility], context: str) -> list[Incompatibility]:
    return [Incompatibility(i.path, i.field, f"{context}: {i.message}") for i in found]
