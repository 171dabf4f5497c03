"""Faust agents: thin loops around the pure state machine.

Each agent reads the previous state from its table, calls the pure `apply`, writes the new state, and
sends the output. All decisions live in `processors.state`.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from processors.app import Processor
from processors.state import apply
from schemas.errors import InvalidEvent

log = logging.getLogger(__name__)


def install_agents(p: Processor) -> None:
    codecs, table, config, metrics = p.codecs, p.table, p.config, p.metrics

    @p.app.agent(p.receipts, name="message-state")
    async def fold_receipts(stream: Any) -> None:
        async for event in stream.events():
            key: bytes = event.key
            try:
                receipt = codecs.receipts.decode(event.value)
            except InvalidEvent as exc:
                msg = event.message
                log.error("undecodable receipt topic=%s partition=%s offset=%s: %s",
                          msg.topic, msg.partition, msg.offset, exc.reason)
                metrics.events.labels("invalid").inc()
                continue
            previous = table.get(key)
            prev = codecs.state.decode(previous) if previous is not None else None
            outcome = apply(prev, receipt, now=datetime.now(UTC), config=config)
            if outcome.duplicate:
                metrics.events.labels("duplicate").inc()
            if not outcome.changed:
                if outcome.state is not prev and outcome.duplicate:
                    # duplicate counters moved: keep the table in step without emitting a new version
                    table[key] = codecs.state.encode(outcome.state)
                metrics.events.labels("unchanged").inc()
                continue
            value = codecs.state.encode(outcome.state)
            table[key] = value
            await p.states.send(key=key, value=value)
            metrics.events.labels("applied").inc()
            metrics.states_emitted.inc()

    @p.app.page("/healthz")
    async def healthz(web: Any, request: Any) -> Any:
        return web.json({"status": "ok"})

    @p.app.page("/metrics")
    async def metrics_page(web: Any, request: Any) -> Any:
        return web.bytes(generate_latest(p.metrics_registry), content_type=CONTENT_TYPE_LATEST)
