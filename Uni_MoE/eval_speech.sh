#!/usr/bin/env bash
# Evaluate the speech model on one benchmark file, with the original eval_speech.sh's arguments:
#
#   bash Uni_MoE/eval_speech.sh --data_path data/vqa.json --data_type vqa --output out/vqa.json [--flags]
#
# MODEL (default checkpoint/Uni-MoE-speech-e2) is a converted checkpoint. EP_SIZE=N shards the experts over
# N GPUs with DeepSpeed-MoE, as the 8e eval did (deepspeed --num_gpus=N ... --enable_deepspeed_moe True
# --eval_ep_size N). DTYPE sets --dtype, DRY_RUN=1 prints the command instead of running it (MODEL is
# checked first in both cases).
# Writes the predictions JSON, <output>_metrics.json, and prints a summary table.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
MODEL="${MODEL:-checkpoint/Uni-MoE-speech-e2}"
EP_SIZE="${EP_SIZE:-1}"
. "$root/scripts/launcher_checks.sh"
need_model_folder "$MODEL"
launcher=(python -m)
ep=()
if [ "$EP_SIZE" -gt 1 ]; then
  launcher=(deepspeed --num_gpus "$EP_SIZE" --master_port "${MASTER_PORT:-29502}" --module)
  ep=(--enable_deepspeed_moe True --eval_ep_size "$EP_SIZE")
fi
cmd=("${launcher[@]}" Uni_MoE.eval --model_path "$MODEL" ${DTYPE:+--dtype "$DTYPE"} "${ep[@]}" "$@")
echo "+ ${cmd[*]}"
[ "${DRY_RUN:-0}" = 1 ] || exec "${cmd[@]}"
