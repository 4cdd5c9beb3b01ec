#!/usr/bin/env bash
# Create (or reuse) .venv and install the project with the given extras, offline-safe and idempotent.
# torch goes first and alone: installed together with other packages pip would pick a CUDA build.
# Usage: bash scripts/setup_env.sh [extras]   (default extras: train,eval,video,dev)
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS="${1:-train,eval,video,dev}"
PYTHON="${PYTHON:-python3}"

if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null; then
  missing=()
  command -v espeak-ng >/dev/null || missing+=(espeak-ng)
  command -v sox >/dev/null || missing+=(sox)
  command -v ffmpeg >/dev/null || missing+=(ffmpeg)
  command -v java >/dev/null || missing+=(default-jre-headless)
  command -v chromium >/dev/null || missing+=(chromium)
  if [ "${#missing[@]}" -gt 0 ]; then
    echo "installing system packages: ${missing[*]}"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  fi
fi

[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
# shellcheck disable=SC1091
. .venv/bin/activate
python -m pip install -q --upgrade pip 2>/dev/null || true
python -c "import torch" 2>/dev/null || python -m pip install -q "torch==2.13.0"
python -m pip install -q -e ".[${EXTRAS}]"
