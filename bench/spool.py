"""Spool append throughput with fsync: one append (one fsync) at a time vs AsyncSpool group commit.

Same run, same disk, same record size (an encoded webhook is ~1 KiB):

- single: `Spool.append` in a loop; every call writes one record and fdatasyncs before returning;
- group commit: `--concurrency` asyncio tasks each awaiting `AsyncSpool.append` in a loop (what ingest's
  request handlers do when the broker is down); appends arriving while an fsync runs are written together.

    /tmp/venv/bin/python bench/spool.py [--dir DIR] [--seconds 3] [--value-bytes 1024] [--concurrency 64]

`--dir` should be on the disk the spool will use in production (default: a temp dir under the cwd, since
/tmp may be tmpfs where fsync is free).
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ingest.spool import AsyncSpool, Spool

TOPIC = "chatpipe.receipts"


def bench_single(directory: Path, seconds: float, value: bytes) -> tuple[float, int, int]:
    spool = Spool(directory)
    fsyncs0, n = spool.fsyncs, 0
    start = time.perf_counter()
    deadline = start + seconds
    while time.perf_counter() < deadline:
        spool.append(TOPIC, b"umid-%d" % n, value)
        n += 1
    elapsed = time.perf_counter() - start
    fsyncs = spool.fsyncs - fsyncs0
    spool.close()
    return n / elapsed, n, fsyncs


async def bench_group(
    directory: Path, seconds: float, value: bytes, concurrency: int
) -> tuple[float, int, int]:
    spool = Spool(directory)
    aspool = AsyncSpool(spool)
    fsyncs0 = spool.fsyncs
    counts = [0] * concurrency
    start = time.perf_counter()
    deadline = start + seconds

    async def appender(k: int) -> None:
        while time.perf_counter() < deadline:
            await aspool.append(TOPIC, b"umid-%d-%d" % (k, counts[k]), value)
            counts[k] += 1

    await asyncio.gather(*(appender(k) for k in range(concurrency)))
    elapsed = time.perf_counter() - start
    fsyncs = spool.fsyncs - fsyncs0
    await aspool.close()
    n = sum(counts)
    return n / elapsed, n, fsyncs


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dir", type=Path, default=Path.cwd())
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--value-bytes", type=int, default=1024)
    parser.add_argument("--concurrency", type=int, default=64)
    args = parser.parse_args()
    value = b"x" * args.value_bytes
    root = Path(tempfile.mkdtemp(prefix="spool-bench-", dir=args.dir))
    try:
        single, n1, f1 = bench_single(root / "single", args.seconds, value)
        group, n2, f2 = asyncio.run(bench_group(root / "group", args.seconds, value, args.concurrency))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"spool in {args.dir}, {args.value_bytes}-byte values, fsync on, {args.seconds:g} s each")
    print(
        f"single append (1 fsync each):           {single:>10,.0f} appends/s  ({n1:,} appends, {f1:,} fsyncs)"
    )
    print(
        f"AsyncSpool group commit, {args.concurrency:>3} appenders: {group:>10,.0f} appends/s  "
        f"({n2:,} appends, {f2:,} fsyncs, {n2 / max(f2, 1):.1f} appends/fsync)"
    )
    print(f"ratio group/single: {group / single:.1f}x")


if __name__ == "__main__":
    main()
