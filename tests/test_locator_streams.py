"""The locator on the two hard kinds of stream: same question / different images, near-duplicate wording.

Real tiny LLaVAs built from config (the random one has the streams' answer words), real easy-vqa
images and drawn ones (`cmoe_adapters.easyvqa.streams`). Locating needs no trained experts: the
feature is taken before any adapter acts.
"""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model

from cmoe_adapters import ContinualMoEConfig, ContinualMoETrainer, ContinualTrainingArguments, Task
from cmoe_adapters.data import VisionLanguageCollator
from cmoe_adapters.easyvqa import build_tiny_llava, shipped_base
from cmoe_adapters.easyvqa.streams import (
    NEAR_DUPLICATE_TASKS,
    SAME_QUESTION_TASKS,
    STREAM_WORDS,
    image_kind_records,
    near_duplicate_records,
    unknown_inputs,
)
from cmoe_adapters.evaluation import generate_answers
from cmoe_adapters.metrics import auroc

STREAMS = {
    "same_question": (SAME_QUESTION_TASKS, image_kind_records),
    "near_duplicate": (NEAR_DUPLICATE_TASKS, near_duplicate_records),
}


def batches(collator, records, size=100):
    for start in range(0, len(records), size):
        yield collator(records[start : start + size])


def located(model, collator, records):
    return model.locate_tasks(**collator.generation_inputs(records), return_scores=True)


@pytest.fixture(scope="module")
def tiny_llava():
    base, processor = build_tiny_llava(seed=0, extra_words=STREAM_WORDS)
    return base.eval(), processor


@pytest.mark.parametrize("stream", list(STREAMS))
def test_stream_is_located_and_unknown_inputs_are_flagged(stream, tiny_llava):
    base, processor = tiny_llava
    tasks, records_of = STREAMS[stream]
    collator = VisionLanguageCollator(processor)
    model = get_peft_model(base, ContinualMoEConfig(r=4, num_experts=2, top_k=1))
    try:
        for task in tasks:
            model.add_task(task)
            model.collect_locator_features(batches(collator, records_of(task, "train", 300)), progress=False)
            model.fit_locator(task)
        correct, total, known = 0, 0, []
        for task in tasks:
            location = located(model, collator, records_of(task, "test", 100, seed=1))
            correct += location.tasks.count(task)  # a rejected input (None) counts as wrong
            total += len(location.tasks)
            known += location.novelty.tolist()
        assert correct / total >= 0.99, f"{stream}: located {correct}/{total}"
        unknown = unknown_inputs(stream, "test", 100, seed=1)
        kinds = ["checkers", "patches_other_question"] if stream == "same_question" else list(unknown)
        for kind in kinds:
            location = located(model, collator, unknown[kind])
            assert auroc(known, location.novelty.tolist()) >= 0.99, f"{stream}: {kind}"
    finally:
        model.unload()


@pytest.mark.slow
@pytest.mark.parametrize(
    ("stream", "base_kind", "steps"),
    [("same_question", "random", 60), ("near_duplicate", "shipped", 100)],  # shipped: no digit words
)
def test_trained_stream_matches_the_oracle_and_leaves_unknown_inputs_to_the_base(
    stream, base_kind, steps, tmp_path, tiny_llava
):
    base, processor = tiny_llava if base_kind == "random" else shipped_base()
    collator = VisionLanguageCollator(processor)
    original = {k: v.clone() for k, v in base.state_dict().items()}
    model = get_peft_model(base, ContinualMoEConfig(r=4, num_experts=2, top_k=1))
    names, records_of = STREAMS[stream]
    tasks = [Task(t, records_of(t, "train", 400), records_of(t, "test", 60, seed=1)) for t in names]
    args = ContinualTrainingArguments(
        output_dir=str(tmp_path),
        max_steps=steps,
        per_device_train_batch_size=16,
        learning_rate=3e-3,
        lr_scheduler_type="constant",
        save_strategy="no",
        logging_strategy="no",
        report_to=[],
        disable_tqdm=True,
        use_cpu=True,
        eval_oracle=True,
        eval_batch_size=60,
        eval_max_new_tokens=3,
    )
    trainer = ContinualMoETrainer(model=model, args=args, data_collator=collator, processing_class=processor)
    try:
        result = trainer.train_tasks(tasks)
        assert result.locator_accuracy >= 0.99
        assert abs(result.final_average - result.oracle_final_average) <= 0.02, result.summary()

        # inputs of no learnt task: exactly what the base model generates on its own
        kind = "patches_other_question" if stream == "same_question" else "what_color"
        questions = unknown_inputs(stream, "test", 20, seed=2)[kind]
        inputs = collator.generation_inputs(questions)
        assert model.locate_tasks(**inputs) == [None] * len(questions)
        kwargs = {"max_new_tokens": 3, "do_sample": False}
        with torch.no_grad():
            generated = model.generate(**inputs, **kwargs)
            with model.disable_adapter():
                expected = model.generate(**inputs, **kwargs)
        assert torch.equal(generated, expected)

        # the fallback changes the learnt tasks' answers only on the inputs it rejected (the
        # open-set rate of the learnt tasks' own inputs; 0 in most runs)
        def decode(tokens):
            return processor.batch_decode(tokens, skip_special_tokens=True)

        def answers():
            return [
                generate_answers(model, t.eval_dataset, collator, decode, batch_size=60, max_new_tokens=3)
                for t in tasks
            ]

        config = model.peft_config["default"]
        with_fallback = answers()
        rejected = [located(model, collator, t.eval_dataset).tasks for t in tasks]
        config.locator_open_set = "nearest"
        routed = answers()
        for task, fallback, nearest, where in zip(tasks, with_fallback, routed, rejected, strict=True):
            for answer, other, located_as in zip(fallback, nearest, where, strict=True):
                assert answer == other or located_as is None, task.name
        assert sum(where.count(None) for where in rejected) <= 0.005 * sum(map(len, rejected))
    finally:
        model.unload()
        assert all(torch.equal(v, original[k]) for k, v in base.state_dict().items())


@pytest.mark.parametrize(("patch_size", "image_tokens"), [(16, 16), (8, 64), (4, 256)])
def test_finer_patches_give_more_image_tokens_and_room_for_them(patch_size, image_tokens):
    """`build_tiny_llava(patch_size=...)`: the towers of benchmarks/locator_image_unknowns.py."""
    base, processor = build_tiny_llava(seed=0, extra_words=STREAM_WORDS, patch_size=patch_size)
    inputs = VisionLanguageCollator(processor).generation_inputs(image_kind_records("digits", "test", 2))
    assert (inputs["input_ids"] == base.config.image_token_index).sum(1).tolist() == [image_tokens] * 2
    assert processor.tokenizer.model_max_length == base.config.text_config.max_position_embeddings
    assert base.config.text_config.max_position_embeddings >= inputs["input_ids"].shape[1] + 200
    with torch.no_grad():
        logits = base(**inputs).logits
    assert logits.shape[:2] == inputs["input_ids"].shape and torch.isfinite(logits).all()
