"""`chatpipe replay`'s pure parts: JSON Lines in and out, byte for byte."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from chatpipe.replay import ReplayError, bodies_from_lines, dump_lines
from tests.fixtures.webhooks import ALL, load


@given(st.lists(st.binary(max_size=300), max_size=20))
def test_dump_then_read_gives_back_every_body_byte_for_byte(bodies: list[bytes]) -> None:
    assert list(bodies_from_lines(dump_lines(bodies))) == bodies


def test_a_line_may_be_the_webhook_itself() -> None:
    body = json.dumps(json.loads(load(ALL[0])))
    assert list(bodies_from_lines(["", body, "  "])) == [body.encode()]


@pytest.mark.parametrize(
    ("line", "why"),
    [("{not json", "not JSON"), ('{"namespace": "ChatApps"}', "neither a webhook"), ("[1, 2]", "neither")],
)
def test_anything_else_is_refused_naming_the_line(line: str, why: str) -> None:
    ok = json.dumps({"body": "{}"})
    with pytest.raises(ReplayError, match=rf"f\.jsonl:2: {why}"):
        list(bodies_from_lines([ok, line], "f.jsonl"))
