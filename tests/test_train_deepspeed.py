"""DeepSpeed ZeRO-2 runs on the CPU (gloo, world size 1) train a few steps and export a loadable model: with
the local MoE backend, and with DeepSpeed-MoE experts (``--enable_deepspeed_moe``, the v2 launch flags)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import torchrun, without_rank_vars

from Uni_MoE.checkpoint.tiny import build_tiny
from Uni_MoE.eval.distributed import free_port
from Uni_MoE.model.uni_moe import UniMoEForCausalLM

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "data_sample" / "samples.json"


def _train_stage3(tmp_path: Path, *extra: str, processes: int = 1, experts: int = 2) -> Path:
    """Three ZeRO-2 steps of stage 3 from the tiny model on ``processes`` gloo ranks; returns the output folder."""
    pytest.importorskip("deepspeed")
    tiny = build_tiny(tmp_path / "tiny")
    out = tmp_path / "out"
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
           "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "HF_HUB_OFFLINE": "1",
           "TORCH_EXTENSIONS_DIR": str(tmp_path / "extensions")}
    launch = [sys.executable, "-m", "Uni_MoE.train"]
    if processes > 1:
        launch = [*torchrun(processes), "-m", "Uni_MoE.train", "--use_cpu", "True"]
        env = without_rank_vars(env)
    cmd = [*launch, "--stage", "3", "--model_name_or_path", str(tiny), "--num_experts", str(experts), "--data_path", str(SAMPLES), "--data_root", str(SAMPLES.parent),
           "--output_dir", str(out), "--deepspeed", str(ROOT / "scripts" / "zero2.json"), "--ddp_backend", "gloo",
           "--per_device_train_batch_size", "2", "--max_steps", "3", "--save_steps", "3", "--logging_steps", "1",
           "--learning_rate", "1e-3", "--report_to", "none", "--disable_tqdm", "True", *extra]
    done = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=880)
    assert done.returncode == 0, done.stderr[-3000:]
    assert not (tmp_path / "extensions").exists()  # DeepSpeed's CPU all-reduce op is not compiled
    history = json.loads((out / "checkpoint-3" / "trainer_state.json").read_text())["log_history"]
    assert [h["step"] for h in history if "loss" in h] == [1, 2, 3]
    return out


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_zero2_on_cpu_trains_and_exports(tmp_path):
    out = _train_stage3(tmp_path)
    assert UniMoEForCausalLM.from_pretrained(out).moe_mlps()


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_zero2_with_deepspeed_moe_experts_trains_and_exports_the_local_layout(tmp_path):
    out = _train_stage3(tmp_path, "--enable_deepspeed_moe", "True", "--ep_size", "1")
    experts = sorted(p.name for p in (out / "checkpoint-3" / "global_step3").glob("layer_*_expert_*"))
    assert "layer_0_expert_1_mp_rank_00_model_states.pt" in experts  # DeepSpeed's own expert files
    model = UniMoEForCausalLM.from_pretrained(out)  # exported for the local backend
    assert model.config.moe_backend == "local" and model.config.num_experts == 2
    lora_b = torch.stack([layer.experts.up_lora_B for layer in model.moe_mlps()])
    assert lora_b.abs().max() > 0  # zero-initialised, so non-zero only if the expert LoRA trained


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_zero2_expert_parallel_over_two_processes_exports_every_expert(tmp_path):
    """ep_size 2 on two gloo ranks, two of four experts each: both ranks' experts train, and the export gathers
    them all into the local layout; ``--moe_recompute`` (gate/up recomputed in backward) trains alike. (Three
    steps of the tiny model can leave a rarely routed expert without a token, so the check is per rank, not per
    expert.)"""
    out = _train_stage3(tmp_path, "--enable_deepspeed_moe", "True", "--ep_size", "2", "--moe_recompute", "True",
                        processes=2, experts=4)
    files = {p.name for p in (out / "checkpoint-3" / "global_step3").glob("layer_0_expert_*")}
    assert files == {f"layer_0_expert_{e}_mp_rank_00_model_states.pt" for e in range(4)}
    model = UniMoEForCausalLM.from_pretrained(out)
    for layer in model.moe_mlps():
        moved = layer.experts.up_lora_B.abs().amax(dim=(1, 2)) > 0  # zero-initialised: non-zero once trained
        assert moved[:2].any() and moved[2:].any()  # rank 0's experts 0-1 and rank 1's experts 2-3
