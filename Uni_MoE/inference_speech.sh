#!/usr/bin/env bash
# Chat with the speech model in the terminal, as the original inference_speech.sh (KV-cached here):
#
#   bash Uni_MoE/inference_speech.sh --image cat.png [--speech q.wav] [--video clip.mp4] [--question "..."]
#
# MODEL (default checkpoint/Uni-MoE-speech-e2) is a converted checkpoint, checked first; DRY_RUN=1 prints the
# command.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
MODEL="${MODEL:-checkpoint/Uni-MoE-speech-e2}"
. "$root/scripts/launcher_checks.sh"
need_model_folder "$MODEL"
cmd=(python -m Uni_MoE.serve.cli --model_path "$MODEL" ${DTYPE:+--dtype "$DTYPE"} "$@")
echo "+ ${cmd[*]}" >&2
[ "${DRY_RUN:-0}" = 1 ] || exec "${cmd[@]}"
