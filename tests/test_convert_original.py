"""Converting original-layout releases: tiny fake releases written with the original's file names and
parameter names, converted, and checked against the original's arithmetic computed by hand here."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import CLIPModel, LlamaConfig, LlamaForCausalLM, WhisperForConditionalGeneration

from helpers import (
    ALPHA, H, HEADS, I, LAYERS, LM, Q, R, V, aligner_state, base_state, llava_config, make_encoders, merged, rand,
    save_adapter, save_shards, write_v1_release,
)

from Uni_MoE.checkpoint.convert_original import convert_original, load_original
from Uni_MoE.checkpoint.state_writer import ConversionError
from Uni_MoE.checkpoint.v2_experts import V2_EXPERT_FILES

class OriginalMoE(nn.Module):
    """The original's MoE arithmetic: top-k router logits, softmax over the chosen, full SwiGLU experts
    (v1), or each expert its own MLP plus LoRA on gate/up/down with the down LoRA on h (v2)."""

    def __init__(self, w: dict, prefix: str, experts: int, lora: bool) -> None:
        super().__init__()
        self.w, self.p, self.experts, self.lora = w, prefix, experts, lora

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        w = lambda name: self.w[self.p + name.format(e=e)]  # noqa: E731
        if not self.lora:
            h = F.silu(x @ w("experts.{e}.gate_proj.weight").T) * (x @ w("experts.{e}.up_proj.weight").T)
            return h @ w("experts.{e}.down_proj.weight").T
        s = ALPHA / R
        lin = lambda v, p: v @ w(f"e{{e}}.{p}_proj.weight").T + s * v @ w(f"e{{e}}.{p}_A").T @ w(f"e{{e}}.{p}_B").T  # noqa: E731
        h = F.silu(lin(x, "gate")) * lin(x, "up")
        return lin(h, "down")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        logits = flat @ self.w[self.p + "gate.weight"].T
        top, idx = logits.topk(2, dim=-1)
        weights = top.softmax(dim=-1)
        out = torch.zeros_like(flat)
        for e in range(self.experts):
            tok, slot = torch.where(idx == e)
            out[tok] += weights[tok, slot, None] * self.expert(e, flat[tok])
        return out.view_as(x)


def reference_logits(final: dict, moe_layers: list[int], ids: torch.Tensor, experts: int = 4, lora: bool = False):
    """A transformers LlamaForCausalLM over the hand-merged weights, MoE MLPs computed as the original."""
    cfg = LlamaConfig(vocab_size=V, hidden_size=H, intermediate_size=I, num_hidden_layers=LAYERS,
                      num_attention_heads=HEADS, num_key_value_heads=HEADS, max_position_embeddings=128,
                      rms_norm_eps=1e-5, tie_word_embeddings=False)
    ref = LlamaForCausalLM(cfg).eval()
    dense = {k: v for k, v in final.items() if k in ref.state_dict()}
    ref.load_state_dict(dense, strict=False)
    for layer in moe_layers:
        ref.model.layers[layer].mlp = OriginalMoE(final, f"model.layers.{layer}.mlp.", experts, lora)
    with torch.no_grad():
        return ref(ids).logits


@pytest.fixture(scope="module")
def encoders(tmp_path_factory) -> tuple[Path, Path]:
    return make_encoders(tmp_path_factory.mktemp("encoders"))


def check_logits(model, final, moe_layers, experts=4, lora=False) -> None:
    ids = torch.tensor([[1, 5, 9, 33, 17, 60, 2, 41, 8, 12]])
    with torch.no_grad():
        ours = model(input_ids=ids).logits[..., :V]
    torch.testing.assert_close(ours, reference_logits(final, moe_layers, ids, experts, lora), atol=1e-4, rtol=1e-4)


def test_speech_e2_matches_hand_merged_original(tmp_path, encoders) -> None:
    clip, whisper = encoders
    final = write_v1_release(tmp_path, clip, whisper, moe_layers=list(range(LAYERS)), router_lora=False)
    model = convert_original(tmp_path / "base", tmp_path / "e2", clip_dir=clip, whisper_dir=whisper,
                             dtype=torch.float32)
    sd = model.state_dict()
    assert model.config.moe_layer_indices() == list(range(LAYERS))
    torch.testing.assert_close(sd[f"{LM}.layers.2.self_attn.q_proj.weight"], final["model.layers.2.self_attn.q_proj.weight"])
    torch.testing.assert_close(sd[f"{LM}.layers.1.mlp.experts.up_proj"][1], final["model.layers.1.mlp.experts.1.up_proj.weight"])
    torch.testing.assert_close(sd[f"{LM}.layers.1.mlp.experts.down_proj"][3], final["model.layers.1.mlp.experts.3.down_proj.weight"])
    torch.testing.assert_close(sd[f"{LM}.layers.3.mlp.router.weight"], final["model.layers.3.mlp.gate.weight"])
    torch.testing.assert_close(sd["model.mm_projector.2.weight"], final["model.mm_projector.2.weight"])
    torch.testing.assert_close(sd["model.speech_aligner.query_tokens"], final["model.query_tokens"])
    torch.testing.assert_close(sd["model.speech_aligner.decoder.layers.0.fc1.weight"],
                               final["model.mm_audio_aligner.decoder.audio_decoder.layers.0.fc1.weight"])
    whisper_enc = WhisperForConditionalGeneration.from_pretrained(whisper).model.encoder.state_dict()
    torch.testing.assert_close(sd["model.speech_encoder.layers.0.fc1.weight"], whisper_enc["layers.0.fc1.weight"])
    clip_sd = CLIPModel.from_pretrained(clip).vision_model.state_dict()
    torch.testing.assert_close(sd["model.vision_tower.post_layernorm.weight"], clip_sd["post_layernorm.weight"])
    check_logits(model, final, list(range(LAYERS)))


def test_router_lora_quirk_v1_5(tmp_path, encoders) -> None:
    """Even-layer MoE with LoRA on the routers (speech-v1.5 / audio-e2): mlp_gates.bin, loaded after the
    merge, leaves the bare trained router, so the router LoRA has no effect."""
    clip, whisper = encoders
    final = write_v1_release(tmp_path, clip, whisper, moe_layers=[0, 2], router_lora=True)
    model = load_original(tmp_path / "base", tmp_path / "e2", clip_dir=clip, whisper_dir=whisper, dtype=torch.float32)
    assert model.config.moe_layer_indices() == [0, 2]
    gates = torch.load(tmp_path / "e2" / "mlp_gates.bin", weights_only=True)
    torch.testing.assert_close(model.state_dict()[f"{LM}.layers.2.mlp.router.weight"], gates["model.layers.2.mlp.gate.weight"])
    torch.testing.assert_close(model.state_dict()[f"{LM}.layers.1.mlp.gate_proj.weight"], final["model.layers.1.mlp.gate_proj.weight"])
    check_logits(model, final, [0, 2])


def test_loader_reads_the_original_layout(tmp_path, encoders) -> None:
    """``load_checkpoint(finetuned, release={"model_base": base, ...})`` converts on the fly, as the original's
    ``load_pretrained_model(model_path, model_base)`` is called; transformers' from_pretrained refuses the
    folder, naming the loader, instead of reading a llava config as ours."""
    from Uni_MoE.checkpoint.loader import load_checkpoint
    from Uni_MoE.model.uni_moe import UniMoEForCausalLM

    clip, whisper = encoders
    final = write_v1_release(tmp_path, clip, whisper, moe_layers=[1, 3], router_lora=False)
    model = load_checkpoint(tmp_path / "e2", torch.float32,
                            release={"model_base": tmp_path / "base", "clip_dir": clip, "whisper_dir": whisper})
    assert model.config.moe_layer_indices() == [1, 3]
    check_logits(model.eval(), final, [1, 3])
    refused = r"model_type 'llava'\): an original Uni-MoE release.*Uni_MoE.checkpoint.loader.load_checkpoint"
    with pytest.raises(ValueError, match=refused):
        UniMoEForCausalLM.from_pretrained(tmp_path / "base")
    (tmp_path / "ours").mkdir()
    with pytest.raises(ValueError, match="release parts.*apply to original releases only"):
        load_checkpoint(tmp_path / "ours", release={"model_base": tmp_path / "base"})
    with pytest.raises(FileNotFoundError, match="no such model folder"):
        load_checkpoint(tmp_path / "nowhere")


def test_base_alone_through_the_cli(tmp_path, encoders) -> None:
    """A base folder alone, converted by the command line and reloaded with from_pretrained."""
    from Uni_MoE.checkpoint.convert_original import main
    from Uni_MoE.model.uni_moe import UniMoEForCausalLM

    clip, whisper = encoders
    torch.manual_seed(0)
    base = base_state(list(range(LAYERS)))
    save_shards(tmp_path / "base", base, llava_config(clip, whisper))
    main(["--base", str(tmp_path / "base"), "--clip", str(clip), "--whisper", str(whisper),
          "--out", str(tmp_path / "out"), "--dtype", "float32"])
    check_logits(UniMoEForCausalLM.from_pretrained(tmp_path / "out").eval(), base, list(range(LAYERS)))


def test_renamed_key_is_named(tmp_path, encoders) -> None:
    clip, whisper = encoders
    torch.manual_seed(0)
    base = base_state(list(range(LAYERS)))
    base["model.layers.1.self_attn.q_proj.wieght"] = base.pop("model.layers.1.self_attn.q_proj.weight")
    save_shards(tmp_path / "base", base, llava_config(clip, whisper))
    with pytest.raises(ConversionError) as err:
        convert_original(tmp_path / "base", clip_dir=clip, whisper_dir=whisper, dtype=torch.float32)
    message = str(err.value)
    assert "model.layers.1.self_attn.q_proj.wieght (32, 32)" in message
    assert f"missing: {LM}.layers.1.self_attn.q_proj.weight (32, 32)" in message
    model = convert_original(tmp_path / "base", clip_dir=clip, whisper_dir=whisper, dtype=torch.float32, strict=False)
    assert model.state_dict()[f"{LM}.layers.1.self_attn.q_proj.weight"].abs().sum() == 0


def test_wrong_shape_is_named(tmp_path, encoders) -> None:
    clip, whisper = encoders
    torch.manual_seed(0)
    base = base_state(list(range(LAYERS)))
    base["model.layers.0.mlp.experts.2.up_proj.weight"] = rand(I + 1, H)
    save_shards(tmp_path / "base", base, llava_config(clip, whisper))
    with pytest.raises(ConversionError, match=r"experts\.2\.up_proj\.weight -> .*up_proj\[2\]: checkpoint \(49, 32\)"):
        convert_original(tmp_path / "base", clip_dir=clip, whisper_dir=whisper, dtype=torch.float32)


def write_v2_release(root: Path, clip: Path, whisper: Path) -> dict:
    """speech-base (4-expert shards + 8config.json), Experts directory, e2 with per-expert LoRA files;
    returns final weights named for OriginalMoE (``model.layers.L.mlp.e{i}.*``) plus dense names."""
    torch.manual_seed(0)
    base = base_state(list(range(LAYERS)))
    save_shards(root / "base", base, llava_config(clip, whisper))
    v2 = llava_config(clip, whisper, moe_type="dense", ep_size=8, capacity_factor=1.5, lora_r=R, lora_alpha=ALPHA,
                      lora_dropout=0.05, aux_balance_loss=True, aux_balance_loss_coef=0.01, use_flash_attn=False)
    v2.update(model_type="llava_llama", num_experts=8)
    (root / "base" / "8config.json").write_text(json.dumps(v2))
    experts = root / "experts"
    experts.mkdir()
    files = {}
    for stem in dict.fromkeys(V2_EXPERT_FILES):
        files[stem] = {f"model.layers.{l}.mlp.{p}_proj.weight": rand(*((H, I) if p == "down" else (I, H)))
                       for l in range(LAYERS) for p in ("gate", "up", "down")}
        torch.save(files[stem], experts / f"{stem}.bin")
    e2 = root / "e2"
    e2.mkdir()
    (e2 / "config.json").write_text(json.dumps(v2))
    final = {k: v for k, v in base.items() if ".mlp." not in k}
    for i, stem in enumerate(V2_EXPERT_FILES):
        lora = {}
        for l in range(LAYERS):
            for p, (in_dim, out_dim) in {"gate": (H, I), "up": (H, I), "down": (I, H)}.items():
                a, b = rand(R, in_dim), rand(out_dim, R)
                ds = f"model.layers.{l}.mlp.deepspeed_moe.experts.deepspeed_experts.0.{p}_proj_lora_"
                lora[ds + "A.weight"], lora[ds + "B.weight"] = a, b
                final[f"model.layers.{l}.mlp.e{i}.{p}_A"], final[f"model.layers.{l}.mlp.e{i}.{p}_B"] = a, b
                final[f"model.layers.{l}.mlp.e{i}.{p}_proj.weight"] = files[stem][f"model.layers.{l}.mlp.{p}_proj.weight"]
        torch.save(lora, e2 / f"{i}_mlp_experts.bin")
    gates = {f"model.layers.{l}.mlp.deepspeed_moe.gate.wg.weight": rand(8, H) for l in range(LAYERS)}
    torch.save(gates, e2 / "mlp_gates.bin")
    final.update({f"model.layers.{l}.mlp.gate.weight": gates[f"model.layers.{l}.mlp.deepspeed_moe.gate.wg.weight"]
                  for l in range(LAYERS)})
    pairs = save_adapter(e2, [f"model.layers.{l}.self_attn.{n}_proj" for l in range(LAYERS) for n in "qkvo"])
    projector = {k: rand(*v.shape) for k, v in base.items() if "mm_projector" in k}
    torch.save({f"base_model.model.{k}": v for k, v in projector.items()}, e2 / "non_lora_trainables.bin")
    aligner = aligner_state()
    torch.save(aligner, e2 / "mm_audio_aligner.bin")
    final = merged({**final, **projector}, pairs)
    final.update(aligner)
    return final


def test_v2_experts_and_lora(tmp_path, encoders) -> None:
    clip, whisper = encoders
    final = write_v2_release(tmp_path, clip, whisper)
    model = convert_original(tmp_path / "base", tmp_path / "e2", experts_dir=tmp_path / "experts",
                             clip_dir=clip, whisper_dir=whisper, dtype=torch.float32)
    sd = model.state_dict()
    assert model.config.num_experts == 8 and model.config.expert_lora_r == R
    for i in (0, 5, 6, 7):
        torch.testing.assert_close(sd[f"{LM}.layers.3.mlp.experts.up_proj"][i], final[f"model.layers.3.mlp.e{i}.up_proj.weight"])
        torch.testing.assert_close(sd[f"{LM}.layers.3.mlp.experts.down_lora_A"][i], final[f"model.layers.3.mlp.e{i}.down_A"])
    torch.testing.assert_close(sd[f"{LM}.layers.1.mlp.router.weight"], final["model.layers.1.mlp.gate.weight"])
    torch.testing.assert_close(sd[f"{LM}.layers.1.self_attn.k_proj.weight"], final["model.layers.1.self_attn.k_proj.weight"])
    check_logits(model, final, list(range(LAYERS)), experts=8, lora=True)


def test_v2_needs_experts_dir(tmp_path, encoders) -> None:
    clip, whisper = encoders
    write_v2_release(tmp_path, clip, whisper)
    (tmp_path / "base" / "config.json").write_text((tmp_path / "base" / "8config.json").read_text())
    with pytest.raises(ValueError, match="experts_dir"):
        convert_original(tmp_path / "base", tmp_path / "e2", clip_dir=clip, whisper_dir=whisper)


QFORMER = dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
               cross_attention_frequency=2, encoder_hidden_size=32)


def qformer_aligner_state() -> dict[str, torch.Tensor]:
    """Audio aligner as the original names it: BLIP-2 Q-Former, projector, query tokens inside the aligner,
    plus the unused speech-path ``model.query_tokens``."""
    from transformers import Blip2QFormerConfig, Blip2QFormerModel

    qformer = Blip2QFormerModel(Blip2QFormerConfig(**QFORMER)).state_dict()
    state = {f"model.mm_audio_aligner.qformer.qformer.{k}": rand(*v.shape) for k, v in qformer.items()}
    state.update({"model.mm_audio_aligner.projector.weight": rand(H, 16),
                  "model.mm_audio_aligner.projector.bias": rand(H),
                  "model.mm_audio_aligner.query_tokens": rand(1, Q, 16), "model.query_tokens": rand(1, Q, 16)})
    return state


def test_audio_e2_with_beats_and_router_lora(tmp_path, encoders) -> None:
    from Uni_MoE.model.encoders.beats import BEATs, BEATsConfig

    clip, _ = encoders
    beats_cfg = BEATsConfig(encoder_layers=1, encoder_embed_dim=32, encoder_ffn_embed_dim=64,
                            encoder_attention_heads=2, embed_dim=16, conv_pos=8, conv_pos_groups=2)
    beats = BEATs(beats_cfg).state_dict()
    torch.save({"cfg": beats_cfg.to_dict(), "model": beats}, tmp_path / "BEATs_iter3_plus_AS2M.pt")
    final = write_v1_release(tmp_path, clip, tmp_path / "BEATs_iter3_plus_AS2M.pt", [0, 2], router_lora=True,
                             aligner=qformer_aligner_state)
    model = convert_original(tmp_path / "base", tmp_path / "e2", clip_dir=clip, dtype=torch.float32,
                             config_overrides={"audio_qformer_config": QFORMER})
    sd = model.state_dict()
    assert model.config.voice_modality == "audio" and model.model.speech_encoder is None
    torch.testing.assert_close(sd["model.audio_aligner.query_tokens"], final["model.mm_audio_aligner.query_tokens"])
    key = "encoder.layer.0.crossattention.attention.key.weight"
    torch.testing.assert_close(sd[f"model.audio_aligner.qformer.{key}"], final[f"model.mm_audio_aligner.qformer.qformer.{key}"])
    name = next(iter(beats))
    torch.testing.assert_close(sd[f"model.audio_encoder.{name}"], beats[name])
    torch.testing.assert_close(sd[f"{LM}.layers.0.mlp.router.weight"], final["model.layers.0.mlp.gate.weight"])
    check_logits(model, final, [0, 2])


@pytest.mark.parametrize("key, rows", [("model.embed_tokens.weight", V - 1), ("lm_head.weight", V + 1)])
def test_wrong_vocab_rows_are_named_and_nothing_is_written(tmp_path, encoders, key, rows) -> None:
    """A short or long token table fails naming its shard, key and both shapes; no output folder appears."""
    clip, whisper = encoders
    torch.manual_seed(0)
    base = base_state(list(range(LAYERS)))
    base[key] = rand(rows, H)
    save_shards(tmp_path / "base", base, llava_config(clip, whisper))
    shard = json.loads((tmp_path / "base" / "pytorch_model.bin.index.json").read_text())["weight_map"][key]
    with pytest.raises(ConversionError) as err:
        convert_original(tmp_path / "base", clip_dir=clip, whisper_dir=whisper, out_dir=tmp_path / "out",
                         dtype=torch.float32)
    line = next(line for line in str(err.value).splitlines() if key in line)
    assert line.strip().startswith(f"shape mismatch: {shard}: {key} -> ")
    assert f"checkpoint ({rows}, {H}) vs ({V}, {H})" in line and f"(model ({V + 4}, {H})" in line
    assert not (tmp_path / "out").exists()


def test_lora_rank_mismatch_is_named(tmp_path, encoders) -> None:
    """lora_A of rank 8 with lora_B of rank 4: the adapter file, module and both shapes are named."""
    clip, whisper = encoders
    write_v1_release(tmp_path, clip, whisper, moe_layers=[1, 3], router_lora=False)
    module = "model.layers.2.self_attn.q_proj"
    adapter = torch.load(tmp_path / "e2" / "adapter_model.bin")
    adapter[f"base_model.model.{module}.lora_A.weight"] = rand(2 * R, H)
    torch.save(adapter, tmp_path / "e2" / "adapter_model.bin")
    with pytest.raises(ConversionError) as err:
        convert_original(tmp_path / "base", tmp_path / "e2", clip_dir=clip, whisper_dir=whisper,
                         out_dir=tmp_path / "out", dtype=torch.float32)
    shapes = f"lora_A ({2 * R}, {H}), lora_B ({H}, {R}): ranks {2 * R} and {R}"
    assert f"adapter_model.bin: {module}: {shapes}, adapter_config.json says r={R}" in str(err.value)
    assert not (tmp_path / "out").exists()


def test_bfloat16_conversion_is_the_float32_merge_cast_once(tmp_path, encoders) -> None:
    """Every bf16 weight is the fp32 conversion's weight cast once (LoRA sums and placeholder rows included)."""
    clip, whisper = encoders
    final = write_v1_release(tmp_path, clip, whisper, moe_layers=[1, 3], router_lora=True)
    args = (tmp_path / "base", tmp_path / "e2")
    f32 = convert_original(*args, clip_dir=clip, whisper_dir=whisper, dtype=torch.float32).state_dict()
    bf16 = convert_original(*args, clip_dir=clip, whisper_dir=whisper, dtype=torch.bfloat16).state_dict()
    assert f32.keys() == bf16.keys()
    for key, value in f32.items():
        assert torch.equal(bf16[key], value.to(torch.bfloat16)), key
    embed = final["model.embed_tokens.weight"]
    torch.testing.assert_close(f32[f"{LM}.embed_tokens.weight"][V:], embed.mean(dim=0).expand(4, H))
    # rounding the base weight before adding the delta (the double rounding avoided) gives other bits
    base = {k: v for path in (tmp_path / "base").glob("pytorch_model-*.bin") for k, v in torch.load(path).items()}
    name = "model.layers.0.self_attn.q_proj.weight"
    twice = (base[name].to(torch.bfloat16).float() + final[name] - base[name]).to(torch.bfloat16)
    assert not torch.equal(twice, bf16[f"{LM}.layers.0.self_attn.q_proj.weight"])
