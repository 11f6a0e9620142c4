"""Continual instruction tuning of LLaVA-1.5-7B on CoIN's eight tasks, one after another.

CoIN (Chen et al., 2024) trains ScienceQA -> TextVQA -> ImageNet -> GQA -> VizWiz -> Grounding ->
VQAv2 -> OCR-VQA with no replay, and scores every task seen so far after each one. This script
does that with a continual mixture of LoRA experts: every task adds its router (and experts) and
freezes the past, a task locator picks the task of each test sample, and the accuracy matrix,
final average and backward transfer (BWT) are printed at the end and written to results.json.

Data, in CoIN's layout (``--coin-root`` is CoIN's ``playground/Instructions``, ``--image-root``
its ``cl_dataset``)::

    <coin-root>/<Task>/train.json   LLaVA conversations (image, conversations)
    <coin-root>/<Task>/test.json    CoIN test records (question_id, image, text, answer)

Scores are normalised exact match (VQA-style), except Grounding: a predicted box counts when its
IoU with the reference box is at least 0.5. For CoIN's own scoring rule per task (VQA accuracy
over ten annotators for TextVQA, ...) and CoIN's published settings, run its recipe instead:
``cmoe train coin-llava15-7b --data-root DIR`` (docs: Reproducing a paper).

Real run, 8 GPUs, bf16, gradient checkpointing, DeepSpeed ZeRO-2 (``zero3.json`` when the base
model does not fit on one GPU)::

    deepspeed --num_gpus 8 examples/llava_coin.py --coin-root playground/Instructions \\
        --image-root cl_dataset --deepspeed examples/deepspeed/zero2.json --output-dir runs/llava-coin

Offline smoke test on a tiny random LLaVA and synthetic CoIN-layout data (CPU, seconds)::

    python examples/llava_coin.py --tiny --output-dir /tmp/llava-coin-tiny
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
from collections.abc import Callable, Sequence
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the examples' shared helpers

import _common
import _tiny

from cmoe_adapters import Task
from cmoe_adapters.data import VisionLanguageCollator, load_coin_test_records, load_llava_records
from cmoe_adapters.evaluation import generate_answers
from cmoe_adapters.scorers import box_iou, parse_box

COIN_TASKS = ("ScienceQA", "TextVQA", "ImageNet", "GQA", "VizWiz", "Grounding", "VQAv2", "OCRVQA")
GROUNDING = "Grounding"
# --tiny: three of CoIN's tasks, in CoIN's order, as synthetic look-alikes (see _tiny.py)
TINY_TASKS = {"ScienceQA": "choice", "ImageNet": "shape", "Grounding": "box"}
TINY_TRAIN, TINY_TEST = 12, 6


def grounding_evaluator(
    collator: VisionLanguageCollator, processor: Any, batch_size: int, max_new_tokens: int
) -> Callable[[Any, Sequence[dict]], float]:
    """Share of records whose generated box has IoU >= 0.5 with the reference (task located)."""

    def decode(tokens: torch.Tensor) -> list[str]:
        return processor.batch_decode(tokens, skip_special_tokens=True)

    def evaluate(model: Any, records: Sequence[dict]) -> float:
        answers = generate_answers(
            model, records, collator, decode, batch_size=batch_size, max_new_tokens=max_new_tokens
        )
        hits = 0
        for answer, record in zip(answers, records, strict=True):
            predicted, reference = parse_box(answer), parse_box(str(record["answer"]))
            hits += predicted is not None and reference is not None and box_iou(predicted, reference) >= 0.5
        return hits / len(records)

    return evaluate


def coin_tasks(args: argparse.Namespace, collator: VisionLanguageCollator, processor: Any) -> list[Task]:
    """The chosen CoIN tasks, in order, read with the library's LLaVA and CoIN loaders."""
    tasks = []
    for name in args.tasks:
        folder = os.path.join(args.coin_root, name)
        train = load_llava_records(os.path.join(folder, args.train_file), image_root=args.image_root)
        test = load_coin_test_records(os.path.join(folder, args.test_file), image_root=args.image_root)
        evaluate = None
        if name == GROUNDING:
            evaluate = grounding_evaluator(
                collator, processor, args.eval_batch_size, args.grounding_max_new_tokens
            )
        train, test = _common.limit(train, args.max_train_samples), _common.limit(test, args.max_eval_samples)
        tasks.append(Task(name, train, test, evaluate=evaluate))
    return tasks


def write_tiny_coin(root: str) -> list[str]:
    """A synthetic CoIN-layout data set under `root` (PNG images, train/test json); its text."""
    coin_root, image_root = os.path.join(root, "Instructions"), os.path.join(root, "cl_dataset")
    corpus: list[str] = []
    for seed, (name, kind) in enumerate(TINY_TASKS.items()):
        train = _tiny.synthetic_records(kind, TINY_TRAIN, seed, image_root, f"{name}/train")
        test = _tiny.synthetic_records(kind, TINY_TEST, 100 + seed, image_root, f"{name}/test")
        _tiny.write_json(
            os.path.join(coin_root, name, "train.json"),
            [_tiny.llava_conversation(r, i) for i, r in enumerate(train)],
        )
        _tiny.write_json(
            os.path.join(coin_root, name, "test.json"),
            [_tiny.coin_test_record(r, i) for i, r in enumerate(test)],
        )
        corpus += _tiny.corpus_of(train + test)
    return corpus


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Continual fine-tuning of LLaVA-1.5 on CoIN with a mixture of LoRA experts.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    data = parser.add_argument_group("CoIN data")
    data.add_argument(
        "--coin-root", help="Folder with one sub-folder per task (CoIN's playground/Instructions)."
    )
    data.add_argument(
        "--image-root", help="Folder the records' image paths are relative to (CoIN's cl_dataset)."
    )
    data.add_argument(
        "--tasks",
        type=lambda text: [t for t in text.split(",") if t],
        default=list(COIN_TASKS),
        help="Comma-separated task folders, in training order (default: CoIN's order).",
    )
    data.add_argument(
        "--train-file", default="train.json", help="Training file name inside each task folder."
    )
    data.add_argument("--test-file", default="test.json", help="Test file name inside each task folder.")
    data.add_argument(
        "--grounding-max-new-tokens",
        type=int,
        default=32,
        help="Tokens generated per Grounding answer (a box).",
    )
    _common.add_common_arguments(parser, default_model="llava-hf/llava-1.5-7b-hf")
    args = parser.parse_args(argv)
    if not args.tiny and not (args.coin_root and args.image_root):
        parser.error("--coin-root and --image-root are required (or --tiny for the offline smoke run).")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    with contextlib.ExitStack() as stack:
        if args.tiny:
            _common.apply_tiny_settings(args)
            root = stack.enter_context(tempfile.TemporaryDirectory(prefix="tiny-coin-"))
            corpus = write_tiny_coin(root)
            args.coin_root, args.image_root = (
                os.path.join(root, "Instructions"),
                os.path.join(root, "cl_dataset"),
            )
            args.tasks, args.grounding_max_new_tokens = list(TINY_TASKS), 6
            # built whole on the CPU (a ZeRO-3 engine partitions it when the first task starts)
            model, processor = _tiny.tiny_llava(corpus, seed=args.seed)
        training_args = _common.training_arguments(args)  # before the model: ZeRO-3 loads it sharded
        if not args.tiny:
            from transformers import AutoProcessor, LlavaForConditionalGeneration

            model = LlavaForConditionalGeneration.from_pretrained(args.model, dtype=torch.bfloat16)
            processor = AutoProcessor.from_pretrained(args.model)
        collator = VisionLanguageCollator(processor, max_length=args.max_length)
        tasks = coin_tasks(args, collator, processor)
        _common.run_stream(model, processor, collator, tasks, args, training_args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
