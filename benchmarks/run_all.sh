#!/usr/bin/env bash
# Every fetch benchmark in sequence (~25 min on 2 cores), then plots and RESULTS.md sections.
#   benchmarks/run_all.sh            # full
#   benchmarks/run_all.sh --quick    # smoke test (~5 min)
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${FASTFETCH_PY:-.venv/bin/python}"
ARGS=("$@")
[ ${#ARGS[@]} -eq 0 ] && ARGS=(--runs 3)
bash benchmarks/setup.sh
"$PY" benchmarks/corpus.py $([[ " ${ARGS[*]} " == *" --quick "* ]] && echo --quick)
"$PY" benchmarks/run_url_bench.py "${ARGS[@]}"
"$PY" benchmarks/run_archive_bench.py "${ARGS[@]}"
"$PY" benchmarks/run_ceiling.py "${ARGS[@]}"
"$PY" benchmarks/run_resize_micro.py $([[ " ${ARGS[*]} " == *" --quick "* ]] && echo --quick)
"$PY" benchmarks/plot.py
"$PY" benchmarks/report.py --write
