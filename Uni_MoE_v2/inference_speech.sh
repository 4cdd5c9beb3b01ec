#!/usr/bin/env bash
# Chat with Uni-MoE v2 (8e) with its experts sharded over EP_SIZE GPUs (default 2), as the original's
# Uni_MoE_v2/inference_speech.sh (deepspeed --num_gpus=2 inference_new.py --enable_deepspeed_moe True
# --eval_ep_size 2 ...):
#
#   MODEL=checkpoint/uni-moe-v2-e2 bash Uni_MoE_v2/inference_speech.sh --image cat.png [--speech q.wav] \
#       [--question "..."] [--model_base ... --mlp_dir ...: accepted with EP_SIZE > 1, not needed]
#
# MODEL is a converted release (see Uni_MoE_v2/eval_speech.sh). EP_SIZE=1 chats on one GPU without
# DeepSpeed (python -m Uni_MoE.serve.cli). DTYPE sets --dtype, MASTER_PORT the launcher's port, DRY_RUN=1
# prints the command instead of running it.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
cd "$root"
export UNI_MOE_LAUNCHER="${UNI_MOE_LAUNCHER:-Uni_MoE_v2/inference_speech.sh}"
. scripts/launcher_checks.sh
EP_SIZE="${EP_SIZE:-2}"
MODEL="${MODEL:-checkpoint/uni-moe-v2-e2}"
need_model_folder "$MODEL"
if [ "$EP_SIZE" -gt 1 ]; then
  cmd=(deepspeed --num_gpus "$EP_SIZE" --master_port "${MASTER_PORT:-29503}" Uni_MoE_v2/chat_expert_parallel.py
    --enable_deepspeed_moe True --eval_ep_size "$EP_SIZE")
else
  cmd=(python -m Uni_MoE.serve.cli)
fi
cmd+=(--model_path "$MODEL" ${DTYPE:+--dtype "$DTYPE"} "$@")
echo "+ ${cmd[*]}" >&2
[ "${DRY_RUN:-0}" = 1 ] || exec "${cmd[@]}"
