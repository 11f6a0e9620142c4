"""LLaVA / CoIN loading and the vision-language collator (real LlavaProcessor, word-level tokenizer)."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from cmoe_adapters.data import (
    DataError,
    VisionLanguageCollator,
    load_coin_test_records,
    load_llava_records,
    to_messages,
)
from cmoe_adapters.easyvqa.tiny_llava import build_processor


@pytest.fixture(scope="module")
def collator() -> VisionLanguageCollator:
    return VisionLanguageCollator(build_processor())


@pytest.fixture
def image_root(tmp_path):
    Image.new("RGB", (64, 64), "blue").save(tmp_path / "a.png")
    return tmp_path


def learnt_tokens(collator, batch, row):
    ids, labels = batch["input_ids"][row], batch["labels"][row]
    return collator.tokenizer.convert_ids_to_tokens(ids[labels != -100].tolist())


def test_llava_records_load_and_collate_multi_turn(collator, image_root):
    data = [
        {
            "id": "x1",
            "image": "a.png",
            "conversations": [
                {"from": "human", "value": "<image>\nwhat color is the shape?"},
                {"from": "gpt", "value": "blue"},
                {"from": "human", "value": "what shape is in the image?"},
                {"from": "gpt", "value": "circle"},
            ],
        }
    ]
    path = image_root / "train.json"
    path.write_text(json.dumps(data))
    records = load_llava_records(str(path), image_root=str(image_root))
    assert records[0]["image"] == str(image_root / "a.png")
    batch = collator(records)
    learnt = learnt_tokens(collator, batch, 0)
    assert "blue" in learnt and learnt[-2:] == ["circle", "</s>"]
    assert "what" not in learnt and "<image>" not in learnt
    prompt = collator.generation_inputs(records)
    text = collator.tokenizer.decode(prompt["input_ids"][0], skip_special_tokens=True)
    assert text.rstrip().endswith("what shape is in the image ? assistant :") and "circle" not in text


def test_coin_test_records(image_root):
    path = image_root / "test.json"
    path.write_text(
        json.dumps([{"question_id": 7, "image": "a.png", "text": "what color?", "answer": "blue"}])
    )
    records = load_coin_test_records(str(path), image_root=str(image_root))
    assert records == [
        {"question_id": 7, "image": str(image_root / "a.png"), "question": "what color?", "answer": "blue"}
    ]


def test_single_turn_records_put_the_image_first(collator):
    messages = to_messages({"image": "x.png", "question": "what color?", "answer": "red"})
    assert messages[0]["content"][0] == {"type": "image"}
    assert messages[1] == {"role": "assistant", "content": [{"type": "text", "text": "red"}]}
    batch = collator(
        [{"image": Image.new("RGB", (64, 64)), "question": "what color is it?", "answer": "red"}]
    )
    assert learnt_tokens(collator, batch, 0) == ["red", "</s>"]


def test_bad_files_and_records_are_named(image_root):
    missing_image = image_root / "m.json"
    missing_image.write_text(json.dumps([{"id": "q9", "image": "nope.png", "conversations": [
        {"from": "human", "value": "<image>\\nhi"}, {"from": "gpt", "value": "yo"}]}]))  # fmt: skip
    with pytest.raises(DataError, match=r"m\.json: record 0 \(q9\): image file .*nope\.png does not exist"):
        load_llava_records(str(missing_image), image_root=str(image_root))
    malformed = image_root / "bad.json"
    malformed.write_text(json.dumps([{"id": "q1", "conversations": [{"from": "robot", "value": "x"}]}]))
    with pytest.raises(DataError, match=r"bad\.json: record 0 \(q1\): every turn needs 'from'"):
        load_llava_records(str(malformed))
    broken = image_root / "broken.json"
    broken.write_text("[{")
    with pytest.raises(DataError, match=r"broken\.json: not valid JSON"):
        load_llava_records(str(broken))
    with pytest.raises(DataError, match="no such file"):
        load_coin_test_records(str(image_root / "absent.json"))
    coin = image_root / "coin.json"
    coin.write_text(json.dumps([{"image": "a.png", "text": "q"}]))
    with pytest.raises(DataError, match=r"record 0: missing \['answer'\]"):
        load_coin_test_records(str(coin), image_root=str(image_root))


def test_a_missing_image_at_collate_time_names_the_file(collator, tmp_path):
    with pytest.raises(DataError, match=r"gone\.png does not exist"):
        collator([{"image": str(tmp_path / "gone.png"), "question": "what?", "answer": "x"}])


# The generation prompt ends in "assistant :", but the template renders answers as "assistant : red":
# LLaVA-1.5's Vicuna format ("ASSISTANT:" / "ASSISTANT: red"). ChatML (Qwen) puts no gap there.
_GAP_TEMPLATE = (
    "{%- for m in messages -%}{{- m['role'] + ' : ' -}}{%- for p in m['content'] -%}"
    "{%- if p['type'] == 'image' -%}{{- '<image> ' -}}{%- else -%}{{- p['text'] + ' ' -}}{%- endif -%}"
    "{%- endfor -%}{%- endfor -%}{%- if add_generation_prompt -%}{{- 'assistant :' -}}{%- endif -%}"
)
_NO_GAP_TEMPLATE = (
    "{%- for m in messages -%}{{- m['role'] + ' :\n' -}}{%- for p in m['content'] -%}"
    "{%- if p['type'] == 'image' -%}{{- '<image> ' -}}{%- else -%}{{- p['text'] -}}{%- endif -%}"
    "{%- endfor -%}{{- '\n' -}}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- 'assistant :\n' -}}{%- endif -%}"
)


@pytest.mark.parametrize(
    ("template", "learnt_text"), [(_GAP_TEMPLATE, " red</s>"), (_NO_GAP_TEMPLATE, "red</s>")]
)
def test_the_answer_follows_the_generation_prompt_as_the_template_renders_it(template, learnt_text):
    processor = build_processor()
    processor.chat_template = template
    collator = VisionLanguageCollator(processor)
    record = {"image": Image.new("RGB", (64, 64)), "question": "what color is it?", "answer": "red"}
    messages = to_messages(record)
    text, _ = collator._spans(messages)
    prompt = collator._render(messages[:-1], generation_prompt=True)
    assert text == prompt + learnt_text
    assert learnt_tokens(collator, collator([record]), 0) == ["red", "</s>"]


def test_reference_answer_is_the_answer_or_the_last_assistant_turn():
    from cmoe_adapters.data import reference_answer

    assert reference_answer({"question": "q", "answer": "red"}) == "red"
    conversation = {
        "conversations": [
            {"from": "human", "value": "<image>\nwhat color?"},
            {"from": "gpt", "value": "red"},
            {"from": "human", "value": "and the shape?"},
            {"from": "gpt", "value": "circle"},
        ]
    }
    assert reference_answer(conversation) == "circle"
    with pytest.raises(DataError, match="assistant turn"):
        reference_answer({"conversations": [{"from": "human", "value": "hi"}]})
