#!/usr/bin/env bash
# Stage 3 of speech v1.5 (MoE on even layers) with data parallelism over several GPUs, as the original's
# finetune_speech_dp.sh: NUM_GPUS (default 2) x batch 2 x accumulation 2, modality-grouped batches.
# Same variables as finetune_speech.sh (MODEL, DATA, DATA_ROOT, EXPERTS, OUTPUT, DRY_RUN, LAUNCHER ...),
# whose command it reuses with these settings (a later flag overrides an earlier one):
#
#   NUM_GPUS=2 MODEL=checkpoint/speech-base-interval DATA=data/train.json DATA_ROOT=data \
#   EXPERTS="out/s2_image out/s2_speech" OUTPUT=output/speech-v1.5 bash Uni_MoE/finetune_speech_dp.sh
set -euo pipefail
here="$(dirname "$0")"
export UNI_MOE_LAUNCHER="${UNI_MOE_LAUNCHER:-finetune_speech_dp.sh}"
NUM_GPUS="${NUM_GPUS:-2}" MODEL="${MODEL:-checkpoint/Uni-MoE-speech-base-interval}" \
  OUTPUT="${OUTPUT:-output/Uni-MoE-speech-v1.5}" \
  exec bash "$here/finetune_speech.sh" --moe_layers even --per_device_train_batch_size 2 \
  --gradient_accumulation_steps 2 --group_by_modality_length True "$@"
