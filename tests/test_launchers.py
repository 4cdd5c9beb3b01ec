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


@pytest.fixture
def inputs(tmp_path):
    """A model folder and two data files, as absolute paths (the launchers check that they exist)."""
    (tmp_path / "model").mkdir()
    for name in ("a.json", "b.json"):
        (tmp_path / name).write_text("[]")
    return str(tmp_path / "model"), str(tmp_path / "a.json"), str(tmp_path / "b.json")


def refusal(script: str, *args: str, **env: str) -> str:
    """The one line a launcher exits with (status 2) before printing or running anything."""
    done = subprocess.run(["bash", str(ROOT / script), *args], env={"PATH": "/usr/bin:/bin", "DRY_RUN": "1", **env},
                          capture_output=True, text=True)
    assert done.returncode == 2 and done.stdout == "", (done.stdout, done.stderr)
    assert done.stderr.count("\n") == 1
    return done.stderr.strip()


def test_data_parallel_launcher_sets_gpus_and_interval_moe(inputs):
    model, a, b = inputs
    line = dry_run("Uni_MoE/finetune_speech_dp.sh", *CPU, MODEL=model, DATA=f"{a} {b}", NUM_GPUS="4").strip()
    assert line.startswith("+ deepspeed --num_gpus 4 ")
    model_args, data_args, train_args, _ = parse_args(train_argv(line))
    assert model_args.moe_layers == "even" and data_args.data_path == [a, b]
    assert train_args.per_device_train_batch_size == 2 and train_args.gradient_accumulation_steps == 2
    assert train_args.output_dir == "output/Uni-MoE-speech-v1.5"


def test_slurm_launcher_writes_hostfile_from_nodelist(inputs, tmp_path):
    model, a, _ = inputs
    out = dry_run("scripts/train_slurm.sh", "--stage", "3", "--model_name_or_path", model, "--data_path",
                  a, "--output_dir", str(tmp_path / "o"), *CPU, SLURM_JOB_NODELIST="gpu01,gpu02", GPUS_PER_NODE="4",
                  SLURM_JOB_ID="77")
    lines = out.splitlines()
    assert lines[:3] == [f"# {tmp_path}/o/hostfile.77", "gpu01 slots=4", "gpu02 slots=4"]
    assert f"--hostfile {tmp_path}/o/hostfile.77 --master_addr gpu01 " in lines[3]
    model_args, _, train_args, _ = parse_args(train_argv(lines[3]))
    assert model_args.stage == 3 and train_args.gradient_accumulation_steps == 4
    assert not (tmp_path / "o").exists() and not (ROOT / "hostfile.77").exists()  # a dry run writes nothing


@pytest.mark.parametrize("nodelist, hosts", [
    ("gpu[01-02]", ["gpu01", "gpu02"]),
    ("gpu[01-03,07]", ["gpu01", "gpu02", "gpu03", "gpu07"]),
    ("gpu[08-10],cpu5,node[1-2]-ib", ["gpu08", "gpu09", "gpu10", "cpu5", "node1-ib", "node2-ib"]),
    ("a.example.org", ["a.example.org"]),
])
def test_slurm_launcher_expands_bracket_ranges_without_scontrol(inputs, tmp_path, nodelist, hosts):
    model, a, _ = inputs
    lines = dry_run("scripts/train_slurm.sh", "--model_name_or_path", model, "--data_path", a, "--output_dir",
                    str(tmp_path / "o"), SLURM_JOB_NODELIST=nodelist, GPUS_PER_NODE="2").splitlines()
    assert lines[1:1 + len(hosts)] == [f"{h} slots=2" for h in hosts]
    assert f"--master_addr {hosts[0]} " in lines[1 + len(hosts)]


@pytest.mark.parametrize("nodelist", ["gpu[a-b]", "gpu[01-02]x[1-2]", "gpu[3-1]", "a,,b", "gpu[01-02"])
def test_slurm_launcher_refuses_a_nodelist_it_cannot_expand(inputs, tmp_path, nodelist):
    model, a, _ = inputs
    line = refusal("scripts/train_slurm.sh", "--model_name_or_path", model, "--data_path", a, "--output_dir",
                   str(tmp_path / "o"), SLURM_JOB_NODELIST=nodelist)
    assert line == f"train_slurm.sh: cannot expand SLURM_JOB_NODELIST '{nodelist}' without scontrol; set it to " \
                   "a comma list of hosts"


def test_launchers_check_model_and_data_before_a_dry_run(inputs, tmp_path):
    model, a, _ = inputs
    gone = str(tmp_path / "gone")
    for script in ("finetune_speech.sh", "finetune_audio.sh", "finetune_speech_dp.sh"):
        assert refusal(f"Uni_MoE/{script}", MODEL=gone, DATA=a) == f"{script}: no such model folder: {gone}"
        assert refusal(f"Uni_MoE/{script}", MODEL=model, DATA=f"{a} {gone}.json") \
            == f"{script}: no such data file: {gone}.json"
        assert refusal(f"Uni_MoE/{script}", MODEL=model, DATA=a, EXPERTS=f"{model} {gone}") \
            == f"{script}: no such model folder: {gone}"
        assert refusal(f"Uni_MoE/{script}", MODEL=model) == f"{script}: set DATA to the training JSON file(s)"
    for script in ("eval_speech.sh", "eval_audio.sh", "inference_speech.sh", "inference_audio.sh"):
        assert refusal(f"Uni_MoE/{script}", MODEL=gone) == f"{script}: no such model folder: {gone}"
    assert refusal("scripts/train_slurm.sh", "--model_name_or_path", gone, "--output_dir", "o",
                   SLURM_JOB_NODELIST="gpu01") == f"train_slurm.sh: no such model folder: {gone}"
    assert refusal("scripts/train_slurm.sh", "--model_name_or_path", model, "--data_path", a, f"{gone}.json",
                   "--output_dir", "o", SLURM_JOB_NODELIST="gpu01") == f"train_slurm.sh: no such data file: {gone}.json"
    assert refusal("scripts/train_slurm.sh", "--model_name_or_path", model, SLURM_JOB_NODELIST="gpu01") \
        == "train_slurm.sh: pass --output_dir (the hostfile is written there)"


def test_slurm_launcher_needs_a_nodelist():
    assert refusal("scripts/train_slurm.sh") == "train_slurm.sh: run under sbatch, or set SLURM_JOB_NODELIST"


def test_quickstart_dry_run_runs_three_stages_then_evaluates(tmp_path):
    out = dry_run("scripts/quickstart.sh", OUT=str(tmp_path / "qs"), TINY=str(tmp_path / "tiny"),
                  GROUPS_SPEC="vision:image_colour audio:audio_class")
    stages = [line.split("--stage ")[1].split()[0] for line in out.splitlines() if " Uni_MoE.train " in line]
    assert stages == ["1", "2", "2", "3"]
    stage3 = next(line for line in out.splitlines() if "--stage 3" in line)
    assert f"{tmp_path}/qs/stage2_vision {tmp_path}/qs/stage2_audio" in stage3
    assert out.splitlines()[-2].startswith("+ python -m Uni_MoE.train.quick_eval")
