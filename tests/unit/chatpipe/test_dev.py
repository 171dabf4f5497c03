"""chatpipe dev starts the worker and the sink behind ingest for the CPU (CHATPIPE_DEV_DOWNSTREAM_NICE and
_IDLE)."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest

from chatpipe import dev
from chatpipe.dev import EMBEDDED_PARTITIONS, dev_partitions
from chatpipe.runtime.config import Settings

# a child that starts a thread, says the priority it started with, writes its ready file and waits
CHILD = (
    "import os, sys, threading, time\n"
    "threading.Thread(target=time.sleep, args=(60,), daemon=True).start()\n"
    "print(os.getpriority(os.PRIO_PROCESS, 0), os.sched_getscheduler(0), flush=True)\n"
    "open(os.environ['CHATPIPE_READY_FILE'], 'w').write(str(os.getpid()))\n"
    "time.sleep(60)\n"
)


def _threads(pid: int) -> list[int]:
    return [int(t) for t in os.listdir(f"/proc/{pid}/task")]


@pytest.mark.parametrize(("nice", "idle"), [(0, False), (3, False), (0, True), (19, True)])
def test_children_start_at_full_priority_and_drop_to_theirs_once_ready(
    tmp_path: Path, nice: int, idle: bool
) -> None:
    """A child that is still starting competes normally for the CPU (a SCHED_IDLE one would starve on a
    saturated machine and never become ready); once ready, every one of its threads runs at the lower
    priority asked for."""
    base_nice, base_policy = os.getpriority(os.PRIO_PROCESS, 0), os.sched_getscheduler(0)
    group = dev.ProcessGroup(tmp_path / "logs", tmp_path / "run", say=lambda _t: None)
    child = group.spawn("c", [sys.executable, "-c", CHILD], dict(os.environ), nice=nice, idle=idle)
    try:
        group.wait_ready([child], 60)
        started = child.log_path.read_text().split()
        assert [int(x) for x in started] == [base_nice, base_policy]
        tids = _threads(child.proc.pid)
        assert len(tids) == 2
        assert [os.getpriority(os.PRIO_PROCESS, t) for t in tids] == [min(19, base_nice + nice)] * 2
        policy = os.SCHED_IDLE if idle else base_policy
        assert [os.sched_getscheduler(t) for t in tids] == [policy] * 2
    finally:
        group.stop()


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


def test_restart_back_off_doubles_up_to_its_cap() -> None:
    delays = [dev.restart_delay(n) for n in range(1, 10)]
    assert delays[:4] == [dev.RESTART_BACKOFF * f for f in (1, 2, 4, 8)]
    assert max(delays) == dev.RESTART_BACKOFF_MAX
    assert delays == sorted(delays)


def _stack(tmp_path: Path) -> dev.DevStack:
    stack = dev.DevStack(Settings.from_env({"CHATPIPE_STATE_DIR": str(tmp_path)}), {})
    for d in (stack.state, stack.logs, stack.run_dir):
        d.mkdir(parents=True, exist_ok=True)
    return stack


def test_a_child_that_dies_is_restarted_and_a_child_that_keeps_failing_ends_dev(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(dev, "RESTART_BACKOFF", 0.01)
    stack = _stack(tmp_path)
    starts = tmp_path / "starts"
    # each start appends a line, then the child fails
    script = f"open({str(starts)!r}, 'a').write('x\\n'); raise SystemExit(3)"
    stack.spawn("flaky", [sys.executable, "-c", script], dict(os.environ), ready=False)
    with pytest.raises(dev.ChildDied, match=r"flaky exited with code 3 \(failed 6 times within"):
        stack.supervise(poll=0.01)
    assert starts.read_text().count("x") == dev.MAX_RESTARTS + 1  # the first start and 5 restarts
    out = capsys.readouterr().out
    assert out.count("flaky exited with code 3; restarting it in") == dev.MAX_RESTARTS
    assert "flaky restarted (pid" in out


def test_a_restarted_child_that_comes_up_is_announced_ready_and_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(dev, "RESTART_BACKOFF", 0.01)
    stack = _stack(tmp_path)
    marker = tmp_path / "crashed-once"
    # the first run crashes; the second writes its ready file (as chatpipe's children do) and stays up
    script = (
        "import os, pathlib, time\n"
        f"m = pathlib.Path({str(marker)!r})\n"
        "if not m.exists():\n    m.write_text('1'); os._exit(9)\n"
        "pathlib.Path(os.environ['CHATPIPE_READY_FILE']).write_text(str(os.getpid()))\n"
        "time.sleep(60)\n"
    )
    child = stack.spawn("phoenix", [sys.executable, "-c", script], dict(os.environ))
    deadline = time.monotonic() + 20

    def stop_when_ready(*_a: object) -> None:
        if "phoenix ready again" in capsys.readouterr().out or time.monotonic() > deadline:
            stack.request_stop()

    monkeypatch.setattr(stack, "say", lambda text: (print(text), stop_when_ready()))
    try:
        stack.supervise(poll=0.01)
    finally:
        child.proc.kill()
        child.proc.wait()
    assert child.restarts == 1
    assert child.announced
    assert child.ready_file is not None and int(child.ready_file.read_text()) == child.proc.pid


def test_broker_storage_is_memory_unless_disk_is_asked_for() -> None:
    assert Settings.from_env({}).dev_broker_storage == "memory"
    disk = Settings.from_env({"CHATPIPE_DEV_BROKER_STORAGE": "disk"})
    assert disk.dev_broker_storage == "disk" and disk.dev_broker_fsync is True
    assert Settings.from_env({"CHATPIPE_DEV_BROKER_FSYNC": "0"}).dev_broker_fsync is False
    with pytest.raises(ValueError, match="CHATPIPE_DEV_BROKER_STORAGE"):
        Settings.from_env({"CHATPIPE_DEV_BROKER_STORAGE": "s3"})


def test_broker_data_is_kept_only_when_its_bucket_holds_an_object(tmp_path: Path) -> None:
    broker = tmp_path / "broker"
    assert not dev.broker_data_kept(broker)
    (broker / "chatpipe" / "clusters").mkdir(parents=True)
    (broker / "chatpipe" / "clusters" / ".tmp-1-1").write_bytes(b"never acknowledged")
    assert not dev.broker_data_kept(broker)  # a new object store makes its bucket, and may leave temp files
    (broker / "chatpipe" / "clusters" / "meta.json").write_bytes(b"{}")
    assert dev.broker_data_kept(broker)


def test_a_restart_with_the_broker_data_kept_says_so_and_keeps_the_processor_state(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    env = {"CHATPIPE_STATE_DIR": str(tmp_path), "CHATPIPE_STORE_URL": f"sqlite:///{tmp_path}/chatpipe.db"}
    stack = dev.DevStack(Settings.from_env({**env, "CHATPIPE_DEV_BROKER_STORAGE": "disk"}), {})
    (tmp_path / "chatpipe.db").write_bytes(b"")
    (tmp_path / "processor").mkdir()
    stack._say_what_is_kept(embedded=True, broker_kept=True)
    out = capsys.readouterr().out
    assert "the broker's topics, records and committed offsets" in out
    assert "the processor's state (checked against the broker's changelog)" in out and "rebuilt" not in out
    stack._say_what_is_kept(embedded=True, broker_kept=False)
    assert "rebuilt: the processor's state (the embedded broker starts empty" in capsys.readouterr().out


def test_a_process_group_waits_for_ready_files_and_stops_the_last_started_first(tmp_path: Path) -> None:
    said: list[str] = []
    group = dev.ProcessGroup(tmp_path / "logs", tmp_path / "run", say=said.append)
    stopped = tmp_path / "stopped"
    # each child writes its ready file, then on SIGTERM appends its name to `stopped` and exits
    script = (
        "import os, pathlib, signal, sys, time\n"
        "def bye(*_):\n"
        f"    open({str(stopped)!r}, 'a').write(sys.argv[1] + '\\n'); sys.exit(0)\n"
        "signal.signal(signal.SIGTERM, bye)\n"
        "pathlib.Path(os.environ['CHATPIPE_READY_FILE']).write_text(str(os.getpid()))\n"
        "print('up', flush=True)\n"
        "time.sleep(60)\n"
    )
    first, second = (
        group.spawn(name, [sys.executable, "-c", script, name], dict(os.environ)) for name in ("a", "b")
    )
    try:
        group.wait_ready([first, second], 30)
        assert {s.split()[0] for s in said} == {"a", "b"}
        assert first.ready_file is not None and int(first.ready_file.read_text()) == first.proc.pid
        group.stop()
    finally:
        for child in (first, second):
            if child.proc.poll() is None:
                child.proc.kill()
    assert group.children == []
    assert stopped.read_text().split() == ["b", "a"]
    assert first.tail() == "up"


def test_a_process_group_child_that_exits_before_it_is_ready_is_reported(tmp_path: Path) -> None:
    group = dev.ProcessGroup(tmp_path / "logs", tmp_path / "run", say=lambda _text: None)
    child = group.spawn("early", [sys.executable, "-c", "print('bad config'); raise SystemExit(4)"], {})
    with pytest.raises(dev.ChildDied, match="early exited with code 4") as caught:
        group.wait_ready([child], 30, announce=False)
    assert caught.value.child.tail() == "bad config"
