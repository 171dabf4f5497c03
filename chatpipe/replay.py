"""`chatpipe replay`: send captured webhooks again, from a JSON Lines file or straight from a topic.

    chatpipe replay --url URL [--token T] [--rate R] (--file FILE | --topic TOPIC) [--dump FILE]

Where the bodies come from (`bodies_from_*`, pure apart from reading):
- `--file FILE`: JSON Lines, one webhook per line: either the webhook itself (a JSON object with
  `eventType`), or `{"body": "<the body as text>"}` (what `--dump` writes: the exact bytes 8x8 sent).
- `--topic TOPIC` (with `CHATPIPE_KAFKA_BOOTSTRAP` and `CHATPIPE_SCHEMA_REGISTRY_URL`): every record
  from the start of the topic to its end as the broker reports it in fetch responses (never ListOffsets,
  which Tansu gets wrong): `chatpipe.receipts.raw` / `chatpipe.inbound.raw` give each record's
  `raw_json` (the exact body ingest accepted), `chatpipe.ingest.dlq` the refused request bodies,
  `chatpipe.processor.dlq` the raw JSON of the receipts the processor could not fold.

Then either `--dump FILE` writes them as JSON Lines (to keep, inspect, or replay later), or they are
POSTed to `--url` the way 8x8 sends webhooks (`chatpipe.proof.client`: bounded concurrency, `--rate` per
second, a failed attempt retried after 1, 10, 30 and 90 s times `--time-factor`, then given up), with a
progress line on stderr and a summary on stdout. Exit 0 when every body was accepted (2xx), 1 when some
were refused or given up (the summary says how many), 2 for bad arguments.

Replaying is safe at any time: ingest and the processor are idempotent (a receipt already folded is a
duplicate) and the sinks merge states of another processor lineage by content. Rebuilding every derived
state from the raw topics is: dump them (`--topic chatpipe.receipts.raw --dump r.jsonl`, the same for
`chatpipe.inbound.raw`), start a pipeline with a fresh processor state (a new cluster, or `chatpipe dev`
in a new folder), and replay the files into it; keep the store (states merge into it) or start with an
empty one (rows are rewritten from scratch). Also runs as `python -m chatpipe.replay ...`.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import sys
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from chatpipe.proof.client import deliver
from chatpipe.proof.delivery import RetryPolicy
from chatpipe.proof.shell import SubParsers, run_alone
from chatpipe.proof.traffic import Webhook
from chatpipe.runtime.config import Settings
from chatpipe.simulate import Progress, webhook_url
from schemas.catalog import INBOUND, INGEST_DLQ, PROCESSOR_DLQ, RECEIPTS
from schemas.codec import Codecs

__all__ = ["add_replay_parser", "bodies_from_lines", "cmd_replay", "dump_lines", "main"]

#: topics replay can read, and how a record becomes the webhook body that produced it
TOPIC_KINDS = {
    RECEIPTS.name: "receipts",
    INBOUND.name: "inbound",
    INGEST_DLQ.name: "dead-letter",
    PROCESSOR_DLQ.name: "processor-dead-letter",
}


class ReplayError(ValueError):
    """A line or record replay cannot turn into a body (names where)."""


def bodies_from_lines(lines: Iterable[str], source: str = "<lines>") -> Iterator[bytes]:
    """The webhook bodies of JSON Lines (see the module docstring); blank lines are skipped.
    Raises ReplayError naming the line of anything else."""
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            doc = json.loads(line)
        except ValueError as exc:
            raise ReplayError(f"{source}:{number}: not JSON: {exc}") from None
        if isinstance(doc, dict) and isinstance(doc.get("body"), str):
            yield doc["body"].encode("utf-8")
        elif isinstance(doc, dict) and isinstance(doc.get("bodyBase64"), str):
            yield base64.b64decode(doc["bodyBase64"])
        elif isinstance(doc, dict) and "eventType" in doc:
            yield line.strip().encode("utf-8")
        else:
            raise ReplayError(f'{source}:{number}: neither a webhook (eventType) nor {{"body": ...}}')


def dump_lines(bodies: Iterable[bytes]) -> Iterator[str]:
    """JSON Lines `bodies_from_lines` reads back byte for byte: `{"body": text}`, or `{"bodyBase64":
    ...}` for a body that is not UTF-8 (a dead-lettered request may be anything)."""
    for body in bodies:
        try:
            yield json.dumps({"body": body.decode("utf-8")}, ensure_ascii=False)
        except UnicodeDecodeError:
            yield json.dumps({"bodyBase64": base64.b64encode(body).decode("ascii")})


def bodies_from_topic(settings: Settings, topic: str, idle: float = 3.0) -> Iterator[bytes]:
    """Every record's webhook body, from the start of `topic` to the high watermark the broker reports
    in fetch responses (or until nothing new came for `idle` seconds: an empty partition)."""
    from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, TopicPartition

    from chatpipe.runtime import kafka

    kind = TOPIC_KINDS.get(topic)
    if kind is None:
        raise ReplayError(f"cannot replay topic {topic!r}: one of {', '.join(TOPIC_KINDS)}")
    codecs = Codecs.connect(settings.schema_registry_url)
    group = f"chatpipe-replay-{uuid.uuid4()}"  # assigned, never committed
    consumer = Consumer(kafka.consumer(settings, group, **{"enable.partition.eof": True}))
    try:
        meta = consumer.list_topics(topic, timeout=10).topics[topic]
        if meta.error is not None:
            raise ReplayError(f"topic {topic}: {meta.error}")
        partitions = sorted(meta.partitions)
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions])
        done: set[int] = set()
        last_new = time.monotonic()
        while len(done) < len(partitions) and time.monotonic() - last_new < idle:
            for msg in consumer.consume(num_messages=5000, timeout=0.2):
                err = msg.error()
                if err is not None:
                    if err.code() == KafkaError._PARTITION_EOF:
                        done.add(msg.partition())
                        continue
                    raise ReplayError(f"topic {topic} partition {msg.partition()}: {err}")
                last_new = time.monotonic()
                done.discard(msg.partition())
                yield _body_of(codecs, kind, msg.value())
    finally:
        consumer.close()


def _body_of(codecs: Codecs, kind: str, value: bytes) -> bytes:
    if kind in ("receipts", "inbound"):
        codec = codecs.receipts if kind == "receipts" else codecs.inbound
        return codec.decode(value).raw_json.encode("utf-8")
    letter = codecs.ingest_dlq.decode(value)
    if kind == "dead-letter":
        return letter.body
    # the processor parks the receipt's record as it read it (Avro): its raw_json is the accepted body
    return codecs.receipts.decode(letter.body).raw_json.encode("utf-8")


def _arguments(p: argparse.ArgumentParser) -> None:
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--file", type=Path, help="JSON Lines of webhooks (see `chatpipe replay --help`)")
    source.add_argument("--topic", help=f"read the bodies from this topic: {', '.join(TOPIC_KINDS)}")
    p.add_argument("--dump", type=Path, help="write the bodies to this JSON Lines file instead of sending")
    p.add_argument("--url", help="ingest's base URL or its webhook URL (required unless --dump)")
    p.add_argument("--token", help="present Authorization: Bearer TOKEN (default: CHATPIPE_WEBHOOK_TOKEN)")
    p.add_argument("--rate", type=float, default=500.0, help="webhooks per second (default 500)")
    p.add_argument("--concurrency", type=int, default=32, help="requests in flight at most (default 32)")
    p.add_argument("--time-factor", type=float, default=1.0, help="multiply 8x8's retry delays by this")
    p.add_argument("--timeout", type=float, default=5.0, help="seconds before an attempt times out")


def add_replay_parser(sub: SubParsers) -> argparse.ArgumentParser:
    """Register `replay` on `chatpipe`'s sub-command parsers."""
    p = sub.add_parser(
        "replay",
        help="send captured webhooks again (JSON Lines, or a raw or dead-letter topic)",
        description=__doc__.split("\n\n")[0],
    )
    _arguments(p)
    p.set_defaults(func=cmd_replay)
    return p


def cmd_replay(settings: Settings, args: argparse.Namespace, env: dict[str, str]) -> int:
    if args.dump is None and not args.url:
        print("chatpipe replay: --url is required unless --dump is given", file=sys.stderr)
        return 2
    if args.rate <= 0 or args.concurrency < 1 or args.time_factor < 0:
        print("chatpipe replay: --rate > 0, --concurrency >= 1, --time-factor >= 0", file=sys.stderr)
        return 2
    try:
        if args.file is not None:
            with args.file.open(encoding="utf-8") as f:
                bodies = list(bodies_from_lines(f, str(args.file)))
        else:
            bodies = list(bodies_from_topic(settings, args.topic))
    except (OSError, ReplayError) as exc:
        print(f"chatpipe replay: {exc}", file=sys.stderr)
        return 2
    source = args.file or args.topic
    if args.dump is not None:
        args.dump.parent.mkdir(parents=True, exist_ok=True)
        with args.dump.open("w", encoding="utf-8") as f:
            for line in dump_lines(bodies):
                f.write(line + "\n")
        print(f"replay: {len(bodies)} bodies from {source} written to {args.dump}")
        return 0
    webhooks = [Webhook("replay", None, body) for body in bodies]
    result = asyncio.run(
        deliver(
            webhooks,
            webhook_url(args.url),
            rate=args.rate,
            concurrency=args.concurrency,
            policy=RetryPolicy(time_factor=args.time_factor),
            token=args.token or settings.webhook_token,
            timeout=args.timeout,
            progress=Progress(),
        )
    )
    s = result.stats
    refused = sum(n for code, n in s.statuses.items() if 400 <= code < 500)
    statuses = ", ".join(f"{code}: {n}" for code, n in sorted(s.statuses.items()))
    print(
        f"replay: {len(bodies)} bodies from {source} to {webhook_url(args.url)} in {result.elapsed:.1f} s: "
        f"accepted {s.accepted}, given up {s.given_up}; attempts {s.attempts} {{{statuses}}}; "
        f"refused (4xx) answers {refused}"
    )
    return 0 if s.accepted == len(bodies) else 1


def main(argv: Sequence[str] | None = None) -> int:
    return run_alone("chatpipe replay", __doc__, _arguments, cmd_replay, argv)


if __name__ == "__main__":
    sys.exit(main())
