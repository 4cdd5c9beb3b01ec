#!/usr/bin/env bash
# Stage 3 (MoE tuning) of the audio model (CLIP + BEATs + BLIP-2 Q-Former, 4 experts on even layers), as
# the original's finetune_audio.sh: batch 2 x accumulation 4, lr 4e-5, 10 epochs, fp32 (no bf16), keep 5.
# Same variables as finetune_speech.sh (MODEL, DATA, DATA_ROOT, EXPERTS, OUTPUT, DRY_RUN, LAUNCHER ...),
# whose command it reuses with these settings (a later flag overrides an earlier one):
#
#   MODEL=checkpoint/audio-base DATA=data/train.json DATA_ROOT=data EXPERTS="out/s2_image out/s2_audio" \
#   OUTPUT=output/audio-e2 bash Uni_MoE/finetune_audio.sh [more --flags]
set -euo pipefail
here="$(dirname "$0")"
export UNI_MOE_LAUNCHER="${UNI_MOE_LAUNCHER:-finetune_audio.sh}"
MODEL="${MODEL:-checkpoint/Uni-MoE-audio-base}" OUTPUT="${OUTPUT:-output/Uni-MoE-audio-e2}" \
  exec bash "$here/finetune_speech.sh" --moe_layers even --num_train_epochs 10 --per_device_train_batch_size 2 \
  --gradient_accumulation_steps 4 --bf16 False --tf32 False --save_total_limit 5 "$@"
