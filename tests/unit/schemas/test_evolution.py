"""Schema evolution: the real schemas keep every released version readable, breaking changes are caught
naming the field, and old and new consumers really read each other's records (fastavro resolution)."""

from __future__ import annotations

import copy
import io
import json
import shutil
import struct
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import fastavro
import pytest

from schemas.catalog import SCHEMA_DIR, TOPICS, load_schema
from schemas.codec import Codecs, Registry
from schemas.errors import SchemaError
from schemas.evolution import (
    check_history,
    check_schema,
    cmd_check,
    current_schemas,
    release,
    released_versions,
    schema_files,
)
from tests.fixtures.records import FROM_DICT, TO_DICT, plain, sample

Schema = dict[str, Any]


@pytest.fixture()
def schema_dir(tmp_path: Path) -> Path:
    """A copy of the package's schemas and their history, free to break."""
    target = tmp_path / "schemas"
    target.mkdir()
    for path in SCHEMA_DIR.glob("*.avsc"):
        shutil.copy(path, target)
    shutil.copytree(SCHEMA_DIR / "history", target / "history")
    return target


def edit(schema_dir: Path, name: str, change: Callable[[Schema], None]) -> None:
    path = schema_dir / name
    schema = json.loads(path.read_text())
    change(schema)
    path.write_text(json.dumps(schema, indent=2))


def record_named(schema: Any, name: str) -> Schema:
    """The (first) record definition called `name` anywhere inside `schema`."""
    if isinstance(schema, dict):
        if schema.get("type") == "record" and schema.get("name") == name:
            return schema
        children = [schema.get(k) for k in ("type", "items", "values")] + list(schema.get("fields", ()))
    elif isinstance(schema, list):
        children = schema
    else:
        children = []
    for child in children:
        try:
            return record_named(child, name)
        except LookupError:
            pass
    raise LookupError(name)


def field_of(schema: Schema, record: str, field: str) -> Schema:
    return next(f for f in record_named(schema, record)["fields"] if f["name"] == field)


def drop_field(schema: Schema, record: str, field: str) -> None:
    fields = record_named(schema, record)["fields"]
    fields[:] = [f for f in fields if f["name"] != field]


OPTIONAL = {"type": ["null", "string"], "default": None, "doc": "Added later."}


# --- the real schemas ----------------------------------------------------------------------------------


def test_current_schemas_pass_the_check_against_every_release() -> None:
    assert check_history() == []


def test_every_topic_schema_has_been_released() -> None:
    for name in schema_files():
        assert released_versions(SCHEMA_DIR, name), f"{name}: no schemas/history/<stem>/v1.avsc"


def test_checked_schemas_are_exactly_what_the_codec_registers() -> None:
    current = current_schemas()
    for spec in TOPICS:
        assert current[spec.schema_file] == json.loads(load_schema(spec.schema_file))


def test_cli_check_prints_a_line_per_subject_and_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    assert cmd_check([]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == len(TOPICS)
    for spec, line in zip(TOPICS, lines, strict=True):
        assert line.startswith("ok") and spec.subject in line and "FULL vs v1" in line


# --- breaking changes are caught, naming the field --------------------------------------------------------


def _add_required(s: Schema) -> None:
    s["fields"].append({"name": "channelPath", "type": "string", "doc": "No default: old data lacks it."})


def _remove_required(s: Schema) -> None:
    drop_field(s, "MessageState", "subAccountId")


def _retype_nested(s: Schema) -> None:
    field_of(s, "Step", "duplicates")["type"] = "string"


def _rename(s: Schema) -> None:
    field_of(s, "MessageState", "umid")["name"] = "messageId"


def _narrow(s: Schema) -> None:
    field_of(s, "StatusEvent", "errorCode")["type"] = "int"  # was ["null", "int"]


@pytest.mark.parametrize(
    ("change", "field", "direction"),
    [
        (_add_required, "channelPath", "the new schema cannot read v1 data"),
        (_remove_required, "subAccountId", "v1 consumers cannot read new data"),
        (_retype_nested, "steps.duplicates", "cannot read"),
        (_rename, "messageId", "the new schema cannot read v1 data"),
        (_narrow, "steps.history.errorCode", "the new schema cannot read v1 data"),
    ],
    ids=["add-required", "remove-required", "retype-nested", "rename", "optional-to-required"],
)
def test_incompatible_change_fails_naming_the_field(
    schema_dir: Path, change: Callable[[Schema], None], field: str, direction: str
) -> None:
    edit(schema_dir, "message_state.avsc", change)

    problems = check_history(schema_dir)

    assert problems, "the breaking change went unnoticed"
    # the step and history schemas embed message_state's Step/StatusEvent records, so they may break too
    assert "message_state.avsc" in {p.schema for p in problems}
    assert {p.schema for p in problems} <= {"message_state.avsc", "message_step.avsc", "status_event.avsc"}
    # it breaks every released version, each reported
    released = set(released_versions(schema_dir, "message_state.avsc"))
    assert {p.version for p in problems if p.schema == "message_state.avsc"} == released
    assert field in {p.field for p in problems if p.schema == "message_state.avsc"}
    text = "\n".join(map(str, problems))
    assert f"field {field!r}" in text and "message_state.avsc vs released v1 (FULL)" in text
    assert direction in text


def test_cli_check_reports_the_broken_subject_and_field(
    schema_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    edit(schema_dir, "message_state.avsc", _add_required)
    assert cmd_check(["--schema-dir", str(schema_dir)]) == 1
    out = capsys.readouterr().out
    assert "INCOMPATIBLE chatpipe.messages.state-value" in out
    assert "ok           chatpipe.receipts.raw-value" in out
    assert "'channelPath'" in out


def test_a_change_breaking_an_older_release_is_caught_too(schema_dir: Path) -> None:
    # vN+1: an optional field is added and released; then a required field dropped breaks every release
    last = max(released_versions(schema_dir, "message_state.avsc"))
    edit(schema_dir, "message_state.avsc", lambda s: s["fields"].append({"name": "note", **OPTIONAL}))
    assert [p.name for p in release(schema_dir)] == [f"v{last + 1}.avsc"]
    edit(schema_dir, "message_state.avsc", _remove_required)
    assert {p.version for p in check_history(schema_dir)} == set(range(1, last + 2))


# --- compatible changes pass ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "record"),
    [
        ("message_state.avsc", "MessageState"),
        ("message_state.avsc", "Step"),
        ("message_state.avsc", "StatusEvent"),
        ("inbound_message.avsc", "InboundContent"),
        ("delivery_receipt.avsc", "Status"),
        ("dead_letter.avsc", "DeadLetter"),
    ],
)
def test_adding_an_optional_field_with_a_default_passes(schema_dir: Path, name: str, record: str) -> None:
    edit(schema_dir, name, lambda s: record_named(s, record)["fields"].append({"name": "extra", **OPTIONAL}))
    assert check_history(schema_dir) == []


def test_declared_backward_level_allows_dropping_a_required_field(schema_dir: Path) -> None:
    def backward_without_sub_account(s: Schema) -> None:
        s["chatpipe.compatibility"] = "BACKWARD"
        _remove_required(s)

    edit(schema_dir, "message_state.avsc", backward_without_sub_account)
    assert check_history(schema_dir) == []
    edit(schema_dir, "message_state.avsc", _add_required)  # still BACKWARD: new readers need old data
    assert {p.field for p in check_history(schema_dir)} == {"channelPath"}


def test_unknown_level_is_a_problem(schema_dir: Path) -> None:
    edit(schema_dir, "dead_letter.avsc", lambda s: s.update({"chatpipe.compatibility": "SIDEWAYS"}))
    [problem] = check_history(schema_dir)
    assert problem.schema == "dead_letter.avsc" and "SIDEWAYS" in problem.message


# --- releasing ---------------------------------------------------------------------------------------------


def test_release_snapshots_only_what_changed(schema_dir: Path) -> None:
    assert release(schema_dir) == []  # today's schemas are v1
    edit(schema_dir, "inbound_message.avsc", lambda s: s["fields"].append({"name": "note", **OPTIONAL}))

    written = release(schema_dir)

    assert written == [schema_dir / "history" / "inbound_message" / "v2.avsc"]
    released = released_versions(schema_dir, "inbound_message.avsc")
    assert list(released) == [1, 2]
    assert released[2] == current_schemas(schema_dir)["inbound_message.avsc"]
    assert check_history(schema_dir) == []
    assert release(schema_dir) == []


def test_release_refuses_an_incompatible_schema(schema_dir: Path) -> None:
    before = list(released_versions(schema_dir, "message_state.avsc"))
    edit(schema_dir, "message_state.avsc", _add_required)
    with pytest.raises(SchemaError, match="channelPath"):
        release(schema_dir)
    assert list(released_versions(schema_dir, "message_state.avsc")) == before


# --- old and new consumers read each other's records ------------------------------------------------


def _evolved(old: Schema, name: str) -> Schema:
    """`old` plus optional fields at the top and in a nested record, as a compatible release would add."""
    new = copy.deepcopy(old)
    new["fields"].append({"name": "tenant", "type": ["null", "string"], "default": None, "doc": "New."})
    nested = {
        "message_state.avsc": "Step",
        "inbound_message.avsc": "InboundContent",
        "delivery_receipt.avsc": "Status",
        "dead_letter.avsc": "DeadLetter",
        "message_step.avsc": "Step",
        "status_event.avsc": "StatusEvent",
        "conversation.avsc": "Conversation",
    }[name]
    record_named(new, nested)["fields"].append(
        {"name": "priority", "type": "int", "default": 0, "doc": "New, not optional but defaulted."}
    )
    return new


def _write(schema: Schema, record: dict[str, Any]) -> bytes:
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, fastavro.parse_schema(schema), record)
    return buf.getvalue()


def _read(data: bytes, writer: Schema, reader: Schema) -> dict[str, Any]:
    out = fastavro.schemaless_reader(
        io.BytesIO(data), fastavro.parse_schema(writer), fastavro.parse_schema(reader)
    )
    return plain(out)  # type: ignore[no-any-return]


def _with_new_fields(name: str, record: dict[str, Any], tenant: str | None, priority: int) -> dict[str, Any]:
    out = copy.deepcopy(record)
    out["tenant"] = tenant
    nested = {
        "message_state.avsc": lambda r: r["steps"],
        "inbound_message.avsc": lambda r: [r["content"]],
        "delivery_receipt.avsc": lambda r: [r["status"]],
        "dead_letter.avsc": lambda r: [r],
        "message_step.avsc": lambda r: [r["step"]],
        "status_event.avsc": lambda r: [r["event"]],
        "conversation.avsc": lambda r: [r],
    }[name]
    for holder in nested(out):
        holder["priority"] = priority
    return out


@pytest.mark.parametrize("name", schema_files())
def test_old_consumer_reads_new_records_and_new_consumer_reads_old(name: str) -> None:
    released = released_versions(SCHEMA_DIR, name)
    last = max(released)
    old = released[last]
    new = _evolved(old, name)
    assert check_schema(name, new, {last: old}) == []
    model = sample(name)
    record = TO_DICT[name](model)

    # a producer of the last release, a consumer built with the new schema
    from_old = _read(_write(old, record), writer=old, reader=new)
    assert from_old == _with_new_fields(name, record, None, 0)
    assert FROM_DICT[name](from_old) == model

    # a new producer filling the new fields, a consumer still on the last release
    from_new = _read(_write(new, _with_new_fields(name, record, "acme-eu", 7)), writer=new, reader=old)
    assert from_new == record
    assert FROM_DICT[name](from_new) == model


# --- the codec resolves any registered version of a subject against its own schema ----------------------


class InMemoryClient:
    """The two calls `schemas.codec.Registry` makes of confluent-kafka's SchemaRegistryClient."""

    def __init__(self) -> None:
        self.schemas: dict[int, str] = {}

    def register_schema(self, subject: str, schema: Any) -> int:
        return self.add(schema.schema_str)

    def add(self, text: str) -> int:
        for sid, existing in self.schemas.items():
            if existing == text:
                return sid
        self.schemas[len(self.schemas) + 1] = text
        return len(self.schemas)

    def get_schema(self, schema_id: int) -> Any:
        return SimpleNamespace(schema_str=self.schemas[schema_id])


def test_codec_reads_records_of_older_and_newer_registered_versions() -> None:
    client = InMemoryClient()
    codecs = Codecs(Registry("memory://", client=client))  # type: ignore[arg-type]
    current = json.loads(load_schema("message_state.avsc"))
    model = sample("message_state.avsc")
    record = TO_DICT["message_state.avsc"](model)
    assert codecs.state.decode(codecs.state.encode(model)) == model  # own schema: no resolution needed

    older = copy.deepcopy(current)  # a release before `final` and `readAt` existed
    drop_field(older, "MessageState", "final")
    drop_field(older, "MessageState", "readAt")
    old_record = {k: v for k, v in record.items() if k not in ("final", "readAt")}
    newer = _evolved(current, "message_state.avsc")  # a producer already on the next release
    new_record = _with_new_fields("message_state.avsc", record, "acme-eu", 7)

    for schema, written in ((older, old_record), (newer, new_record)):
        schema_id = client.add(json.dumps(schema))
        data = struct.pack(">bI", 0, schema_id) + _write(schema, written)
        assert codecs.state.decode(data) == model
