#!/usr/bin/env bash
# The whole Uni-MoE recipe on a CPU, offline, in minutes: environment, tiny checkpoint, synthetic data,
# stage 1 -> stage 2 (one expert per modality group) -> stage 3 (MoE), then held-out accuracy per task.
#
#   bash scripts/quickstart.sh                 # everything under runs/quickstart
#   OUT=runs/qs_small N_TRAIN=40 bash scripts/quickstart.sh   # smaller and faster
#   DRY_RUN=1 bash scripts/quickstart.sh       # print the commands only
#   NO_SETUP=1 bash scripts/quickstart.sh      # use the active Python environment as it is
#
# Tiny-setting choices (the real recipe is the same commands with real checkpoints):
# - stage 1 adds --train_lm_head: the tiny LLM is random, so its output head maps to no word; a real base
#   (Vicuna) has a trained one. Training the whole random LLM instead (--train_full_llm) learns the image
#   tasks but drowns the weak early speech signal of the random Whisper Q-former (speech stays at chance).
#   Stages 2 and 3 then train exactly what the paper's stages train.
# - learning rates are ~50x the paper's 2e-5..4e-5, steps are a few hundred; the data is synthetic.
set -euo pipefail
cd "$(dirname "$0")/.."

OUT="${OUT:-runs/quickstart}"
TINY="${TINY:-checkpoint/tiny}"
N_TRAIN="${N_TRAIN:-150}"          # training samples per task
N_TEST="${N_TEST:-30}"             # held-out samples per task
EPOCHS1="${EPOCHS1:-8}"
EPOCHS2="${EPOCHS2:-3}"
EPOCHS3="${EPOCHS3:-3}"
SEED="${SEED:-0}"
GROUPS_SPEC="${GROUPS_SPEC:-vision:image_colour,image_shape,video_colour speech:speech_word,speech_long,image_speech audio:audio_class,video_sound}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONWARNINGS=ignore
start=$(date +%s)

run() {
  echo "+ $*"
  if [ "${DRY_RUN:-0}" != 1 ]; then "$@"; fi
}

# ---- environment: .venv with CPU torch first, then the project; skipped when already satisfied
if [ "${DRY_RUN:-0}" != 1 ] && [ "${NO_SETUP:-0}" != 1 ]; then
  bash scripts/setup_env.sh "train,eval,video"
  # shellcheck disable=SC1091
  . .venv/bin/activate
fi

# ---- tiny checkpoint and synthetic data (reused when present)
[ -f "$TINY/config.json" ] || run python -m Uni_MoE.checkpoint.tiny --out "$TINY"
DATA="$OUT/data"
all_train=()
group_names=()
for spec in $GROUPS_SPEC; do
  name="${spec%%:*}"
  tasks="${spec#*:}"
  group_names+=("$name")
  all_train+=("$DATA/train_$name.json")
  [ -f "$DATA/train_$name.json" ] || run python -m Uni_MoE.data.synthetic --out "$DATA" --split "train_$name" \
    --n_per_task "$N_TRAIN" --seed "$SEED" --tasks ${tasks//,/ }
done
all_tasks=$(for spec in $GROUPS_SPEC; do echo "${spec#*:}"; done | tr ',\n' '  ')
[ -f "$DATA/test.json" ] || run python -m Uni_MoE.data.synthetic --out "$DATA" --split test \
  --n_per_task "$N_TEST" --seed "$((SEED + 1))" --tasks $all_tasks

COMMON=(--data_root "$DATA" --per_device_train_batch_size 16 --cache_data True --lr_scheduler_type cosine
        --warmup_ratio 0.05 --weight_decay 0. --logging_steps 20 --save_steps 200 --save_total_limit 1
        --report_to tensorboard --dataloader_num_workers 0 --seed "$SEED" --version v1 --lazy_preprocess True)

# ---- stage 1: connectors (+ the tiny LLM itself, see above) on every modality
[ -f "$OUT/stage1/config.json" ] || run python -m Uni_MoE.train --stage 1 --model_name_or_path "$TINY" \
  --data_path "${all_train[@]}" --output_dir "$OUT/stage1" --num_train_epochs "$EPOCHS1" \
  --learning_rate 1e-3 --train_lm_head True "${COMMON[@]}"

# ---- stage 2: one single-modality expert per group (PEFT LoRA on the LLM + projectors, merged)
expert_dirs=()
for name in "${group_names[@]}"; do
  expert_dirs+=("$OUT/stage2_$name")
  [ -f "$OUT/stage2_$name/config.json" ] || run python -m Uni_MoE.train --stage 2 \
    --model_name_or_path "$OUT/stage1" --data_path "$DATA/train_$name.json" --output_dir "$OUT/stage2_$name" \
    --num_train_epochs "$EPOCHS2" --learning_rate 1e-3 --llm_lora_enable True --lora_r 8 --lora_alpha 16 \
    --tune_mm_mlp_adapter True --tune_mm_audio_projector True "${COMMON[@]}"
done

# ---- stage 3: MoE from the stage-1 base + stage-2 MLPs as experts; routers, expert LoRA, attention LoRA
[ -f "$OUT/stage3/config.json" ] || run python -m Uni_MoE.train --stage 3 --model_name_or_path "$OUT/stage1" \
  --expert_dirs "${expert_dirs[@]}" --num_experts 4 --num_experts_per_tok 2 --moe_layers all \
  --expert_lora_r 8 --data_path "${all_train[@]}" --output_dir "$OUT/stage3" --num_train_epochs "$EPOCHS3" \
  --learning_rate 1e-3 --llm_lora_enable True --tune_mm_mlp_adapter True --tune_mm_audio_projector True \
  "${COMMON[@]}"

# ---- held-out accuracy per task
run python -m Uni_MoE.train.quick_eval --model "$OUT/stage3" --data_path "$DATA/test.json" --data_root "$DATA" \
  --output "$OUT/accuracy.json"
echo "quickstart finished in $(( $(date +%s) - start )) s; TensorBoard logs: tensorboard --logdir $OUT"
