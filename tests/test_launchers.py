"""Shell and slurm launchers: valid bash, and their dry runs print commands that parse into the intended
settings (later flags override the base script's)."""

import subprocess
from pathlib import Path

import pytest

from Uni_MoE.train.arguments import parse_args

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted([*ROOT.glob("Uni_MoE/*.sh"), *ROOT.glob("scripts/*.sh")])
CPU = ["--bf16", "False", "--tf32", "False"]


def dry_run(script: str, *args: str, **env: str) -> str:
    done = subprocess.run(["bash", str(ROOT / script), *args], env={"PATH": "/usr/bin:/bin", "DRY_RUN": "1", **env},
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return done.stdout


def train_argv(line: str) -> list[str]:
    return line.split(" Uni_MoE.train ", 1)[1].split()


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_bash_syntax(script):
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0


def test_data_parallel_launcher_sets_gpus_and_interval_moe():
    line = dry_run("Uni_MoE/finetune_speech_dp.sh", *CPU, DATA="a.json b.json", NUM_GPUS="4").strip()
    assert line.startswith("+ deepspeed --num_gpus 4 ")
    model_args, data_args, train_args, _ = parse_args(train_argv(line))
    assert model_args.moe_layers == "even" and data_args.data_path == ["a.json", "b.json"]
    assert train_args.per_device_train_batch_size == 2 and train_args.gradient_accumulation_steps == 2
    assert train_args.output_dir == "output/Uni-MoE-speech-v1.5"


def test_slurm_launcher_writes_hostfile_from_nodelist():
    out = dry_run("scripts/train_slurm.sh", "--stage", "3", "--model_name_or_path", "base", "--data_path",
                  "t.json", "--output_dir", "o", *CPU, SLURM_JOB_NODELIST="gpu01,gpu02", GPUS_PER_NODE="4",
                  SLURM_JOB_ID="77")
    lines = out.splitlines()
    assert lines[:3] == ["# hostfile.77", "gpu01 slots=4", "gpu02 slots=4"]
    assert "--hostfile hostfile.77 --master_addr gpu01 " in lines[3]
    model_args, _, train_args, _ = parse_args(train_argv(lines[3]))
    assert model_args.stage == 3 and train_args.gradient_accumulation_steps == 4
    assert not (ROOT / "hostfile.77").exists()


def test_slurm_launcher_needs_a_nodelist():
    done = subprocess.run(["bash", str(ROOT / "scripts/train_slurm.sh")], env={"PATH": "/usr/bin:/bin"},
                          capture_output=True, text=True)
    assert done.returncode != 0 and "SLURM_JOB_NODELIST" in done.stderr


def test_quickstart_dry_run_runs_three_stages_then_evaluates(tmp_path):
    out = dry_run("scripts/quickstart.sh", OUT=str(tmp_path / "qs"), TINY=str(tmp_path / "tiny"),
                  GROUPS_SPEC="vision:image_colour audio:audio_class")
    stages = [line.split("--stage ")[1].split()[0] for line in out.splitlines() if " Uni_MoE.train " in line]
    assert stages == ["1", "2", "2", "3"]
    stage3 = next(line for line in out.splitlines() if "--stage 3" in line)
    assert f"{tmp_path}/qs/stage2_vision {tmp_path}/qs/stage2_audio" in stage3
    assert out.splitlines()[-2].startswith("+ python -m Uni_MoE.train.quick_eval")
