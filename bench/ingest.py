"""Ingest throughput against a bare aiohttp server, side by side in one run, on the same load generator.

    .venv/bin/python bench/ingest.py [--seconds 15] [--connections 64] [--workers 1] [--rounds 1]
                                     [--partitions 2[,6]] [--loops asyncio[,uvloop]]
                                     [--with-dev-load [--dev-load-only] [--dev-nice 19[,0]]
                                      [--dev-idle 1[,0]]]
                                     [--rss-requests 1000000 [--rss-only]]

Per comparison, each server runs in its own process(es), apart from the load generator:

- bare: an aiohttp server whose handler only reads the body, parses it with orjson and answers 200;
- chatpipe: `chatpipe ingest` as a subprocess, as in production, producing durably (acks=all, idempotent)
  to a fresh embedded Tansu broker with chatpipe's topics, schemas in the embedded registry (`chatpipe
  registry` subprocess), a webhook token set (the load sends it as a Bearer token; bare ignores it).
  Its webhook route skips aiohttp's router (`ingest.app.fast_dispatch`, about 4 us a request); bare keeps
  the router, as an ordinary aiohttp app does. For scale (a one-off measurement on this machine, which this
  script does not repeat): the same bare handler on aiohttp's low-level server did 26.2k req/s against 21.9k
  through the router.

The load is every delivery-receipt fixture of tests/fixtures/webhooks in turn with the umid replaced per
request (unique across the run), at `--connections` keep-alive connections. Load generator: `wrk` (Debian
package `wrk`, required) with a generated Lua script. Each measurement is preceded by a 2 s warm-up.
"non-2xx" is wrk's count of status >= 400 plus socket errors (neither server answers 3xx).

Every process is started and stopped by chatpipe's own supervisor (`chatpipe.dev.ProcessGroup`, what
`chatpipe dev` runs its children with: log files, ready files, die-with-parent, CPU priorities).

`--workers N` runs N processes of each server (SO_REUSEPORT).
`--partitions 2,6` repeats everything with topics of 2 and then 6 partitions (default: what `chatpipe dev`
creates on its embedded broker, 2: chatpipe/dev.py EMBEDDED_PARTITIONS). Both servers run on the event loop
chatpipe runs on (CHATPIPE_EVENT_LOOP's default); `--loops asyncio,uvloop` repeats everything on each.
`--with-dev-load` repeats the comparison on a second fresh stack where a Faust worker (`chatpipe worker`) and
the sink (`chatpipe sink`, SQLite) also run, consuming what ingest produces: the rest of `chatpipe dev` on
the same cores, at the CPU priority `chatpipe dev` gives them (`--dev-nice` and `--dev-idle`, defaults
CHATPIPE_DEV_DOWNSTREAM_NICE's and _IDLE's; `--dev-nice 0,19 --dev-idle 1,0` compares all four), and
it prints how long they stay busy with their backlog once the load stops. `--rss-requests N` then drives
N requests through chatpipe ingest and prints its RSS (VmRSS, summed over worker processes) about every
N/10 requests.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import os
import re
import resource
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import orjson

from chatpipe.broker import free_port, start_tansu, wait_for_port
from chatpipe.dev import EMBEDDED_PARTITIONS, Child, ChildDied, ProcessGroup
from chatpipe.runtime.config import Settings
from chatpipe.runtime.serve import run
from chatpipe.runtime.topics import ensure_topics
from tests.fixtures.webhooks import DELIVERY_RECEIPTS, load

PATH = "/v1/webhooks/chatapps"
HOST = "127.0.0.1"
UMID_MARK = "@@UMID@@"
WARMUP_SECONDS = 2.0
READY_TIMEOUT = 120.0


def templates() -> list[tuple[bytes, bytes]]:
    """(before umid, after umid) for every delivery-receipt fixture, compact JSON."""
    out = []
    for name in DELIVERY_RECEIPTS:
        doc = orjson.loads(load(name))
        doc["payload"]["umid"] = UMID_MARK
        head, tail = orjson.dumps(doc).split(UMID_MARK.encode())
        out.append((head, tail))
    return out


@dataclass
class Result:
    requests: int
    seconds: float
    non2xx: int
    p50_ms: float
    p99_ms: float
    cpu: str = ""  # CPU used while measuring, in cores, per party (filled by Load.measure)

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    def line(self, label: str) -> str:
        return (
            f"{label:<34} {self.rps:>9,.0f} req/s  p50 {self.p50_ms:>7.2f} ms  p99 {self.p99_ms:>7.2f} ms  "
            f"non-2xx {self.non2xx:,}  ({self.requests:,} requests)"
            + (f"\n{'':<35}CPU {self.cpu}" if self.cpu else "")
        )


# ------------------------------------------------------------------------------------------- servers


def serve_bare(port: int, event_loop: str) -> None:
    """The baseline: parse the JSON body with orjson, answer 200. Access log off and on the same event
    loop, as chatpipe's; its pid in CHATPIPE_READY_FILE once it serves, as chatpipe's services."""
    from aiohttp import web

    async def handler(request: web.Request) -> web.Response:
        orjson.loads(await request.read())
        return web.Response(body=b'{"status":"accepted"}', content_type="application/json")

    async def main() -> None:
        app = web.Application()
        app.router.add_post(PATH, handler)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, HOST, port, reuse_port=True, backlog=1024).start()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        Path(os.environ["CHATPIPE_READY_FILE"]).write_text(str(os.getpid()))
        await stop.wait()
        await runner.cleanup()

    run(main(), event_loop)


def start(
    procs: ProcessGroup, name: str, argv: list[str], env: dict[str, str], nice: int = 0, idle: bool = False
) -> Child:
    """`argv` as child `name` of the group, once it wrote its ready file."""
    child = procs.spawn(name, argv, env, nice=nice, idle=idle)
    procs.wait_ready([child], READY_TIMEOUT, announce=False)
    return child


@dataclass(frozen=True)
class Setup:
    """What every process of a stack is configured with (CHATPIPE_PARTITIONS, CHATPIPE_EVENT_LOOP)."""

    partitions: int
    event_loop: str

    def __str__(self) -> str:
        return f"{self.partitions} partitions, {self.event_loop}"


class Stack:
    """A fresh Tansu broker with chatpipe's topics and the embedded registry; starts ingest and friends."""

    def __init__(self, procs: ProcessGroup, workdir: Path, name: str, setup: Setup) -> None:
        self.procs = procs
        self.setup = setup
        self.dir = workdir / name
        for n in itertools.count(2):  # a phase repeated (--partitions 2,6,2) gets a fresh directory
            if not self.dir.exists():
                break
            self.dir = workdir / f"{name}-{n}"
        self.dir.mkdir(parents=True)
        name = self.dir.name
        port = free_port()
        self.bootstrap = f"{HOST}:{port}"
        self.broker = procs.adopt(
            f"{name}-broker", start_tansu(HOST, port, procs.logs / f"{name}-broker.log")
        )
        ensure_topics(self.bootstrap, setup.partitions)
        rport = free_port()
        self.token = secrets.token_urlsafe(24)
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("CHATPIPE_")}
        self.env.update(
            CHATPIPE_KAFKA_BOOTSTRAP=self.bootstrap,
            CHATPIPE_SCHEMA_REGISTRY_URL=f"http://{HOST}:{rport}",
            CHATPIPE_EMBEDDED_BROKER="1",
            CHATPIPE_STATE_DIR=str(self.dir / "state"),
            CHATPIPE_STORE_URL=f"sqlite:///{self.dir / 'chatpipe.db'}",
            CHATPIPE_WEBHOOK_TOKEN=self.token,
            CHATPIPE_PARTITIONS=str(setup.partitions),
            CHATPIPE_EVENT_LOOP=setup.event_loop,
            CHATPIPE_LOG_LEVEL="WARNING",
            CHATPIPE_WORKER_WEB_PORT=str(free_port()),
        )
        self.name = name
        self.dev_load: list[Child] = []
        reg = self.chatpipe("registry", "--port", str(rport), "--storage", str(self.dir / "registry.json"))
        wait_for_port(HOST, rport)
        self.registry = reg

    def chatpipe(self, command: str, *args: str, nice: int = 0, idle: bool = False, **env: str) -> Child:
        argv = [sys.executable, "-m", "chatpipe.cli", command, *args]
        return start(self.procs, f"{self.name}-{command}", argv, {**self.env, **env}, nice, idle)

    def ingest(self, port: int, workers: int) -> Child:
        shutil.rmtree(self.dir / "state" / "spool", ignore_errors=True)
        return self.chatpipe("ingest", CHATPIPE_INGEST_PORT=str(port), CHATPIPE_INGEST_WORKERS=str(workers))

    def start_dev_load(self, nice: int, idle: bool) -> None:
        """The worker and the sink as `chatpipe dev` runs them: CHATPIPE_DEV_DOWNSTREAM_NICE and _IDLE."""
        self.dev_load = [
            self.chatpipe("worker", nice=nice, idle=idle),
            self.chatpipe("sink", nice=nice, idle=idle),
        ]

    def consumers(self) -> dict[str, list[int]]:
        return {"worker+sink": [c.proc.pid for c in self.dev_load]} if self.dev_load else {}


def start_bare(procs: ProcessGroup, port: int, workers: int, event_loop: str) -> list[Child]:
    argv = [sys.executable, __file__, "--serve-bare", str(port), event_loop]
    return [start(procs, f"bare-{port}-{i}", argv, dict(os.environ)) for i in range(workers)]


def process_tree(pid: int) -> list[int]:
    pids = [pid]
    with contextlib.suppress(OSError):
        for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
            pids.extend(process_tree(int(child)))
    return pids


def cpu_seconds(pid: int) -> float:
    """user + system CPU time of a process so far (0 once it is gone)."""
    with contextlib.suppress(OSError, IndexError):
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return 0.0


def rss_mb(pid: int) -> float:
    with contextlib.suppress(OSError):
        m = re.search(r"^VmRSS:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text(), re.M)
        if m:
            return int(m.group(1)) / 1024
    return 0.0


# ------------------------------------------------------------------------------------ load generators


def _lua_long(text: str) -> str:
    level = 0
    while f"]{'=' * level}]" in text:
        level += 1
    return f"[{'=' * level}[{text}]{'=' * level}]"


def wrk_script(token: str) -> str:
    bodies = ",\n".join(f"{{{_lua_long(h.decode())}, {_lua_long(t.decode())}}}" for h, t in templates())
    nonce = secrets.randbelow(1 << 32)
    return f"""
local bodies = {{
{bodies}
}}
local nbodies = #bodies
local headers = {{["Content-Type"] = "application/json", ["Authorization"] = "Bearer {token}"}}
local next_tid = 0
local tid, n = 0, 0
local pre, post = {{}}, {{}}
local mark = "@@@@@@@@-@@@@-@@@@-@@@@-@@@@@@@@@@@@"
function setup(thread)
  thread:set("tid", next_tid)
  next_tid = next_tid + 1
end
function init(args)
  -- whole requests built once (the umid has a fixed length, so Content-Length is too): per request only
  -- the umid is formatted and concatenated, keeping the load generator's CPU share small on 2 cores
  for i, b in ipairs(bodies) do
    local r = wrk.format("POST", "{PATH}", headers, b[1] .. mark .. b[2])
    local s, e = string.find(r, mark, 1, true)
    pre[i], post[i] = string.sub(r, 1, s - 1), string.sub(r, e + 1)
  end
end
function request()
  n = n + 1
  local i = (n % nbodies) + 1
  return pre[i] .. string.format("%08x-%04x-4000-8000-%012x", {nonce}, tid, n) .. post[i]
end
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("WRK %d %d %d %.0f %.0f\\n", summary.requests, summary.duration,
    e.status + e.connect + e.read + e.write + e.timeout, latency:percentile(50), latency:percentile(99)))
end
"""


def run_wrk(
    port: int,
    seconds: float,
    connections: int,
    threads: int,
    token: str,
    script_dir: Path,
) -> Result:
    script = script_dir / f"wrk-{secrets.token_hex(4)}.lua"
    script.write_text(wrk_script(token))
    duration = f"{max(1, round(seconds))}s"
    out = subprocess.run(
        [
            "wrk",
            "-t",
            str(threads),
            "-c",
            str(connections),
            "-d",
            duration,
            "--timeout",
            "10s",
            "-s",
            str(script),
            f"http://{HOST}:{port}{PATH}",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    m = re.search(r"^WRK (\d+) (\d+) (\d+) (\d+) (\d+)$", out, re.M)
    if not m:
        raise RuntimeError(f"unexpected wrk output:\n{out}")
    n, us, errors, p50, p99 = (int(x) for x in m.groups())
    return Result(n, us / 1e6, errors, p50 / 1000, p99 / 1000)


class Load:
    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        self.args = args
        self.workdir = workdir
        if shutil.which("wrk") is None:
            raise SystemExit("wrk not found: apt-get install -y wrk")

    @property
    def name(self) -> str:
        return f"wrk -t{self.args.threads} -c{self.args.connections} (Lua script, umid varied per request)"

    def run(self, port: int, seconds: float, token: str) -> Result:
        a = self.args
        return run_wrk(port, seconds, a.connections, a.threads, token, self.workdir)

    def measure(self, port: int, token: str, parties: dict[str, list[int]]) -> Result:
        """Warm up, then measure; `parties` (name -> pids) get their CPU use printed, with the load."""
        self.run(port, WARMUP_SECONDS, token)
        before = {name: sum(cpu_seconds(p) for p in pids) for name, pids in parties.items()}
        load_before = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.monotonic()
        result = self.run(port, self.args.seconds, token)
        wall = time.monotonic() - t0
        load_after = resource.getrusage(resource.RUSAGE_CHILDREN)
        used = {
            name: (sum(cpu_seconds(p) for p in pids) - before[name]) / wall for name, pids in parties.items()
        }
        used["load generator"] = (
            load_after.ru_utime + load_after.ru_stime - load_before.ru_utime - load_before.ru_stime
        ) / wall
        result.cpu = ", ".join(f"{name} {cores:.2f}" for name, cores in used.items()) + " cores"
        return result


# ---------------------------------------------------------------------------------------------- runs


def compare(load: Load, procs: ProcessGroup, stack: Stack, workers: int) -> tuple[Result, Result]:
    port = free_port()
    bare = start_bare(procs, port, workers, stack.setup.event_loop)
    others = {"broker": [stack.broker.proc.pid], **stack.consumers()}
    try:
        b = load.measure(port, stack.token, {"server": [c.proc.pid for c in bare], **others})
    finally:
        for c in bare:
            procs.discard(c)
    port = free_port()
    ingest = stack.ingest(port, workers)
    try:
        c = load.measure(port, stack.token, {"server": process_tree(ingest.proc.pid), **others})
    finally:
        procs.discard(ingest)
    return b, c


def settle_seconds(pids: list[int], limit: float = 180.0) -> float:
    """Seconds until `pids` use under 5% of a core over two 0.5 s samples in a row (their backlog done)."""
    t0 = time.monotonic()
    quiet = 0
    last = sum(cpu_seconds(p) for p in pids)
    while quiet < 2 and time.monotonic() - t0 < limit:
        time.sleep(0.5)
        now = sum(cpu_seconds(p) for p in pids)
        quiet = quiet + 1 if now - last < 0.025 else 0
        last = now
    return time.monotonic() - t0 - 1.0


def phase(
    load: Load,
    procs: ProcessGroup,
    workdir: Path,
    title: str,
    dev: tuple[int, bool] | None,
    workers: int,
    rounds: int,
    setup: Setup,
) -> None:
    """One stack; `dev` = (nice, idle) not None: with the worker and the sink running at that priority."""
    name = "plain" if dev is None else f"devload-nice{dev[0]}-idle{int(dev[1])}"
    stack = Stack(procs, workdir, f"{name}-p{setup.partitions}-{setup.event_loop}", setup)
    if dev is not None:
        stack.start_dev_load(*dev)
    print(f"\n== {title}", flush=True)
    ratios = []
    for r in range(rounds):
        b, c = compare(load, procs, stack, workers)
        ratios.append(c.rps / b.rps if b.rps else 0.0)
        tag = f"[{workers} proc{'s' if workers > 1 else ''}{f', round {r + 1}' if rounds > 1 else ''}]"
        print(b.line(f"bare aiohttp+orjson {tag}"), flush=True)
        print(c.line(f"chatpipe ingest     {tag}"), flush=True)
        print(f"ratio chatpipe/bare {tag}: {ratios[-1]:.2f}", flush=True)
        if stack.dev_load:
            behind = settle_seconds([p for d in stack.dev_load for p in process_tree(d.proc.pid)])
            print(f"worker+sink busy {behind:.1f} s after the load stopped (their backlog)", flush=True)
    if rounds > 1:
        print(f"median ratio, {workers} proc(s): {statistics.median(ratios):.2f}", flush=True)


def rss_run(load: Load, procs: ProcessGroup, workdir: Path, total: int, workers: int, setup: Setup) -> None:
    stack = Stack(procs, workdir, "rss", setup)
    port = free_port()
    ingest = stack.ingest(port, workers)
    step = max(1, total // 10)
    print(
        f"\n== RSS of chatpipe ingest ({workers} proc(s)) over {total:,} requests, about every {step:,}",
        flush=True,
    )
    pids = process_tree(ingest.proc.pid)
    workers_only = pids[1:] if workers > 1 else pids
    print(
        f"  {0:>10,} requests  RSS {sum(rss_mb(p) for p in workers_only):7.1f} MB (after start)", flush=True
    )
    done = bad = 0
    rate = 0.0
    try:
        while done < total:
            # load runs by duration: each chunk is sized from the last rate to carry about `step` requests
            want = min(step, total - done)
            r = load.run(port, want / rate if rate else 3.0, stack.token)
            rate = r.rps or 1.0
            done += r.requests
            bad += r.non2xx
            rss = [rss_mb(p) for p in workers_only]
            print(
                f"  {done:>10,} requests  RSS {sum(rss):7.1f} MB {[round(x, 1) for x in rss]}  "
                f"{r.rps:,.0f} req/s  non-2xx {bad:,}  (broker RSS {rss_mb(stack.broker.proc.pid):.0f} MB)",
                flush=True,
            )
    finally:
        procs.discard(ingest)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=15.0, help="measurement per server (default 15)")
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--workers", type=int, default=1, help="processes of each server (default 1)")
    parser.add_argument(
        "--rounds", type=int, default=1, help="repeat each comparison, report the median ratio"
    )
    parser.add_argument(
        "--with-dev-load",
        action="store_true",
        help="also compare while a Faust worker and the sink consume ingest's output",
    )
    parser.add_argument(
        "--dev-nice",
        default=str(Settings().dev_downstream_nice),
        help="niceness of that worker and sink, as `chatpipe dev` runs them; a list (0,10) compares",
    )
    parser.add_argument(
        "--dev-idle",
        default=str(int(Settings().dev_downstream_idle)),
        help="1: that worker and sink under SCHED_IDLE, as `chatpipe dev` runs them; 1,0 compares",
    )
    parser.add_argument(
        "--partitions",
        default=str(EMBEDDED_PARTITIONS),
        help="partitions of every topic (default: what `chatpipe dev` creates on its embedded broker)",
    )
    parser.add_argument(
        "--loops",
        default=Settings().event_loop,
        help="event loop of both servers, as CHATPIPE_EVENT_LOOP (default: its default); a list compares",
    )
    parser.add_argument(
        "--dev-load-only", action="store_true", help="skip the comparison without the dev load"
    )
    parser.add_argument("--rss-requests", type=int, default=0, help="drive N requests and print ingest RSS")
    parser.add_argument("--rss-only", action="store_true", help="skip the comparisons")
    parser.add_argument("--threads", type=int, default=1, help="wrk threads (default 1: it shares the cores)")
    parser.add_argument("--serve-bare", nargs=2, metavar=("PORT", "LOOP"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_bare:
        serve_bare(int(args.serve_bare[0]), args.serve_bare[1])
        return
    partition_counts = [int(x) for x in args.partitions.split(",")]
    workdir = Path(tempfile.mkdtemp(prefix="chatpipe-bench-ingest-"))
    procs = ProcessGroup(workdir / "logs", workdir / "run")
    procs.logs.mkdir()  # the broker's log goes there before any child is spawned
    load = Load(args, workdir)
    print(
        f"load generator: {load.name}; {len(templates())} delivery-receipt bodies; "
        f"{args.seconds:g} s per server after a {WARMUP_SECONDS:g} s warm-up; {os.cpu_count()} cores"
    )
    try:
        priorities = [
            (int(n), bool(int(i))) for n in args.dev_nice.split(",") for i in args.dev_idle.split(",")
        ]
        setups = [Setup(p, loop) for p in partition_counts for loop in args.loops.split(",")]
        for setup in [] if args.rss_only else setups:
            if not args.dev_load_only:
                procs.stop()
                title = f"bare vs chatpipe ingest (broker + registry only; {setup})"
                phase(load, procs, workdir, title, None, args.workers, args.rounds, setup)
            for nice, idle in priorities if args.with_dev_load else []:
                procs.stop()
                policy = ", SCHED_IDLE" if idle else ""
                title = (
                    "bare vs chatpipe ingest, with a Faust worker and the sink consuming "
                    f"(nice {nice}{policy}; {setup})"
                )
                phase(load, procs, workdir, title, (nice, idle), args.workers, args.rounds, setup)
        if args.rss_requests:
            procs.stop()
            rss_run(load, procs, workdir, args.rss_requests, args.workers, setups[0])
    except ChildDied as exc:
        raise SystemExit(f"{exc}; last lines of {exc.child.log_path}:\n{exc.child.tail()}") from exc
    finally:
        procs.stop()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
