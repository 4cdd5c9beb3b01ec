import pytest

from Uni_MoE.checkpoint.tiny import tokenizer_corpus
from Uni_MoE.data.conversation import IGNORE_INDEX, SYSTEM, render_prompt, tokenize_conversation
from Uni_MoE.data.schema import SampleError, parse_sample
from Uni_MoE.data.tokenizer import train_tokenizer

IDS = {"image": 900, "video": 901, "speech": 902, "audio": 903}


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(tokenizer_corpus(), vocab_size=1024)


def _enc(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def test_labels_cover_answers_only(tok):
    turns = [
        {"from": "human", "value": "<image>\nWhat colour is the shape?"},
        {"from": "gpt", "value": "red"},
        {"from": "human", "value": "And the shape?"},
        {"from": "gpt", "value": "circle"},
    ]
    ids, labels = tokenize_conversation(tok, turns, {"image": [3]}, IDS)
    q1 = [900] * 3 + _enc(tok, "\nWhat colour is the shape? ASSISTANT:")
    first = _enc(tok, SYSTEM + " USER: ") + q1
    a1 = _enc(tok, " red") + [tok.eos_token_id]
    q2 = _enc(tok, "USER: And the shape? ASSISTANT:")
    a2 = _enc(tok, " circle") + [tok.eos_token_id]
    assert ids == [tok.bos_token_id] + first + a1 + q2 + a2
    ignore = lambda n: [IGNORE_INDEX] * n  # noqa: E731
    assert labels == ignore(1 + len(first)) + a1 + ignore(len(q2)) + a2
    assert tok.decode([t for t in labels if t != IGNORE_INDEX]).replace(" ", "") == "red</s>circle</s>"


def test_generation_prompt_ends_with_assistant(tok):
    turns = [{"from": "human", "value": "Hi <speech>"}, {"from": "gpt", "value": ""}]
    ids, labels = tokenize_conversation(tok, turns, {"speech": [4]}, IDS, for_generation=True)
    assert all(label == IGNORE_INDEX for label in labels)
    assert ids.count(902) == 4
    assert render_prompt(turns).endswith("USER: Hi <speech> ASSISTANT:")


def test_placeholder_and_media_counts_must_agree(tok):
    turns = [{"from": "human", "value": "<image><image>"}, {"from": "gpt", "value": "x"}]
    with pytest.raises(ValueError, match="more <image> placeholders"):
        tokenize_conversation(tok, turns, {"image": [2]}, IDS)
    with pytest.raises(ValueError, match="without placeholders"):
        tokenize_conversation(tok, turns[:1] + turns[1:], {"image": [2, 2, 2]}, IDS)


def test_voice_maps_to_speech_or_audio():
    record = {"id": "s1", "voice": ["a.wav"], "image": "x.jpg",
              "conversations": [{"from": "human", "value": "<image>\n<audio>\nQ"}, {"from": "gpt", "value": "A"}]}
    speech = parse_sample(record, 0, voice_modality="speech")
    assert speech.speech == ["a.wav"] and not speech.audio
    assert speech.conversations[0]["value"] == "<image>\n<speech>\nQ"
    assert speech.modality == "image+speech"
    sound = parse_sample(record, 0, voice_modality="audio")
    assert sound.audio == ["a.wav"] and sound.conversations[0]["value"] == "<image>\n<audio>\nQ"


def test_missing_placeholder_is_prepended_and_bad_records_are_named():
    s = parse_sample({"image": "x.jpg", "conversations": [{"from": "human", "value": "Q"}]}, 3)
    assert s.conversations[0]["value"] == "<image>\nQ"
    with pytest.raises(SampleError, match="sample 4 .*conversations"):
        parse_sample({"id": "b", "conversations": []}, 4)
    with pytest.raises(SampleError, match="field 'voice'"):
        parse_sample({"voice": 3, "conversations": [{"from": "human", "value": "Q"}]}, 5)
    with pytest.raises(SampleError, match="2 '<audio>' placeholders but 1 audio"):
        parse_sample({"audio": ["a.wav"], "conversations": [{"from": "human", "value": "<audio><audio>"}]}, 6)
