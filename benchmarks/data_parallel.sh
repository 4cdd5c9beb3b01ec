#!/usr/bin/env bash
# Data-parallel stage 3 through Uni_MoE/finetune_speech_dp.sh (deepspeed launcher, ZeRO-2, bf16, gradient
# checkpointing, 4 experts on even layers) on a randomly initialised model of LLaMA-7B width, then a table of
# the tokens/s per GPU the trainer logged (spliced LLM tokens, padding included; first window left out).
#
#   DATA=data/train.json DATA_ROOT=data NUM_GPUS=2 bash benchmarks/data_parallel.sh [more --flags]
# DATA: image + speech training JSON, e.g. from `python -m Uni_MoE.data.synthetic --tasks image_colour
# speech_word image_speech`. WORK (scratch, default runs/data_parallel), LAYERS (4), STEPS (30), RESULT (a
# markdown file to append the table to), WIDTH (LLM width flags of Uni_MoE.checkpoint.tiny; small ones for a CPU
# smoke run with LAUNCHER="python -m" and --bf16 False --tf32 False --deepspeed "").
set -euo pipefail
cd "$(dirname "$0")/.."
WORK="${WORK:-runs/data_parallel}"
NUM_GPUS="${NUM_GPUS:-2}"
LAYERS="${LAYERS:-4}"
read -r -a width <<< "${WIDTH:---hidden_size 4096 --intermediate_size 11008 --num_heads 32}"
[ -f "$WORK/wide/config.json" ] || python -m Uni_MoE.checkpoint.tiny --out "$WORK/wide" "${width[@]}" \
  --num_layers "$LAYERS"
NUM_GPUS="$NUM_GPUS" MODEL="$WORK/wide" OUTPUT="$WORK/out" bash Uni_MoE/finetune_speech_dp.sh \
  --max_steps "${STEPS:-30}" --logging_steps 5 --report_to none --save_strategy no --dataloader_num_workers 2 \
  "$@" 2>&1 | tee "$WORK/train.log"
python - "$WORK/train.log" "$NUM_GPUS" "$LAYERS" "${RESULT:-}" <<'EOF'
import re, statistics, sys, datetime
log, gpus, layers, result = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
text = open(log, errors="replace").read()
rates = [float(x) for x in re.findall(r"'tokens_per_second_per_device': '([0-9.]+)'", text)][1:]
losses = [float(x) for x in re.findall(r"'loss': '([0-9.]+)'", text)]
if not rates:
    sys.exit(f"no tokens_per_second_per_device in {log}")
row = (f"| {datetime.date.today()} | {gpus} | {layers} | {statistics.mean(rates):.0f} | "
       f"{statistics.mean(rates) * int(gpus):.0f} | {losses[0]:.3f} -> {losses[-1]:.3f} |")
print("| date | GPUs | layers | tokens/s per GPU | tokens/s total | loss first -> last |")
print("|---|---|---|---|---|---|")
print(row)
if result:
    open(result, "a").write(row + "\n")
EOF
