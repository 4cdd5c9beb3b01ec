#!/usr/bin/env bash
# Stage 3 (MoE tuning) of the speech model (CLIP + Whisper, 4 experts in every layer), as the original's
# finetune_speech.sh: 1 GPU x batch 4 x accumulation 2, lr 4e-5, 2 epochs, bf16, ZeRO-2.
#
#   MODEL=checkpoint/speech-base DATA=data/train.json DATA_ROOT=data EXPERTS="out/s2_image out/s2_speech" \
#   OUTPUT=output/speech-e2 bash Uni_MoE/finetune_speech.sh [more --flags]
# MODEL is a dense base (with EXPERTS: stage-2 outputs whose MLPs become the experts) or a MoE checkpoint.
# MODEL, EXPERTS and DATA are checked first (paths are relative to the repository root); DRY_RUN=1 then prints
# the command instead of running it; LAUNCHER replaces the deepspeed launcher
# (e.g. LAUNCHER="python -m" on one CPU); NUM_GPUS, MASTER_PORT and DEEPSPEED_CONFIG as named.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/launcher_checks.sh
MODEL="${MODEL:-checkpoint/Uni-MoE-speech-base}"
[ -n "${DATA:-}" ] || die "set DATA to the training JSON file(s)"
OUTPUT="${OUTPUT:-output/Uni-MoE-speech-e2}"
read -r -a launcher <<< \
  "${LAUNCHER:-deepspeed --num_gpus ${NUM_GPUS:-1} --master_port ${MASTER_PORT:-29501} --module}"
read -r -a data <<< "$DATA"
read -r -a experts <<< "${EXPERTS:-}"
need_model_folder "$MODEL" "${experts[@]}"
need_data_files "${data[@]}"
cmd=("${launcher[@]}" Uni_MoE.train --stage 3 --deepspeed "${DEEPSPEED_CONFIG:-scripts/zero2.json}"
  --model_name_or_path "$MODEL" --version v1 --data_path "${data[@]}" --data_root "${DATA_ROOT:-.}"
  ${EXPERTS:+--expert_dirs "${experts[@]}"} --num_experts 4 --moe_layers all --expert_lora_r "${EXPERT_LORA_R:-8}"
  --mm_projector_type mlp2x_gelu --mm_vision_select_layer -2 --mm_use_im_start_end False
  --mm_use_im_patch_token False --bf16 True --num_train_epochs 2 --per_device_train_batch_size 4
  --gradient_accumulation_steps 2 --learning_rate 4e-5 --weight_decay 0. --warmup_ratio 0.03
  --lr_scheduler_type cosine --tf32 True --model_max_length 2048 --gradient_checkpointing True
  --dataloader_num_workers 3 --lazy_preprocess True --tune_mm_mlp_adapter True --tune_mm_audio_projector True
  --llm_lora_enable True --mix_va True --save_steps 1000 --output_dir "$OUTPUT" "$@")
echo "+ ${cmd[*]}"
[ "${DRY_RUN:-0}" = 1 ] || exec "${cmd[@]}"
