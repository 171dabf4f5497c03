"""End-to-end: simulated 8x8 traffic through `chatpipe dev` (SQLite, then PostgreSQL) at increasing rates.

    .venv/bin/python bench/e2e.py [--rates 1000,2000,5000,10000] [--seconds 60] [--stores sqlite,postgres]
                                  [--samples 300] [--short] [--keep-going] [--plot /tmp/chatpipe-e2e.png]

`--short` is the quick check: `--seconds 15 --rates 500,1000,2000` unless those are given.

Per store a fresh `chatpipe dev` runs as a subprocess with its defaults (embedded Tansu in memory, the
worker and the sink at its downstream CPU priority), PostgreSQL through tests/support/postgres.py (a
throw-away cluster). Per rate, with a seed of its own (so its own subaccounts):

- traffic: `chatpipe.proof.traffic.generate` makes about rate x seconds webhooks (receipts, duplicates,
  shuffled messages, inbound replies, 1% malformed), sent by `chatpipe.proof.client.deliver` paced to the
  rate (retries included) from `--senders` forked processes (each a share of the umids, in order, each
  at rate / senders); 8x8's retry schedule times `--time-factor` (default 0.02, so that the 4xx answers
  to malformed webhooks, retried five times, end within about 3 s instead of 131 s);
- latency, what a user sees: `--samples` webhooks, each the first receipt of its message (the webhook that
  makes the message exist; its next webhook comes at least 2 s later in the send order), are sent by this
  process at their place in the schedule; from each one's 2xx it polls the read API
  (GET /api/v1/subaccounts/{sub}/messages/{umid}) until 200: latency = arrival of that 200 - arrival of
  the 2xx (polls 50 ms apart at first, then 10% of the age, at most 500 ms: an overestimate by at most
  one interval);
- lag, sampled each second: records the Faust worker's group (chatpipe-processor) has not committed on
  chatpipe.receipts.raw, plus records the sink's group (chatpipe-sink) has not committed on
  chatpipe.messages.state; the end of each partition is the high watermark of a fetch response (a
  consumer assigned at the last end seen, read until a record or end-of-partition), never ListOffsets
  (Tansu answers it wrong, docs/embedded-broker.md);
- CPU and RSS of each process from /proc, each second: ingest, broker, worker, sink, api, registry, dev
  (the supervisor), the senders and this process (probes, API polls, lag and /proc sampling);
- after the send, the backlog drains (until every probe was seen and both lags are 0, at most `--drain`
  s), then `chatpipe verify` compares the store with the simulator's truth (zero loss: no message or
  inbound umid missing or wrong).

Sustained: the senders kept the schedule (>= 95% of the rate sent within the nominal seconds), no
well-formed webhook answered other than 2xx (nor timed out), every probe seen with p99 < 2 s, verify OK.
After a rate whose schedule was not kept, or which lost data or did not drain, the higher ones are skipped
unless `--keep-going` (a latency above the limit alone does not stop the series). "others": cores the
rest of the machine used meanwhile (/proc/stat busy time minus this run's processes): other work on the
same cores, which the worker and the sink, at `chatpipe dev`'s SCHED_IDLE, only get what it leaves.
`--dev-env NAME=VALUE` (repeatable) passes settings to `chatpipe dev`, e.g.
CHATPIPE_DEV_DOWNSTREAM_IDLE=0 CHATPIPE_DEV_DOWNSTREAM_NICE=0 to compare the downstream priority.
CPU per webhook: CPU seconds of a process from the start of the send until the backlog drained, divided
by the webhooks answered 2xx. Prints the tables, then writes a PNG (needs matplotlib:
`.venv/bin/pip install -e '.[bench]'`; without it the tables are printed all the same).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import math
import multiprocessing
import os
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import quote

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.ingest import cpu_seconds, process_tree, rss_mb
from chatpipe.broker import free_port
from chatpipe.dev import ProcessGroup
from chatpipe.proof.client import DeliveryResult, SendStats, deliver
from chatpipe.proof.delivery import RetryPolicy, failed
from chatpipe.proof.traffic import Traffic, TrafficConfig, generate
from chatpipe.proof.truth import truth_of
from chatpipe.runtime.topics import PROCESSOR_APP_ID
from chatpipe.simulate import WEBHOOK_PATH, delivery_of, write_truth
from schemas.catalog import MESSAGE_STATE, RECEIPTS
from sinks.worker import SINK_GROUP

HOST = "127.0.0.1"
P99_LIMIT = 2.0
WEBHOOKS_PER_MESSAGE = 3.1  # what generate() makes on average with its default shares
PROBE_GAP = 2.0  # seconds of schedule between a probe and its message's next webhook, at least
PLOT_INSTALL = ".venv/bin/pip install -e '.[bench]'"
#: the webhook's path; the read API's CPU is mostly this bench's polls, shown apart
PIPELINE = ("ingest", "broker", "worker", "sink", "postgres", "registry", "dev")
PARTIES = (*PIPELINE, "api", "senders", "bench")


def load1() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


def busy_seconds() -> float:
    """CPU seconds the whole machine spent busy (every state but idle and iowait), all cores."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(fields[:8]) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


# ------------------------------------------------------------------------------------------ the stack


class Dev:
    """`chatpipe dev` as a subprocess in a fresh state directory, with its own ports and token."""

    def __init__(self, workdir: Path, store_url: str | None, extra_env: dict[str, str]) -> None:
        self.dir = workdir
        self.group = ProcessGroup(workdir, workdir / "run")
        self.token = secrets.token_urlsafe(24)
        self.ingest_port, self.api_port = free_port(), free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("CHATPIPE_")}
        env.update(
            CHATPIPE_STATE_DIR=str(workdir / "state"),
            CHATPIPE_STORE_URL=store_url or f"sqlite:///{workdir / 'chatpipe.db'}",
            CHATPIPE_INGEST_PORT=str(self.ingest_port),
            CHATPIPE_API_PORT=str(self.api_port),
            CHATPIPE_WEBHOOK_TOKEN=self.token,
            CHATPIPE_LOG_LEVEL="WARNING",
        )
        env.update(extra_env)
        self.env = env
        self.store_url = env["CHATPIPE_STORE_URL"]
        # dev.log in `workdir`; `chatpipe dev` says "chatpipe ready" there (it writes no ready file)
        self.child = self.group.spawn("dev", [sys.executable, "-m", "chatpipe.cli", "dev"], env, ready=False)
        self.log, self.proc = self.child.log_path, self.child.proc
        deadline = time.monotonic() + 180
        while "chatpipe ready" not in self.text():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"chatpipe dev did not start:\n{self.text()[-3000:]}")
            time.sleep(0.2)
        m = re.search(r"^CHATPIPE_KAFKA_BOOTSTRAP=(\S+)$", self.text(), re.M)
        assert m, self.text()
        self.bootstrap = m.group(1)
        self.url = f"http://{HOST}:{self.ingest_port}{WEBHOOK_PATH}"
        self.api = f"http://{HOST}:{self.api_port}"

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def parties(self) -> dict[str, list[int]]:
        """name -> pids (with their children) of dev's processes, read afresh (dev restarts dead ones)."""
        out: dict[str, list[int]] = {"dev": [self.proc.pid]}
        with contextlib.suppress(OSError):
            children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text().split()
            for pid in map(int, children):
                with contextlib.suppress(OSError):
                    argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
                    words = [a.decode(errors="replace") for a in argv]
                    if any(w.endswith("tansu") for w in words):
                        name = "broker"
                    elif "chatpipe.cli" in words:
                        name = words[words.index("chatpipe.cli") + 1]
                    else:
                        name = Path(words[0]).name
                    out.setdefault(name, []).extend(process_tree(pid))
        return out

    def stop(self) -> None:
        self.group.terminate([self.child], timeout=90)


# ---------------------------------------------------------------------------------------- lag (fetch)


class Lag:
    """Uncommitted records of a consumer group, ends of partitions from fetch high watermarks."""

    def __init__(self, bootstrap: str, watched: list[tuple[str, str]]) -> None:
        from confluent_kafka import Consumer, TopicPartition

        self.tp = TopicPartition
        common = {"bootstrap.servers": bootstrap, "enable.auto.commit": False, "log_level": 2}
        self.fetcher = Consumer(
            {
                **common,
                "group.id": f"chatpipe-bench-e2e-{secrets.token_hex(4)}",  # assigned, never joined
                "enable.partition.eof": True,
                "fetch.wait.max.ms": 20,
                "max.partition.fetch.bytes": 1,  # the first batch is enough: only the watermark counts
            }
        )
        self.groups = {g: Consumer({**common, "group.id": g}) for g, _ in watched}
        self.watched = watched
        self.partitions: dict[str, list[int]] = {}
        for _, topic in watched:
            meta = self.fetcher.list_topics(topic, timeout=10).topics[topic]
            self.partitions[topic] = sorted(meta.partitions)
        self.ends: dict[tuple[str, int], int] = {}

    def high_watermarks(self, timeout: float = 2.0) -> dict[tuple[str, int], int]:
        tps = [self.tp(t, p, max(0, self.ends.get((t, p), 0) - 1)) for t, ps in self.partitions.items()
               for p in ps]  # fmt: skip
        self.fetcher.assign(tps)
        pending = {(t.topic, t.partition) for t in tps}
        deadline = time.monotonic() + timeout
        while pending and time.monotonic() < deadline:
            msg = self.fetcher.poll(0.05)
            if msg is None:
                continue
            key = (msg.topic(), msg.partition())
            if key in pending:
                hw = self.fetcher.get_watermark_offsets(self.tp(*key), cached=True)[1]
                if hw >= 0:
                    self.ends[key] = max(self.ends.get(key, 0), hw)
                    pending.discard(key)
        self.fetcher.unassign()
        return dict(self.ends)

    def sample(self) -> dict[str, int]:
        """group -> records it is behind on its watched topic."""
        ends = self.high_watermarks()
        out = {}
        for group, topic in self.watched:
            tps = [self.tp(topic, p) for p in self.partitions[topic]]
            committed = self.groups[group].committed(tps, timeout=5)
            out[group] = sum(max(0, ends.get((topic, c.partition), 0) - max(c.offset, 0)) for c in committed)
        return out

    def close(self) -> None:
        for c in (self.fetcher, *self.groups.values()):
            c.close()


# -------------------------------------------------------------------------------------------- senders


STAT_FIELDS = ("attempts", "accepted", "failures", "dlq_records")


def _sender(
    traffic: Traffic, indices: list[int], slot: int, rate: float, go: Any, live: Any, results: Any,
    url: str, token: str, concurrency: int, time_factor: float,
) -> None:  # fmt: skip
    """A forked sender: `deliver` its share of the webhooks once `go` is set (at the monotonic time it
    carries); live counters into `live`, the outcome into `results`."""
    import uvloop

    hooks = [traffic.webhooks[i] for i in indices]
    go.wait()
    start_at = live[len(live) - 1]
    time.sleep(max(0.0, start_at - time.monotonic()))

    def progress(s: SendStats, _elapsed: float) -> None:
        for k, name in enumerate(STAT_FIELDS):
            live[slot * len(STAT_FIELDS) + k] = getattr(s, name)

    result = uvloop.run(
        deliver(
            hooks, url, rate=rate, concurrency=concurrency, policy=RetryPolicy(time_factor=time_factor),
            token=token, progress=progress, progress_interval=0.25,
        )
    )  # fmt: skip
    progress(result.stats, result.elapsed)
    results.put((slot, [indices[i] for i in result.given_up], result.stats, time.monotonic()))


# --------------------------------------------------------------------------------------------- probes


@dataclass
class Probe:
    index: int  # into traffic.webhooks
    umid: str
    sub: str
    acked: float | None = None  # monotonic time of its 2xx
    seen: float | None = None  # monotonic time of the read API's first 200
    given_up: bool = False

    @property
    def latency(self) -> float | None:
        return None if self.acked is None or self.seen is None else self.seen - self.acked


def choose_probes(traffic: Traffic, rate: float, count: int) -> list[Probe]:
    """First receipts of messages, evenly spread over the run, whose next webhook comes PROBE_GAP s of
    schedule later at least (so that no other webhook can make the message exist first)."""
    hooks = traffic.webhooks
    first: dict[str, int] = {}
    following: dict[str, int] = {}
    for i, h in enumerate(hooks):
        if h.umid is None or h.kind == "malformed":
            continue
        if h.umid not in first:
            first[h.umid] = i
        elif h.umid not in following:
            following[h.umid] = i
    sub_of = {m.umid: m.sub_account_id for m in traffic.messages}
    gap = PROBE_GAP * rate
    ok = sorted(
        i for u, i in first.items()
        if hooks[i].kind == "receipt" and not hooks[i].duplicate and following.get(u, 1 << 62) - i >= gap
    )  # fmt: skip
    lo, hi = int(0.02 * len(hooks)), int(0.98 * len(hooks))
    ok = [i for i in ok if lo <= i < hi]
    if not ok or count <= 0:
        return []
    picked = [ok[j * len(ok) // min(count, len(ok))] for j in range(min(count, len(ok)))]
    return [Probe(i, hooks[i].umid or "", sub_of[hooks[i].umid or ""]) for i in picked]


async def run_probes(
    probes: list[Probe], traffic: Traffic, dev: Dev, rate: float, start_at: float, time_factor: float,
    stats: SendStats, stop_at: Callable[[], float],
) -> None:  # fmt: skip
    """Send each probe at its place in the schedule (retrying like 8x8), then poll the read API for it."""
    import aiohttp

    policy = RetryPolicy(time_factor=time_factor)
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {dev.token}"}
    timeout = aiohttp.ClientTimeout(total=5)

    async def one(session: aiohttp.ClientSession, p: Probe) -> None:
        body = traffic.webhooks[p.index].body
        made = 0
        while True:
            status = None
            stats.attempts += 1
            with contextlib.suppress(aiohttp.ClientError, OSError, asyncio.TimeoutError):
                async with session.post(dev.url, data=body, headers=headers) as r:
                    await r.read()
                    status = r.status
            made += 1
            if status is None:
                stats.timeouts += 1
            else:
                stats.statuses[status] += 1
            if not failed(status):
                stats.accepted += 1
                p.acked = time.monotonic()
                break
            delay = policy.next_delay(made)
            if delay is None:
                stats.given_up += 1
                p.given_up = True
                return
            stats.retries += 1
            await asyncio.sleep(delay)
        url = f"{dev.api}/api/v1/subaccounts/{quote(p.sub, safe='')}/messages/{quote(p.umid, safe='')}"
        while time.monotonic() < stop_at():
            with contextlib.suppress(aiohttp.ClientError, OSError, asyncio.TimeoutError):
                async with session.get(url) as r:
                    await r.read()
                    if r.status == 200:
                        p.seen = time.monotonic()
                        return
            age = time.monotonic() - p.acked
            await asyncio.sleep(min(0.5, max(0.05, 0.1 * age)))

    connector = aiohttp.TCPConnector(limit=256)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        tasks = []
        for p in probes:
            await asyncio.sleep(max(0.0, start_at + p.index / rate - time.monotonic()))
            tasks.append(asyncio.create_task(one(session, p)))
        await asyncio.gather(*tasks)


# ----------------------------------------------------------------------------------------- one rate


@dataclass
class Sample:
    t: float  # seconds since the start of the send
    attempts: int
    accepted: int
    lag: dict[str, int]
    cpu: dict[str, float]
    rss: dict[str, float]
    busy: float = 0.0  # busy_seconds() of the whole machine


@dataclass
class RateResult:
    store: str
    rate: int
    seconds: float
    webhooks: int
    senders: int
    sent_rate: float = 0.0
    accepted_rate: float = 0.0
    accepted: int = 0
    non2xx: int = 0  # well-formed webhooks refused, timed out or not connected
    malformed_refused: int = 0
    send_seconds: float = 0.0
    drain_seconds: float = 0.0
    probes: int = 0
    seen: int = 0
    p50: float = math.nan
    p99: float = math.nan
    max_lag: int = 0  # worker + sink
    max_worker_lag: int = 0
    max_sink_lag: int = 0
    verify_ok: bool = False
    cut: bool = False  # the senders were stopped at the time limit: 2xx counted from their live counters
    verify_text: str = ""
    load_start: float = 0.0
    load_end: float = 0.0
    cores: dict[str, float] = field(default_factory=dict)  # during the send
    others: float = 0.0  # cores the rest of the machine used during the send
    us_per_webhook: dict[str, float] = field(default_factory=dict)  # send start .. drained
    rss_max: dict[str, float] = field(default_factory=dict)
    samples: list[Sample] = field(default_factory=list)

    @property
    def kept_schedule(self) -> bool:
        return self.sent_rate >= 0.95 * self.rate

    @property
    def sustained(self) -> bool:
        return (
            self.kept_schedule
            and self.non2xx == 0
            and self.seen == self.probes > 0
            and self.p99 < P99_LIMIT
            and self.verify_ok
        )


def percentile(values: list[float], q: float) -> float:
    if not values:
        return math.nan
    values = sorted(values)
    return values[min(len(values) - 1, round(q * (len(values) - 1)))]


def split(traffic: Traffic, probes: list[Probe], senders: int) -> list[list[int]]:
    """Every webhook but the probes, to `senders` shares by umid (each keeps the send order)."""
    skip = {p.index for p in probes}
    shares: list[list[int]] = [[] for _ in range(senders)]
    for i, h in enumerate(traffic.webhooks):
        if i not in skip:
            shares[zlib.crc32((h.umid or str(i)).encode()) % senders].append(i)
    return shares


def merge(parts: list[SendStats]) -> SendStats:
    out = SendStats()
    for s in parts:
        for f in dataclasses.fields(SendStats):
            if f.name == "statuses":
                out.statuses.update(s.statuses)
            else:
                setattr(out, f.name, getattr(out, f.name) + getattr(s, f.name))
    return out


def run_rate(
    args: argparse.Namespace, dev: Dev, store: str, rate: int, seed: int, out: Path,
    extra: Callable[[], dict[str, list[int]]],
) -> RateResult:  # fmt: skip
    messages = max(1, round(rate * args.seconds / WEBHOOKS_PER_MESSAGE))
    start = (datetime.now(UTC) - timedelta(hours=8)).replace(microsecond=0)  # every event in the past
    t = time.monotonic()
    traffic = generate(TrafficConfig(messages=messages, seed=seed, start=start))
    truth = truth_of(traffic)
    probes = choose_probes(traffic, rate, args.samples)
    senders = args.senders or max(1, math.ceil(rate / 2500))
    shares = split(traffic, probes, senders)
    res = RateResult(store, rate, args.seconds, len(traffic.webhooks), senders, probes=len(probes))
    print(
        f"  {store} {rate:,}/s: {len(traffic.webhooks):,} webhooks ({messages:,} messages, seed {seed}) "
        f"made in {time.monotonic() - t:.1f} s; {len(probes)} probes, {senders} sender process(es); "
        f"load {load1():.2f}",
        flush=True,
    )
    ctx = multiprocessing.get_context("fork")  # forked before any thread of this process starts
    live = ctx.Array("d", senders * len(STAT_FIELDS) + 1, lock=False)
    go = ctx.Event()
    results = ctx.Queue()
    procs = [
        ctx.Process(
            target=_sender,
            args=(
                traffic,
                share,
                k,
                rate * len(share) / max(1, len(traffic.webhooks)),
                go,
                live,
                results,
                dev.url,
                dev.token,
                args.concurrency,
                args.time_factor,
            ),
            daemon=True,
        )
        for k, share in enumerate(shares)
    ]
    for p in procs:
        p.start()
    time.sleep(1.0)  # let the children copy their shares
    lag = Lag(dev.bootstrap, [(PROCESSOR_APP_ID, RECEIPTS.name), (SINK_GROUP, MESSAGE_STATE.name)])
    lag.sample()
    res.load_start = load1()
    start_at = time.monotonic() + 0.5
    live[len(live) - 1] = start_at
    go.set()

    state: dict[str, Any] = {"send_end": None, "drained": None, "stop": False}
    probe_stats = SendStats()

    def totals() -> tuple[int, int]:
        att = acc = 0
        for k in range(senders):
            att += int(live[k * len(STAT_FIELDS)])
            acc += int(live[k * len(STAT_FIELDS) + 1])
        return att + probe_stats.attempts, acc + probe_stats.accepted

    def parties() -> dict[str, list[int]]:
        return {
            **dev.parties(),
            **extra(),
            "senders": [p.pid for p in procs if p.pid],
            "bench": [os.getpid()],
        }

    cpu_seen: dict[int, float] = {}  # pid -> CPU seconds last read (a process that ended keeps its last)

    def cpu_of(pids: list[int]) -> float:
        for p in pids:
            cpu_seen[p] = max(cpu_seen.get(p, 0.0), cpu_seconds(p))
        return sum(cpu_seen[p] for p in pids)

    def sampler() -> None:
        zero_in_a_row = 0
        while not state["stop"]:
            tick = time.monotonic()
            who = parties()
            try:
                lags = lag.sample()
            except Exception as exc:  # a broker busy beyond the timeouts: a gap in the series
                print(f"    lag sample failed: {exc}", flush=True)
                lags = {}
            att, acc = totals()
            res.samples.append(
                Sample(
                    tick - start_at,
                    att,
                    acc,
                    lags,
                    {n: cpu_of(pids) for n, pids in who.items()},
                    {n: sum(rss_mb(p) for p in pids) for n, pids in who.items()},
                    busy_seconds(),
                )
            )
            if state["send_end"] is not None and state["drained"] is None:
                done = all(p.seen is not None or p.given_up for p in probes)
                zero_in_a_row = zero_in_a_row + 1 if lags and not any(lags.values()) and done else 0
                if zero_in_a_row >= 2 or time.monotonic() > state["send_end"] + args.drain:
                    state["drained"] = time.monotonic()
            time.sleep(max(0.0, 1.0 - (time.monotonic() - tick)))

    thread = threading.Thread(target=sampler, daemon=True)
    thread.start()

    def stop_polling_at() -> float:
        end = state["send_end"]
        return math.inf if end is None else end + args.drain

    hard_limit = start_at + 4 * args.seconds + 120
    probe_task_done = threading.Event()

    def probe_thread() -> None:
        try:
            asyncio.run(
                run_probes(
                    probes, traffic, dev, rate, start_at, args.time_factor, probe_stats, stop_polling_at
                )
            )
        finally:
            probe_task_done.set()

    pt = threading.Thread(target=probe_thread, daemon=True)
    pt.start()
    outcomes: dict[int, tuple[list[int], SendStats, float]] = {}
    while len(outcomes) < senders and time.monotonic() < hard_limit:
        with contextlib.suppress(Exception):
            slot, given_up, stats, ended = results.get(timeout=1.0)
            outcomes[slot] = (given_up, stats, ended)
    cut = len(outcomes) < senders
    for p in procs:
        if p.is_alive():
            p.kill()
        p.join()
    send_end = max([o[2] for o in outcomes.values()], default=time.monotonic())
    state["send_end"] = send_end
    while state["drained"] is None and thread.is_alive():
        time.sleep(0.2)
    probe_task_done.wait(args.drain + 10)
    state["stop"] = True
    thread.join()
    lag.close()
    res.load_end = load1()

    stats = merge([o[1] for o in outcomes.values()] + [probe_stats])
    given_up = [i for o in outcomes.values() for i in o[0]] + [p.index for p in probes if p.given_up]
    res.accepted = stats.accepted
    if cut and res.samples:  # the stopped senders never reported: their live counters instead
        res.accepted = max(res.accepted, res.samples[-1].accepted)
    res.cut = cut
    res.malformed_refused = stats.dlq_records
    res.non2xx = stats.failures - stats.dlq_records
    res.send_seconds = send_end - start_at
    res.drain_seconds = (state["drained"] or time.monotonic()) - send_end
    nominal = min(args.seconds, len(traffic.webhooks) / rate)  # when the schedule's last first attempt is due
    res.sent_rate = at(res.samples, nominal, "attempts") / nominal
    res.accepted_rate = at(res.samples, nominal, "accepted") / nominal
    lat = [p.latency for p in probes if p.latency is not None]
    res.seen, res.p50, res.p99 = len(lat), percentile(lat, 0.50), percentile(lat, 0.99)
    res.max_lag = max((sum(s.lag.values()) for s in res.samples if s.lag), default=0)
    res.max_worker_lag = max((s.lag.get(PROCESSOR_APP_ID, 0) for s in res.samples), default=0)
    res.max_sink_lag = max((s.lag.get(SINK_GROUP, 0) for s in res.samples), default=0)
    cpu_window(res)
    if cut:
        res.verify_text = "not verified: the senders were stopped before they finished"
        print(f"    {res.verify_text}", flush=True)
        return res
    delivery = delivery_of(traffic.webhooks, DeliveryResult(stats, tuple(given_up), send_end - start_at))
    truth_file = out / f"truth-{store}-{rate}.jsonl"
    write_truth(truth_file, dataclasses.replace(truth, delivery=delivery))
    done = subprocess.run(
        [sys.executable, "-m", "chatpipe.cli", "verify", "--truth", str(truth_file), "--store", dev.store_url,
         "--wait", str(args.verify_wait), "--show", "5"],
        env=dev.env, capture_output=True, text=True,
    )  # fmt: skip
    res.verify_ok = done.returncode == 0
    res.verify_text = done.stdout.strip()
    if not res.verify_ok:
        print("    " + "\n    ".join((done.stdout + done.stderr).strip().splitlines()[-12:]), flush=True)
    return res


def cpu_window(res: RateResult) -> None:
    """Cores used during the send; CPU per accepted webhook from the start to the drained backlog."""
    s = res.samples
    if len(s) < 2:
        return
    during = [x for x in s if x.t <= res.send_seconds] or s[:2]
    first, last_send, last = s[0], during[-1], s[-1]
    span = max(last_send.t - first.t, 1e-9)
    names = set(first.cpu) | set(last.cpu)
    ours = sum(last_send.cpu.get(n, 0.0) - first.cpu.get(n, 0.0) for n in names)
    res.others = max(0.0, (last_send.busy - first.busy - ours) / span)
    for n in names:
        res.cores[n] = (last_send.cpu.get(n, 0.0) - first.cpu.get(n, 0.0)) / span
        res.us_per_webhook[n] = (last.cpu.get(n, 0.0) - first.cpu.get(n, 0.0)) / max(res.accepted, 1) * 1e6
        res.rss_max[n] = max(x.rss.get(n, 0.0) for x in s)


def at(samples: list[Sample], t: float, attr: str) -> float:
    """`attr` of the samples at `t` s after the start, linearly interpolated."""
    before = [s for s in samples if s.t <= t]
    after = [s for s in samples if s.t > t]
    if not before:
        return 0.0
    a = before[-1]
    if not after:
        return float(getattr(a, attr))
    b = after[0]
    va, vb = getattr(a, attr), getattr(b, attr)
    return va + (vb - va) * (t - a.t) / max(b.t - a.t, 1e-9)


# --------------------------------------------------------------------------------------------- output


def fmt_ms(x: float) -> str:
    return "-" if math.isnan(x) else f"{x * 1000:,.0f}"


def table(results: list[RateResult]) -> str:
    head = (
        f"{'store':<8} {'rate/s':>7} {'sent/s':>7} {'2xx/s':>7} {'non-2xx':>7} {'p50 ms':>7} {'p99 ms':>7} "
        f"{'seen':>9} {'lag worker/sink':>15} {'drain s':>7} {'loss':>5} {'load':>9} {'others':>6} "
        f"{'sustained':>9}"
    )
    lines = [head, "-" * len(head)]
    for r in results:
        loss = "cut" if r.cut else "0" if r.verify_ok else "FAIL"
        lines.append(
            f"{r.store:<8} {r.rate:>7,} {r.sent_rate:>7,.0f} {r.accepted_rate:>7,.0f} {r.non2xx:>7,} "
            f"{fmt_ms(r.p50):>7} {fmt_ms(r.p99):>7} {f'{r.seen}/{r.probes}':>9} "
            f"{f'{r.max_worker_lag:,}/{r.max_sink_lag:,}':>15} "
            f"{r.drain_seconds:>7.1f} {loss:>5} {f'{r.load_start:.1f}-{r.load_end:.1f}':>9} {r.others:>6.2f} "
            f"{'yes' if r.sustained else 'no':>9}"
        )
    return "\n".join(lines)


def cpu_table(results: list[RateResult]) -> str:
    names = [n for n in PARTIES if any(n in r.cores for r in results)]
    head = f"{'store':<8} {'rate/s':>7}  " + " ".join(f"{n:>14}" for n in names)
    lines = [
        "CPU while sending, in cores / CPU per 2xx webhook, in us (send start to drained backlog):",
        head,
        "-" * len(head),
    ]
    for r in results:
        cells = [f"{r.cores.get(n, 0):.2f}/{r.us_per_webhook.get(n, 0):,.0f}" for n in names]
        lines.append(f"{r.store:<8} {r.rate:>7,}  " + " ".join(f"{c:>14}" for c in cells))
    lines += ["", "RSS, largest seen, MB:", head, "-" * len(head)]
    for r in results:
        lines.append(
            f"{r.store:<8} {r.rate:>7,}  " + " ".join(f"{r.rss_max.get(n, 0):>14,.0f}" for n in names)
        )
    return "\n".join(lines)


def ratios(results: list[RateResult]) -> str:
    by = {(r.store, r.rate): r for r in results}
    lines = []
    for rate in sorted({r.rate for r in results}):
        a, b = by.get(("sqlite", rate)), by.get(("postgres", rate))
        if a and b and a.accepted_rate and not math.isnan(a.p99) and not math.isnan(b.p99) and a.p99:
            lines.append(
                f"  {rate:>7,}/s: postgres/sqlite 2xx/s {b.accepted_rate / a.accepted_rate:.2f}, "
                f"p99 {b.p99 / a.p99:.2f}, sink CPU per webhook "
                f"{b.us_per_webhook.get('sink', 0) / max(a.us_per_webhook.get('sink', 0), 1e-9):.2f}"
            )
    return "\n".join(lines)


def verdict(results: list[RateResult], goal: int) -> str:
    lines = []
    for store in dict.fromkeys(r.store for r in results):
        mine = [r for r in results if r.store == store]
        ok = [r.rate for r in mine if r.sustained]
        best = max(ok) if ok else None
        lines.append(
            f"{store}: highest rate sustained (p99 < {P99_LIMIT:g} s, zero loss, schedule kept, no non-2xx): "
            + (f"{best:,}/s" if best else "none of those tried")
            + ("" if best and best >= goal else f"; goal {goal:,}/s not met")
        )
        top = max(mine, key=lambda r: r.rate)
        pipe = {n: top.us_per_webhook.get(n, 0.0) for n in PIPELINE if n in top.us_per_webhook}
        if not pipe:
            continue
        worst = max(pipe, key=lambda n: pipe[n])
        total = sum(pipe.values())
        load = top.us_per_webhook.get("senders", 0.0) + top.us_per_webhook.get("bench", 0.0)
        lines.append(
            f"  bottleneck at {top.rate:,}/s: {worst}, {pipe[worst]:,.0f} us CPU per webhook "
            f"({1e6 / pipe[worst]:,.0f} webhooks/s on one whole core; it used {top.cores.get(worst, 0):.2f} "
            f"cores while sending). Pipeline in all {total:,.0f} us per webhook: 2 cores carry at most "
            f"{2e6 / total:,.0f}/s; with this load generator ({load:,.0f} us) {2e6 / (total + load):,.0f}/s."
        )
        share = ", ".join(
            f"{n} {100 * v / total:.0f}%" for n, v in sorted(pipe.items(), key=lambda kv: -kv[1])
        )
        lines.append(f"  pipeline CPU per webhook by process: {share}")
    return "\n".join(lines)


def plot(results: list[RateResult], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"\nno plot: matplotlib is not installed. Install it with: {PLOT_INSTALL}")
        return
    fig, ((ax1, ax0), (ax2, ax3)) = plt.subplots(2, 2, figsize=(14, 10))
    top = max(r.rate for r in results)
    ax0.plot([0, top], [0, top], color="grey", lw=0.8, ls=":", label="offered")
    for store in dict.fromkeys(r.store for r in results):
        mine = sorted((r for r in results if r.store == store), key=lambda r: r.rate)
        rates = [r.rate for r in mine]
        ax1.plot(rates, [r.p50 * 1000 for r in mine], "o--", label=f"{store} p50")
        ax1.plot(rates, [r.p99 * 1000 for r in mine], "o-", label=f"{store} p99")
        ax2.plot(rates, [r.max_worker_lag for r in mine], "o-", label=f"{store} worker (receipts)")
        ax2.plot(rates, [r.max_sink_lag for r in mine], "o--", label=f"{store} sink (states)")
        ax0.plot(rates, [r.accepted_rate for r in mine], "o-", label=f"{store} 2xx/s")
        for r in mine:
            pts = [(s.t, sum(s.lag.values())) for s in r.samples if s.lag]
            ax3.plot([p[0] for p in pts], [p[1] for p in pts], label=f"{store} {r.rate:,}/s")
    ax1.axhline(P99_LIMIT * 1000, color="red", lw=0.8, ls=":", label="p99 limit 2 s")
    ax1.set(xlabel="offered webhooks/s", ylabel="webhook 2xx -> visible in read API, ms", yscale="log",
            title="end-to-end latency")  # fmt: skip
    ax2.set(xlabel="offered webhooks/s", ylabel="records not committed, largest", yscale="symlog",
            title="largest consumer lag")  # fmt: skip
    ax0.set(xlabel="offered webhooks/s", ylabel="webhooks answered 2xx/s", title="throughput", ylim=(0, None))
    ax3.set(xlabel="seconds since the send started", ylabel="records not committed (worker + sink)",
            title="consumer lag over time", yscale="symlog")  # fmt: skip
    for ax in (ax0, ax1, ax2, ax3):
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"chatpipe dev end to end, {os.cpu_count()} cores (bench/e2e.py)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"\nplot: {path}")


# ----------------------------------------------------------------------------------------------- main


def postgres_pids(pg: Any) -> dict[str, list[int]]:
    """The PostgreSQL cluster's processes (postmaster and its backends), when it runs."""
    if pg is None:
        return {}
    with contextlib.suppress(OSError, ValueError, IndexError):
        return {"postgres": process_tree(int((pg.data / "postmaster.pid").read_text().split()[0]))}
    return {}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rates", help="webhooks per second, ascending (default 1000,2000,5000,10000)")
    parser.add_argument("--seconds", type=float, help="send time per rate (default 60)")
    parser.add_argument(
        "--short", action="store_true", help="quick check: --seconds 15 --rates 500,1000,2000"
    )
    parser.add_argument("--stores", default="sqlite,postgres", help="sqlite, postgres or both (default)")
    parser.add_argument("--samples", type=int, default=300, help="latency probes per rate (default 300)")
    parser.add_argument("--senders", type=int, default=0, help="sender processes (default: 1 per 2,500/s)")
    parser.add_argument("--concurrency", type=int, default=64, help="requests in flight per sender")
    parser.add_argument("--time-factor", type=float, default=0.02, help="times 8x8's retry delays")
    parser.add_argument("--drain", type=float, default=300.0, help="longest wait for the backlog, s")
    parser.add_argument("--verify-wait", type=float, default=60.0, help="chatpipe verify --wait")
    parser.add_argument("--keep-going", action="store_true", help="try higher rates after one failed")
    parser.add_argument("--goal", type=int, default=5000, help="the rate to reach (default 5000)")
    parser.add_argument("--seed", type=int, default=1500, help="seed of the first rate (then +1 each)")
    parser.add_argument("--plot", type=Path, default=Path("/tmp/chatpipe-e2e.png"))
    parser.add_argument(
        "--dev-env", action="append", default=[], metavar="NAME=VALUE", help="a setting for chatpipe dev"
    )
    args = parser.parse_args()
    args.seconds = args.seconds or (15.0 if args.short else 60.0)
    rates = [
        int(x) for x in (args.rates or ("500,1000,2000" if args.short else "1000,2000,5000,10000")).split(",")
    ]
    stores = [s for s in args.stores.split(",") if s]
    workdir = Path(tempfile.mkdtemp(prefix="chatpipe-bench-e2e-"))
    print(
        f"chatpipe dev end to end: rates {', '.join(f'{r:,}' for r in rates)}/s, {args.seconds:g} s each, "
        f"stores {', '.join(stores)}; {os.cpu_count()} cores; {args.samples} latency probes per rate; "
        f"retries at 8x8's delays x {args.time_factor:g}; work in {workdir}"
        + (f"; chatpipe dev with {' '.join(args.dev_env)}" if args.dev_env else ""),
        flush=True,
    )
    print(f"uptime: {subprocess.run(['uptime'], capture_output=True, text=True).stdout.strip()}", flush=True)
    results: list[RateResult] = []
    seed = args.seed
    try:
        for store in stores:
            pg = None
            url = None
            if store == "postgres":
                from tests.support.postgres import PostgresServer

                pg = PostgresServer(database="chatpipe_e2e")
                pg.start()
                url = pg.url
            elif store != "sqlite":
                raise SystemExit(f"unknown store {store!r}: sqlite or postgres")
            sdir = workdir / store
            sdir.mkdir()
            dev = Dev(sdir, url, dict(kv.split("=", 1) for kv in args.dev_env))
            print(f"\n== {store}: chatpipe dev ready ({dev.store_url})", flush=True)
            try:
                for rate in rates:
                    r = run_rate(args, dev, store, rate, seed, sdir, lambda pg=pg: postgres_pids(pg))
                    seed += 1
                    results.append(r)
                    print(table([r]).splitlines()[-1], flush=True)
                    broke = not r.kept_schedule or not r.verify_ok or r.drain_seconds >= args.drain
                    if broke and not args.keep_going:
                        print(
                            f"  {rate:,}/s: schedule not kept, data lost or backlog not drained: "
                            "higher rates skipped (--keep-going runs them)"
                        )
                        break
            finally:
                dev.stop()
                if pg is not None:
                    pg.cleanup()
    finally:
        print(f"\nuptime: {subprocess.run(['uptime'], capture_output=True, text=True).stdout.strip()}")
        if results:
            print("\n" + table(results))
            print(
                "  rate: offered (attempts paced, retries included); sent/s, 2xx/s: within the nominal "
                "seconds; non-2xx: well-formed webhooks refused, timed out or unconnected (the 4xx "
                f"answers to malformed ones, {sum(r.malformed_refused for r in results):,} in all, are "
                "by design); seen: probes visible in the read API; lag: largest records not committed by "
                "the worker (receipts) and the sink (states); "
                "drain: from the end of the send until both lags were 0; loss: chatpipe verify (cut: senders "
                "stopped at the time limit, not verified); "
                "load: 1-minute load average at the start and end; others: cores used by everything else "
                "on the machine during the send"
            )
            print("\n" + cpu_table(results))
            rat = ratios(results)
            if rat:
                print("\nside by side (same run):\n" + rat)
            print("\n" + verdict(results, args.goal))
            plot(results, args.plot)
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
