#!/usr/bin/env bash
#SBATCH --job-name=uni-moe
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --time=48:00:00
#SBATCH --output=%x-%j.out
# Multi-node training under slurm: one DeepSpeed launcher on the first node starts GPUS_PER_NODE ranks on
# every node of the allocation (pdsh/ssh between nodes, as DeepSpeed's multi-node launcher does).
#
#   sbatch --nodes 4 scripts/train_slurm.sh --stage 3 --model_name_or_path BASE --expert_dirs E1 E2 E3 \
#       --data_path train.json --data_root DATA --output_dir OUT [--flags of Uni_MoE.train]
# Defaults from the 8e release: ZeRO-2, bf16, batch 2 x accumulation 4 per GPU, modality-grouped batches
# (later flags override them). DRY_RUN=1 prints the hostfile and command; outside slurm set
# SLURM_JOB_NODELIST (e.g. "gpu[01-02]"; expanded with scontrol when available, else a comma list).
set -euo pipefail
cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}"
GPUS_PER_NODE="${GPUS_PER_NODE:-8}"
MASTER_PORT="${MASTER_PORT:-29500}"
nodelist="${SLURM_JOB_NODELIST:?run under sbatch, or set SLURM_JOB_NODELIST}"
if command -v scontrol >/dev/null; then
  hosts=$(scontrol show hostnames "$nodelist")
else
  hosts=$(tr ',' '\n' <<< "$nodelist")
fi
MASTER_ADDR=$(head -n 1 <<< "$hosts")
HOSTFILE="${HOSTFILE:-hostfile.${SLURM_JOB_ID:-local}}"
hostfile_text=$(while read -r host; do echo "$host slots=$GPUS_PER_NODE"; done <<< "$hosts")
export MASTER_ADDR MASTER_PORT
cmd=(deepspeed --hostfile "$HOSTFILE" --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT"
  --module Uni_MoE.train --deepspeed "${DEEPSPEED_CONFIG:-scripts/zero2.json}" --version v1 --bf16 True
  --tf32 True --per_device_train_batch_size 2 --gradient_accumulation_steps 4 --learning_rate 4e-5
  --weight_decay 0. --warmup_ratio 0.03 --lr_scheduler_type cosine --gradient_checkpointing True
  --group_by_modality_length True --dataloader_num_workers 4 --save_steps 1000 "$@")
if [ "${DRY_RUN:-0}" = 1 ]; then
  echo "# $HOSTFILE"; echo "$hostfile_text"; echo "+ ${cmd[*]}"
  exit 0
fi
echo "$hostfile_text" > "$HOSTFILE"
exec "${cmd[@]}"
