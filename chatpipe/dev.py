"""`chatpipe dev`: the whole pipeline on one machine.

Starts, in order: the embedded Tansu broker (unless CHATPIPE_KAFKA_BOOTSTRAP names one), the topics, the
embedded schema registry (unless CHATPIPE_SCHEMA_REGISTRY_URL names one), then the ingest service, the
Faust worker, the sink, the read API and, when CHATPIPE_8X8_API_KEY is set, the reconciler as child
processes (it says clearly when the reconciler is off). Prints the addresses and `chatpipe ready`
once every child reported ready. SIGINT/SIGTERM stop every child (exit 0).

The children are started, waited for and stopped by `ProcessGroup` (log and ready file per child,
die-with-parent, CPU priority), which the scripts under bench/ use for their own processes too.

Supervision: a child that dies after start-up is restarted, with the same command line, environment and
ports, after a back-off that doubles with each failure (`RESTART_BACKOFF` .. `RESTART_BACKOFF_MAX`); dev
says so and shows the child's last log lines. Only a child that fails more than `MAX_RESTARTS` times within
`RESTART_WINDOW` makes dev give up (stop everything, exit 1). A child that dies during start-up is fatal at
once (a configuration error does not get better by retrying). When the embedded broker dies it is started
again on the same port and the topics are created again. What happens next depends on its storage:

- memory (CHATPIPE_DEV_BROKER_STORAGE's default): the broker comes back empty, so the processor's local
  state is wiped and every service is restarted against the new broker. A new `chatpipe dev` starts with
  empty topics too, so it wipes the processor's state at start.
- disk: Tansu keeps its data in an S3-compatible object store that dev runs as a child of its own
  (`chatpipe.objectstore`, data under STATE_DIR/broker/, on a loopback port), started before Tansu and
  stopped after it. A restarted Tansu has every acknowledged record, topic and committed offset, so only
  Tansu is restarted (same port, same storage) and the services reconnect by themselves; a dead object
  store is restarted on its port and folder like any other child (Tansu's requests fail meanwhile, the
  clients retry). A new `chatpipe dev` in the same folder keeps topics and offsets, and the processor's
  state with them; it wipes that state only when the broker's folder is new or empty.
  Caveat (Tansu 0.6.0): its s3 engine persists an idempotent producer's sequence before the record batch,
  so a kill -9 of Tansu in between loses that acknowledged batch (the retry is answered as a duplicate);
  chatpipe's producers are idempotent, so a kill -9 of Tansu under load can lose a few receipts (a kill -9
  of the object store, and a stop and start of dev, lose none).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from chatpipe.broker import free_port, s3_env, start_tansu, wait_for_port
from chatpipe.objectstore import DEFAULT_BUCKET
from chatpipe.runtime.config import Settings
from chatpipe.runtime.topics import ensure_topics
from sinks.connect import sqlite_path

READY_TIMEOUT = 90.0
STOP_TIMEOUT = 15.0
#: first restart delay of a child that died; doubles with each failure within RESTART_WINDOW
RESTART_BACKOFF = 0.5
RESTART_BACKOFF_MAX = 30.0
#: a child failing more than MAX_RESTARTS times within RESTART_WINDOW seconds makes dev give up
MAX_RESTARTS = 5
RESTART_WINDOW = 120.0
INFRA = ("registry", "broker", "objectstore")
#: partitions of every topic on the embedded broker unless CHATPIPE_PARTITIONS says otherwise. On Tansu the
#: cost of a request grows with the number of batches a topic holds, not of records (bench/tansu_batches.py:
#: the same probe cost 0.21 cores on an empty topic and 1.09 after 200,000 records in batches of 4, 0.23 after
#: the same records in large batches), and librdkafka sends one batch per partition per linger: 2 partitions
#: instead of 6 mean a third of the batches and requests, so the broker's share of the 2 cores grows about
#: three times slower (bench/ingest.py --partitions 2,6).
EMBEDDED_PARTITIONS = 2


def dev_partitions(env: Mapping[str, str], settings: Settings, embedded: bool) -> int:
    """Partitions of the topics `chatpipe dev` creates: CHATPIPE_PARTITIONS when set, else
    EMBEDDED_PARTITIONS on the embedded broker and the settings' default on an external one."""
    if env.get("CHATPIPE_PARTITIONS") or not embedded:
        return settings.partitions
    return EMBEDDED_PARTITIONS


def _die_with_parent() -> None:  # pragma: no cover - runs in the child
    """Ask Linux to SIGTERM the child if `dev` itself dies (even by SIGKILL): no orphans."""
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def lower_priority(pid: int, nice: int = 0, idle: bool = False) -> None:
    """Lower the CPU priority of every thread of process `pid` (threads it starts later inherit it).

    `nice`: by that much. `idle`: SCHED_IDLE, the policy for background work: it gets a core when nothing
    else wants it, and a normal thread that wakes up on its core preempts it at once (a nice 19 thread may
    keep the core for the rest of its slice). Done once the child is ready, not at its start: on a saturated
    machine a SCHED_IDLE process that is still starting gets almost no CPU and would never become ready.
    A thread that exits meanwhile is skipped.
    """
    try:
        tids = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    except OSError:
        return
    for tid in tids:
        if nice:
            with contextlib.suppress(OSError):
                os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + nice))
        if idle:
            with contextlib.suppress(OSError, AttributeError):
                os.sched_setscheduler(tid, os.SCHED_IDLE, os.sched_param(0))


def restart_delay(failures: int) -> float:
    """Back-off before restarting a child that failed `failures` (>= 1) times within the window."""
    return min(RESTART_BACKOFF_MAX, RESTART_BACKOFF * 2 ** max(0, failures - 1))


@dataclass
class Child:
    name: str
    proc: subprocess.Popen[bytes]
    log_path: Path
    ready_file: Path | None = None
    started: float = field(default_factory=time.monotonic)
    #: how to start it again (None: dev does not restart it this way, e.g. the broker)
    argv: list[str] | None = None
    env: dict[str, str] | None = None
    nice: int = 0
    idle: bool = False
    failures: list[float] = field(default_factory=list)  # monotonic times of its deaths within the window
    restart_at: float | None = None  # set while it waits for its back-off
    restarts: int = 0
    announced: bool = True  # its readiness after the last (re)start was said

    def tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


class ProcessGroup:
    """Child processes, each logging to `logs`/NAME.log and, when it has a ready file, told where to write it
    (CHATPIPE_READY_FILE, `run_dir`/NAME.ready: chatpipe's services write their pid there once they serve).
    Every child gets SIGTERM from Linux if this process dies (even by SIGKILL) and may run at a lower CPU
    priority (`nice`, SCHED_IDLE) once it is ready. `wait_ready` waits for ready files, `terminate` stops a
    wave of children together (SIGTERM, SIGKILL after `STOP_TIMEOUT`), `stop` stops them all, last started
    first. `chatpipe dev` supervises its stack with it (DevStack); bench/ scripts start theirs with it.
    """

    def __init__(self, logs: Path, run_dir: Path, say: Callable[[str], None] | None = None) -> None:
        self.logs = logs
        self.run_dir = run_dir
        self.children: list[Child] = []
        self._stopping = False
        if say is not None:
            self.say = say  # type: ignore[method-assign]

    def say(self, text: str) -> None:
        print(text, flush=True)

    def spawn(
        self,
        name: str,
        argv: list[str],
        env: dict[str, str],
        ready: bool = True,
        nice: int = 0,
        idle: bool = False,
    ) -> Child:
        """Start `argv` as child `name` (its ready file, if `ready`, named after it: names are unique)."""
        for d in (self.logs, self.run_dir):
            d.mkdir(parents=True, exist_ok=True)
        log_path = self.logs / f"{name}.log"
        ready_file = self.run_dir / f"{name}.ready" if ready else None
        proc = self._popen(argv, env, log_path, ready_file)
        child = Child(name, proc, log_path, ready_file, argv=argv, env=env, nice=nice, idle=idle)
        self.children.append(child)
        return child

    def adopt(self, name: str, proc: subprocess.Popen[bytes], ready_file: Path | None = None) -> Child:
        """Supervise a process started elsewhere (e.g. `start_tansu`), logging to `logs`/NAME.log."""
        child = Child(name, proc, self.logs / f"{name}.log", ready_file)
        self.children.append(child)
        return child

    def launch(self, child: Child) -> None:
        """Start `child` again from its command line and environment."""
        c = child
        c.proc = self._popen(c.argv, c.env, c.log_path, c.ready_file)  # type: ignore[arg-type]
        child.started = time.monotonic()

    @staticmethod
    def _popen(
        argv: list[str], env: dict[str, str], log_path: Path, ready_file: Path | None
    ) -> subprocess.Popen[bytes]:
        child_env = dict(env)
        if ready_file is not None:
            ready_file.unlink(missing_ok=True)
            child_env["CHATPIPE_READY_FILE"] = str(ready_file)
        with open(log_path, "ab") as logf:
            return subprocess.Popen(
                argv,
                env=child_env,
                stdout=logf,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                preexec_fn=_die_with_parent,
            )

    def wait_ready(self, children: list[Child], timeout: float, announce: bool = True) -> None:
        """Until each of `children` wrote its ready file (said, when `announce`); raises `ChildDied` for one
        that exits, TimeoutError after `timeout` s, KeyboardInterrupt once a stop was requested."""
        deadline = time.monotonic() + timeout
        pending = list(children)
        while pending:
            for child in list(pending):
                if child.proc.poll() is not None:
                    raise ChildDied(child)
                if child.ready_file is not None and child.ready_file.exists():
                    self.settle(child)
                    if announce:
                        self.say(f"  {child.name} ready in {time.monotonic() - child.started:.1f}s")
                    pending.remove(child)
            if self._stopping:
                raise KeyboardInterrupt
            if time.monotonic() > deadline:
                names = ", ".join(c.name for c in pending)
                raise TimeoutError(f"not ready after {timeout:.0f}s: {names}")
            time.sleep(0.05)

    @staticmethod
    def settle(child: Child) -> None:
        """A ready child drops to its lower CPU priority (`nice`, `idle`): see `lower_priority`."""
        if child.nice or child.idle:
            lower_priority(child.proc.pid, child.nice, child.idle)

    def request_stop(self, *_: object) -> None:
        self._stopping = True

    def terminate(self, wave: list[Child], timeout: float = STOP_TIMEOUT) -> None:
        """SIGTERM every child of `wave` that runs, then wait for all of them (SIGKILL after `timeout`)."""
        for child in wave:
            if child.proc.poll() is None:
                child.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for child in wave:
            while child.proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.05)
            if child.proc.poll() is None:
                self.say(f"  {child.name} did not stop in {timeout:.0f}s, killing it")
                child.proc.kill()
                child.proc.wait()

    def discard(self, child: Child) -> None:
        """Stop `child` and forget it."""
        self.terminate([child])
        self.children = [c for c in self.children if c is not child]

    def stop(self) -> None:
        """Stop every child, one at a time, the last started first."""
        for child in reversed(list(self.children)):
            self.discard(child)


class DevStack(ProcessGroup):
    def __init__(self, settings: Settings, env: dict[str, str]) -> None:
        self.settings = settings
        self.env = env
        self.state = settings.state_dir
        super().__init__(self.state / "logs", self.state / "run")
        #: disk storage of the embedded broker: its data folder, and Tansu's storage URL and environment
        self.broker_dir = self.state / "broker"
        self.disk = settings.dev_broker_storage == "disk"
        self.tansu_storage: str | None = None
        self.tansu_env: dict[str, str] | None = None

    def _chatpipe(self, name: str, *args: str, nice: int = 0, idle: bool = False) -> Child:
        argv = [sys.executable, "-m", "chatpipe.cli", name, *args]
        return self.spawn(name, argv, self.child_env, nice=nice, idle=idle)

    def start(self) -> None:
        t0 = time.monotonic()
        s = self.settings
        for d in (self.state, self.logs, self.run_dir):
            d.mkdir(parents=True, exist_ok=True)
        env = dict(self.env)
        bootstrap = env.get("CHATPIPE_KAFKA_BOOTSTRAP")
        embedded = not bootstrap
        if embedded and s.kafka_security_protocol != "PLAINTEXT":
            raise RuntimeError("CHATPIPE_KAFKA_SECURITY_PROTOCOL: the embedded broker speaks PLAINTEXT only")
        broker_kept = embedded and self.disk and broker_data_kept(self.broker_dir)
        if embedded:
            port = free_port()
            bootstrap = f"127.0.0.1:{port}"
            where = "in memory"
            if self.disk:
                self._start_objectstore()
                where = f"on disk in {self.broker_dir}, fsync {'on' if s.dev_broker_fsync else 'off'}"
            self.broker_port = port
            ready = self.run_dir / "broker.ready"
            self.adopt("broker", self._start_tansu(), ready)
            self.say(f"  broker (tansu, {where}) on {bootstrap}")
        self._say_what_is_kept(embedded, broker_kept)
        if embedded and not broker_kept:
            # a broker that starts empty: processor state from an earlier broker must not be mixed in
            shutil.rmtree(self.state / "processor", ignore_errors=True)
        partitions = dev_partitions(env, s, embedded)
        ensure_topics(s.replace(kafka_bootstrap=bootstrap), partitions, s.replication_factor)
        self.bootstrap, self.partitions = bootstrap, partitions
        self.say(f"  topics: {partitions} partitions each")
        registry_url = env.get("CHATPIPE_SCHEMA_REGISTRY_URL")
        env.update(
            CHATPIPE_PARTITIONS=str(partitions),
            CHATPIPE_KAFKA_BOOTSTRAP=bootstrap,
            CHATPIPE_EMBEDDED_BROKER="1" if embedded else "0",
            CHATPIPE_STATE_DIR=str(self.state),
            CHATPIPE_STORE_URL=s.store_url,
            CHATPIPE_INGEST_PORT=str(s.ingest_port),
            CHATPIPE_API_PORT=str(s.api_port),
            CHATPIPE_WORKER_WEB_PORT=str(free_port()),
            # dev stays open by default (docs/interface.md), saying so; tokens and keys are enforced when set
            CHATPIPE_INSECURE="1",
        )
        if not (s.webhook_token or s.oauth_client_id):
            self.say("  warning: no CHATPIPE_WEBHOOK_TOKEN: ingest accepts webhooks from anyone")
        if not (s.api_keys or s.api_keys_file):
            self.say("  warning: no CHATPIPE_API_KEYS: the read API serves every subaccount to anyone")
        if embedded and self.disk and not env.get("CHATPIPE_KAFKA_IDEMPOTENCE"):
            env["CHATPIPE_KAFKA_IDEMPOTENCE"] = "0"  # see Settings.kafka_idempotence: Tansu's sequence bug
        self.child_env = env
        if not registry_url:
            rport = free_port()
            registry_url = f"http://127.0.0.1:{rport}"
            reg = self._chatpipe(
                "registry", "--port", str(rport), "--storage", str(self.state / "registry.json")
            )
            self.wait_ready([reg], 20)
            wait_for_port("127.0.0.1", rport)
        env["CHATPIPE_SCHEMA_REGISTRY_URL"] = registry_url
        self.say(f"CHATPIPE_KAFKA_BOOTSTRAP={bootstrap}")
        self.say(f"CHATPIPE_SCHEMA_REGISTRY_URL={registry_url}")
        services = [
            self._chatpipe("ingest"),
            # behind ingest for the CPU: what ingest does not take in time 8x8 gives up on, whereas the
            # worker and the sink only lag (Kafka holds the backlog) and catch up when the burst is over
            # (measured: bench/ingest.py --with-dev-load --dev-nice 0,19 --dev-idle 1,0)
            self._chatpipe("worker", nice=s.dev_downstream_nice, idle=s.dev_downstream_idle),
            self._chatpipe("sink", nice=s.dev_downstream_nice, idle=s.dev_downstream_idle),
            self._chatpipe("api"),
        ]
        if s.api_8x8_key:  # the reconciler: 8x8's details API for messages whose receipts stopped coming
            services.append(self._chatpipe("reconcile"))
        self.wait_ready(services, READY_TIMEOUT)
        self.say(f"CHATPIPE_INGEST_URL=http://{s.ingest_host}:{s.ingest_port}/v1/webhooks/chatapps")
        self.say(f"CHATPIPE_API_URL=http://{s.api_host}:{s.api_port}/api/v1")
        self.say(f"CHATPIPE_STORE_URL={s.store_url}")
        self.say(f"logs: {self.logs}/")
        if s.api_8x8_key:
            self.say(
                f"  reconciler on: messages not final and quiet for {s.reconcile_after:g}s are looked up "
                f"at {s.api_8x8_url} (at most 1 request/s per subaccount)"
            )
        else:
            self.say(
                "  reconciler off: CHATPIPE_8X8_API_KEY is not set, so messages whose receipts were lost "
                "stay as the last receipt left them (set it, and CHATPIPE_8X8_API_URL, to turn it on)"
            )
        names = ", ".join(c.name for c in services)
        self.say(f"chatpipe ready in {time.monotonic() - t0:.1f}s ({names})")

    def _start_tansu(self) -> subprocess.Popen[bytes]:
        """Tansu on the broker's port and storage; its pid in run/broker.ready once it accepts connections
        (like the other children's ready files)."""
        ready = self.run_dir / "broker.ready"
        ready.unlink(missing_ok=True)
        proc = start_tansu(
            "127.0.0.1", self.broker_port, self.logs / "broker.log", self.tansu_storage, self.tansu_env
        )
        ready.write_text(str(proc.pid))
        return proc

    def _start_objectstore(self) -> None:
        """The object store of the disk-backed broker, as a supervised child; Tansu's storage points at it."""
        s = self.settings
        port = free_port()
        argv = [sys.executable, "-m", "chatpipe.objectstore", "--port", str(port),
                "--dir", str(self.broker_dir), "--bucket", DEFAULT_BUCKET,
                *([] if s.dev_broker_fsync else ["--no-fsync"])]  # fmt: skip
        store = self.spawn("objectstore", argv, dict(self.env))
        self.wait_ready([store], 30)
        self.tansu_storage = f"s3://{DEFAULT_BUCKET}/"
        self.tansu_env = s3_env(f"http://127.0.0.1:{port}")
        self.say(f"  broker storage (chatpipe.objectstore) on 127.0.0.1:{port}")

    def _say_what_is_kept(self, embedded: bool, broker_kept: bool = False) -> None:
        """On a start in a folder used before: what survives from the last run, and what is rebuilt."""
        s = self.settings
        kept: list[str] = []
        if broker_kept:
            kept.append(f"the broker's topics, records and committed offsets ({self.broker_dir})")
        store = Path(sqlite_path(s.store_url)) if s.store_url.startswith("sqlite:") else None
        if store is not None and store.exists():
            kept.append(f"the store ({store})")
        elif store is None:
            kept.append("the store (external)")
        if (self.state / "registry.json").exists():
            kept.append("the schema registry")
        if any((self.state / "spool").glob("*/spool-*.log")):
            kept.append("the ingest spool (what it holds is sent to the broker first)")
        rebuilt: list[str] = []
        if (self.state / "processor").exists():
            if embedded and not broker_kept:
                rebuilt.append(
                    "the processor's state (the embedded broker starts empty: receipts for earlier "
                    "messages start new states, which the sink merges by content with the stored ones)"
                )
            else:
                kept.append("the processor's state (checked against the broker's changelog)")
        if not kept or (store is not None and not store.exists()):
            return  # a first start
        self.say(f"  kept from the last run: {'; '.join(kept)}")
        if rebuilt:
            self.say(f"  rebuilt: {'; '.join(rebuilt)}")

    def supervise(self, poll: float = 0.2) -> int:
        """Watch the children until a stop is requested: restart the ones that die (see the module
        docstring); raises `ChildDied` for a child that keeps failing."""
        while not self._stopping:
            now = time.monotonic()
            for child in list(self.children):
                if child.restart_at is not None:
                    if now >= child.restart_at:
                        self._restart(child)
                    continue
                code = child.proc.poll()
                if code is not None:
                    self._died(child, code, now)
                elif not child.announced and child.ready_file is not None and child.ready_file.exists():
                    child.announced = True
                    self.settle(child)
                    self.say(f"  {child.name} ready again in {now - child.started:.1f}s")
            time.sleep(poll)
        return 0

    def _died(self, child: Child, code: int, now: float) -> None:
        child.failures = [t for t in child.failures if now - t < RESTART_WINDOW] + [now]
        if len(child.failures) > MAX_RESTARTS:
            raise ChildDied(child, f"failed {len(child.failures)} times within {RESTART_WINDOW:.0f}s")
        delay = restart_delay(len(child.failures))
        self.say(
            f"  {child.name} exited with code {code}; restarting it in {delay:.1f}s "
            f"(failure {len(child.failures)} of at most {MAX_RESTARTS} within {RESTART_WINDOW:.0f}s); "
            f"last lines of {child.log_path}:"
        )
        for line in child.tail(10).splitlines():
            self.say(f"    | {line}")
        child.restart_at = now + delay

    def _restart(self, child: Child) -> None:
        child.restart_at = None
        child.restarts += 1
        if child.name == "broker":
            self._restart_broker(child)
            return
        self.launch(child)
        child.announced = child.ready_file is None
        self.say(f"  {child.name} restarted (pid {child.proc.pid}, restart {child.restarts})")

    def _restart_broker(self, broker: Child) -> None:
        """The embedded broker again on its port and storage, its topics; on memory storage (it came back
        empty) every service restarted against it with the processor's local state wiped, on disk storage
        nothing else (it kept everything: the services reconnect)."""
        try:
            broker.proc = self._start_tansu()
        except TimeoutError as exc:  # it did not come up: a failure like any other, with its back-off
            self.say(f"  broker did not start again: {exc}")
            self._died(broker, -1, time.monotonic())
            return
        broker.started = time.monotonic()
        broker.announced = False
        s = self.settings
        ensure_topics(s.replace(kafka_bootstrap=self.bootstrap), self.partitions, s.replication_factor)
        if self.disk:
            self.say(
                f"  broker restarted on {self.bootstrap} (pid {broker.proc.pid}, restart {broker.restarts}); "
                f"it kept its records, topics and committed offsets ({self.broker_dir}): "
                "the services reconnect to it"
            )
            return
        self.say(
            f"  broker restarted on {self.bootstrap} (pid {broker.proc.pid}); it keeps records in memory "
            "only, so what it held is gone: restarting the services against the empty broker"
        )
        services = [c for c in self.children if c.name not in INFRA]
        self.terminate(services)
        shutil.rmtree(self.state / "processor", ignore_errors=True)
        for child in services:
            child.restart_at = None
            self.launch(child)
            child.announced = child.ready_file is None

    def stop(self) -> None:
        """Stop the services together (they flush to the broker), then the registry, the broker last."""
        self.terminate([c for c in self.children if c.name not in INFRA])
        self.terminate([c for c in self.children if c.name == "registry"])
        self.terminate([c for c in self.children if c.name == "broker"])
        self.terminate([c for c in self.children if c.name == "objectstore"])


def broker_data_kept(broker_dir: Path) -> bool:
    """Whether the disk-backed broker's folder holds data from an earlier run (any object in its bucket)."""
    bucket = broker_dir / DEFAULT_BUCKET
    return bucket.is_dir() and any(f.is_file() for f in bucket.rglob("*") if not f.name.startswith("."))


class ChildDied(RuntimeError):
    def __init__(self, child: Child, why: str = "") -> None:
        why = f" ({why})" if why else ""
        super().__init__(f"{child.name} exited with code {child.proc.returncode}{why}")
        self.child = child


def run_dev(settings: Settings, env: dict[str, str]) -> int:
    stack = DevStack(settings, env)
    signal.signal(signal.SIGINT, stack.request_stop)
    signal.signal(signal.SIGTERM, stack.request_stop)
    code = 0
    try:
        stack.start()
        stack.supervise()
    except KeyboardInterrupt:
        pass
    except ChildDied as exc:
        print(f"chatpipe dev: {exc}; last lines of {exc.child.log_path}:", file=sys.stderr)
        print(exc.child.tail(), file=sys.stderr)
        code = 1
    except (TimeoutError, RuntimeError, OSError) as exc:
        print(f"chatpipe dev: {exc}", file=sys.stderr)
        code = 1
    finally:
        stack.stop()
    if code == 0:
        print("chatpipe stopped", flush=True)
    return code
