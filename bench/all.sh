#!/usr/bin/env bash
# Every benchmark the README lists, in sequence, with arguments small enough for about 40 minutes on
# 2 shared cores (the figures to compare are the ratios each script measures side by side in one run).
# Used for the before/after figures of a refactor: run the identical set on both commits.
#
#     bench/all.sh [NAME ...] > /tmp/bench.txt 2>&1     (from the repo root; NAME e.g. ingest codec)
#
# PYTHON (default .venv/bin/python) runs the scripts; BENCH_S3_PATH is a folder holding moto_server /
# localbucket / weed for bench/broker_storage.py (e.g. a venv's bin: pip install 'moto[server]'
# localbucket); servers not found are skipped by that script. A failing bench is reported and the next
# one runs; the exit code is the number of failures.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
S3_PATH=()
if [ -n "${BENCH_S3_PATH:-}" ]; then S3_PATH=(--path "$BENCH_S3_PATH"); fi

declare -a NAMES=() CMDS=()
add() { NAMES+=("$1"); shift; CMDS+=("$*"); }
add ingest          "$PY" bench/ingest.py --seconds 10 --rss-requests 300000
add tansu_batches   "$PY" bench/tansu_batches.py --records 100000 --seconds 5
add codec           "$PY" bench/codec.py --records 20000 --repeat 3
add processors      "$PY" bench/processors.py --receipts 100000 --umids 25000
add sinks           "$PY" bench/sinks.py --rows 100000 --naive-rows 5000 --durable-rows 20000
add sinks_aggregates "$PY" bench/sinks.py --only-aggregates --rows 100000 --aggregate-rounds 1
add sink_instructions "$PY" bench/sink_instructions.py --rows 20000
add analytics       "$PY" bench/analytics.py --messages 200000 --repeat 3
add e2e             "$PY" bench/e2e.py --short --plot /tmp/chatpipe-e2e-all.png
add broker_storage  "$PY" bench/broker_storage.py --storages memory,moto,localbucket --seconds 4 \
    --records 1000 "${S3_PATH[@]}"
add spool           "$PY" bench/spool.py --seconds 3
add state_core      "$PY" bench/state_core.py
add reconciler      "$PY" bench/reconciler.py

failures=0
for i in "${!NAMES[@]}"; do
  name=${NAMES[$i]}
  if [ $# -gt 0 ] && ! printf '%s\n' "$@" | grep -qx "$name"; then continue; fi
  echo
  echo "===== bench $name: ${CMDS[$i]}  ($(date -u +%FT%TZ), commit ${BENCH_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)})"
  start=$(date +%s)
  # shellcheck disable=SC2086  # the command is a word list built above
  ${CMDS[$i]}
  rc=$?
  echo "===== end $name: exit $rc, $(( $(date +%s) - start )) s"
  [ $rc -eq 0 ] || failures=$((failures + 1))
done
exit $failures
