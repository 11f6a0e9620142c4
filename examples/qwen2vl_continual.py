"""Continual fine-tuning of Qwen2-VL-2B-Instruct on any sequence of LLaVA-format tasks.

Each ``--task name=train.json[:eval.json]`` is one task of the stream, trained in the order given.
Training files hold LLaVA conversations (``image``, ``conversations``); evaluation files either
LLaVA conversations (the last turn's answer is the reference) or CoIN test records (``question_id,
image, text, answer``). Image paths are relative to ``--image-root``. Every task adds its router
(and experts) and freezes the past; after each task every task seen so far is scored by normalised
exact match with the task *located*, and the accuracy matrix, final average and BWT are printed at
the end and written to results.json.

Real run, 4 GPUs, bf16, gradient checkpointing::

    accelerate launch --num_processes 4 examples/qwen2vl_continual.py --image-root data/images \\
        --task vqa=data/vqa/train.json:data/vqa/test.json \\
        --task ocr=data/ocr/train.json:data/ocr/test.json --output-dir runs/qwen2vl

Offline smoke test on a tiny random Qwen2-VL and synthetic data (CPU, seconds)::

    python examples/qwen2vl_continual.py --tiny --output-dir /tmp/qwen2vl-tiny
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the examples' shared helpers

import _common
import _tiny

from cmoe_adapters import Task
from cmoe_adapters.config import validate_task_name
from cmoe_adapters.data import (
    DataError,
    VisionLanguageCollator,
    load_coin_test_records,
    load_llava_records,
)

# --tiny: three synthetic tasks; the last one's eval file is in CoIN's test format, the others' in
# LLaVA's, so that both evaluation formats are read.
TINY_TASKS = {"colors": "color", "shapes": "shape", "choices": "choice"}
TINY_TRAIN, TINY_EVAL = 12, 6
TINY_SIDE = 32  # --tiny images are resized to 32x32 pixels: 8x8 patches of 4, 16 tokens after merging


@dataclass
class TaskSpec:
    """One ``--task name=train.json[:eval.json]``."""

    name: str
    train: str
    eval: str | None


def parse_task(text: str) -> TaskSpec:
    """``name=train.json[:eval.json]`` -> `TaskSpec` (argparse type; the name must be a valid task)."""
    name, sep, files = text.partition("=")
    train, _, evaluation = files.partition(":")
    if not sep or not name or not train:
        raise argparse.ArgumentTypeError(f"{text!r}: expected name=train.json[:eval.json]")
    try:
        validate_task_name(name)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return TaskSpec(name, train, evaluation or None)


def _first_record(path: str) -> object:
    """The file's first record (None when empty), to tell the evaluation formats apart."""
    if not os.path.exists(path):
        raise DataError(f"{path}: no such file.")
    with open(path, encoding="utf-8") as handle:
        if path.endswith(".jsonl"):
            return json.loads(next((line for line in handle if line.strip()), "null"))
        data = json.load(handle)
    return data[0] if isinstance(data, list) and data else None


def load_eval_records(path: str, image_root: str | None) -> list[dict]:
    """Evaluation records ``{"image", "question", "answer"}`` from CoIN test or LLaVA files."""
    first = _first_record(path)
    if isinstance(first, dict) and "conversations" not in first:
        return load_coin_test_records(path, image_root=image_root)
    records = []
    for index, record in enumerate(load_llava_records(path, image_root=image_root)):
        turns = record["conversations"]
        if len(turns) != 2:
            raise DataError(f"{path}: record {index}: evaluation records need one question and one answer.")
        question = turns[0]["value"].replace("<image>", "").strip()
        records.append({"image": record["image"], "question": question, "answer": turns[1]["value"]})
    return records


def build_tasks(args: argparse.Namespace) -> list[Task]:
    """One `Task` per ``--task``, read with the library's loaders."""
    tasks = []
    for spec in args.task:
        train = load_llava_records(spec.train, image_root=args.image_root)
        evaluation = load_eval_records(spec.eval, args.image_root) if spec.eval else None
        if evaluation is not None:
            evaluation = _common.limit(evaluation, args.max_eval_samples)
        tasks.append(Task(spec.name, _common.limit(train, args.max_train_samples), evaluation))
    return tasks


def write_tiny_tasks(root: str) -> tuple[list[TaskSpec], list[str]]:
    """Synthetic tasks under `root` (PNG images, LLaVA train files, eval files); specs and text."""
    specs, corpus = [], []
    for seed, (name, kind) in enumerate(TINY_TASKS.items()):
        train = _tiny.synthetic_records(kind, TINY_TRAIN, seed, root, f"{name}/train")
        test = _tiny.synthetic_records(kind, TINY_EVAL, 100 + seed, root, f"{name}/test")
        train_path, eval_path = os.path.join(root, name, "train.json"), os.path.join(root, name, "eval.json")
        _tiny.write_json(train_path, [_tiny.llava_conversation(r, i) for i, r in enumerate(train)])
        coin_format = seed == len(TINY_TASKS) - 1
        convert = _tiny.coin_test_record if coin_format else _tiny.llava_conversation
        _tiny.write_json(eval_path, [convert(r, i) for i, r in enumerate(test)])
        specs.append(TaskSpec(name, train_path, eval_path))
        corpus += _tiny.corpus_of(train + test)
    return specs, corpus


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Continual fine-tuning of Qwen2-VL on LLaVA-format tasks with a mixture of LoRA experts.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    data = parser.add_argument_group("data")
    data.add_argument(
        "--task",
        type=parse_task,
        action="append",
        default=[],
        metavar="NAME=TRAIN[:EVAL]",
        help="A task: its name, LLaVA-format training file and optional evaluation file. Repeat, in order.",
    )
    data.add_argument("--image-root", help="Folder the records' image paths are relative to.")
    data.add_argument(
        "--min-pixels", type=int, default=256 * 28 * 28, help="Smallest image size (pixels) fed to the model."
    )
    data.add_argument(
        "--max-pixels",
        type=int,
        default=1024 * 28 * 28,
        help="Largest image size (pixels); each 28x28 block is one image token.",
    )
    _common.add_common_arguments(parser, default_model="Qwen/Qwen2-VL-2B-Instruct")
    args = parser.parse_args(argv)
    if not args.tiny and not args.task:
        parser.error("give at least one --task name=train.json[:eval.json] (or --tiny for the smoke run)")
    names = [spec.name for spec in args.task]
    if len(set(names)) != len(names):
        parser.error(f"task names must be unique, got {names}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    with contextlib.ExitStack() as stack:
        if args.tiny:
            _common.apply_tiny_settings(args)
            root = stack.enter_context(tempfile.TemporaryDirectory(prefix="tiny-qwen2vl-"))
            args.task, corpus = write_tiny_tasks(root)
            args.image_root = root
            args.min_pixels = args.max_pixels = TINY_SIDE * TINY_SIDE
            # built whole on the CPU (a ZeRO-3 engine partitions it when the first task starts)
            model, processor = _tiny.tiny_qwen2_vl(corpus, seed=args.seed)
        training_args = _common.training_arguments(args)  # before the model: ZeRO-3 loads it sharded
        if not args.tiny:
            from transformers import AutoProcessor, Qwen2VLForConditionalGeneration

            model = Qwen2VLForConditionalGeneration.from_pretrained(args.model, dtype=torch.bfloat16)
            processor = AutoProcessor.from_pretrained(args.model)
        # the image budget bounds the number of image tokens, hence memory and speed
        processor.image_processor.size = {"shortest_edge": args.min_pixels, "longest_edge": args.max_pixels}
        collator = VisionLanguageCollator(processor, max_length=args.max_length)
        _common.run_stream(model, processor, collator, build_tasks(args), args, training_args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
