#!/usr/bin/env bash
# Evaluate the audio model (CLIP + BEATs) on one benchmark file, as the original eval_audio.sh, in fp32 as
# the original ran it. Same variables and arguments as eval_speech.sh, e.g.
#
#   bash Uni_MoE/eval_audio.sh --data_path data/clotho.json --data_type clothov1 --output out/clotho.json
set -euo pipefail
export UNI_MOE_LAUNCHER="${UNI_MOE_LAUNCHER:-eval_audio.sh}"
MODEL="${MODEL:-checkpoint/Uni-MoE-audio-e2}" DTYPE="${DTYPE:-float32}" \
  exec bash "$(dirname "$0")/eval_speech.sh" "$@"
