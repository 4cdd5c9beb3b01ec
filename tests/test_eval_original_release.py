"""Eval straight from an original release folder with the original's arguments (--model_base,
--vision_tower, --audio_tower) predicts exactly what eval on the converted checkpoint predicts."""

from __future__ import annotations

import json

import torch
from helpers import V, make_encoders, write_v1_release
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from Uni_MoE.checkpoint.convert_original import convert_original
from Uni_MoE.checkpoint.loader import load_model
from Uni_MoE.eval.__main__ import main
from Uni_MoE.eval.fixtures import write_benchmark_files

WORDS = "is there a circle square triangle in the image which shape picture".split()


def write_llama_like_tokenizer(folder) -> None:
    """A word-level tokenizer with exactly the release's V ids (ids 0-2 <unk>, <s>, </s>)."""
    vocab = {t: i for i, t in enumerate(["<unk>", "<s>", "</s>", *WORDS])}
    vocab.update({f"w{i}": i for i in range(len(vocab), V)})
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    tok.save_pretrained(folder)


def test_original_release_folder_evaluates_like_its_conversion(tmp_path):
    clip, whisper = make_encoders(tmp_path / "encoders")
    write_v1_release(tmp_path, clip, whisper, moe_layers=[1, 3], router_lora=False)
    write_llama_like_tokenizer(tmp_path / "base")
    convert_original(tmp_path / "base", tmp_path / "e2", clip_dir=clip, whisper_dir=whisper,
                     out_dir=tmp_path / "converted", dtype=torch.float32)
    files = write_benchmark_files(tmp_path / "bench", n=2, data_types=["pope", "seedbench"])
    common = ["--max_new_tokens", "3", "--dtype", "float32", "--batch_size", "2"]
    for data_type in ("pope", "seedbench"):
        data = ["--data_path", str(files[data_type]["data"]), "--data_type", data_type]
        main([*data, *common, "--model_path", str(tmp_path / "converted"), "--output", str(tmp_path / "a.json")])
        main([*data, *common, "--model_path", str(tmp_path / "e2"), "--model_base", str(tmp_path / "base"),
              "--vision_tower", str(clip), "--audio_tower", str(whisper), "--output", str(tmp_path / "b.json")])
        converted = json.loads((tmp_path / "a.json").read_text())
        original = json.loads((tmp_path / "b.json").read_text())
        assert [r["prediction"] for r in original] == [r["prediction"] for r in converted]
        assert len(original) == 2 and original[0]["prompt"] == converted[0]["prompt"]
    # the same weights and tokenizer either way
    model_a, tok_a = load_model(tmp_path / "converted", "cpu", "float32")
    model_b, tok_b = load_model(tmp_path / "e2", "cpu", "float32", release={
        "model_base": tmp_path / "base", "clip_dir": clip, "whisper_dir": whisper})
    assert tok_a.get_vocab() == tok_b.get_vocab() and tok_b.convert_tokens_to_ids("<image>") == V
    ids = torch.tensor([[1, 5, 9, 33, 17, 60, 2, 41]])
    with torch.no_grad():
        torch.testing.assert_close(model_b(input_ids=ids).logits, model_a(input_ids=ids).logits)
