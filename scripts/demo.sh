#!/usr/bin/env bash
# The main job on the embedded Shakespeare corpus: prepare -> train -> eval -> generate.
# Runs scripts/setup.sh first. Outputs go to runs/demo/. About 5 minutes on a 2-core CPU (measured: BENCHMARKS.md).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
RUN=${RUN:-runs/demo}
STEPS=${STEPS:-150}
mkdir -p "$RUN"
leangpt prepare --source shakespeare --out "$RUN/data" --overwrite
leangpt train --data "$RUN/data" --out "$RUN/ckpt" --preset small-cpu --set max_steps="$STEPS" --set eval_every=50 --overwrite
echo "checkpoint: $RUN/ckpt"
leangpt eval --model "$RUN/ckpt" --data "$RUN/data" --max-tokens 65536
leangpt generate --model "$RUN/ckpt" --prompt "ROMEO:" --max-new-tokens 80 --seed 1
