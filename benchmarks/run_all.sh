#!/usr/bin/env bash
# Every fetch benchmark in sequence (~35 min on 2 cores), then plots and RESULTS.md sections.
#   benchmarks/run_all.sh            # full
#   benchmarks/run_all.sh --quick    # smoke test (~5 min)
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${FASTFETCH_PY:-.venv/bin/python}"
ARGS=("$@")
URL=() ARCHIVE=()
if [ ${#ARGS[@]} -eq 0 ]; then
  # Enough work per run that start-up (~0.6 s of imports and planning) weighs as little as
  # it does in a real job: 8000 URLs (in units of 1000, several open at once as in a real job;
  # their copies are byte-identical, the duplicates --dedup exact drops); 4000 LAION-size and
  # 1920 SA-1B-size archived images.
  ARGS=(--runs 3) URL=(--repeat 2 --unit-size 1000 --tools fetch,img2dataset,fetch-dedup) ARCHIVE=(--repeat mixed=4,sa1b=8 --tools seed,seed-stock,fetch)
fi
bash benchmarks/setup.sh
"$PY" benchmarks/corpus.py $([[ " ${ARGS[*]} " == *" --quick "* ]] && echo --quick)
"$PY" benchmarks/run_url_bench.py "${ARGS[@]}" "${URL[@]}"
"$PY" benchmarks/run_archive_bench.py "${ARGS[@]}" "${ARCHIVE[@]}"
"$PY" benchmarks/run_ceiling.py "${ARGS[@]}"
"$PY" benchmarks/run_resize_micro.py $([[ " ${ARGS[*]} " == *" --quick "* ]] && echo --quick)
"$PY" benchmarks/near_dedup.py $([[ " ${ARGS[*]} " == *" --quick "* ]] && echo --quick)
"$PY" benchmarks/plot.py
"$PY" benchmarks/report.py --write
