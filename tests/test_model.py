import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from Uni_MoE.model.uni_moe import UniMoEForCausalLM

IMG, VID, AUD, SPE = 296, 297, 298, 299


def _prompt(*runs):
    """Concatenate (token, count) runs into one [1, S] prompt."""
    return torch.tensor([[t for tok, n in runs for t in [tok] * n]])


def _inputs():
    """A batch of two prompts: image + two speech windows; video + audio."""
    ids_a = _prompt((1, 1), (5, 3), (IMG, 64), (6, 2), (SPE, 16), (7, 2))
    ids_b = _prompt((1, 1), (8, 2), (VID, 64), (AUD, 8), (9, 13))
    ids = torch.cat([ids_a, ids_b])
    media = dict(
        pixel_values=torch.randn(1, 3, 64, 64),
        pixel_values_videos=torch.randn(1, 8, 3, 64, 64),
        input_features=torch.randn(2, 80, 400),
        input_values=torch.randn(1, 64000) * 0.1,
        padding_mask=torch.zeros(1, 64000, dtype=torch.bool),
    )
    return ids, media


@pytest.mark.parametrize("implementation", ["reference", "grouped"])
def test_save_load_round_trip_gives_identical_logits(tmp_path, make_config, implementation):
    model = UniMoEForCausalLM(make_config(expert_lora_r=4, moe_implementation=implementation)).eval()
    ids, media = _inputs()
    with torch.no_grad():
        before = model(input_ids=ids, **media).logits
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    loaded = UniMoEForCausalLM.from_pretrained(tmp_path).eval()
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))
    with torch.no_grad():
        after = loaded(input_ids=ids, **media).logits
    if implementation == "reference":
        assert torch.equal(before, after)
    else:
        # same weights, but the loaded tensors sit at other memory alignments (mapped from the file), and
        # the CPU batched-matmul kernels the grouped path uses then sum in another order: float32 rounding
        torch.testing.assert_close(after, before, rtol=0, atol=1e-6)


def _llama_twin(model):
    tc = model.config.text_config
    llama = LlamaForCausalLM(LlamaConfig(**tc.to_dict())).eval()
    own = model.model.language_model.state_dict()
    for k, v in llama.model.state_dict().items():
        if k in own and own[k].shape == v.shape:
            v.copy_(own[k])
    llama.lm_head.weight.data.copy_(model.lm_head.weight)
    return llama


def test_dense_backbone_reproduces_llama(make_config):
    model = UniMoEForCausalLM(make_config(moe_layers="none")).eval()
    llama = _llama_twin(model)
    ids = torch.randint(0, 290, (2, 12))
    with torch.no_grad():
        assert torch.allclose(model(input_ids=ids).logits, llama(input_ids=ids).logits, atol=1e-5)


def test_moe_of_identical_experts_with_zero_lora_reproduces_llama(make_config):
    model = UniMoEForCausalLM(make_config(moe_layers="all", expert_lora_r=4)).eval()
    llama = _llama_twin(model)
    for layer, twin in zip(model.model.language_model.layers, llama.model.layers):
        mlp = twin.mlp.state_dict()
        layer.mlp.experts.load_dense_mlps([{f"{k}": v for k, v in mlp.items()}] * 4)
    ids = torch.randint(0, 290, (2, 12))
    with torch.no_grad():
        assert torch.allclose(model(input_ids=ids).logits, llama(input_ids=ids).logits, atol=1e-5)


def test_features_land_on_their_placeholders(make_config):
    model = UniMoEForCausalLM(make_config()).eval()
    inner = model.model
    ids = _prompt((1, 1), (5, 2), (IMG, 3), (6, 1), (IMG, 2), (7, 1))
    embeds = inner.get_input_embeddings()(ids)
    feats = torch.arange(5 * 128, dtype=torch.float).view(1, 5, 128)
    out = inner.splice_modality_features(ids, embeds, "image", feats)
    assert torch.equal(out[0, 3:6], feats[0, :3]) and torch.equal(out[0, 7:9], feats[0, 3:5])
    untouched = torch.ones(ids.shape[1], dtype=torch.bool)
    untouched[[3, 4, 5, 7, 8]] = False
    assert torch.equal(out[0, untouched], embeds[0, untouched])
    with pytest.raises(ValueError, match="5 placeholder tokens but the image inputs give 6 feature rows"):
        inner.splice_modality_features(ids, embeds, "image", torch.zeros(2, 3, 128))
    both, _ = _inputs()
    assert inner.placeholder_counts(both) == {"image": 64, "video": 64, "speech": 16, "audio": 8}


def test_video_is_the_mean_of_its_frames(make_config):
    model = UniMoEForCausalLM(make_config()).eval()
    frames = torch.randn(8, 3, 64, 64)
    with torch.no_grad():
        video = model.model.get_video_features(frames[None])
        per_frame = model.model.get_image_features(frames)
    assert torch.allclose(video[0], per_frame.mean(0), atol=1e-5)


def test_missing_media_and_missing_encoder_are_reported(make_config):
    model = UniMoEForCausalLM(make_config(audio_config=None, audio_qformer_config=None)).eval()
    ids = _prompt((1, 1), (IMG, 64))
    with pytest.raises(ValueError, match="placeholder tokens but no image inputs"):
        model(input_ids=ids)
    with pytest.raises(ValueError, match="no audio encoder"):
        model(input_ids=_prompt((1, 1), (AUD, 8)), input_values=torch.zeros(1, 64000))


def test_every_modality_trains_and_generates(make_config):
    model = UniMoEForCausalLM(make_config(expert_lora_r=4, aux_balance_loss_coef=0.01))
    ids, media = _inputs()
    out = model(input_ids=ids, labels=ids, **media)
    assert torch.isfinite(out.loss) and out.aux_loss is not None
    assert torch.isclose(out.loss, out.lm_loss + 0.01 * out.aux_loss)
    out.loss.backward()
    aligners = [model.model.mm_projector, model.model.speech_aligner, model.model.audio_aligner]
    for module in aligners:
        assert all(p.grad is not None for p in module.parameters() if p.requires_grad)
    assert len(model.collect_routing()) == 4 and model.collect_routing()[0].shape == (2, ids.shape[1], 2)

    model.eval()
    mask = torch.ones_like(ids)
    with torch.no_grad():
        cached = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, **media)
        uncached = model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, use_cache=False, **media
        )
    assert cached.shape == (2, ids.shape[1] + 6)
    assert torch.equal(cached, uncached)


def test_training_forward_builds_no_cache(make_config, monkeypatch):
    """In training neither the language model nor the speech Q-former (a Whisper decoder) keeps a KV cache,
    whose per-layer key/value copies would cost memory and time; evaluation still caches by default."""
    from transformers import cache_utils

    made = []
    init = cache_utils.DynamicCache.__init__

    def counting_init(self, *args, **kwargs):
        made.append(type(self).__name__)
        init(self, *args, **kwargs)

    monkeypatch.setattr(cache_utils.DynamicCache, "__init__", counting_init)
    model = UniMoEForCausalLM(make_config(expert_lora_r=4)).train()
    ids, media = _inputs()
    out = model(input_ids=ids, labels=ids, **media)
    out.loss.backward()
    assert made == [] and out.past_key_values is None
    model.eval()
    with torch.no_grad():
        assert model(input_ids=ids, **media).past_key_values is not None


def test_training_loss_skips_the_logits_and_equals_the_full_logits_loss(make_config):
    """In training the LM loss comes from the chunked head (no logits returned); value, gradients and the
    per-sample losses equal transformers' loss over full logits (same seed, hence the same dropout)."""
    from Uni_MoE.train.tracking import per_sample_loss

    torch.manual_seed(0)
    model = UniMoEForCausalLM(make_config(expert_lora_r=4)).train()
    ids, media = _inputs()
    labels = ids.clone()
    labels[0, :20] = -100
    weight = next(model.model.mm_projector.parameters())

    def run(chunked: bool, **kwargs):
        model._chunked_loss = lambda: chunked
        torch.manual_seed(1)
        out = model(input_ids=ids, labels=labels, **media, **kwargs)
        return out, torch.autograd.grad(out.lm_loss, [weight])[0]

    (ours, ours_grad), (full, full_grad) = run(True), run(False)
    assert ours.logits is None and full.logits is not None
    torch.testing.assert_close(ours.lm_loss, full.lm_loss)
    torch.testing.assert_close(ours_grad, full_grad, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(ours.sample_loss, per_sample_loss(full.logits.detach(), labels))
    summed, _ = run(True, num_items_in_batch=17)
    torch.testing.assert_close(summed.lm_loss, full.lm_loss * (labels[:, 1:] != -100).sum() / 17)
    del model._chunked_loss
    assert model._chunked_loss() and not model.eval()._chunked_loss()


def test_training_loss_falls_back_to_logits_for_a_partitioned_or_wrapped_head(make_config):
    """A ZeRO-3 head (its weight carries ``ds_id`` and is only a shard outside the module's own call) or an
    adapter-wrapped head goes through the module and transformers' loss; logits are returned."""
    model = UniMoEForCausalLM(make_config()).train()
    ids, media = _inputs()
    assert model._chunked_loss()
    model.lm_head.weight.ds_id = 0
    assert not model._chunked_loss()
    out = model(input_ids=ids, labels=ids, **media)
    assert out.logits is not None and out.sample_loss is None and torch.isfinite(out.loss)
    del model.lm_head.weight.ds_id
    model.lm_head = torch.nn.Sequential(model.lm_head)
    assert not model._chunked_loss()
