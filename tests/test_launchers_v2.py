"""Uni_MoE_v2 launchers: valid bash; their dry runs print commands that parse into the v2 settings (8 experts,
DeepSpeed-MoE over the expert-parallel size, the original argument names); the expert-parallel chat answers."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import load_file, torchrun, without_rank_vars

from Uni_MoE.eval.__main__ import build_parser as eval_parser
from Uni_MoE.train.arguments import parse_args

ROOT = Path(__file__).resolve().parents[1]
LAUNCHERS = sorted([*ROOT.glob("Uni_MoE_v2/*.sh"), *ROOT.glob("Uni_MoE_v2/*.slurm")])


def dry_run(script: str, *args: str, **env: str) -> list[str]:
    """The script's DRY_RUN output lines (stdout then stderr)."""
    done = subprocess.run(["bash", str(ROOT / script), *args], env={"PATH": "/usr/bin:/bin", "DRY_RUN": "1", **env},
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return (done.stdout + done.stderr).splitlines()


def after(line: str, marker: str) -> list[str]:
    """The arguments following ``marker`` in a printed ``+ command`` line."""
    return shlex.split(line.split(f" {marker} ", 1)[1])


def chat_module():
    return load_file("chat_expert_parallel", ROOT / "Uni_MoE_v2" / "chat_expert_parallel.py")


def test_there_are_three_launchers():
    assert [p.name for p in LAUNCHERS] == ["eval_speech.sh", "inference_speech.sh", "train_deepspeed_8moe.slurm"]


@pytest.mark.parametrize("script", LAUNCHERS, ids=lambda p: p.name)
def test_bash_syntax(script):
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0


@pytest.fixture
def folders(tmp_path):
    """Existing model, experts and data paths (the launchers check them)."""
    for name in ("dense", "Experts", "model"):
        (tmp_path / name).mkdir()
    for name in ("a.json", "b.json"):
        (tmp_path / name).write_text("[]")
    return tmp_path


def test_slurm_training_shards_eight_experts_over_the_nodes(folders):
    t = folders
    lines = dry_run("Uni_MoE_v2/train_deepspeed_8moe.slurm", "--bf16", "False", "--tf32", "False",
                    MODEL=f"{t}/dense", DATA=f"{t}/a.json {t}/b.json", MLP_DIR=f"{t}/Experts", OUTPUT=f"{t}/out",
                    SLURM_JOB_NODELIST="gpu01,gpu02", SLURM_JOB_ID="9", EP_SIZE="4")
    assert lines[:3] == [f"# {t}/out/hostfile.9", "gpu01 slots=8", "gpu02 slots=8"]
    assert lines[3].startswith(f"+ deepspeed --hostfile {t}/out/hostfile.9 --master_addr gpu01 ")
    model_args, data_args, train_args, _ = parse_args(after(lines[3], "Uni_MoE.train"))
    assert (model_args.stage, model_args.enable_deepspeed_moe, model_args.ep_size) == (3, True, 4)
    assert (model_args.mlp_dir, model_args.num_experts, model_args.expert_lora_r) == (f"{t}/Experts", 8, 8)
    assert model_args.aux_balance_loss_coef == 0.01 and model_args.expert_dirs == []
    assert data_args.data_path == [f"{t}/a.json", f"{t}/b.json"] and train_args.output_dir == f"{t}/out"
    assert (train_args.per_device_train_batch_size, train_args.gradient_accumulation_steps) == (2, 4)
    assert train_args.num_train_epochs == 2 and train_args.group_by_modality_length and not train_args.bf16


def test_slurm_training_needs_expert_weights():
    done = subprocess.run(["bash", str(ROOT / "Uni_MoE_v2/train_deepspeed_8moe.slurm")],
                          env={"PATH": "/usr/bin:/bin", "DRY_RUN": "1", "MODEL": "m", "DATA": "d.json",
                               "SLURM_JOB_NODELIST": "gpu01"}, capture_output=True, text=True)
    assert done.returncode == 2
    assert done.stderr == "train_deepspeed_8moe.slurm: set MLP_DIR (the original v2 Experts folder) or EXPERTS " \
                          "(stage-2 output folders)\n"


def test_eval_runs_expert_parallel_with_the_original_arguments(folders):
    model = str(folders / "model")
    args = ["--data_path", "vqa.json", "--data_type", "vqa", "--output_dir", "o.json", "--model_base", "base",
            "--mlp_dir", "Experts", "--version", "v1"]
    (line,) = dry_run("Uni_MoE_v2/eval_speech.sh", *args, MODEL=model)
    assert line.startswith("+ deepspeed --num_gpus 2 ")
    parsed = eval_parser().parse_args(after(line, "Uni_MoE.eval"))
    assert (parsed.enable_deepspeed_moe, parsed.eval_ep_size) == (True, 2)
    assert (parsed.model_path, parsed.output, parsed.mlp_dir) == (model, "o.json", "Experts")
    (single,) = dry_run("Uni_MoE_v2/eval_speech.sh", *args, EP_SIZE="1", MODEL=model)
    assert single.startswith(f"+ python -m Uni_MoE.eval --model_path {model} ") and "--eval_ep_size" not in single


def test_v2_launchers_name_a_missing_model_folder_in_one_line(folders):
    for script in ("eval_speech.sh", "inference_speech.sh"):
        done = subprocess.run(["bash", str(ROOT / "Uni_MoE_v2" / script)], env={"PATH": "/usr/bin:/bin",
                              "MODEL": str(folders / "gone")}, capture_output=True, text=True)
        assert (done.returncode, done.stdout) == (2, "")
        assert done.stderr == f"Uni_MoE_v2/{script}: no such model folder: {folders / 'gone'}\n"


def test_inference_chats_expert_parallel_or_on_one_gpu(folders):
    model = str(folders / "model")
    (line,) = dry_run("Uni_MoE_v2/inference_speech.sh", "--image", "cat.png", "--mlp_dir", "Experts", EP_SIZE="4",
                      MODEL=model)
    assert line.startswith("+ deepspeed --num_gpus 4 ")
    parsed = chat_module().parse_args(after(line, "Uni_MoE_v2/chat_expert_parallel.py"))
    assert (parsed.eval_ep_size, parsed.image, parsed.mlp_dir) == (4, "cat.png", "Experts")
    (single,) = dry_run("Uni_MoE_v2/inference_speech.sh", "--question", "hi", EP_SIZE="1", MODEL=model)
    assert single.startswith(f"+ python -m Uni_MoE.serve.cli --model_path {model} ")


def tiny_moe_checkpoint(folder: Path) -> Path:
    """The tiny model with 4 random experts in every layer, saved with its tokenizer."""
    import torch

    from Uni_MoE.checkpoint.tiny import build_tiny
    from Uni_MoE.data.tokenizer import load_tokenizer
    from Uni_MoE.model.uni_moe import UniMoEForCausalLM

    tiny = build_tiny(folder / "tiny")
    model = UniMoEForCausalLM.from_pretrained(tiny, moe_layers="all", num_experts=4, expert_lora_r=2)
    torch.manual_seed(0)
    with torch.no_grad():
        for layer in model.moe_mlps():
            layer.router.weight.normal_(0.0, 0.02)
            layer.experts.reset_parameters()
    model.save_pretrained(folder / "moe")
    load_tokenizer(tiny).save_pretrained(folder / "moe")
    return folder / "moe"


@pytest.mark.slow
def test_expert_parallel_chat_over_two_processes_answers_as_one_process(tmp_path):
    """Two gloo ranks, two experts each: rank 0 reads the questions, both decode in step, and the sampled
    reply equals the single-process CLI's on the same seed; a greedy float32 --question reply too."""
    pytest.importorskip("deepspeed")
    model = tiny_moe_checkpoint(tmp_path)
    env = without_rank_vars()
    env.update(DS_ACCELERATOR="cpu", HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    decoding = ["--max_new_tokens", "8", "--temperature", "1.0", "--seed", "3"]
    cmd = [*torchrun(2), str(ROOT / "Uni_MoE_v2" / "chat_expert_parallel.py"), "--model_path", str(model),
           "--eval_ep_size", "2", *decoding]
    done = subprocess.run(cmd, env=env, cwd=ROOT, input="What is this?\nAgain?\n\n", capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    replies = [line.split("ASSISTANT: ", 1)[1] for line in done.stdout.splitlines() if "ASSISTANT: " in line]
    assert len(replies) == 2
    single = subprocess.run([sys.executable, "-m", "Uni_MoE.serve.cli", "--model_path", str(model), "--question",
                             "What is this?", *decoding], env=env, cwd=ROOT, capture_output=True, text=True,
                            timeout=600)
    assert single.returncode == 0, single.stderr[-3000:]
    assert replies[0] == single.stdout.strip() != ""
    greedy = ["--question", "Describe it.", "--max_new_tokens", "12", "--temperature", "0", "--dtype", "float32"]
    sharded = subprocess.run([*cmd[:-len(decoding)], *greedy], env=env, cwd=ROOT, capture_output=True, text=True,
                             timeout=600)
    assert sharded.returncode == 0, sharded.stderr[-3000:]
    alone = subprocess.run([sys.executable, "-m", "Uni_MoE.serve.cli", "--model_path", str(model), *greedy], env=env,
                           cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert alone.returncode == 0, alone.stderr[-3000:]
    reply = sharded.stdout.strip().splitlines()[-1]  # after DeepSpeed's own start-up lines
    assert reply == alone.stdout.strip() != ""  # greedy float32: the same tokens


def test_expert_parallel_chat_names_a_missing_model_folder_before_starting_ranks(tmp_path, monkeypatch):
    module = chat_module()
    monkeypatch.setattr(module, "init_expert_parallel", lambda size: pytest.fail("ranks started"))
    missing = tmp_path / "no-model"
    with pytest.raises(SystemExit) as stop:
        module.main(["--model_path", str(missing), "--question", "hi"])
    assert str(stop.value) == f"no such model folder: {missing}"
