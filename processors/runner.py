"""Run the Faust worker process (`chatpipe worker`)."""

from __future__ import annotations

import logging
from collections.abc import Callable

import faust

from chatpipe.runtime.config import Settings
from chatpipe.runtime.patches import apply_worker_patches
from chatpipe.runtime.tuning import tune_gc
from processors.agents import install_agents
from processors.app import create_processor

log = logging.getLogger(__name__)


class _Worker(faust.Worker):
    """Faust's worker with a hook for "ready": partitions assigned and tables recovered."""

    on_ready: Callable[[], None] | None = None

    async def on_startup_finished(self) -> None:
        await super().on_startup_finished()
        tune_gc()
        if self.on_ready is not None:
            self.on_ready()


def run_worker(settings: Settings, on_ready: Callable[[], None] | None = None) -> int:
    apply_worker_patches()  # refuses to run on Faust/mode/aiokafka versions the patches do not know
    (settings.state_dir / "processor").mkdir(parents=True, exist_ok=True)
    processor = create_processor(settings)
    processor.codecs.register_all()
    install_agents(processor)
    worker = _Worker(processor.app, loglevel=settings.log_level, quiet=True, redirect_stdouts=False)
    worker.on_ready = on_ready
    try:
        worker.execute_from_commandline()  # returns via SystemExit when stopped
    except SystemExit:
        if processor.fatal:  # it stopped itself (the dead-letter limit, agents.py `halt`): a failure
            log.error("the worker stopped itself: %s", processor.fatal[0])
            return 1
        raise
    return 0
