#!/usr/bin/env bash
# Reproduces the README's Home Depot figures in one command, on the machine it runs on:
#   1. the whole pipeline with the Home Depot profile (validation, graph, teacher, labelling,
#      student, TFMA gates, push, report) -> runs/homedepot/
#   2. the results table: IDF overlap, teacher, student k = 0/1/2, BERM-O (AUC, per-query AUC,
#      NDCG@10, pairs/s, p50/p99 per 100 pairs) -> runs/homedepot/student_homedepot.json
#   3. TF Serving API load on the pushed model -> runs/homedepot/serving_load.json
# Usage: benchmarks/homedepot.sh [path/to/train_dev.csv.zip]   (OUT=dir to change runs/homedepot)
set -euo pipefail
cd "$(dirname "$0")/.."
INPUT="${1:-../shared/datasets/homedepot/train_dev.csv.zip}"
OUT="${OUT:-runs/homedepot}"
[ -f "$INPUT" ] || { echo "homedepot.sh: input not found: $INPUT" >&2; exit 2; }
make install
echo "== $(date -u +%FT%TZ) $(nproc) cores: pipeline (Home Depot profile) -> $OUT"
status=0
.venv/bin/relkd run --dataset homedepot --input "$INPUT" --config pipeline/profiles/homedepot.yaml \
    --output "$OUT" || status=$?
# 4 = the student was not pushed (a gate failed); the figures below are still measured.
[ "$status" = 0 ] || [ "$status" = 4 ] || exit "$status"
echo "== $(date -u +%FT%TZ): results table (benchmarks/student_homedepot.py)"
.venv/bin/python benchmarks/student_homedepot.py --input "$INPUT" --work-dir "$OUT/benchmark" \
    --out "$OUT/student_homedepot.json"
if [ -d "$OUT/serving/relkd" ]; then
  echo "== $(date -u +%FT%TZ): serving load (benchmarks/serving_load.py)"
  .venv/bin/python benchmarks/serving_load.py --model-base "$OUT/serving/relkd" --out "$OUT/serving_load.json"
fi
echo "== $(date -u +%FT%TZ): done; report: $OUT/report/report.html"
