"""A continual stream with TRL's `SFTTrainer`: its own VLM collator, the model's task lifecycle.

The demo's tiny LLaVA (a real `LlavaProcessor` with a chat template) learns easy-vqa tasks one after
another. Each task is a prompt-completion data set in TRL's conversational format, trained by
`SFTTrainer` (which masks the prompt) inside ``model.learning_task(name)``; LLaVA-CMoE's probe
phase is one more short `SFTTrainer` run inside ``model.probing_task(name)``. `RouterAuxLossMixin`
adds the routers' balancing loss to TRL's loss. After each task every seen task is scored with its
task located, each task is saved to ``<output-dir>/<task>``, and the accuracy matrix is written to
``<output-dir>/results.json``.

    pip install trl
    python examples/trl_sft_continual.py --preset llava_cmoe --steps 40 --output-dir /tmp/trl-cmoe
"""

from __future__ import annotations

import argparse
import copy
import json
import os

from datasets import Dataset
from peft import get_peft_model
from trl import SFTConfig, SFTTrainer

from cmoe_adapters import ContinualMoEConfig, ContinualResult, RouterAuxLossMixin
from cmoe_adapters.config import PRESETS
from cmoe_adapters.easyvqa import TASK_ORDER, load_task, shipped_base
from cmoe_adapters.evaluation import exact_match_accuracy


class ContinualSFTTrainer(RouterAuxLossMixin, SFTTrainer):
    """TRL's SFTTrainer whose loss also carries the routers' balancing loss."""


def conversational(records: list[dict]) -> Dataset:
    """easy-vqa records as TRL's prompt-completion conversational data set (prompt masked by TRL)."""
    return Dataset.from_list(
        [
            {
                "prompt": [
                    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": r["question"]}]}
                ],
                "completion": [{"role": "assistant", "content": [{"type": "text", "text": r["answer"]}]}],
                "images": [r["image"]],
            }
            for r in records
        ]
    )


class SFTPrompts:
    """Prompts for scoring, formatted exactly as `SFTTrainer` formatted them for training.

    TRL tokenizes the chat template's text without the tokenizer's special tokens (no ``<s>``);
    scored prompts must match, or the locator rightly finds them unlike any learnt task.
    """

    def __init__(self, processor) -> None:
        self.processor = processor

    def generation_inputs(self, records: list[dict]) -> dict:
        prompts = conversational(records)["prompt"]
        texts = [
            self.processor.apply_chat_template(p, add_generation_prompt=True, tokenize=False) for p in prompts
        ]
        images = [[r["image"]] for r in records]
        return dict(
            self.processor(
                images=images, text=texts, padding=True, return_tensors="pt", add_special_tokens=False
            )
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", choices=PRESETS, default="llava_cmoe")
    parser.add_argument("--tasks", type=int, default=2, help="how many easy-vqa tasks, in the demo's order")
    parser.add_argument("--steps", type=int, default=40, help="SFTTrainer steps per task")
    parser.add_argument("--train", type=int, default=320, help="training questions per task")
    parser.add_argument("--test", type=int, default=60, help="test questions per task")
    parser.add_argument("--output-dir", default="trl-cmoe")
    args = parser.parse_args()

    base, processor = shipped_base()
    model = get_peft_model(
        copy.deepcopy(base), ContinualMoEConfig.from_preset(args.preset, r=4, num_experts=2, top_k=1)
    )
    prompts = SFTPrompts(processor)
    names = TASK_ORDER[: args.tasks]
    tests = {name: load_task(name, "test", args.test, seed=1) for name in names}
    result = ContinualResult()

    def sft(name: str, data: Dataset, steps: int, folder: str) -> ContinualSFTTrainer:
        config = SFTConfig(
            output_dir=os.path.join(args.output_dir, "checkpoints", folder),
            max_steps=steps,
            per_device_train_batch_size=16,
            learning_rate=3e-3,
            lr_scheduler_type="constant",
            gradient_checkpointing=False,
            logging_steps=max(1, steps // 4),
            save_strategy="no",
            report_to=[],
            use_cpu=True,
            disable_tqdm=True,
        )
        trainer = ContinualSFTTrainer(
            model=model, args=config, train_dataset=data, processing_class=processor
        )
        trainer.train()
        return trainer

    for index, name in enumerate(names):
        data = conversational(load_task(name, "train", args.train, seed=0))
        if model.needs_probe(name):  # LLaVA-CMoE: a short probe run decides where new experts go
            share = model.peft_config["default"].expansion_probe_fraction
            with model.probing_task(name):
                sft(
                    name,
                    data.select(range(max(16, int(share * len(data))))),
                    max(2, int(share * args.steps)),
                    f"{name}.probe",
                )
        with model.learning_task(name) as task:
            trainer = sft(name, data, args.steps, name)
        model.save_pretrained(os.path.join(args.output_dir, name))

        def decode(tokens):
            return processor.batch_decode(tokens, skip_special_tokens=True)

        row = [
            exact_match_accuracy(model, tests[seen], prompts, decode, batch_size=60, max_new_tokens=3)
            for seen in names[: index + 1]
        ]
        aux = [h["router_aux_loss"] for h in trainer.state.log_history if "router_aux_loss" in h]
        result.tasks.append(name)
        result.accuracy_matrix.append(row)
        result.task_logs.append({"task": name, **task.log, "router_aux_loss": aux})
        print(
            f"after {name}: "
            + ", ".join(f"{seen} {100 * acc:.1f}" for seen, acc in zip(names, row, strict=False))
        )

    summary = result.summary()
    print(f"final average {100 * summary['final_average']:.1f}, bwt {100 * summary['bwt']:+.1f}")
    with open(os.path.join(args.output_dir, "results.json"), "w", encoding="utf-8") as handle:
        json.dump(result.to_dict(), handle, indent=2, default=str)


if __name__ == "__main__":
    main()
