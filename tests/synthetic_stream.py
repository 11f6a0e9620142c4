"""A synthetic task stream on the tiny Llama where forgetting is real and fast to show.

Each task has its own prompt vocabulary and its own answer token. A single LoRA trained on the
tasks one after another ends up answering every prompt with the newest task's token; keeping the
old tasks needs per-task routing and a locator that recognises the prompts.
"""

from __future__ import annotations

import torch
from conftest import tiny_llama
from peft import get_peft_model

from cmoe_adapters import ContinualMoEConfig, ContinualMoETrainer, ContinualTrainingArguments, Task

TASKS = {"low": ((3, 30), 91), "mid": ((33, 60), 92), "high": ((63, 90), 93)}
PROMPT_LENGTH = 6


def records(task: str, count: int, seed: int) -> list[dict]:
    (low, high), answer = TASKS[task]
    generator = torch.Generator().manual_seed(seed)
    prompts = torch.randint(low, high, (count, PROMPT_LENGTH), generator=generator)
    return [{"prompt": row.tolist(), "answer": answer} for row in prompts]


class TokenCollator:
    """prompt + answer -> input_ids, attention_mask, labels (only the answer is learnt)."""

    def __call__(self, batch: list[dict]) -> dict[str, torch.Tensor]:
        ids = torch.tensor([r["prompt"] + [r["answer"]] for r in batch])
        labels = ids.clone()
        labels[:, :PROMPT_LENGTH] = -100
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


@torch.no_grad()
def answer_accuracy(model, dataset) -> float:
    """Greedy next token after the prompt, with no task given (the model must locate)."""
    prompts = torch.tensor([r["prompt"] for r in dataset])
    device = next(model.parameters()).device
    generated = model.generate(
        input_ids=prompts.to(device),
        attention_mask=torch.ones_like(prompts).to(device),
        max_new_tokens=1,
        do_sample=False,
        pad_token_id=0,
    )
    answers = torch.tensor([r["answer"] for r in dataset], device=device)
    return (generated[:, -1] == answers).float().mean().item()


def stream(train=96, evaluate=24) -> list[Task]:
    return [
        Task(name, records(name, train, i), records(name, evaluate, 100 + i), evaluate=answer_accuracy)
        for i, name in enumerate(TASKS)
    ]


def trainer_for(model, output_dir, **overrides) -> ContinualMoETrainer:
    settings = {
        "output_dir": str(output_dir),
        "max_steps": 24,
        "per_device_train_batch_size": 8,
        "learning_rate": 5e-3,
        "save_strategy": "no",
        "report_to": [],
        "disable_tqdm": True,
        "use_cpu": True,
        **overrides,
    }
    return ContinualMoETrainer(
        model=model, args=ContinualTrainingArguments(**settings), data_collator=TokenCollator()
    )


def moe_model(**config):
    defaults = {"r": 4, "num_experts": 2, "top_k": 1, "locator_steps": 100}
    return get_peft_model(tiny_llama(), ContinualMoEConfig(**{**defaults, **config}))
