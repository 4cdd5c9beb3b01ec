"""The benchmark scripts' CPU smoke modes run every path and print their markdown tables."""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import interpreter_env, load_file

ROOT = Path(__file__).resolve().parents[1]


def run_smoke(script: str, tmp_path: Path, *extra: str) -> tuple[str, str]:
    out = tmp_path / "table.md"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), "--smoke", "--out", str(out), *extra],
        capture_output=True, text=True, cwd=ROOT, timeout=300, env=env,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout, out.read_text()


@pytest.mark.slow
def test_moe_layer_smoke(tmp_path: Path) -> None:
    stdout, table = run_smoke("moe_layer.py", tmp_path)
    for row in ("| mlp (k×dense) | 4 | 8 | 64 |", "| shared (1×dense) | 4 | 8 | 64 |"):
        assert row in table and row in stdout
    rows = [line for line in table.splitlines() if line.startswith(("| mlp", "| shared"))]
    cells = [[cell.strip() for cell in line.strip("|").split("|")] for line in rows]
    errors = [float(row[14]) for row in cells]
    assert errors and max(errors) < 1e-5  # fused and loop agree in float32
    assert all(row[15] == "— / —" for row in cells)  # no GPU clock to read on the CPU


def test_shared_wgrad_smoke_times_both_ways_on_equal_gradients(tmp_path: Path) -> None:
    stdout, table = run_smoke("shared_wgrad.py", tmp_path)
    row = next(line for line in table.splitlines() if line.startswith("| 64 |"))
    cells = [cell.strip(" *") for cell in row.strip("|").split("|")]
    dense, kernel, rows, ratio = (float(c) for c in cells[3:7])
    assert min(dense, kernel, rows) > 0 and abs(ratio / (rows / kernel) - 1) < 0.03
    assert float(cells[-1]) < 1e-5 and row in stdout  # float32: the two ways give the same gradients


def test_speech_encoder_smoke_times_both_paths_on_equal_outputs(tmp_path: Path) -> None:
    stdout, table = run_smoke("speech_encoder.py", tmp_path)
    row = next(line for line in table.splitlines() if line.startswith("| ") and "**" in line)
    base_ms, ours_ms, ratio, difference = (float(cell.strip(" *")) for cell in row.strip("|").split("|"))
    assert base_ms > 0 and ours_ms > 0 and abs(ratio / (ours_ms / base_ms) - 1) < 0.03  # ms rounded to 0.01
    assert difference < 1e-5  # float32: the model's attention and layout compute transformers' function
    assert row in stdout


def test_expert_gemm_smoke_times_three_ways_on_equal_products(tmp_path: Path) -> None:
    stdout, table = run_smoke("expert_gemm.py", tmp_path)
    rows = [line for line in table.splitlines() if line.startswith("| 64 | 4 |")]
    assert len(rows) == 4 and all(row in stdout for row in rows)
    for row in rows:
        grouped, loop, dense, loop_ratio, dense_ratio, difference = (float(c.strip(" *"))
                                                                     for c in row.strip("|").split("|")[3:])
        assert min(grouped, loop, dense) > 0
        for ratio, num, den in ((loop_ratio, loop, grouped), (dense_ratio, grouped, dense)):
            # the times are rounded to 3 decimals, the ratio is of the unrounded times
            assert (num - 5e-4) / (den + 5e-4) - 1e-3 <= ratio <= (num + 5e-4) / (den - 5e-4) + 1e-3
        assert difference < 1e-5  # float32: one GEMM per expert computes the grouped product


def test_factor_transpose_smoke_times_both_copies_of_equal_results(tmp_path: Path) -> None:
    stdout, table = run_smoke("factor_transpose.py", tmp_path)
    rows = [line for line in table.splitlines() if line.startswith("| 4 | 128 | 8 |")]
    assert len(rows) == 1 and rows[0] in stdout
    mb, base, ours, ratio = (float(c.strip(" *")) for c in rows[0].strip("|").split("|")[3:7])
    assert min(base, ours) > 0 and abs(ratio - base / ours) <= 0.01 + 0.1 * ratio / min(base, ours)  # us rounded
    assert rows[0].rstrip(" |").endswith("yes")


def test_moe_layer_ncu_step_runs_one_warmed_up_step() -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "moe_layer.py"), "--smoke", "--ncu-step",
                             "shared"], capture_output=True, text=True, cwd=ROOT, timeout=300, env=env)
    assert result.returncode == 0, result.stderr
    assert "one step in the CUDA profiler range: shared E=4 r=8 T=64" in result.stdout


@pytest.mark.slow
def test_moe_layer_profile_splits_host_from_wall_time() -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "moe_layer.py"), "--smoke", "--profile", "mlp"],
                            capture_output=True, text=True, cwd=ROOT, timeout=300, env=env)
    assert result.returncode == 0, result.stderr
    lines = {line.split(":")[0]: line for line in result.stdout.splitlines() if "a step" in line}
    assert set(lines) == {"dense MLP T=64", "mlp E=4 r=8 T=64"}
    for line in lines.values():
        host, wall = (float(line.split(f"{kind} ")[1].split(" ms")[0]) for kind in ("host", "wall"))
        assert 0 < host <= wall  # on the CPU the host's time is the step's
    assert "DistinctExpertsBackward" in result.stdout  # the layer's operator table follows


@pytest.mark.slow
def test_train_step_smoke(tmp_path: Path) -> None:
    _, table = run_smoke("train_step.py", tmp_path)
    rows = [line for line in table.splitlines() if line.startswith(("| mlp", "| shared"))]
    assert [r.split("|")[2].strip() for r in rows] == ["per-expert loop", "fused grouped"] * 2
    assert "tokens/s" in table and "device: cpu" in table


@pytest.mark.slow
def test_launcher_run_smoke_reports_the_median_of_repeated_pairs(tmp_path: Path) -> None:
    """Two launcher + train_step.py pairs through finetune_speech.sh on the CPU: every pair is listed, and
    the table is the pair with the lower-middle launcher / train_step ratio; only the last run's output folder
    is kept."""
    work = tmp_path / "work"
    _, table = run_smoke("launcher_run.py", tmp_path, "--repeats", "2", "--work_dir", str(work))
    assert not (work / "out0").exists() and (work / "out1" / "checkpoint-3").is_dir()
    listed = next(line for line in table.splitlines() if line.startswith("- 2 runs"))
    pairs = [part.split("=") for part in listed.split("tokens/s: ", 1)[1].split("; ")]
    ratios = sorted((float(ratio), rates.split("/")[0].strip()) for rates, ratio in pairs)
    assert len(ratios) == 2 and all(r > 0 for r, _ in ratios)
    shown = float(table.split("| launcher / train_step | **", 1)[1].split("**", 1)[0])
    assert abs(shown - ratios[0][0]) <= 0.0051  # the listing rounds to three decimals, the table to two
    lowest = [rate for ratio, rate in ratios if ratio == ratios[0][0]]  # equal at three decimals: either pair
    assert any(f"| launcher tokens/s (median step) | {rate} |" in table for rate in lowest)
    assert "--repeats 2`" in table


@pytest.mark.slow
def test_moe_decode_smoke(tmp_path: Path) -> None:
    _, table = run_smoke("moe_decode.py", tmp_path)
    rows = [line.split("|")[1:3] for line in table.splitlines() if line.startswith(("| mlp", "| shared"))]
    assert [(k.strip(), t.strip()) for k, t in rows] == [("mlp", "1"), ("mlp", "4"), ("shared", "1"), ("shared", "4")]


def test_lm_loss_smoke(tmp_path: Path) -> None:
    _, table = run_smoke("lm_loss.py", tmp_path)
    assert "| chunked (ours) |" in table and "| transformers, full logits |" in table
    error = float(table.rsplit("relative error ", 1)[1].split()[0])
    assert error < 1e-5  # float32 on the CPU: the same loss gradient


def test_check_attention_smoke() -> None:
    """The GPU check of the fused attention and LoRA runs on the CPU too, and passes both dtypes."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "check_attention.py"), "--smoke"],
                            capture_output=True, text=True, cwd=ROOT, timeout=300, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert [line.split(":")[0] for line in lines] == ["float32", "bfloat16"]
    assert all(line.endswith("-> pass") for line in lines)


def test_kernel_memcheck_reads_memchecks_verdicts() -> None:
    verdict = load_file("kernel_memcheck", ROOT / "benchmarks" / "kernel_memcheck.py").verdict

    def run(code: int, out: str, err: str = "") -> str:
        return verdict(subprocess.CompletedProcess([], code, out, err))

    clean = "========= COMPUTE-SANITIZER\nstep ok\n========= ERROR SUMMARY: 0 errors\n"
    assert run(0, clean) == "clean"
    found = ("========= COMPUTE-SANITIZER\n========= Invalid __shared__ read of size 1024 bytes\n"
             "=========     at _weight_grads_kernel+0x5680 in shared_kernels.py:295\nstep ok\n"
             "========= ERROR SUMMARY: 2 errors\n")
    assert run(1, found) == "**2 errors**: Invalid __shared__ read of size 1024 bytes"
    skipped = "skipped by the autotuner (OutOfResources: out of resource: shared memory)"
    assert run(0, f"{skipped}\n========= ERROR SUMMARY: 0 errors\n") == skipped
    crashed = run(1, "", "Traceback ...\ntorch.AcceleratorError: CUDA error: an illegal memory access was encountered")
    assert crashed.startswith("**failed**: torch.AcceleratorError")



@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed")
def test_configs_the_autotuner_skips_are_reported_and_passed_over(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    """Like Triton's autotuner, ``--each-config`` passes over a config that does not fit (OutOfResources) or that
    ptxas rejects (PTXASError), naming the reason, and still fails on a wrong result."""
    from triton.runtime.errors import OutOfResources, PTXASError

    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    check = load_file("check_moe_kernels", ROOT / "benchmarks" / "check_moe_kernels.py")
    ptxas = PTXASError("Internal Triton PTX codegen error\n`ptxas` stderr:\nptxas fatal   : (C7600) Register "
                       "allocation failed with register count of '128'.\n")
    outcomes = iter([ptxas, OutOfResources(262144, 232448, "shared memory"), False])

    def check_layer(*args: object, **kwargs: object) -> bool:
        outcome = next(outcomes, True)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    monkeypatch.setattr(check, "check_layer", check_layer)
    failures = check.check_each_config(argparse.Namespace(expert_types=["mlp"], experts=[4], ranks=[8]))
    out = capsys.readouterr().out
    assert "skipped by the autotuner (PTXASError: (C7600) Register allocation failed with register count of " \
           "'128'.)" in out
    assert "skipped by the autotuner (OutOfResources: out of resource: shared memory, Required: 262144" in out
    assert len(failures) == 1 and failures[0].endswith(": mlp E=4 r=8")

@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed")
def test_kernel_memcheck_smoke_runs_every_kernel_in_the_interpreter() -> None:
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "kernel_memcheck.py"), "--smoke"],
                            capture_output=True, text=True, cwd=ROOT, timeout=900, env=interpreter_env())
    assert result.returncode == 0, result.stdout + result.stderr
    rows = [line for line in result.stdout.splitlines() if line.startswith("| ") and "config" not in line]
    assert len(rows) == 6 and all(row.endswith("| clean |") for row in rows)


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed")
def test_kernel_ptx_smoke_compiles_every_expert_kernel_for_sm90() -> None:
    env = {k: v for k, v in interpreter_env().items() if k != "TRITON_INTERPRET"}  # a real compile, no GPU
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "kernel_ptx.py"), "--smoke"],
                            capture_output=True, text=True, cwd=ROOT, timeout=600, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    table = result.stdout.split("| kernel |")[1]
    rows = {line.split(" | ")[0].strip("| "): line.split(" | ") for line in table.splitlines()[2:] if line}
    assert set(rows) == {"distinct forward", "distinct backward", "shared forward", "shared backward",
                         "shared weight gradients", "rank gradients"}
    for name, cells in rows.items():
        registers, async_copies, b16_loads = int(cells[3]), int(cells[5]), int(cells[6])
        shared_kb = int(cells[8].strip(" |"))
        assert 0 < registers <= 255 and async_copies > 0  # the three-stage configs prefetch their tiles
        assert 0 < shared_kb <= 227  # staged tiles, within what a block may take
        if name.startswith("distinct") or name == "rank gradients":
            assert b16_loads == 0  # every tile, the LoRA factors too, is read as whole vectors


_LOOP_TTGIR = """
    %a = tt.load %p0, %m0 : tensor<64x32x!tt.ptr<bf16>, #blocked>
    %r:3 = scf.for %i = %c0 to %c8 step %c1 iter_args(%x = %a, %y = %cst) -> (tensor<64x32xbf16, #blocked>, f32) {
      %next = tt.load %p1, %m1 : tensor<64x32x!tt.ptr<bf16>, #blocked>
      %now = tt.load %p2, %m2 : tensor<64x32x!tt.ptr<bf16>, #blocked>
      %now.1 = tt.load %p2, %m2 : tensor<64x32x!tt.ptr<bf16>, #blocked>
      %row = tt.load %p3, %m3 : tensor<64x!tt.ptr<i32>, #ttg.slice<{dim = 1, parent = #blocked}>>
      %c = ttg.async_copy_global_to_local %p4, %buf mask %m4 : tensor<64x32x!tt.ptr<bf16>, #blocked> -> <64x32xbf16>
      scf.yield %next, %now.10 : tensor<64x32xbf16, #blocked>, f32
    }
    %after = tt.load %p5, %m5 : tensor<64x32x!tt.ptr<bf16>, #blocked>
"""


def test_kernel_ptx_counts_the_tile_loads_a_loop_step_waits_for(monkeypatch: pytest.MonkeyPatch) -> None:
    """Of the 2-D loads from the first loop on, those whose values the loop carries to its next step are read ahead;
    1-D loads, asynchronous copies and loads before the loop are not counted, and a name that is a prefix of a
    carried one (%now.1 of %now.10) is still waited on."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    ptx = load_file("kernel_ptx", ROOT / "benchmarks" / "kernel_ptx.py")
    assert ptx.waited_tile_loads(_LOOP_TTGIR) == 3  # %now, %now.1 and the load after the loop
    assert ptx.waited_tile_loads(_LOOP_TTGIR.replace("%next, %now.10", "%next, %now.1")) == 2
    assert ptx.waited_tile_loads("%a = tt.load %p : tensor<64x32x!tt.ptr<bf16>, #blocked>") == 0  # no loop


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed")
def test_shared_backward_kernel_with_stored_slot_rows_waits_on_no_tile_load(monkeypatch: pytest.MonkeyPatch) -> None:
    """Compiled for SM90 at r = 64 (stored slot rows, so no LoRA product consumes the d mixed, gate and up tiles and
    Triton's pipeliner leaves them alone), the backward kernel's loop reads those tiles a step ahead itself."""
    import triton

    from Uni_MoE.model.moe import shared_kernels

    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    ptx = load_file("kernel_ptx", ROOT / "benchmarks" / "kernel_ptx.py")
    config = triton.Config({"BLOCK_N": 32}, num_warps=8, num_stages=3)  # the autotuner's pick on the H200
    stats = ptx.compile_stats(shared_kernels._backward_kernel, config, 64, 8)
    assert stats["waited"] == 0 and stats["async_copies"] > 0, stats


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed")
def test_kernel_ptx_lists_a_config_that_does_not_compile_and_goes_on(monkeypatch: pytest.MonkeyPatch) -> None:
    from triton.runtime.errors import PTXASError

    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    ptx = load_file("kernel_ptx", ROOT / "benchmarks" / "kernel_ptx.py")
    message = ("Internal Triton PTX codegen error\n`ptxas` stderr:\nptxas info    : (C7512) Potential Performance Loss\n"
               "ptxas fatal   : (C7600) Register allocation failed with register count of '128'.\n")

    def fails(*args: object) -> dict:
        raise PTXASError(message)

    monkeypatch.setattr(ptx, "compile_stats", fails)
    config = type("Config", (), dict(kwargs={"BLOCK_N": 16}, num_warps=4, num_stages=1, maxnreg=128))()
    assert ptx.row("shared forward", 128, None, config, 4) == (
        "| shared forward | 128 | BLOCK_N 16, 4 warps, 1 stages, max 128 registers | does not compile: (C7600) "
        "Register allocation failed with register count of '128'. | | | | | | |", False)


_STEP_KERNELS_TABLE = """# Where a layer step's time goes (NVIDIA H200)

| kind | dense | shared E=8 r=64 |
|---|---|---|
| grouped GEMM | 0, 0.000 | 4, 0.326 |
| Triton | 0, 0.000 | 14, 2.313 |
| all | 23, 6.346 | 150, 9.358 |
| span ms | 7.079 | 10.133 |

## dense: kernels of at least 0 us in launch order

| us | kind | kernel |
|---|---|---|
| 933.0 | GEMM | `nvjet_sm90_tst_192x192_64x4_2x1_v_bz_coopB_TNN` |

## shared E=8 r=64: kernels of at least 0 us in launch order

| us | kind | kernel |
|---|---|---|
| 800.1 | Triton | `_forward_kernel` |
| 93.5 | Triton | `_rank_grad_kernel` |
| 1157.5 | Triton | `_backward_kernel` |
| 91.5 | Triton | `_rank_grad_kernel` |
| 44.9 | rest | `void at::native::reduce_kernel<512, 1>` |
"""


def test_tree_ab_reads_kind_totals_and_each_triton_kernel_from_a_step_kernels_table(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Per layer: each kind's summed ms (as us) from the summary, and each Triton kernel's time summed over its
    launches; the span row, GEMMs and the rest are not listed one by one."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    rows = load_file("tree_ab", ROOT / "benchmarks" / "tree_ab.py").kernel_rows(_STEP_KERNELS_TABLE)
    got = {key: round(us, 1) for key, (us, _) in rows.items()}
    assert got == {("dense", "every grouped GEMM kernel"): 0.0, ("shared E=8 r=64", "every grouped GEMM kernel"): 326.0,
                   ("dense", "every Triton kernel"): 0.0, ("shared E=8 r=64", "every Triton kernel"): 2313.0,
                   ("dense", "every kernel"): 6346.0, ("shared E=8 r=64", "every kernel"): 9358.0,
                   ("shared E=8 r=64", "_forward_kernel"): 800.1, ("shared E=8 r=64", "_rank_grad_kernel"): 185.0,
                   ("shared E=8 r=64", "_backward_kernel"): 1157.5}


@pytest.mark.slow
def test_tree_ab_smoke_times_each_tree_and_names_the_package_it_ran(tmp_path: Path) -> None:
    """Two trees (here the same one twice, and a copy of its package): each round runs both, the first tree's step is
    the reference (1.000), every layer of moe_layer.py's table appears, and a tree whose package a process would not
    import is refused. A tree given relative to the working directory is found."""
    copy = tmp_path / "copy"
    shutil.copytree(ROOT / "Uni_MoE", copy / "Uni_MoE", ignore=shutil.ignore_patterns("__pycache__"))
    stdout, table = run_smoke("tree_ab.py", tmp_path, "--trees", ".", os.path.relpath(copy, ROOT), "--rounds", "1")
    assert f"- tree 1: `{ROOT}` (its `Uni_MoE` imported)" in table and f"- tree 2: `{copy}`" in table
    rows = [line for line in table.splitlines() if line.startswith(("| mlp", "| shared"))]
    assert len(rows) == 2 and {row.split(" | ")[0] for row in rows} == {"| mlp", "| shared"}
    for row in rows:
        cells = row.strip("| ").split(" | ")
        assert cells[1:5] == ["4", "8", "64", "1"], cells  # E, r, T (the smoke shapes) and the round
        first, second = (cell.split(", ") for cell in cells[5:7])
        assert first[2] == "1.000" and float(first[0].split()[0]) > 0 and float(second[2]) > 0
    _, table = run_smoke("tree_ab.py", tmp_path, "--kernels", "--trees", str(ROOT), str(copy), "--rounds", "1",
                         "--experts", "4", "--ranks", "8")
    rows = [line.strip("| ").split(" | ") for line in table.splitlines() if line.startswith("| ") and " | 1 | " in line]
    assert {(row[0], row[1]) for row in rows} >= {(layer, "every kernel") for layer in ("dense", "mlp E=4 r=8",
                                                                                          "shared E=4 r=8")}
    assert all(row[3].endswith(", 1.000") or row[3].endswith("—") for row in rows)  # tree 1 is the reference
    empty = tmp_path / "empty"
    empty.mkdir()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "tree_ab.py"), "--smoke", "--trees", str(ROOT),
                             str(empty)], capture_output=True, text=True, cwd=ROOT, timeout=120, env=env)
    assert result.returncode != 0 and f"--trees {empty}" in result.stderr


def test_docs_list_every_benchmark_script_and_its_results_file() -> None:
    doc = (ROOT / "docs" / "benchmarks.md").read_text()
    scripts = [p for p in sorted((ROOT / "benchmarks").iterdir())
               if p.suffix == ".sh" or (p.suffix == ".py" and '__name__ == "__main__"' in p.read_text())]
    assert len(scripts) > 10
    missing = [p.name for p in scripts if f"`{p.name}`" not in doc]
    assert not missing, f"docs/benchmarks.md does not describe {missing}"
    commands = re.findall(r"benchmarks/[\w./]+\.(?:py|sh)", doc)
    results = re.findall(r"`(\w+_(?:h200|sm90)\w*\.md)`", doc)
    assert commands and results
    for path in [ROOT / c for c in commands] + [ROOT / "benchmarks" / "results" / r for r in results]:
        assert path.exists(), f"docs/benchmarks.md names {path.relative_to(ROOT)}, which does not exist"


def test_rank_grad_smoke_times_both_ways_on_equal_products(tmp_path: Path) -> None:
    stdout, table = run_smoke("rank_grad.py", tmp_path)
    rows = [line.split(" | ") for line in table.splitlines() if line.startswith("| 64 ")]
    assert len(rows) == 2 and stdout.strip().endswith(rows[-1][-1].strip())
    for cells in rows:
        assert float(cells[4]) > 0 and float(cells[5]) > 0
        assert float(cells[-2]) < 1e-5 and float(cells[-1].strip(" |")) < 1e-5  # both ways equal float32


def test_setting_ab_smoke_times_every_value_of_a_setting_each_round(tmp_path: Path) -> None:
    setting = "Uni_MoE.model.moe.shared_kernels.SLOT_ROWS_MIN_RANK=64,8"
    stdout, table = run_smoke("setting_ab.py", tmp_path, "--set", setting, "--layers", "mlp:4:8", "shared:4:64")
    assert "| kind | E | r | T | round | SLOT_ROWS_MIN_RANK = 64 | SLOT_ROWS_MIN_RANK = 8 |" in table
    rows = [line.strip(" |").split(" | ") for line in table.splitlines() if line.startswith(("| mlp", "| shared"))]
    assert [row[:5] for row in rows] == [["mlp", "4", "8", "64", "1"], ["mlp", "4", "8", "64", "2"],
                                         ["shared", "4", "64", "64", "1"], ["shared", "4", "64", "64", "2"]]
    for row in rows:
        cells = [[float(v.removesuffix(" ms")) for v in cell.split(", ")] for cell in row[5:]]
        assert len(cells) == 2 and cells[0][2] == 1.0  # each round relative to the first value's step
        for ms, ratio, relative in cells:
            first = cells[0][0]  # ms printed to 0.01 and the relative step to 0.001: allow for both roundings
            slack = 5e-4 + 5e-3 * (ms + first) / first**2
            assert ms > 0 and ratio > 0 and relative == pytest.approx(ms / first, abs=slack)
    assert stdout.strip().endswith(table.strip().splitlines()[-1])


def run_setting_ab(*args: str) -> subprocess.CompletedProcess:
    """``setting_ab.py --smoke`` with these arguments, its output captured."""
    return subprocess.run([sys.executable, str(ROOT / "benchmarks" / "setting_ab.py"), "--smoke", *args],
                          capture_output=True, text=True, cwd=ROOT, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})


@pytest.mark.parametrize("setting, message", [
    ("Uni_MoE.model.moe.shared_kernels.NO_SUCH=1,2", "has no setting NO_SUCH"),
    ("Uni_MoE.model.moe.no_such_module.X=1", "No module named"),
    ("SLOT_ROWS_MIN_RANK", "expected module.NAME=value,value"),
    ("Uni_MoE.model.moe.shared_kernels.SLOT_ROWS_MIN_RANK=64,eight", "must be a Python literal"),
])
def test_setting_ab_names_a_bad_setting(setting: str, message: str) -> None:
    result = run_setting_ab("--set", setting)
    assert result.returncode != 0 and message in result.stderr and setting in result.stderr


@pytest.mark.parametrize("layer", ["mlp:8", "dense:8:64", "mlp:eight:64", "shared:8:64:1"])
def test_setting_ab_names_a_bad_layer(layer: str) -> None:
    result = run_setting_ab("--set", "Uni_MoE.model.moe.shared_kernels.SLOT_ROWS_MIN_RANK=64,8", "--layers", layer)
    assert result.returncode != 0 and "expected kind:E:r" in result.stderr and layer in result.stderr


def test_step_kernels_sorts_kernels_by_kind() -> None:
    kind_of = load_file("step_kernels", ROOT / "benchmarks" / "step_kernels.py").kind_of
    grouped = ("_ZN7cutlass13device_kernelIN2at4cuda6detail25enable_3x_kernel_for_sm9xINS_4gemm6kernel13"
               "GemmUniversalINS5_17GroupProblemShapeE")
    assert kind_of(grouped) == "grouped GEMM"
    assert kind_of("void at::cuda::detail::prepare_grouped_gemm_data<cutlass::bfloat16_t>(int)") == "grouped GEMM"
    assert kind_of("nvjet_sm90_tst_192x192_64x4_2x1_v_bz_coopB_TNN") == "GEMM"
    assert kind_of("aten::mm") == "GEMM"
    assert kind_of("_backward_body") == kind_of("_rank_grad_kernel") == "Triton"
    assert kind_of("_ZN2at6native29vectorized_elementwise_kernelILi4E") == "rest"
    assert kind_of("void at::native::vectorized_elementwise_kernel<8, at::native::silu_kernel>(int)") == "rest"
    assert kind_of("Memset (Device)") == "rest"


def test_step_kernels_sums_kernels_by_the_operator_chain_that_launched_them() -> None:
    module = load_file("step_kernels", ROOT / "benchmarks" / "step_kernels.py")

    class Op:
        def __init__(self, name: str, parent: "Op | None" = None) -> None:
            self.name, self.cpu_parent = name, parent

    block = Op("DistinctExperts", Op("Module", Op("step")))
    mm = Op("aten::mm", block)
    assert module.owner_of(mm) == "aten::mm < DistinctExperts < Module"
    assert module.owner_of(mm, depth=1) == "aten::mm"
    kernels = [("aten::mm < DistinctExperts", "Memset (Device)", 0.7), ("aten::mm < DistinctExperts", "nvjet_a", 260.0),
               ("aten::index", "gather", 68.0), ("aten::mm < DistinctExperts", "nvjet_b", 270.5)]
    assert module.by_owner(kernels) == [("aten::mm < DistinctExperts", 3, pytest.approx(531.2), "nvjet_b"),
                                        ("aten::index", 1, 68.0, "gather")]


def test_step_kernels_finds_where_the_gpu_waited_for_the_host() -> None:
    """Idle stretches between kernels, each charged to the operators around the launch of the kernel that ended it."""
    module = load_file("step_kernels", ROOT / "benchmarks" / "step_kernels.py")

    def op(name: str, ts: float, dur: float, tid: int = 1) -> dict:
        return {"ph": "X", "cat": "cpu_op", "name": name, "ts": ts, "dur": dur, "tid": tid}

    def launch(cid: int, ts: float, tid: int = 1, cat: str = "cuda_runtime") -> dict:
        return {"ph": "X", "cat": cat, "name": "cudaLaunchKernel", "ts": ts, "dur": 3, "tid": tid,
                "args": {"correlation": cid}}

    def kernel(cid: int, name: str, ts: float, dur: float) -> dict:
        return {"ph": "X", "cat": "kernel", "name": name, "ts": ts, "dur": dur, "args": {"correlation": cid}}

    trace = {"traceEvents": [
        op("MoE", 0, 200), op("aten::mm", 10, 10), launch(1, 12), kernel(1, "nvjet", 20, 50),
        op("aten::sort", 30, 20), op("aten::copy_", 60, 8), launch(2, 62), kernel(2, "copy", 65, 10),  # overlaps
        op("Backward", 100, 100, tid=2), op("aten::add", 110, 20, tid=2), launch(3, 115, tid=2, cat="cuda_driver"),
        kernel(3, "_kernel", 120, 5), kernel(4, "orphan", 140, 5), {"ph": "i", "name": "marker", "ts": 0},
    ]}
    lead, gaps = module.trace_gaps(trace)
    assert lead == 20  # the first operator at 0, the first kernel at 20
    assert gaps == [(45.0, "aten::add < Backward", "_kernel"), (15.0, "(no launch call)", "orphan")]
    lines = module.gap_lines("shared", lead, gaps + [(5.0, "aten::add < Backward", "_kernel")])
    assert "idle GPU time, 65.0 us in 3 stretches (host lead before the first kernel 20.0 us)" in lines[1]
    assert lines[-2:] == ["| aten::add < Backward | 2 | 50.0 |", "| (no launch call) | 1 | 15.0 |"]
    assert module.trace_gaps({"traceEvents": []}) == (0.0, [])


def test_step_phases_times_the_row_count_copy_and_puts_the_method_back() -> None:
    import torch

    from Uni_MoE.model.moe import segments

    module = load_file("step_phases", ROOT / "benchmarks" / "step_phases.py")

    original = segments.SlotGrouping.counts_on_host
    waits: list[float] = []
    grouping = segments.group_slots(torch.tensor([[0, 2], [2, 1]]), 3)
    with module.counted_waits(waits):
        assert grouping.counts_on_host() == [1, 1, 2]
        assert grouping.counts_on_host() == [1, 1, 2]
    assert len(waits) == 2 and all(w >= 0 for w in waits)
    assert segments.SlotGrouping.counts_on_host is original


@pytest.mark.slow
def test_step_phases_smoke_gives_host_times_of_both_starts(tmp_path: Path) -> None:
    stdout, table = run_smoke("step_phases.py", tmp_path, "--layers", "mlp:4:8", "shared:4:8")
    rows = [line.strip(" |").split(" | ") for line in table.splitlines() if line.startswith("| ") and "---" not in line]
    assert [r[:2] for r in rows[1:]] == [[step, start] for step in ("dense", "mlp E=4 r=8", "shared E=4 r=8")
                                          for start in ("idle start", "back to back")]
    for row in rows[1:]:
        assert float(row[2]) > 0 and float(row[4]) > 0 and row[5:] == ["—"] * 3  # no GPU times on the CPU


def test_step_kernels_smoke_sums_every_step_by_kind(tmp_path: Path) -> None:
    stdout, table = run_smoke("step_kernels.py", tmp_path, "--layers", "mlp:4:8", "shared:4:8", "--list",
                              "--min-us", "0")
    assert "| kind | dense | mlp E=4 r=8 | shared E=4 r=8 |" in table
    rows = {line.split(" | ")[0].strip("| "): line.strip(" |").split(" | ")[1:] for line in table.splitlines()
            if line.startswith(("| grouped", "| GEMM", "| Triton", "| rest", "| all", "| span"))}
    assert list(rows) == ["grouped GEMM", "GEMM", "Triton", "rest", "all", "span ms"]
    for column in range(3):
        cells = [[float(v) for v in rows[kind][column].split(", ")]
                 for kind in ("grouped GEMM", "GEMM", "Triton", "rest")]
        count, ms = (float(v) for v in rows["all"][column].split(", "))
        assert count == sum(c for c, _ in cells) > 0 and ms == pytest.approx(sum(m for _, m in cells), abs=3e-3)
        assert ms > 0 and float(rows["span ms"][column]) > 0
    assert float(rows["GEMM"][0].split(", ")[0]) >= 3  # the dense step's three projections
    listed = table.split("## mlp E=4 r=8")[1].split("## shared")[0]
    assert listed.count("\n| ") - 1 == int(float(rows["all"][1].split(", ")[0]))  # every operator at --min-us 0
    assert stdout.strip().endswith(table.strip().splitlines()[-1])
