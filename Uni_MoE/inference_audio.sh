#!/usr/bin/env bash
# Chat with the audio model (CLIP + BEATs) in the terminal, in fp32 as the original inference_audio.sh:
#
#   bash Uni_MoE/inference_audio.sh --audio sound.wav --question "What is this sound?"
set -euo pipefail
export UNI_MOE_LAUNCHER="${UNI_MOE_LAUNCHER:-inference_audio.sh}"
MODEL="${MODEL:-checkpoint/Uni-MoE-audio-e2}" DTYPE="${DTYPE:-float32}" \
  exec bash "$(dirname "$0")/inference_speech.sh" "$@"
