"""A synthetic task stream on the tiny Llama where forgetting is real and fast to show.

Each task has its own prompt vocabulary and its own answer token. A single LoRA trained on the
tasks one after another ends up answering every prompt with the newest task's token; keeping the
old tasks needs per-task routing and a locator that recognises the prompts.
"""

from __future__ import annotations

import torch

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
