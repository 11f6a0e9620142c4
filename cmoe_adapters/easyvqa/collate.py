"""`VQACollator`: records ``{"image", "question", "answer"}`` -> LLaVA batches through the real processor.

Going through `LlavaProcessor` (rather than building ids by hand) keeps training and generation
on exactly the inputs a user of the saved model would produce. Padding is on the left so that the
prompts of a batch all end where generation starts; with left padding the learnt tokens (answer +
`</s>`) are simply the last ones of every row, so the labels need no alignment bookkeeping.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import LlavaForConditionalGeneration, LlavaProcessor

from .tiny_llava import IMAGE, NUM_IMAGE_TOKENS, chat_prompt

IGNORE_INDEX = -100


class VQACollator:
    """Collate function: ``collator(records)`` -> ``input_ids, attention_mask, pixel_values, labels``.

    Only the answer tokens and the closing `</s>` are learnt; prompt, image and padding positions get
    label -100. `prompts_only(records)` gives the same prompts without answers, for `generate`.
    """

    def __init__(self, processor: LlavaProcessor) -> None:
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self._target_len: dict[str, int] = {}

    def _n_target(self, answer: str) -> int:
        """Number of learnt tokens for `answer`: its tokens plus `</s>` (cached: answers repeat)."""
        n = self._target_len.get(answer)
        if n is None:
            n = len(self.tokenizer(answer, add_special_tokens=False)["input_ids"]) + 1
            self._target_len[answer] = n
        return n

    def _encode(
        self, records: Sequence[dict], texts: list[str], pixel_values: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        if pixel_values is not None:  # images already processed: only the text is left to do
            expanded = [text.replace(IMAGE, IMAGE * NUM_IMAGE_TOKENS) for text in texts]
            batch = self.tokenizer(expanded, padding=True, padding_side="left", return_tensors="pt")
            return {**batch, "pixel_values": pixel_values}
        batch = self.processor(
            images=[r["image"] for r in records],
            text=texts,
            padding=True,
            padding_side="left",
            return_tensors="pt",
        )
        return dict(batch)

    def prompts_only(self, records: Sequence[dict]) -> dict[str, torch.Tensor]:
        """Left-padded prompts (question with `<image>`, ending in "assistant :") for `model.generate`."""
        return self._encode(records, [chat_prompt(r["question"]) for r in records])

    def __call__(
        self, records: Sequence[dict], pixel_values: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """The batch; `pixel_values` (the records' images, already processed) skips the images."""
        eos = self.tokenizer.eos_token
        texts = [f"{chat_prompt(r['question'])} {r['answer']} {eos}" for r in records]
        batch = self._encode(records, texts, pixel_values)
        ids = batch["input_ids"]
        n_target = torch.tensor([self._n_target(r["answer"]) for r in records])
        position = torch.arange(ids.shape[1])
        learnt = position.unsqueeze(0) >= ids.shape[1] - n_target.unsqueeze(1)
        batch["labels"] = torch.where(learnt, ids, torch.full_like(ids, IGNORE_INDEX))
        return batch


@torch.no_grad()
def generate_answers(
    model: LlavaForConditionalGeneration | torch.nn.Module,
    collator: VQACollator,
    records: Sequence[dict],
    batch_size: int = 128,
) -> list[str]:
    """Greedy answers to `records`' questions (special tokens removed, stripped), from `model` or any
    wrapper of it with the same `generate` (e.g. a peft model); the model's train/eval mode is kept."""
    was_training = model.training
    model.eval()
    answers: list[str] = []
    for k in range(0, len(records), batch_size):
        inputs = collator.prompts_only(records[k : k + batch_size])
        out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
        new = out[:, inputs["input_ids"].shape[1] :]
        answers += [a.strip() for a in collator.tokenizer.batch_decode(new, skip_special_tokens=True)]
    model.train(was_training)
    return answers
