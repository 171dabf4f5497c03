"""Instructions the analytics aggregates add to the sink's process, counted by valgrind: no noise.

    python bench/sink_instructions.py [--rows 20000] [--batch 5000]      (apt-get install valgrind)

CPU seconds on the shared 2-core machine move by 20% from one minute to the next, so a change worth a few
percent of the sink's time needs many interleaved rounds of `bench/sinks.py --only-aggregates` to show.
Instruction counts do not move: this runs the sink's write path (`PostgresStore.write_states`, the stream
of `bench/sinks.py`) three times under `valgrind --tool=cachegrind --cache-sim=no` (about 50x slower), each
on a fresh database: start-up only, writing without the aggregates, writing with them; and prints the
instructions of the writes (each run minus the start-up) per record, and what the aggregates add. It counts
the sink's process only (the PostgreSQL server is not run under valgrind): use it to choose between
versions of the sink's Python, and `bench/sinks.py --only-aggregates` for the verdict on throughput.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

MODES = ("start-up", "without", "with")


def child(url: str, mode: str, rows: int, batch: int) -> None:
    """One measured run (inside valgrind): the stream built, the store opened, and written unless
    `mode` is start-up."""
    from bench.sinks import PII, workload
    from chatpipe.runtime.tuning import tune_gc
    from sinks.postgres import PostgresStore

    batches = workload(rows, 0.2, batch)
    store = PostgresStore(url, PII, aggregates=mode == "with")
    store.migrate()
    store._connection()
    tune_gc()  # as `chatpipe sink` runs
    if mode != "start-up":
        for b in batches:
            store.write_states(b)
    store.close()
    # not the interpreter's teardown: freeing the workload costs more or less depending on what was
    # allocated before (by 1-2k instructions a record), which is not what this measures
    sys.stdout.flush()
    os._exit(0)


def instructions(url: str, mode: str, rows: int, batch: int) -> int:
    cmd = [
        "valgrind", "--tool=cachegrind", "--cache-sim=no", "--cachegrind-out-file=/dev/null",
        sys.executable, os.path.abspath(__file__), "--child", mode, "--url", url,
        "--rows", str(rows), "--batch", str(batch),
    ]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONHASHSEED": "0"})
    found = re.search(r"I\s+refs:\s+([\d,]+)", done.stderr)
    if done.returncode or not found:
        raise SystemExit(f"valgrind run failed ({mode}):\n{done.stderr[-3000:]}")
    return int(found.group(1).replace(",", ""))


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=20_000, help="MessageState records in the stream")
    p.add_argument("--batch", type=int, default=5_000)
    p.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    p.add_argument("--url", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        child(args.url, args.child, args.rows, args.batch)
        return
    if not shutil.which("valgrind"):
        raise SystemExit("valgrind is not installed (apt-get install valgrind)")
    from tests.support.postgres import PostgresServer, fresh_database

    counts = {}
    with PostgresServer() as server:
        for mode in MODES:
            print(f"  {mode}: under valgrind...", file=sys.stderr, flush=True)
            counts[mode] = instructions(fresh_database(server, "ir"), mode, args.rows, args.batch)
    without = counts["without"] - counts["start-up"]
    with_ = counts["with"] - counts["start-up"]
    n = args.rows
    print(f"Sink process instructions (valgrind), PostgreSQL write path, {n:,} records, batch={args.batch:,}")
    print(f"  without aggregates {without / n:>9,.0f} per record ({without / 1e9:.3f}G)")
    print(f"  with aggregates    {with_ / n:>9,.0f} per record ({with_ / 1e9:.3f}G)")
    added = with_ - without
    print(f"  added              {added / n:>9,.0f} per record: {added / without:+.1%}")


if __name__ == "__main__":
    main()
