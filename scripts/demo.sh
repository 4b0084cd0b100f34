#!/usr/bin/env bash
# The main job on the embedded Shakespeare corpus: `leangpt pipeline` (prepare -> train -> int8, GPTQ-int4 and
# structured-pruned variants -> eval and bench of each -> a sample -> report). Runs scripts/setup.sh first.
# Writes runs/pipeline/ (report.md, report.json, report.png, one directory per stage); prints the variants table.
# About 10 minutes on a 2-core CPU. Extra arguments go to the pipeline: bash scripts/demo.sh --set train.max_steps=100
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
RUN=${RUN:-runs/pipeline}
leangpt pipeline --out "$RUN" --overwrite "$@"
echo "report: $RUN/report.md"
