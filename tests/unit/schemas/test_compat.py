"""Avro schema compatibility: one table-driven case per resolution rule, then hypothesis properties."""

from __future__ import annotations

import io
import json
from typing import Any

import fastavro
import pytest
from fastavro.utils import generate_one
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from schemas.compat import Incompatibility, SchemaError, check, check_compatibility


def record(name: str, *fields: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"type": "record", "name": name, "fields": list(fields), **extra}


def f(name: str, type_: Any, **extra: Any) -> dict[str, Any]:
    return {"name": name, "type": type_, **extra}


def enum(name: str, *symbols: str, **extra: Any) -> dict[str, Any]:
    return {"type": "enum", "name": name, "symbols": list(symbols), **extra}


STATUS = record("Status", f("state", "string"))
LINKED = record("Node", f("value", "int"), f("next", ["null", "Node"], default=None))

# (id, reader, writer, expected [(path, field)] of the incompatibilities; [] means compatible)
CASES: list[tuple[str, Any, Any, list[tuple[str, str | None]]]] = [
    # primitives and promotions
    ("same primitive", "string", "string", []),
    ("int promotes to long", "long", "int", []),
    ("int promotes to float", "float", "int", []),
    ("int promotes to double", "double", "int", []),
    ("long promotes to float", "float", "long", []),
    ("long promotes to double", "double", "long", []),
    ("float promotes to double", "double", "float", []),
    ("string reads bytes", "string", "bytes", []),
    ("bytes reads string", "bytes", "string", []),
    ("long does not narrow to int", "int", "long", [("/", None)]),
    ("double does not narrow to float", "float", "double", [("/", None)]),
    ("int cannot read string", "int", "string", [("/", None)]),
    ("boolean cannot read null", "boolean", "null", [("/", None)]),
    ("wrapped primitive equals bare", {"type": "int"}, "int", []),
    # logical types resolve by their underlying type
    ("timestamp-millis reads long", {"type": "long", "logicalType": "timestamp-millis"}, "long", []),
    (
        "timestamp-micros reads int date",
        {"type": "long", "logicalType": "timestamp-micros"},
        {"type": "int", "logicalType": "date"},
        [],
    ),
    ("uuid string cannot read long", {"type": "string", "logicalType": "uuid"}, "long", [("/", None)]),
    # records
    (
        "reader field with default missing in writer",
        record("M", f("a", "int"), f("b", "string", default="x")),
        record("M", f("a", "int")),
        [],
    ),
    (
        "reader field without default missing in writer",
        record("M", f("a", "int"), f("errorCode", "int")),
        record("M", f("a", "int")),
        [("/fields/errorCode", "errorCode")],
    ),
    ("null default counts as a default", record("M", f("a", ["null", "int"], default=None)), record("M"), []),
    (
        "writer-only field is skipped",
        record("M", f("a", "int")),
        record("M", f("a", "int"), f("z", "string")),
        [],
    ),
    (
        "field type change inside nested record",
        record("M", f("status", record("Status", f("state", "int")))),
        record("M", f("status", STATUS)),
        [("/fields/status/fields/state", "status.state")],
    ),
    (
        "field found through reader alias",
        record("M", f("code", "int", aliases=["errorCode"])),
        record("M", f("errorCode", "int")),
        [],
    ),
    (
        "field order does not matter",
        record("M", f("b", "string"), f("a", "int")),
        record("M", f("a", "int"), f("b", "string")),
        [],
    ),
    ("record names must match", record("A", f("a", "int")), record("B", f("a", "int")), [("/name", None)]),
    (
        "namespaces are ignored: unqualified names compare",
        record("M", f("a", "int"), namespace="new.ns"),
        record("M", f("a", "int"), namespace="old.ns"),
        [],
    ),
    (
        "reader alias accepts the writer's full name",
        record("New", f("a", "int"), namespace="ns", aliases=["old.Old"]),
        record("Old", f("a", "int"), namespace="old"),
        [],
    ),
    (
        "error type reads like a record",
        {**record("E", f("a", "int")), "type": "error"},
        record("E", f("a", "int")),
        [],
    ),
    # enums
    ("enum gains a symbol", enum("S", "A", "B", "C"), enum("S", "A", "B"), []),
    ("writer symbol missing from reader", enum("S", "A"), enum("S", "A", "B"), [("/symbols", None)]),
    ("reader default covers missing symbols", enum("S", "A", "U", default="U"), enum("S", "A", "B"), []),
    ("enum names must match", enum("S", "A"), enum("T", "A"), [("/name", None)]),
    (
        "enum symbol removed inside a field",
        record("M", f("st", enum("S", "A"))),
        record("M", f("st", enum("S", "A", "B"))),
        [("/fields/st/symbols", "st")],
    ),
    # fixed
    (
        "same fixed",
        {"type": "fixed", "name": "H", "size": 16},
        {"type": "fixed", "name": "H", "size": 16},
        [],
    ),
    (
        "fixed size differs",
        {"type": "fixed", "name": "H", "size": 16},
        {"type": "fixed", "name": "H", "size": 8},
        [("/size", None)],
    ),
    (
        "fixed names differ",
        {"type": "fixed", "name": "H", "size": 4},
        {"type": "fixed", "name": "G", "size": 4},
        [("/name", None)],
    ),
    (
        "decimal on fixed resolves by fixed",
        {"type": "fixed", "name": "D", "size": 8, "logicalType": "decimal", "precision": 10},
        {"type": "fixed", "name": "D", "size": 8},
        [],
    ),
    # arrays and maps
    ("array items promote", {"type": "array", "items": "long"}, {"type": "array", "items": "int"}, []),
    (
        "array items incompatible",
        {"type": "array", "items": "int"},
        {"type": "array", "items": "string"},
        [("/items", None)],
    ),
    ("map values promote", {"type": "map", "values": "double"}, {"type": "map", "values": "float"}, []),
    (
        "map values incompatible",
        {"type": "map", "values": "int"},
        {"type": "map", "values": "long"},
        [("/values", None)],
    ),
    (
        "array cannot read map",
        {"type": "array", "items": "int"},
        {"type": "map", "values": "int"},
        [("/", None)],
    ),
    (
        "nested record inside array names the field",
        record("M", f("items", {"type": "array", "items": record("I", f("n", "int"), f("new", "int"))})),
        record("M", f("items", {"type": "array", "items": record("I", f("n", "int"))})),
        [("/fields/items/items/fields/new", "items.new")],
    ),
    # unions
    ("union reader reads its member", ["null", "string"], "string", []),
    ("union reader reads a promotable member", ["null", "long"], "int", []),
    ("union reader lacks the writer type", ["null", "string"], "int", [("/", None)]),
    ("writer union subset of reader union", ["null", "int", "string"], ["null", "int"], []),
    ("writer union branch unreadable", ["null", "int"], ["null", "int", "string"], [("/2", None)]),
    ("non-union reader reads every writer branch", "long", ["int", "long"], []),
    ("non-union reader misses a writer branch", "string", ["null", "string"], [("/0", None)]),
    (
        "optional field becomes required",
        record("M", f("a", "int")),
        record("M", f("a", ["null", "int"], default=None)),
        [("/fields/a/0", "a")],
    ),
    # named references and recursion
    ("recursive record reads itself", LINKED, LINKED, []),
    (
        "recursive record with an incompatible change",
        record("Node", f("value", "long"), f("next", ["null", "Node"], default=None)),
        record("Node", f("value", "string"), f("next", ["null", "Node"], default=None)),
        [("/fields/value", "value")],
    ),
    (
        "named type referenced twice",
        record("M", f("a", STATUS), f("b", "Status")),
        record("M", f("a", STATUS), f("b", "Status")),
        [],
    ),
    (
        "reference by full name in a namespace",
        record("M", f("a", {**STATUS, "namespace": "x.y"}), f("b", "x.y.Status"), namespace="ns"),
        record("M", f("a", {**STATUS, "namespace": "x.y"}), f("b", "x.y.Status"), namespace="ns"),
        [],
    ),
]


@pytest.mark.parametrize(("reader", "writer", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_check(reader: Any, writer: Any, expected: list[tuple[str, str | None]]) -> None:
    found = check(reader, writer)
    assert [(i.path, i.field) for i in found] == expected, found
    for incompatibility in found:
        if incompatibility.field is not None:
            assert repr(incompatibility.field) in incompatibility.message


def test_message_names_the_missing_field() -> None:
    [found] = check(record("M", f("errorCode", "int")), record("M"))
    assert found == Incompatibility(
        "/fields/errorCode", "errorCode", "field 'errorCode' added to reader without a default"
    )


def test_message_names_the_type_change_and_the_missing_symbols() -> None:
    [changed] = check(
        record("M", f("status", record("Status", f("state", "int")))), record("M", f("status", STATUS))
    )
    assert "'status.state'" in changed.message and "int" in changed.message and "string" in changed.message
    [symbols] = check(enum("S", "A"), enum("S", "A", "B", "C"))
    assert "['B', 'C']" in symbols.message


def test_accepts_json_text() -> None:
    assert check(json.dumps(record("M", f("a", "long"))), json.dumps(record("M", f("a", "int")))) == []
    assert check('"long"', "int") == []


@pytest.mark.parametrize(
    "schema",
    [
        "nope",
        record("M", f("a", "Undefined")),
        "{not json",
        {"type": "enum", "name": "E"},
        {"type": "array"},
        [record("M"), record("M")],
    ],
)
def test_invalid_schema_raises(schema: Any) -> None:
    with pytest.raises(SchemaError):
        check(schema, "int")


V1 = record("M", f("a", "int"))
V2 = record("M", f("a", "int"), f("b", ["null", "string"], default=None))
V3 = record("M", f("b", ["null", "string"], default=None))  # drops 'a', which has no default


@pytest.mark.parametrize(
    ("level", "new", "previous", "bad_fields"),
    [
        ("NONE", record("X", f("q", "bytes")), [V1], []),
        ("BACKWARD", V3, [V1, V2], []),  # new reads V2 (latest only): fine
        ("BACKWARD", record("M", f("a", "int"), f("c", "int")), [V1], ["c"]),
        ("BACKWARD_TRANSITIVE", record("M", f("b", "string")), [V1, V2], ["b", "b"]),  # V1 lacks b; V2 union
        ("FORWARD", V3, [V1, V2], ["a"]),  # V2 cannot read V3: 'a' missing, no default
        ("FORWARD", record("M", f("a", "int"), f("c", "int")), [V1], []),
        ("FORWARD_TRANSITIVE", V2, [V1, V1], []),
        ("FORWARD_TRANSITIVE", record("M", f("a", "string")), [V1, record("M", f("a", "long"))], ["a", "a"]),
        ("FULL", V2, [V1], []),
        ("FULL", V3, [V2], ["a"]),
        ("FULL_TRANSITIVE", V3, [V1, V2], ["a", "a"]),
        ("BACKWARD", V1, [], []),
    ],
)
def test_check_compatibility_levels(level: str, new: Any, previous: list[Any], bad_fields: list[str]) -> None:
    found = check_compatibility(new, previous, level)
    assert [i.field for i in found] == bad_fields, found


def test_check_compatibility_says_which_direction_failed() -> None:
    [forward] = check_compatibility(V3, [V1], "FULL")
    assert forward.message.startswith("previous #0 cannot read data written with new schema")
    [backward] = check_compatibility(record("M", f("a", "int"), f("c", "int")), [V1], "full")
    assert backward.message.startswith("new schema cannot read data written with previous #0")


def test_check_compatibility_rejects_unknown_level() -> None:
    with pytest.raises(ValueError, match="SIDEWAYS"):
        check_compatibility(V1, [V1], "SIDEWAYS")


# --- properties -------------------------------------------------------------------------------------

NAMES = st.from_regex(r"[a-z][a-z0-9_]{0,6}", fullmatch=True)
PRIMITIVE = st.sampled_from(["null", "boolean", "int", "long", "float", "double", "bytes", "string"])


def _leaf(name: str) -> st.SearchStrategy[Any]:
    return st.one_of(
        PRIMITIVE,
        PRIMITIVE.filter(lambda p: p != "null").map(lambda p: ["null", p]),
        PRIMITIVE.map(lambda p: {"type": "array", "items": p}),
        PRIMITIVE.map(lambda p: {"type": "map", "values": p}),
        st.lists(st.sampled_from("ABCDEFG"), min_size=1, max_size=4, unique=True).map(
            lambda symbols: enum(f"E_{name}", *symbols)
        ),
        st.just({"type": "fixed", "name": f"F_{name}", "size": 4}),
        st.just({"type": "long", "logicalType": "timestamp-millis"}),
    )


@st.composite
def records(draw: st.DrawFn, depth: int = 0, prefix: str = "R") -> dict[str, Any]:
    names = draw(st.lists(NAMES, min_size=1, max_size=6, unique=True))
    fields = []
    for name in names:
        if depth < 1 and draw(st.booleans()) and draw(st.booleans()):
            type_ = draw(records(depth + 1, f"{prefix}_{name}"))
        else:
            type_ = draw(_leaf(f"{prefix}_{name}"))
        fields.append(f(name, type_))
    return record(prefix, *fields)


def _read_back(reader: Any, writer: Any) -> Any:
    parsed_writer = fastavro.parse_schema(writer)
    datum = generate_one(parsed_writer)
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, parsed_writer, datum)
    buf.seek(0)
    return fastavro.schemaless_reader(buf, parsed_writer, fastavro.parse_schema(reader))


@given(records())
def test_a_schema_is_always_compatible_with_itself(schema: dict[str, Any]) -> None:
    assert check(schema, schema) == []
    assert check_compatibility(schema, [schema, schema], "FULL_TRANSITIVE") == []


@given(records(), NAMES)
def test_adding_an_optional_field_with_null_default_keeps_full_compatibility(
    schema: dict[str, Any], name: str
) -> None:
    if any(field["name"] == f"new_{name}" for field in schema["fields"]):
        return
    evolved = {**schema, "fields": [*schema["fields"], f(f"new_{name}", ["null", "string"], default=None)]}
    assert check_compatibility(evolved, [schema], "FULL") == []


@given(records(), st.data())
def test_removing_a_field_without_default_breaks_forward_but_not_backward(
    schema: dict[str, Any], data: st.DataObject
) -> None:
    removed = data.draw(st.sampled_from(schema["fields"]))
    if len(schema["fields"]) == 1:
        return
    evolved = {**schema, "fields": [x for x in schema["fields"] if x is not removed]}
    assert check_compatibility(evolved, [schema], "BACKWARD") == []
    forward = check_compatibility(evolved, [schema], "FORWARD")
    assert [i.field for i in forward] == [removed["name"]]
    assert f"'{removed['name']}'" in forward[0].message


@given(records(), st.data())
def test_adding_a_field_without_default_breaks_backward_but_not_forward(
    schema: dict[str, Any], data: st.DataObject
) -> None:
    new_type = data.draw(PRIMITIVE)
    evolved = {**schema, "fields": [*schema["fields"], f("zz_added", new_type)]}
    assert check_compatibility(evolved, [schema], "FORWARD") == []
    assert [i.field for i in check_compatibility(evolved, [schema], "BACKWARD")] == ["zz_added"]


MUTATED_TYPES = st.sampled_from(
    ["int", "long", "float", "double", "string", "bytes", "boolean", ["null", "long"], ["null", "double"]]
)


@settings(suppress_health_check=[HealthCheck.too_slow], max_examples=150)
@given(records(), st.data())
def test_whatever_check_accepts_fastavro_can_actually_read(
    schema: dict[str, Any], data: st.DataObject
) -> None:
    """Differential: mutate a field's type, drop or add fields; if `check` says compatible, decoding the
    writer's bytes with the reader schema must succeed."""
    fields = list(schema["fields"])
    for _ in range(data.draw(st.integers(1, 3))):
        action = data.draw(st.sampled_from(["retype", "drop", "add_default", "add_required"]))
        index = data.draw(st.integers(0, len(fields) - 1))
        if action == "retype" and isinstance(fields[index]["type"], str | list):
            fields[index] = f(fields[index]["name"], data.draw(MUTATED_TYPES))
        elif action == "drop" and len(fields) > 1:
            fields.pop(index)
        elif action == "add_default":
            fields.append(f(f"d{len(fields)}_x", "long", default=7))
        elif action == "add_required":
            fields.append(f(f"r{len(fields)}_x", "long"))
    reader = {**schema, "fields": fields}
    found = check(reader, schema)
    if not found:
        result = _read_back(reader, schema)
        assert set(result) == {x["name"] for x in fields}
        return
    # Data-independent failures must fail in fastavro too: a missing required field, or a primitive
    # writer field the reader's type cannot read (unions, enums and empty arrays depend on the datum).
    writer_types = {x["name"]: x["type"] for x in schema["fields"]}
    certain = [
        i
        for i in found
        if i.path == f"/fields/{i.field}"
        and (i.field not in writer_types or isinstance(writer_types[i.field], str))
    ]
    if certain:
        with pytest.raises(Exception):  # noqa: B017 - fastavro raises several types on resolution errors
            _read_back(reader, schema)
