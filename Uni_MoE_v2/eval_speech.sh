#!/usr/bin/env bash
# Evaluate Uni-MoE v2 (8e) with its experts sharded over EP_SIZE GPUs (default 2), as the original's
# Uni_MoE_v2/eval_speech.sh (deepspeed --num_gpus=2 ... --enable_deepspeed_moe True --eval_ep_size 2):
#
#   MODEL=checkpoint/uni-moe-v2-e2 bash Uni_MoE_v2/eval_speech.sh --data_path data/vqa.json --data_type vqa \
#       --output_dir out/vqa.json [--model_base ... --mlp_dir ... --version v1: accepted, not needed]
#
# MODEL is a converted release (python -m Uni_MoE.checkpoint.convert_original --base Uni-MoE-speech-base
# --finetuned Uni-MoE-v2-e2 --experts Uni-MoE-v2-Experts ... --out checkpoint/uni-moe-v2-e2): base, expert
# files and encoders in one folder. EP_SIZE=1 runs on one GPU without DeepSpeed. DTYPE sets --dtype,
# MASTER_PORT the launcher's port, DRY_RUN=1 prints the command instead of running it.
set -euo pipefail
cd "$(dirname "$0")/.."
export UNI_MOE_LAUNCHER="${UNI_MOE_LAUNCHER:-Uni_MoE_v2/eval_speech.sh}"
MODEL="${MODEL:-checkpoint/uni-moe-v2-e2}" EP_SIZE="${EP_SIZE:-2}" exec bash Uni_MoE/eval_speech.sh "$@"
