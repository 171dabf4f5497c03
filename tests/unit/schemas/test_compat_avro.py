"""`schemas.compat` against Apache Avro's own checker (`avro.compatibility`, PyPI `avro`), case by case.

Why chatpipe keeps its own checker (issue #18 item 5), shown here rather than asserted in prose:
- on every case of `test_compat.CASES` that Avro's Python parser accepts, both give the same verdict;
- Avro's Python parser refuses a standalone `"type": "error"` schema ("Unknown schema type: error"), which
  the Avro specification defines as a record and Java Avro (what Confluent Schema Registry runs) reads;
- Avro's locations do not say which field broke in union and recursive cases (an optional field made
  required is reported at "/", ours at "/fields/a/0", field "a"), and name fields by index elsewhere;
  `chatpipe schemas check` prints ours to say what to fix.
A case where the verdicts part is a bug in one of them: this test fails on it.
"""

from __future__ import annotations

import json
from typing import Any

import avro.compatibility as avro_compatibility
import avro.schema as avro_schema
import pytest

from schemas.compat import check
from tests.unit.schemas.test_compat import CASES

#: cases Avro's Python parser cannot take at all (not a verdict: it refuses the schema)
UNPARSED_BY_AVRO = {"error type reads like a record"}


def avro_compatible(reader: Any, writer: Any) -> tuple[bool, set[str]]:
    result = avro_compatibility.ReaderWriterCompatibilityChecker().get_compatibility(
        avro_schema.parse(json.dumps(reader)), avro_schema.parse(json.dumps(writer))
    )
    ok = result.compatibility is avro_compatibility.SchemaCompatibilityType.compatible
    return ok, set(result.locations)


@pytest.mark.parametrize(
    ("reader", "writer"),
    [c[1:3] for c in CASES if c[0] not in UNPARSED_BY_AVRO],
    ids=[c[0] for c in CASES if c[0] not in UNPARSED_BY_AVRO],
)
def test_the_same_verdict_as_avro(reader: Any, writer: Any) -> None:
    ours = not check(reader, writer)
    theirs, _ = avro_compatible(reader, writer)
    assert ours == theirs


def test_avro_refuses_the_error_type_that_the_specification_and_java_avro_accept() -> None:
    (case,) = [c for c in CASES if c[0] in UNPARSED_BY_AVRO]
    _, reader, writer, expected = case
    assert expected == [] and check(reader, writer) == []
    with pytest.raises(Exception, match="error"):
        avro_compatible(reader, writer)


def test_avro_does_not_say_which_field_an_optional_to_required_change_broke() -> None:
    (case,) = [c for c in CASES if c[0] == "optional field becomes required"]
    _, reader, writer, _ = case
    ok, locations = avro_compatible(reader, writer)
    assert not ok and locations == {"/"}
    assert [(i.path, i.field) for i in check(reader, writer)] == [("/fields/a/0", "a")]
