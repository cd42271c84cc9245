#!/usr/bin/env bash
# Run the measurements behind docs/loadtest.md, one after another, then draw its plots.
# Usage: loadtest/run_report.sh [SUSTAINED_SECONDS]   (default 300: the 10,000-socket run)
# Takes about 40 minutes with the default; OUT=DIR writes into DIR. PostgreSQL and Redis must be up
# (bin/services) and the chat_bench database must exist.
set -euo pipefail
cd "$(dirname "$0")"
ulimit -n "$(ulimit -Hn)"
python=../.venv/bin/python
sustained=${1:-300}
out=${OUT:-"results/report-$(date -u +%Y%m%d-%H%M%S)"}
mkdir -p "$out"

run() {
  local name=$1
  shift
  echo "== $name: loadgen.py $*"
  "$python" loadgen.py --processes 2 --output "$out/$name.json" "$@" 2>"$out/$name.err" | tail -2 || echo "run $name failed; see $out/$name.err"
}

# Latency against connections: rooms of 100, one message a second per room.
run scale-1k-product --label scale --server-processes 2 --connections 1000 --rooms 10 --rate 10 --duration 60
run scale-1k-reference --label scale --target reference --server daphne --connections 1000 --rooms 10 --rate 10 --duration 60
run scale-5k-product --label scale --server-processes 2 --connections 5000 --rooms 50 --rate 50 --duration 60
run scale-5k-reference --label scale --target reference --server daphne --connections 5000 --rooms 50 --rate 50 --duration 60
run scale-10k-product --label scale --server-processes 2 --connections 10000 --rooms 100 --rate 100 --duration "$sustained"
run scale-10k-reference --label scale --target reference --server daphne --connections 10000 --rooms 100 --rate 100 --duration 60

# Latency against message rate at 10,000 sockets (100 a second is the scale run).
run rate-25-product --label rate --server-processes 2 --connections 10000 --rooms 100 --rate 25 --duration 60
run rate-50-product --label rate --server-processes 2 --connections 10000 --rooms 100 --rate 50 --duration 60

# One node process against two, and the reconnect storm.
run single-10k-product --label single-process --connections 10000 --rooms 100 --rate 50 --duration 60
run storm-10k-product --label storm --server-processes 2 --connections 10000 --rooms 100 --rate 25 --duration 120 --storm-at 30 --drain-timeout 180

# ASGI servers under the same app and load.
for server in node daphne uvicorn uvicorn-wsproto hypercorn granian; do
  run "server-$server" --label server --server "$server" --connections 2000 --rooms 20 --rate 20 --duration 30
done

"$python" plot_loadtest.py "$out"/*.json --out ../docs/img --table > "$out/table.md"
echo "Results in $out; table in $out/table.md"
