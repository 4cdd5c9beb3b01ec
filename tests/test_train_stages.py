"""Each stage trains exactly its parameters (by name, and by which tensors one optimizer step changes);
stage 3's expert bases are the stage-2 MLPs; the original scripts' flags parse."""

import re
import subprocess
from pathlib import Path

import pytest
import torch

from Uni_MoE.checkpoint.tiny import build_tiny
from Uni_MoE.data.collate import collate
from Uni_MoE.data.dataset import UniMoEDataset
from Uni_MoE.data.schema import load_samples
from Uni_MoE.data.tokenizer import load_tokenizer
from Uni_MoE.model.uni_moe import UniMoEForCausalLM
from Uni_MoE.train import stages
from Uni_MoE.train.arguments import parse_args
from Uni_MoE.train.sampler import modality_megabatches

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "data_sample" / "samples.json"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny(tmp_path_factory.mktemp("tiny") / "tiny")


@pytest.fixture(scope="module")
def batch(tiny):
    """One batch holding every modality (so every connector receives a gradient)."""
    model = UniMoEForCausalLM.from_pretrained(tiny)
    tokenizer = load_tokenizer(tiny)
    samples = load_samples(SAMPLES)
    wanted, chosen = {"image", "video", "speech", "audio"}, []
    for s in samples:
        if set(s.modality.split("+")) & wanted:
            chosen.append(s)
            wanted -= set(s.modality.split("+"))
    data = UniMoEDataset(chosen, tokenizer, model.config, SAMPLES.parent)
    out = collate([data[i] for i in range(len(data))], tokenizer.pad_token_id)
    for key in ("modality", "sample_index"):
        out.pop(key)
    return out


def _args(tiny, stage, **extra):
    argv = ["--model_name_or_path", str(tiny), "--stage", str(stage), "--data_path", "x.json",
            "--output_dir", "unused", "--report_to", "none"]
    for k, v in extra.items():
        argv += [f"--{k}", *(v if isinstance(v, list) else [str(v)])]
    model_args, _, train_args, _ = parse_args(argv)
    return model_args, train_args


def _prepare(model_args, train_args):
    model = stages.build_model(model_args)
    trained = stages.apply_recipe(model, stages.make_recipe(model, model_args, train_args), train_args)
    return model, trained


def _changed_by_one_step(model, batch):
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.0)
    model.train()
    model(**batch).loss.backward()
    optimizer.step()
    return {n for n, p in model.named_parameters() if not torch.equal(before[n], p.detach())}


def _all_match(names, pattern):
    return [n for n in names if not re.search(pattern, n)]


def test_stage1_trains_connectors_only(tiny, batch):
    model, trained = _prepare(*_args(tiny, 1))
    assert not _all_match(trained, r"^model\.(mm_projector|speech_aligner|audio_aligner)\.")
    assert {"model.speech_aligner.query_tokens", "model.audio_aligner.query_tokens"} <= set(trained)
    assert any(".decoder." in n for n in trained) and any(".qformer." in n for n in trained)
    assert _changed_by_one_step(model, batch) == set(trained)


def test_stage2_trains_llm_lora_and_projectors_and_exports_merged_mlps(tiny, batch, tmp_path):
    model, trained = _prepare(*_args(tiny, 2))
    lora = [n for n in trained if ".lora_" in n]
    assert lora and not _all_match(lora, r"^model\.language_model\.layers\.\d+\.(self_attn|mlp)\.")
    assert {re.search(r"\.(\w+_proj)\.lora", n).group(1) for n in lora} == {
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert not _all_match([n for n in trained if ".lora_" not in n], r"^model\.(mm_projector|\w+_aligner\.projector)\.")
    changed = _changed_by_one_step(model, batch)
    # LoRA A gets no gradient while B is still zero; everything else that trains moves
    assert changed == {n for n in trained if ".lora_A." not in n}
    out = stages.export(model, 2, tmp_path / "s2")
    plain = UniMoEForCausalLM.from_pretrained(out)
    assert not any("lora" in n for n, _ in plain.named_parameters())
    mlps = stages.read_dense_mlps(out, [0, 3])
    assert torch.equal(mlps[3]["up_proj.weight"], plain.model.language_model.layers[3].mlp.up_proj.weight)


def test_stage3_builds_experts_from_stage2_mlps_and_trains_routers_and_loras(tiny, batch, tmp_path):
    dirs = []
    for k in range(2):
        model = UniMoEForCausalLM.from_pretrained(tiny)
        with torch.no_grad():
            for layer in model.model.language_model.layers:
                layer.mlp.gate_proj.weight.add_(0.01 * (k + 1))
        dirs.append(stages.export(model, 2, tmp_path / f"expert{k}"))
    model, trained = _prepare(*_args(tiny, 3, expert_dirs=[str(d) for d in dirs], num_experts=3, expert_lora_r=4))
    for layer_index, moe in zip(model.config.moe_layer_indices(), model.moe_mlps()):
        for expert, source in enumerate([0, 1, 0]):  # 2 dirs for 3 experts: cycled
            mlp = stages.read_dense_mlps(dirs[source], [layer_index])[layer_index]
            assert torch.equal(moe.experts.gate_proj[expert], mlp["gate_proj.weight"])
            assert torch.equal(moe.experts.down_proj[expert], mlp["down_proj.weight"])
    groups = {
        "router": r"\.mlp\.router\.weight$",
        "expert_lora": r"\.mlp\.experts\.\w+_lora_[AB]$",
        "attention_lora": r"\.self_attn\.\w_proj\.lora_[AB]\.",
        "projector": r"^model\.(mm_projector|\w+_aligner\.projector)\.",
    }
    assert not _all_match(trained, "|".join(groups.values()))
    assert all(any(re.search(p, n) for n in trained) for p in groups.values())
    model.eval()
    with torch.no_grad():
        assert torch.isfinite(model(**batch).logits).all()
    changed = _changed_by_one_step(model, batch)
    assert changed <= set(trained)
    assert not [n for n in changed if re.search(r"encoder|decoder|qformer|query_tokens|experts\.\w+_proj$", n)]
    out = stages.export(model, 3, tmp_path / "s3")
    assert (out / "adapter" / "adapter_config.json").exists()
    reloaded = UniMoEForCausalLM.from_pretrained(out).eval()
    model.eval()
    with torch.no_grad():
        assert torch.allclose(reloaded(**batch).logits, model(**batch).logits, atol=1e-5)


def test_original_script_flags_parse(tmp_path):
    for name in ("model", "a", "b"):
        (tmp_path / name).mkdir()
    (tmp_path / "train.json").write_text("[]")
    for script in ("finetune_speech.sh", "finetune_audio.sh", "finetune_speech_dp.sh"):
        env = {"DRY_RUN": "1", "DATA": f"{tmp_path}/train.json", "MODEL": f"{tmp_path}/model",
               "EXPERTS": f"{tmp_path}/a {tmp_path}/b", "PATH": "/usr/bin:/bin"}
        cpu = ["--bf16", "False", "--tf32", "False"]  # the scripts' GPU settings, overridden to parse on a CPU
        line = subprocess.run(["bash", str(ROOT / "Uni_MoE" / script), *cpu], env=env, capture_output=True, text=True,
                              check=True).stdout.strip()
        argv = line.split(" Uni_MoE.train ", 1)[1].split()
        model_args, data_args, train_args, accepted = parse_args(argv)
        assert model_args.stage == 3 and model_args.expert_dirs == [f"{tmp_path}/a", f"{tmp_path}/b"]
        assert accepted.version == "v1"
        assert train_args.warmup_steps == pytest.approx(0.03) and train_args.learning_rate == pytest.approx(4e-5)
    with pytest.raises(ValueError, match="no_such_flag"):
        parse_args(["--data_path", "x.json", "--output_dir", "o", "--no_such_flag", "1"])


def test_modality_sampler_keeps_every_sample_and_groups_full_megabatches():
    modalities = ["image"] * 7 + ["speech"] * 5 + ["audio"] * 2
    lengths = list(range(len(modalities)))
    batches = modality_megabatches(modalities, lengths, 4, torch.Generator().manual_seed(0))
    assert sorted(i for b in batches for i in b) == list(range(len(modalities)))
    full_single = [b for b in batches if len({modalities[i] for i in b}) == 1 and len(b) == 4]
    assert len(full_single) == 2  # one of 4 images, one of 4 speech; the 3+1+2 leftovers are pooled
    assert all(lengths[b[0]] >= lengths[b[-1]] for b in batches)


def test_stage1_connector_files_load_into_a_fresh_model(tmp_path, make_config):
    """save_connectors writes the original's two files; each loads its own connectors and nothing else."""
    trained = UniMoEForCausalLM(make_config(moe_layers="none"))
    stages.save_connectors(trained, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mm_audio_aligner.safetensors", "mm_projector.safetensors"]
    torch.manual_seed(1)
    fresh = UniMoEForCausalLM(make_config(moe_layers="none"))
    before = {n: p.clone() for n, p in fresh.named_parameters()}
    n_proj = stages.load_connector_weights(fresh, str(tmp_path / "mm_projector.safetensors"), "mm_projector")
    n_align = stages.load_connector_weights(fresh, str(tmp_path / "mm_audio_aligner.safetensors"), "mm_audio_aligner")
    prefixes = ("model.mm_projector.", "model.speech_aligner.", "model.audio_aligner.")
    own = dict(trained.named_parameters())
    assert n_proj == sum(n.startswith(prefixes[0]) for n in own) == 4  # Linear, GELU, Linear: 2 weights, 2 biases
    assert n_align == sum(n.startswith(prefixes[1:]) for n in own)
    for name, param in fresh.named_parameters():
        assert torch.equal(param, own[name] if name.startswith(prefixes) else before[name]), name
    with pytest.raises(KeyError, match="mm_projector.safetensors: keys do not fit.*speech_aligner"):
        stages.load_connector_weights(fresh, str(tmp_path / "mm_projector.safetensors"), "mm_audio_aligner")


def test_moe_recompute_reaches_the_experts_except_under_gradient_checkpointing(tmp_path, make_config, caplog):
    argv = ["--data_path", "x.json", "--output_dir", str(tmp_path)]
    cases = (([], False), (["--moe_recompute", "True"], True),
             (["--moe_recompute", "True", "--gradient_checkpointing", "True"], False))
    for extra, expected in cases:
        model = UniMoEForCausalLM(make_config(expert_lora_r=4, expert_lora_alpha=8))
        train_args = parse_args(argv + extra)[2]
        assert stages.apply_moe_recompute(model, train_args) is expected
        assert {layer.experts.recompute_projections for layer in model.moe_mlps()} == {expected}
    assert "--moe_recompute is ignored under --gradient_checkpointing" in caplog.text
