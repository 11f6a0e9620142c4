"""LLaVA / CoIN loading and the vision-language collator (real LlavaProcessor, word-level tokenizer)."""

from __future__ import annotations

import json

import pytest
import torch
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


# ---------------------------------------------------------------- truncation (max_length)
# One processor per family the collator serves, each with a real image processor and a word-level
# tokenizer (every word a token, so that which words survive a cut can be read off exactly).

_FILLER = tuple(f"w{i}" for i in range(40))
_WORDS = (*_FILLER, "context", "question", "what", "color", "is", "the", "shape", "?", ":", "blue", "red",
          "user", "assistant", "answer", "with", "letter", "of")  # fmt: skip
# head ("context : w0 ...") and tail ("... question : what color is the shape ?") of a long question
_LONG = "context : " + " ".join(_FILLER) + " question : what color is the shape ?"


def _word_tokenizer(specials: tuple[str, ...], eos: str):
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate((*specials, *_WORDS))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(list(specials))
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", eos_token=eos, padding_side="left"
    )


def _llava():
    return build_processor(_WORDS), "<image>", 16


def _qwen2_vl():
    from transformers import Qwen2VLProcessor

    from cmoe_adapters._compat import pil_image_processor_class

    class ImageOnlyQwen2VLProcessor(Qwen2VLProcessor):  # its video processor needs torchvision
        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            super().__init__(image_processor, tokenizer, None, chat_template=chat_template)

    specials = ("<pad>", "<unk>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                "<|image_pad|>", "<|video_pad|>")  # fmt: skip
    template = (  # ChatML, as Qwen2-VL's: no gap between the generation prompt and the answer
        "{%- for m in messages -%}{{- '<|im_start|>' + m['role'] + '\n' -}}{%- for p in m['content'] -%}"
        "{%- if p['type'] == 'image' -%}{{- '<|vision_start|><|image_pad|><|vision_end|>' -}}"
        "{%- else -%}{{- p['text'] -}}{%- endif -%}{%- endfor -%}{{- '<|im_end|>\n' -}}{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\n' -}}{%- endif -%}"
    )
    image_processor = pil_image_processor_class("Qwen2VLImageProcessor")(
        min_pixels=32 * 32, max_pixels=32 * 32, patch_size=8, merge_size=2, temporal_patch_size=2
    )
    tokenizer = _word_tokenizer(specials, eos="<|im_end|>")
    processor = ImageOnlyQwen2VLProcessor(image_processor, tokenizer, chat_template=template)
    return processor, "<|image_pad|>", 4  # a 4x4 patch grid, merged 2x2


def _idefics3():
    from transformers import Idefics3Processor

    from cmoe_adapters._compat import pil_image_processor_class

    specials = (
        "<pad>",
        "<unk>",
        "<image>",
        "<fake_token_around_image>",
        "<global-img>",
        "<end_of_utterance>",
    )
    template = (
        "{%- for m in messages -%}{{- m['role'] + ' :' -}}{%- for p in m['content'] -%}"
        "{%- if p['type'] == 'image' -%}{{- ' <image>' -}}{%- else -%}{{- ' ' + p['text'] -}}{%- endif -%}"
        "{%- endfor -%}{{- '<end_of_utterance>\n' -}}{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{- 'assistant :' -}}{%- endif -%}"
    )
    image_processor = pil_image_processor_class("Idefics3ImageProcessor")(
        do_image_splitting=False, size={"longest_edge": 32}, max_image_size={"longest_edge": 32}
    )
    tokenizer = _word_tokenizer(specials, eos="<end_of_utterance>")
    processor = Idefics3Processor(image_processor, tokenizer, image_seq_len=4, chat_template=template)
    return processor, "<image>", 4


_FAMILIES = {"llava": _llava, "qwen2_vl": _qwen2_vl, "idefics3": _idefics3}


@pytest.fixture(scope="module", params=sorted(_FAMILIES))
def family(request):
    processor, image_token, image_tokens = _FAMILIES[request.param]()
    return processor, processor.tokenizer.convert_tokens_to_ids(image_token), image_tokens


def _row(batch, row, key="input_ids"):
    return batch[key][row][batch["attention_mask"][row] == 1]


def _tokens(collator, ids):
    return collator.tokenizer.convert_ids_to_tokens(ids.tolist())


def _long_record(answer="blue", **extra):
    return {"id": "long-1", "image": Image.new("RGB", (32, 32), "blue"), "question": _LONG, "answer": answer,
            **extra}  # fmt: skip


def test_truncation_cuts_the_middle_of_the_question_never_the_answer_or_the_image(family):
    processor, image_id, image_tokens = family
    records = [
        _long_record(),
        {"image": Image.new("RGB", (32, 32)), "question": "what color ?", "answer": "red"},
    ]
    full = VisionLanguageCollator(processor)(records)
    full_lengths = full["attention_mask"].sum(1).tolist()
    max_length = full_lengths[0] - 20
    assert full_lengths[1] <= max_length < full_lengths[0]  # only the first sample is too long

    collator = VisionLanguageCollator(processor, max_length=max_length)
    batch = collator(records)
    assert batch["input_ids"].shape[1] <= max_length
    ids, labels = _row(batch, 0), _row(batch, 0, "labels")
    assert len(ids) == max_length  # cut exactly as far as needed
    eos = collator.tokenizer.eos_token
    assert _tokens(collator, ids[labels != -100]) == ["blue", eos]
    assert int((ids == image_id).sum()) == image_tokens  # every image token kept
    kept = _tokens(collator, ids)
    assert kept.index("context") < kept.index("w0") < kept.index("question")  # head and tail survive,
    assert "w20" not in kept and "w39" in kept  # ... the middle goes
    assert kept[kept.index("question") :][:8] == ["question", ":", "what", "color", "is", "the", "shape", "?"]
    # the sample that fitted is left exactly as it was
    assert torch.equal(_row(batch, 1), _row(full, 1)) and torch.equal(
        _row(batch, 1, "labels"), _row(full, 1, "labels")
    )


def test_a_sample_that_cannot_fit_is_refused_with_its_record_named(family):
    processor, _, image_tokens = family
    collator = VisionLanguageCollator(processor, max_length=image_tokens + 2)
    with pytest.raises(DataError, match=r"record id='long-1': the sample takes \d+ tokens even with the "
                       r"question text cut away entirely .* more than max_length=\d+"):  # fmt: skip
        collator([_long_record()])
    with pytest.raises(DataError, match=r"record id='long-1': the prompt takes"):
        collator.generation_inputs([_long_record()])


def test_generation_prompts_are_cut_the_same_way(family):
    processor, image_id, image_tokens = family
    untruncated = VisionLanguageCollator(processor)
    end = _tokens(untruncated, _row(untruncated.generation_inputs([_long_record()]), 0))[-2:]
    max_length = int(untruncated([_long_record()])["attention_mask"].sum()) - 20
    collator = VisionLanguageCollator(processor, max_length=max_length)
    prompt = _row(collator.generation_inputs([_long_record()]), 0)
    assert len(prompt) == max_length
    kept = _tokens(collator, prompt)
    assert kept[-2:] == end  # ends with the generation prompt, where the answer is generated
    assert "blue" not in kept and int((prompt == image_id).sum()) == image_tokens
    assert "context" in kept and "w0" in kept and "w20" not in kept
    assert kept[kept.index("question") :][:8] == ["question", ":", "what", "color", "is", "the", "shape", "?"]
    # the training sample keeps the same head of the question as the prompt, and more of it is cut
    learnt = _tokens(collator, _row(collator([_long_record()]), 0))
    assert learnt[: learnt.index("w0") + 1] == kept[: kept.index("w0") + 1]


def test_the_issue_example_learns_the_answer_not_prompt_words():
    # issue 15: with max_length=8 the labels were "color", "of" (the end was cut, labels counted from it)
    collator = VisionLanguageCollator(build_processor(_WORDS), max_length=8)
    batch = collator([{"question": "what is the color of the shape ?", "answer": "blue"}])
    assert batch["input_ids"].shape[1] == 8
    assert learnt_tokens(collator, batch, 0) == ["blue", "</s>"]


def test_multi_turn_truncation_keeps_every_answer():
    collator = VisionLanguageCollator(build_processor(_WORDS))
    record = {"id": "mt", "image": Image.new("RGB", (64, 64)), "conversations": [
        {"from": "human", "value": "<image>\n" + _LONG}, {"from": "gpt", "value": "blue"},
        {"from": "human", "value": "what shape is the " + " ".join(_FILLER[:10]) + " ?"},
        {"from": "gpt", "value": "red"}]}  # fmt: skip
    full = int(collator([record])["attention_mask"].sum())
    collator.max_length = full - 30
    batch = collator([record])
    assert batch["input_ids"].shape[1] == full - 30
    learnt = learnt_tokens(collator, batch, 0)
    assert learnt[0] == "blue" and learnt[-2:] == ["red", "</s>"]
    kept = collator.tokenizer.convert_ids_to_tokens(batch["input_ids"][0].tolist())
    assert kept.count("<image>") == 16 and "context" in kept and kept.count("what") == 2


# ---------------------------------------------------------------- text-only records among images


def test_a_batch_may_mix_records_with_and_without_an_image(family):
    """ScienceQA has text-only questions: their rows get no image token, the others keep theirs."""
    processor, image_id, image_tokens = family
    collator = VisionLanguageCollator(processor)
    pictured = {"image": Image.new("RGB", (32, 32), "red"), "question": "what color ?", "answer": "red"}
    text_only = {"image": None, "question": "what is the answer ?", "answer": "blue"}
    for batch in (collator([pictured, text_only]), collator.generation_inputs([text_only, pictured])):
        counts = (batch["input_ids"] == image_id).sum(dim=1).tolist()
        assert sorted(counts) == [0, image_tokens] and "pixel_values" in batch


def test_a_vision_language_model_trains_and_answers_on_a_mixed_batch():
    from cmoe_adapters.tiny_models import tiny_llava

    model, processor = tiny_llava(["what color is it ?", "red", "which letter ? A", "B"])
    collator = VisionLanguageCollator(processor)
    records = [
        {"image": Image.new("RGB", (32, 32), "red"), "question": "what color is it ?", "answer": "red"},
        {"image": None, "question": "which letter ? A", "answer": "B"},
    ]
    loss = model(**collator(records)).loss
    assert torch.isfinite(loss) and loss > 0
    generated = model.generate(**collator.generation_inputs(records), max_new_tokens=2, do_sample=False)
    assert generated.shape[0] == 2
