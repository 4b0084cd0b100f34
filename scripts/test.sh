#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
# The export tests run GGUF files in llama.cpp itself: llama-cpp-python builds it from source, 7-10 minutes on
# 2 cores the first time (pip caches the wheel, so later runs take seconds). The main job's set-up skips it.
pip install -q -e ".[llamacpp]"
# The chat page of `leangpt serve` is tested in a real headless browser: Debian's Chromium and its chromedriver.
if [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null
fi
python -m pytest tests "$@"
