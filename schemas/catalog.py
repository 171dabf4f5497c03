"""The topic catalogue and self-contained Avro schemas, loaded from the `*.avsc` files beside this module.

`.avsc` files may refer to named types another file defines (e.g. `io.chatpipe.common.User`). A schema
registered under TopicNameStrategy must stand alone, so `load_schema` inlines the first use of every such
name with its definition. Pure apart from reading this package's own files (cached).
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SCHEMA_DIR = Path(__file__).resolve().parent


@dataclass(frozen=True, slots=True)
class TopicSpec:
    """One topic chatpipe owns: its name, value schema file, whether it is compacted, who uses it."""

    name: str
    schema_file: str
    compacted: bool
    doc: str
    key: str = "umid"

    @property
    def subject(self) -> str:
        """Value subject under TopicNameStrategy."""
        return f"{self.name}-value"


RECEIPTS = TopicSpec(
    "chatpipe.receipts.raw",
    "delivery_receipt.avsc",
    False,
    "Delivery receipts as received (written by ingest, read by the state processor).",
)
INBOUND = TopicSpec(
    "chatpipe.inbound.raw",
    "inbound_message.avsc",
    False,
    "Inbound messages as received (written by ingest, read by the conversation processor and sinks).",
)
INGEST_DLQ = TopicSpec(
    "chatpipe.ingest.dlq",
    "dead_letter.avsc",
    False,
    "Rejected webhook requests, raw and whole (written by ingest, read by operators for replay).",
    key="errorId",
)
MESSAGE_STATE = TopicSpec(
    "chatpipe.messages.state",
    "message_state.avsc",
    True,
    "Current state per umid, one record per change (written by the processor, read by sinks).",
)
MESSAGE_STEPS = TopicSpec(
    "chatpipe.messages.steps",
    "message_step.avsc",
    False,
    "Each step of a message whenever the message changes (written by the processor, read by sinks).",
)
STATUS_EVENTS = TopicSpec(
    "chatpipe.messages.events",
    "status_event.avsc",
    False,
    "Status history: each distinct status newly recorded, duplicates removed (processor -> sinks).",
)
INBOUND_BY_CONVERSATION = TopicSpec(
    "chatpipe.inbound.by-conversation",
    "inbound_message.avsc",
    False,
    "Inbound messages re-keyed by conversation (processor-internal repartition).",
    key="conversation",
)
CONVERSATIONS = TopicSpec(
    "chatpipe.conversations.state",
    "conversation.avsc",
    True,
    "Current state per conversation, one record per change (written by the processor, read by sinks).",
    key="conversation",
)
SINK_DLQ = TopicSpec(
    "chatpipe.sink.dlq",
    "dead_letter.avsc",
    False,
    "Records a sink could not decode or store (written by sinks, read by operators).",
    key="errorId",
)

PROCESSOR_DLQ = TopicSpec(
    "chatpipe.processor.dlq",
    "dead_letter.avsc",
    False,
    "Receipts the processor could not fold (undecodable, or failing for their umid), raw and whole, with"
    " the reason and their topic/partition/offset (written by the processor, read by operators).",
    key="errorId",
)

TOPICS: tuple[TopicSpec, ...] = (
    RECEIPTS,
    INBOUND,
    INGEST_DLQ,
    MESSAGE_STATE,
    MESSAGE_STEPS,
    STATUS_EVENTS,
    INBOUND_BY_CONVERSATION,
    CONVERSATIONS,
    SINK_DLQ,
    PROCESSOR_DLQ,
)


def named_definitions(schema_dir: Path = SCHEMA_DIR) -> dict[str, dict[str, Any]]:
    """Every named type (record/enum/fixed) defined in any .avsc of `schema_dir`, by full name."""
    found: dict[str, dict[str, Any]] = {}

    def walk(node: Any, namespace: str | None) -> None:
        if isinstance(node, list):
            for item in node:
                walk(item, namespace)
        elif isinstance(node, dict):
            kind = node.get("type")
            if kind in ("record", "enum", "fixed") and "name" in node:
                ns = node.get("namespace", namespace)
                full = node["name"] if "." in node["name"] or not ns else f"{ns}.{node['name']}"
                found.setdefault(full, node)
                namespace = ns
            for key in ("type", "items", "values", "fields"):
                if key in node:
                    walk(node[key], namespace)

    for path in sorted(Path(schema_dir).glob("*.avsc")):
        walk(json.loads(path.read_text()), None)
    return found


def inline_named_types(schema: Any, definitions: dict[str, dict[str, Any]]) -> Any:
    defined: set[str] = set()

    def visit(node: Any, namespace: str | None) -> Any:
        if isinstance(node, str):
            full = node if "." in node else (f"{namespace}.{node}" if namespace else node)
            if full in definitions and full not in defined:
                target = dict(definitions[full])
                if "." not in target["name"] and "namespace" not in target:
                    target["namespace"] = full.rsplit(".", 1)[0]
                return visit(target, namespace)
            return node
        if isinstance(node, list):
            return [visit(n, namespace) for n in node]
        if not isinstance(node, dict):
            return node
        out = dict(node)
        kind = node.get("type")
        if kind in ("record", "enum", "fixed"):
            ns = node.get("namespace", namespace)
            full = node["name"] if "." in node["name"] or not ns else f"{ns}.{node['name']}"
            defined.add(full)
            namespace = ns
        if "fields" in node:
            out["fields"] = [dict(f, type=visit(f["type"], namespace)) for f in node["fields"]]
        for key in ("type", "items", "values"):
            if key in node and not (key == "type" and isinstance(node[key], str) and kind == node[key]):
                out[key] = visit(node[key], namespace)
        return out

    return visit(schema, None)


def render_schema(schema_file: str, schema_dir: Path) -> str:
    """The self-contained schema text (JSON) of one `.avsc` file in `schema_dir`, named types inlined."""
    raw = json.loads((Path(schema_dir) / schema_file).read_text())
    return json.dumps(inline_named_types(raw, named_definitions(schema_dir)), separators=(",", ":"))


@functools.cache
def load_schema(schema_file: str) -> str:
    """`render_schema` for chatpipe's own schemas (cached: the package's files do not change)."""
    return render_schema(schema_file, SCHEMA_DIR)
