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
# (later flags override them). --model_name_or_path, --expert_dirs and --data_path are checked first; the
# hostfile goes to <--output_dir>/hostfile.<job id>. DRY_RUN=1 prints the hostfile and command; outside slurm
# set SLURM_JOB_NODELIST: a comma list whose items may hold one bracket range each ("gpu[01-02]",
# "gpu[01-03,07],cpu5"), expanded by scontrol when available, else here; anything else is refused.
set -euo pipefail
cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}"
. scripts/launcher_checks.sh
GPUS_PER_NODE="${GPUS_PER_NODE:-8}"
MASTER_PORT="${MASTER_PORT:-29500}"
[ -n "${SLURM_JOB_NODELIST:-}" ] || die "run under sbatch, or set SLURM_JOB_NODELIST"

# expand_nodelist LIST: one host per line ("gpu[01-03,07],cpu5" -> gpu01 gpu02 gpu03 gpu07 cpu5); status 1
# for a form it does not know (nested or several brackets in one name, letters in a range).
expand_nodelist() {
  local list="$1" item="" depth=0 i ch prefix ranges suffix part lo hi n
  local items=()
  for ((i = 0; i < ${#list}; i++)); do
    ch="${list:i:1}"
    case "$ch" in
      "[") depth=$((depth + 1)); item+="$ch" ;;
      "]") depth=$((depth - 1)); item+="$ch" ;;
      ",") if [ "$depth" -eq 0 ]; then items+=("$item"); item=""; else item+="$ch"; fi ;;
      *) item+="$ch" ;;
    esac
  done
  items+=("$item")
  local plain='^[A-Za-z0-9._-]+$' ranged='^([A-Za-z0-9._-]*)\[([0-9,-]+)\]([A-Za-z0-9._-]*)$'
  for item in "${items[@]}"; do
    if [[ "$item" =~ $plain ]]; then
      echo "$item"
    elif [[ "$item" =~ $ranged ]]; then
      prefix="${BASH_REMATCH[1]}" ranges="${BASH_REMATCH[2]}" suffix="${BASH_REMATCH[3]}"
      IFS=, read -r -a parts <<< "$ranges"
      for part in "${parts[@]}"; do
        [[ "$part" =~ ^([0-9]+)(-([0-9]+))?$ ]] || return 1
        lo="${BASH_REMATCH[1]}" hi="${BASH_REMATCH[3]:-${BASH_REMATCH[1]}}"
        [ $((10#$lo)) -le $((10#$hi)) ] || return 1
        for ((n = 10#$lo; n <= 10#$hi; n++)); do printf '%s%0*d%s\n' "$prefix" "${#lo}" "$n" "$suffix"; done
      done
    else
      return 1
    fi
  done
}

nodelist="$SLURM_JOB_NODELIST"
if command -v scontrol >/dev/null; then
  hosts=$(scontrol show hostnames "$nodelist")
else
  hosts=$(expand_nodelist "$nodelist") || die "cannot expand SLURM_JOB_NODELIST '$nodelist' without scontrol;" \
    "set it to a comma list of hosts"
fi

# the paths among the arguments: checked now, and the output folder holds the hostfile
output_dir="" model="" data=() experts=() flag=""
for arg in "$@"; do
  case "$arg" in
    --output_dir|--model_name_or_path|--data_path|--expert_dirs) flag="$arg"; continue ;;
    --*) flag=""; continue ;;
  esac
  case "$flag" in
    --output_dir) output_dir="$arg" ;;
    --model_name_or_path) model="$arg" ;;
    --data_path) data+=("$arg") ;;
    --expert_dirs) experts+=("$arg") ;;
  esac
done
[ -n "$output_dir" ] || die "pass --output_dir (the hostfile is written there)"
[ -n "$model" ] && need_model_folder "$model"
need_model_folder "${experts[@]}"
need_data_files "${data[@]}"

MASTER_ADDR=$(head -n 1 <<< "$hosts")
HOSTFILE="${HOSTFILE:-$output_dir/hostfile.${SLURM_JOB_ID:-local}}"
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
mkdir -p "$(dirname "$HOSTFILE")"
echo "$hostfile_text" > "$HOSTFILE"
exec "${cmd[@]}"
