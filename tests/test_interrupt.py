"""kill -9 during a training step or while a checkpoint is being written: no half-written ``checkpoint-N``
is left, and resuming picks the last complete checkpoint and reaches the same losses as an uninterrupted run.

The training process is this file run as a script: it patches UniMoETrainer to stop at a named point
(after the forward pass of a given step, or after the weights of a given checkpoint are written), touch
a marker file and sleep, so the test kills it at exactly that point.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from Uni_MoE.eval.distributed import free_port

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "data_sample" / "samples.json"


def train_argv(tiny: Path, out: Path, resume: str = "auto") -> list[str]:
    return ["--stage", "3", "--model_name_or_path", str(tiny), "--num_experts", "2", "--expert_lora_r", "4",
            "--data_path", str(SAMPLES), "--data_root", str(SAMPLES.parent), "--output_dir", str(out),
            "--per_device_train_batch_size", "2", "--max_steps", "4", "--save_steps", "2", "--logging_steps", "1",
            "--learning_rate", "1e-3", "--report_to", "none", "--disable_tqdm", "True", "--seed", "3",
            "--resume_from_checkpoint", resume]


def stop_at(point: str, step: int, marker: Path) -> None:
    """Patch the trainer to hang at ``point`` ("step" or "checkpoint") of ``step`` after touching ``marker``."""
    from Uni_MoE.train.trainer import UniMoETrainer

    def hang() -> None:
        marker.touch()
        while True:
            time.sleep(60)

    if point == "step":
        compute_loss = UniMoETrainer.compute_loss

        def compute_loss_then_hang(self, *args, **kwargs):
            loss = compute_loss(self, *args, **kwargs)
            if self.state.global_step + 1 == step:  # in step `step`: forward done, no backward or update yet
                hang()
            return loss

        UniMoETrainer.compute_loss = compute_loss_then_hang
    else:
        save_optimizer = UniMoETrainer._save_optimizer_and_scheduler

        def save_optimizer_after_hang(self, output_dir):
            if self.state.global_step == step:  # the weights are written, optimizer and state are not
                hang()
            return save_optimizer(self, output_dir)

        UniMoETrainer._save_optimizer_and_scheduler = save_optimizer_after_hang


def child_env(deepspeed: bool = False) -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    if deepspeed:  # a one-process DeepSpeed world on the CPU
        env.update(DS_ACCELERATOR="cpu", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", LOCAL_RANK="0",
                   WORLD_SIZE="1")
    return env


def kill_at(point: str, step: int, argv: list[str], tmp: Path, env: dict[str, str]) -> None:
    """Run training in a child process, wait until it hangs at the point, then SIGKILL it."""
    marker = tmp / f"at-{point}-{step}"
    log = tmp / f"at-{point}-{step}.log"
    with log.open("wb") as sink:
        child = subprocess.Popen([sys.executable, __file__, point, str(step), str(marker), *argv],
                                 cwd=REPO, env=env, stdout=sink, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 400
        while not marker.exists():
            if child.poll() is not None:
                raise AssertionError(f"training exited ({child.returncode}) before {point} {step}: "
                                     f"{log.read_text()[-3000:]}")
            assert time.monotonic() < deadline, f"training never reached {point} {step}"
            time.sleep(0.2)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    assert child.returncode == -signal.SIGKILL


def losses(checkpoint: Path) -> dict[int, float]:
    history = json.loads((checkpoint / "trainer_state.json").read_text())["log_history"]
    return {h["step"]: h["loss"] for h in history if "loss" in h}


def resume(tiny: Path, out: Path) -> dict[int, float]:
    from Uni_MoE.train.arguments import parse_args
    from Uni_MoE.train.train import run

    run(*parse_args(train_argv(tiny, out))[:3])
    return losses(out / "checkpoint-4")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    from Uni_MoE.checkpoint.tiny import build_tiny

    return build_tiny(tmp_path_factory.mktemp("tiny") / "tiny")


@pytest.fixture(scope="module")
def uninterrupted(tiny, tmp_path_factory) -> dict[int, float]:
    """Losses of the run nothing interrupts, same seed and data."""
    return resume(tiny, tmp_path_factory.mktemp("uninterrupted") / "out")


def assert_same_losses(got: dict[int, float], expected: dict[int, float]) -> None:
    assert sorted(got) == [1, 2, 3, 4]
    for step in (1, 2, 3, 4):
        assert got[step] == pytest.approx(expected[step], rel=1e-4), f"step {step}"


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_kill_during_a_step_resumes_from_the_last_checkpoint(tiny, uninterrupted, tmp_path) -> None:
    out = tmp_path / "out"
    kill_at("step", 3, train_argv(tiny, out), tmp_path, child_env())
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2"]
    assert_same_losses(resume(tiny, out), uninterrupted)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_kill_while_writing_a_checkpoint_leaves_no_half_checkpoint(tiny, uninterrupted, tmp_path) -> None:
    out = tmp_path / "out"
    kill_at("checkpoint", 4, train_argv(tiny, out), tmp_path, child_env())
    staged = out / ".saving" / "checkpoint-4"
    assert (staged / "model.safetensors").is_file() and not (staged / "optimizer.pt").exists()
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2"]
    assert_same_losses(resume(tiny, out), uninterrupted)
    assert not (out / ".saving").exists()


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_deepspeed_kill_while_writing_a_checkpoint_and_resume(tiny, tmp_path) -> None:
    """ZeRO-2 on the CPU: the staged rename holds for DeepSpeed's files, which pass the pickle check and
    load on resume (loss equality after resume is shown without DeepSpeed above)."""
    pytest.importorskip("deepspeed")
    out = tmp_path / "out"
    zero2 = ["--deepspeed", str(REPO / "scripts" / "zero2.json"), "--ddp_backend", "gloo"]
    kill_at("checkpoint", 4, train_argv(tiny, out) + zero2, tmp_path, child_env(deepspeed=True))
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2"]
    assert (out / "checkpoint-2" / "global_step2").is_dir()
    done = subprocess.run([sys.executable, "-m", "Uni_MoE.train", *train_argv(tiny, out), *zero2], cwd=REPO,
                          env=child_env(deepspeed=True), capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"resuming from {out / 'checkpoint-2'}" in done.stderr
    resumed, before = losses(out / "checkpoint-4"), losses(out / "checkpoint-2")
    assert sorted(resumed) == [1, 2, 3, 4] and all(resumed[s] == before[s] for s in (1, 2))


@pytest.mark.timeout(60)
def test_resume_skips_a_checkpoint_without_trainer_state(tmp_path) -> None:
    from Uni_MoE.train.trainer import last_complete_checkpoint

    for step in (2, 4, 6):
        (tmp_path / f"checkpoint-{step}").mkdir()
    for step in (2, 4):
        (tmp_path / f"checkpoint-{step}" / "trainer_state.json").write_text("{}")
    (tmp_path / "checkpoint-10.old").mkdir()
    assert last_complete_checkpoint(tmp_path) == str(tmp_path / "checkpoint-4")
    assert last_complete_checkpoint(tmp_path / "absent") is None


@pytest.mark.timeout(60)
def test_checkpoint_is_renamed_into_place_with_its_state(tmp_path, make_config) -> None:
    """In-process save: the folder appears complete under its final name, the best-checkpoint path in its
    state is the final one, and saving the same step again swaps the folder without leftovers."""
    from Uni_MoE.model.uni_moe import UniMoEForCausalLM
    from Uni_MoE.train.arguments import TrainingArguments
    from Uni_MoE.train.trainer import UniMoETrainer

    out = tmp_path / "out"
    args = TrainingArguments(output_dir=str(out), report_to="none", save_strategy="steps", save_steps=3)
    trainer = UniMoETrainer(model=UniMoEForCausalLM(make_config()), args=args, train_dataset=[{}])
    trainer.create_optimizer_and_scheduler(num_training_steps=3)
    (out / ".saving" / "checkpoint-1").mkdir(parents=True)  # left by a killed run
    trainer.state.global_step = trainer.state.best_global_step = 3
    trainer._save_checkpoint(trainer.model, None)
    final = out / "checkpoint-3"
    assert trainer.state.best_model_checkpoint == str(final)
    assert json.loads((final / "trainer_state.json").read_text())["best_model_checkpoint"] == str(final)
    assert {"model.safetensors", "optimizer.pt", "rng_state.pth"} <= {p.name for p in final.iterdir()}
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-3"]
    (final / "stale").write_text("from the first save")
    trainer._save_checkpoint(trainer.model, None)
    assert not (final / "stale").exists() and (final / "trainer_state.json").is_file()
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-3"]


if __name__ == "__main__":
    from Uni_MoE.train.train import main

    stop_at(sys.argv[1], int(sys.argv[2]), Path(sys.argv[3]))
    main(sys.argv[4:])
