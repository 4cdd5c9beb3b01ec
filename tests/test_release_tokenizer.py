"""A release's sentencepiece tokenizer loads, and prompts get the token ids the released models were trained
and evaluated with: LLaVA's ``tokenizer_image_token`` on transformers 4.31's slow LlamaTokenizer, worked out
here from the raw sentencepiece model."""

from __future__ import annotations

import re

import pytest
import sentencepiece as spm
from llama_sentencepiece import write_release_tokenizer

from Uni_MoE import presets
from Uni_MoE.config import UniMoEConfig
from Uni_MoE.data import tokenizer as tokenizer_module
from Uni_MoE.data.conversation import IGNORE_INDEX, SYSTEM, tokenize_conversation
from Uni_MoE.data.tokenizer import encode_chunk, load_tokenizer
from Uni_MoE.modalities import PLACEHOLDERS

PLACEHOLDER = re.compile("(<image>|<video>|<speech>|<audio>)")
SPECIAL = re.compile("(<s>|</s>|<unk>)")
RUN = {"image": 3, "speech": 2}  # feature rows per item


def runs(prompt: str) -> dict[str, list[int]]:
    return {m: [n] * prompt.count(f"<{m}>") for m, n in RUN.items() if f"<{m}>" in prompt}


def original_chunk_ids(sp: spm.SentencePieceProcessor, chunk: str, legacy: bool) -> list[int]:
    """4.31's slow LlamaTokenizer on one chunk, without BOS: split on special tokens, sentencepiece (with
    its dummy prefix) on each piece; with legacy=False a piece after a special token that does not start
    with a space loses the prefix from its first piece."""
    if not legacy:
        chunk = chunk.replace("▁", " ")
    ids: list[int] = []
    for i, piece in enumerate(SPECIAL.split(chunk)):
        if SPECIAL.fullmatch(piece):
            ids.append(sp.piece_to_id(piece))
            continue
        if not piece:
            continue
        pieces = sp.encode(piece, out_type=str)
        if not legacy and i > 0 and not piece.startswith(" ") and pieces[0].startswith("▁"):
            pieces = ([pieces[0][1:]] if len(pieces[0]) > 1 else []) + pieces[1:]
        ids += [sp.piece_to_id(p) for p in pieces]
    return ids


def original_prompt_ids(sp, prompt: str, ids_of: dict[str, int], legacy: bool) -> list[int]:
    """tokenizer_image_token: BOS, each chunk between placeholders tokenised alone (its BOS dropped); a
    placeholder here is a run of its token (the original's single negative id, expanded to features)."""
    ids = [sp.bos_id()]
    for chunk in PLACEHOLDER.split(prompt):
        if PLACEHOLDER.fullmatch(chunk):
            modality = chunk[1:-1]
            ids += [ids_of[modality]] * RUN[modality]
        else:
            ids += original_chunk_ids(sp, chunk, legacy)
    return ids


CASES = {
    "text": ([{"from": "human", "value": "What is the capital of France?"}],
             f"{SYSTEM} USER: What is the capital of France? ASSISTANT:"),
    "image": ([{"from": "human", "value": "<image>\nWhat colour is the shape?"}],
              f"{SYSTEM} USER: <image>\nWhat colour is the shape? ASSISTANT:"),
    "speech+image": ([{"from": "human", "value": "<image>\n<speech>"}],
                     f"{SYSTEM} USER: <image>\n<speech> ASSISTANT:"),
    "multi-turn": ([{"from": "human", "value": "<image>\nWhat colour is it?"}, {"from": "gpt", "value": "Red."},
                    {"from": "human", "value": "And the shape?"}],
                   f"{SYSTEM} USER: <image>\nWhat colour is it? ASSISTANT: Red.</s>USER: And the shape? ASSISTANT:"),
}


@pytest.fixture
def release(tmp_path, llama_sentencepiece):
    def make(legacy: bool | None = None):
        folder = write_release_tokenizer(tmp_path / f"release-{legacy}", llama_sentencepiece, legacy)
        (folder / "config.json").write_text('{"model_type": "llava"}')  # as in a release folder
        return load_tokenizer(folder), spm.SentencePieceProcessor(model_proto=llama_sentencepiece)
    return make


def test_release_tokenizer_loads_with_its_pieces_and_the_shared_placeholder_ids(release):
    tok, sp = release()
    n = sp.get_piece_size()
    assert [tok.convert_ids_to_tokens(i) for i in range(n)] == [sp.id_to_piece(i) for i in range(n)]
    ids = {m: tok.convert_tokens_to_ids(t) for m, t in PLACEHOLDERS.items()}
    assert ids == {"image": n, "video": n + 1, "speech": n + 2, "audio": n + 3}
    assert presets.placeholder_token_indices(n) == {f"{m}_token_index": i for m, i in ids.items()}
    assert type(tok).__name__ == "LlamaTokenizer"  # not what AutoTokenizer makes of a llava config.json
    assert tok.pad_token == "<unk>" and tok.legacy is True  # 4.31's default when the key is absent
    real = dict(image_token_index=32000, video_token_index=32001, speech_token_index=32002, audio_token_index=32003)
    assert presets.PLACEHOLDER_IDS == real
    assert {k: getattr(UniMoEConfig(), k) for k in real} == real
    assert {k: getattr(presets.speech_v1(), k) for k in real} == real


def test_missing_sentencepiece_is_named(tmp_path, llama_sentencepiece, monkeypatch):
    folder = write_release_tokenizer(tmp_path / "release", llama_sentencepiece)
    monkeypatch.setitem(tokenizer_module.SENTENCEPIECE_NEEDS, "sentencepiece", "no_such_module_here")
    with pytest.raises(ImportError, match=r"tokenizer\.model is a sentencepiece model.*pip install sentencepiece"):
        load_tokenizer(folder)


@pytest.mark.parametrize("legacy", [None, False])
@pytest.mark.parametrize("case", list(CASES))
def test_prompt_ids_are_the_originals(release, case, legacy):
    tok, sp = release(legacy)
    turns, prompt = CASES[case]
    ids_of = {m: tok.convert_tokens_to_ids(t) for m, t in PLACEHOLDERS.items()}
    ids, _ = tokenize_conversation(tok, turns, runs(prompt), ids_of, for_generation=True)
    assert ids == original_prompt_ids(sp, prompt, ids_of, legacy is not False)
    # the two 4.31 settings differ only after a special token: "</s>USER"
    differ = original_prompt_ids(sp, prompt, ids_of, True) != original_prompt_ids(sp, prompt, ids_of, False)
    assert differ == (case == "multi-turn")


def test_a_chunk_after_a_placeholder_starts_with_the_lone_space_piece(release):
    """After ``<image>\\n<speech>`` the chunk " ASSISTANT:" begins with the lone ``▁`` (29871 in LLaMA)."""
    tok, sp = release()
    ids_of = {m: tok.convert_tokens_to_ids(t) for m, t in PLACEHOLDERS.items()}
    turns, prompt = CASES["speech+image"]
    ids, _ = tokenize_conversation(tok, turns, runs(prompt), ids_of, for_generation=True)
    after = ids[len(ids) - ids[::-1].index(ids_of["speech"]):]
    assert after == [sp.piece_to_id("▁"), sp.piece_to_id("▁ASSISTANT"), sp.piece_to_id(":")]


@pytest.mark.parametrize("legacy", [None, False])
def test_training_ids_and_answer_labels(release, legacy):
    tok, sp = release(legacy)
    turns = CASES["multi-turn"][0] + [{"from": "gpt", "value": "A square."}]
    text = (f"{SYSTEM} USER: <image>\nWhat colour is it? ASSISTANT: Red.</s>USER: And the shape? ASSISTANT: "
            "A square.</s>")
    ids_of = {m: tok.convert_tokens_to_ids(t) for m, t in PLACEHOLDERS.items()}
    ids, labels = tokenize_conversation(tok, turns, runs(text), ids_of)
    assert ids == original_prompt_ids(sp, text, ids_of, legacy is not False)
    # an answer continues "ASSISTANT:", so its leading space is the dummy prefix of its own encoding
    assert [t for t in labels if t != IGNORE_INDEX] == sp.encode("Red.") + [2] + sp.encode("A square.") + [2]


@pytest.mark.parametrize("legacy", [None, False])
def test_saved_tokenizer_keeps_the_rule(release, tmp_path, legacy):
    """save_pretrained (the converter's and training's output) keeps the tokenization and the flag."""
    tok, _ = release(legacy)
    tok.save_pretrained(tmp_path / "saved")
    again = load_tokenizer(tmp_path / "saved")
    assert not (tmp_path / "saved" / "tokenizer.model").exists() and again.legacy is (legacy is not False)
    text = CASES["multi-turn"][1] + " A square.</s>USER: ▁odd  spacing\n"
    assert encode_chunk(again, text) == encode_chunk(tok, text)
    assert again.get_vocab() == tok.get_vocab()


@pytest.mark.slow
def test_converter_eval_and_cli_read_a_release_with_its_sentencepiece_tokenizer(
    tmp_path, llama_sentencepiece, monkeypatch, capsys
):
    """A v1 release whose vocabulary is the sentencepiece model's: converted by the command line, then
    evaluated and chatted with from the release folder and from the conversion, with the same results."""
    import json

    import helpers as fake

    from Uni_MoE.checkpoint.convert_original import main as convert
    from Uni_MoE.eval.__main__ import main as evaluate
    from Uni_MoE.eval.fixtures import write_benchmark_files
    from Uni_MoE.serve import cli

    monkeypatch.setattr(fake, "V", spm.SentencePieceProcessor(model_proto=llama_sentencepiece).get_piece_size())
    clip, whisper = fake.make_encoders(tmp_path / "encoders")
    fake.write_v1_release(tmp_path, clip, whisper, moe_layers=[1, 3], router_lora=False)
    for name in ("base", "e2"):
        write_release_tokenizer(tmp_path / name, llama_sentencepiece)
    towers = ["--vision_tower", str(clip), "--audio_tower", str(whisper)]
    release = ["--model_path", str(tmp_path / "e2"), "--model_base", str(tmp_path / "base"), *towers]
    convert(["--base", str(tmp_path / "base"), "--finetuned", str(tmp_path / "e2"), "--clip", str(clip),
             "--whisper", str(whisper), "--out", str(tmp_path / "converted"), "--dtype", "float32"])
    converted = ["--model_path", str(tmp_path / "converted")]
    saved = json.loads((tmp_path / "converted" / "tokenizer_config.json").read_text())
    assert saved["tokenizer_class"] == "LlamaTokenizer" and saved["legacy"] is True

    files = write_benchmark_files(tmp_path / "bench", n=2, data_types=["pope"])
    common = ["--data_path", str(files["pope"]["data"]), "--data_type", "pope", "--max_new_tokens", "3",
              "--dtype", "float32", "--batch_size", "2"]
    rows = []
    for source, out in ((release, "a.json"), (converted, "b.json")):
        evaluate([*common, *source, "--output", str(tmp_path / out)])
        rows.append([(r["prompt"], r["prediction"]) for r in json.loads((tmp_path / out).read_text())])
    assert len(rows[0]) == 2 and rows[0] == rows[1]

    capsys.readouterr()
    answers = []
    for source in (release, converted):
        cli.main([*source, "--question", "Is there a circle?", "--max_new_tokens", "3", "--dtype", "float32",
                  "--device", "cpu"])
        answers.append(capsys.readouterr().out.strip())
    assert answers[0] == answers[1]
