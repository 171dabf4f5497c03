"""chatpipe dev starts the worker and the sink behind ingest for the CPU (CHATPIPE_DEV_DOWNSTREAM_NICE and
_IDLE)."""

from __future__ import annotations

import functools
import os
import subprocess
import sys

import pytest

from chatpipe.config import Settings
from chatpipe.dev import EMBEDDED_PARTITIONS, _die_with_parent, dev_partitions

PRINT_NICE_OF_A_THREAD = (
    "import os, threading; out = []; "
    "t = threading.Thread(target=lambda: out.append(os.getpriority(os.PRIO_PROCESS, 0))); "
    "t.start(); t.join(); print(os.nice(0), out[0])"
)


@pytest.mark.parametrize("nice", [0, 3])
def test_children_start_at_the_given_niceness_threads_included(nice: int) -> None:
    base = os.nice(0)
    out = subprocess.run(
        [sys.executable, "-c", PRINT_NICE_OF_A_THREAD],
        preexec_fn=functools.partial(_die_with_parent, nice),
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    expected = min(19, base + nice)
    assert [int(x) for x in out] == [expected, expected]


PRINT_POLICY_OF_A_THREAD = (
    "import os, threading; out = []; "
    "t = threading.Thread(target=lambda: out.append(os.sched_getscheduler(0))); "
    "t.start(); t.join(); print(os.sched_getscheduler(0), out[0])"
)


@pytest.mark.parametrize("idle", [False, True])
def test_children_run_under_sched_idle_when_asked_threads_included(idle: bool) -> None:
    out = subprocess.run(
        [sys.executable, "-c", PRINT_POLICY_OF_A_THREAD],
        preexec_fn=functools.partial(_die_with_parent, 0, idle),
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    expected = os.SCHED_IDLE if idle else os.sched_getscheduler(0)
    assert [int(x) for x in out] == [expected, expected]


def test_downstream_runs_idle_by_default() -> None:
    assert Settings.from_env({}).dev_downstream_idle is True
    assert Settings.from_env({"CHATPIPE_DEV_DOWNSTREAM_IDLE": "0"}).dev_downstream_idle is False


def test_downstream_niceness_defaults_to_nineteen_and_is_bounded() -> None:
    assert Settings.from_env({}).dev_downstream_nice == 19
    assert Settings.from_env({"CHATPIPE_DEV_DOWNSTREAM_NICE": "0"}).dev_downstream_nice == 0
    with pytest.raises(ValueError, match="CHATPIPE_DEV_DOWNSTREAM_NICE"):
        Settings.from_env({"CHATPIPE_DEV_DOWNSTREAM_NICE": "20"})


def test_dev_topics_have_fewer_partitions_on_the_embedded_broker_unless_configured() -> None:
    default = Settings.from_env({})
    assert dev_partitions({}, default, embedded=True) == EMBEDDED_PARTITIONS == 2
    assert dev_partitions({}, default, embedded=False) == default.partitions == 6
    env = {"CHATPIPE_PARTITIONS": "6"}
    assert dev_partitions(env, Settings.from_env(env), embedded=True) == 6
