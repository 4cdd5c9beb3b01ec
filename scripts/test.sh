#!/usr/bin/env bash
# Set up the environment and run the whole test suite (slow tests included), offline.
# Extra arguments go to pytest, e.g.: bash scripts/test.sh -m "not slow"
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh "train,eval,video,dev,demo"
# shellcheck disable=SC1091
. .venv/bin/activate
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 GRADIO_ANALYTICS_ENABLED=False DS_ACCELERATOR=cpu
python -m pytest -q "$@"
