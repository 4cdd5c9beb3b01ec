#!/usr/bin/env bash
# Set up the environment and run the whole test suite (slow tests included), offline.
# Extra arguments go to pytest, e.g.: bash scripts/test.sh -m "not slow"
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh "train,eval,video,dev,demo,lmms-cli"
# shellcheck disable=SC1091
. .venv/bin/activate
# lmms-eval without its own requirements (they pull a CUDA torch and torchvision); the lmms-cli extra holds
# what its CLI needs. The version is the lmms extra's in pyproject.toml (a test checks they agree).
python -c "import lmms_eval" 2>/dev/null || python -m pip install -q --no-deps "lmms-eval==0.7.3"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 GRADIO_ANALYTICS_ENABLED=False DS_ACCELERATOR=cpu
python -m pytest -q "$@"
