"""Data: LLaVA/CoIN files to records, and a vision-language collator for any processor.

Records are plain dicts, one of

* ``{"image", "question", "answer"}`` -- one question, one answer (CoIN's test format, easy-vqa);
* ``{"image", "conversations": [{"from": "human", "value": "<image>\\n..."}, {"from": "gpt", ...}]}``
  -- LLaVA's conversation format (CoIN's training format).

``image`` is a PIL image or a path. The collator renders each record with the processor's own
chat template, so the same code serves LLaVA, Qwen2-VL, Idefics3 and the others; only assistant
turns are learnt (prompt, image and padding positions get label -100).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch

IGNORE_INDEX = -100
IMAGE_PLACEHOLDER = "<image>"
_CACHE_SIZE = 65536  # rendered prompts and token counts kept per collator


class DataError(ValueError):
    """A data file or record that cannot be used, with the file and record named."""


def read_json_records(path: str) -> list[Any]:
    if not os.path.exists(path):
        raise DataError(f"{path}: no such file.")
    with open(path, encoding="utf-8") as handle:
        text = handle.read()
    try:
        if path.endswith(".jsonl"):
            return [json.loads(line) for line in text.splitlines() if line.strip()]
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise DataError(f"{path}: not valid JSON ({error}).") from None
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of records, got {type(data).__name__}.")
    return data


def _resolve_image(
    path: str, record: Mapping[str, Any], index: int, image_root: str | None, check: bool
) -> Any:
    image = record.get("image")
    if image is None:
        return None
    if not isinstance(image, str):
        raise DataError(f"{path}: record {index} ({record.get('id', '?')}): 'image' must be a path string.")
    full = image if image_root is None or os.path.isabs(image) else os.path.join(image_root, image)
    if check and not os.path.exists(full):
        raise DataError(
            f"{path}: record {index} ({record.get('id', '?')}): image file {full} does not exist."
        )
    return full


def load_llava_records(path: str, image_root: str | None = None, check_images: bool = True) -> list[dict]:
    """LLaVA conversation records (``.json`` list or ``.jsonl``), images resolved against `image_root`."""
    records = []
    for index, record in enumerate(read_json_records(path)):
        where = f"{path}: record {index} ({record.get('id', '?') if isinstance(record, dict) else '?'})"
        if not isinstance(record, dict) or not isinstance(record.get("conversations"), list):
            raise DataError(f"{where}: needs a 'conversations' list.")
        turns = record["conversations"]
        if not turns or any(not isinstance(t, dict) or t.get("from") not in ("human", "gpt") for t in turns):
            raise DataError(f"{where}: every turn needs 'from' = 'human' or 'gpt' and a 'value'.")
        if turns[0]["from"] != "human" or turns[-1]["from"] != "gpt":
            raise DataError(f"{where}: a conversation starts with 'human' and ends with 'gpt'.")
        if any(not isinstance(t.get("value"), str) for t in turns):
            raise DataError(f"{where}: every turn needs a string 'value'.")
        records.append(
            {
                **record,
                "image": _resolve_image(path, record, index, image_root, check_images),
                "conversations": turns,
            }
        )
    return records


def load_coin_test_records(path: str, image_root: str | None = None, check_images: bool = True) -> list[dict]:
    """CoIN's test records (``question_id, image, text, answer``) as ``{"image", "question", "answer"}``."""
    records = []
    for index, record in enumerate(read_json_records(path)):
        missing = [
            key for key in ("image", "text", "answer") if not isinstance(record, dict) or key not in record
        ]
        if missing:
            raise DataError(f"{path}: record {index}: missing {missing}.")
        records.append(
            {
                "question_id": record.get("question_id", index),
                "image": _resolve_image(path, record, index, image_root, check_images),
                "question": record["text"],
                "answer": record["answer"],
            }
        )
    return records


def load_image(image: Any) -> Any:
    """A PIL RGB image from a PIL image or a path."""
    from PIL import Image  # vision-language data needs pillow; plain text use of the library does not

    if isinstance(image, Image.Image):
        return image.convert("RGB") if image.mode != "RGB" else image
    if isinstance(image, (str, os.PathLike)):
        try:
            with Image.open(image) as opened:
                return opened.convert("RGB")
        except FileNotFoundError:
            raise DataError(f"Image file {image} does not exist.") from None
    raise DataError(f"An image must be a PIL image or a path, got {type(image).__name__}.")


def to_messages(record: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The record as chat messages (``role`` + ``content`` parts); the image part leads its turn."""
    if "conversations" in record:
        turns = [(t["from"] == "human", t["value"]) for t in record["conversations"]]
    elif "question" in record:
        question = record["question"]
        if record.get("image") is not None and IMAGE_PLACEHOLDER not in question:
            question = f"{IMAGE_PLACEHOLDER}\n{question}"
        turns = [(True, question)] + ([(False, str(record["answer"]))] if "answer" in record else [])
    else:
        raise DataError(
            f"A record needs 'question' (and 'answer') or 'conversations'; got keys {sorted(record)}."
        )
    messages = []
    for is_user, text in turns:
        parts: list[dict[str, Any]] = []
        if is_user and IMAGE_PLACEHOLDER in text:
            parts.append({"type": "image"})
            text = text.replace(IMAGE_PLACEHOLDER, "").strip()
        parts.append({"type": "text", "text": text})
        messages.append({"role": "user" if is_user else "assistant", "content": parts})
    return messages


def reference_answer(record: Mapping[str, Any]) -> Any:
    """What a record's answer is scored against: its ``answer``, else its last assistant turn."""
    if "answer" in record:
        return record["answer"]
    turns = [t for t in record.get("conversations", ()) if t.get("from") != "human"]
    if not turns:
        raise DataError(
            f"A record to score needs an 'answer' or an assistant turn; got keys {sorted(record)}."
        )
    return turns[-1]["value"]


class VisionLanguageCollator:
    """Records -> model inputs through the model's processor (chat template included).

    ``collator(records)`` gives a training batch whose labels cover only the assistant turns (each
    followed by the end-of-sequence token); ``collator.generation_inputs(records)`` gives the
    prompts up to the last assistant turn, for ``model.generate``. Padding is on the left, so every
    prompt ends where generation starts.
    """

    def __init__(self, processor: Any, max_length: int | None = None) -> None:
        self.processor = processor
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.max_length = max_length
        self._gap: str | None = None
        self._rendered: dict[tuple[str, bool], str] = {}
        self._lengths: dict[str, int] = {}
        if (
            getattr(processor, "chat_template", None) is None
            and getattr(self.tokenizer, "chat_template", None) is None
        ):
            raise DataError(
                f"{type(processor).__name__} has no chat template; set processor.chat_template to the "
                "model's prompt format so that training and generation use the same prompts."
            )

    def _render(self, messages: list[dict], generation_prompt: bool) -> str:
        # VQA data repeats its questions across images: rendering Jinja per record is the slow part
        key = (json.dumps(messages, sort_keys=True), generation_prompt)
        text = self._rendered.get(key)
        if text is None:
            text = self.processor.apply_chat_template(
                messages, add_generation_prompt=generation_prompt, tokenize=False
            )
            self._remember(self._rendered, key, text)
        return text

    def _text_length(self, text: str) -> int:
        length = self._lengths.get(text)
        if length is None:
            length = len(self.tokenizer(text, add_special_tokens=False)["input_ids"])
            self._remember(self._lengths, text, length)
        return length

    @staticmethod
    def _remember(cache: dict, key: Any, value: Any) -> None:
        if len(cache) >= _CACHE_SIZE:  # bounded: long streams of unique prompts must not grow memory
            cache.clear()
        cache[key] = value

    def _answer_gap(self, messages: list[dict], prompt: str, answer: str) -> str:
        """The whitespace the template puts between the generation prompt and the answer.

        LLaVA-1.5's template ends the generation prompt with ``ASSISTANT:`` but renders answers as
        ``ASSISTANT: blue``; learning ``ASSISTANT:blue`` would teach the model a tokenization it
        never saw (``blue`` instead of ``▁blue``). ChatML templates (Qwen) have no gap.
        """
        if self._gap is not None:  # a property of the template: found once, not rendered per record
            return self._gap
        full = self._render(messages, generation_prompt=False)
        if not full.startswith(prompt) or not answer or answer not in full[len(prompt) :]:
            return ""
        rest = full[len(prompt) :]
        gap = rest[: rest.index(answer)]
        self._gap = gap if not gap.strip() else ""
        return self._gap

    def _spans(self, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
        """The full text and, in text tokens, the ``[start, end)`` spans of the assistant turns.

        The last answer is appended to the generation prompt (after the template's own gap, see
        `_answer_gap`) and closed with the end-of-sequence token, exactly what generation produces;
        earlier answers span the template's own rendering.
        """
        assistant = [i for i, message in enumerate(messages) if message["role"] == "assistant"]
        if not assistant:
            return "", []
        last = assistant[-1]
        prompt = self._render(messages[:last], generation_prompt=True)
        answer = messages[last]["content"][-1]["text"]
        gap = self._answer_gap(messages[: last + 1], prompt, answer)
        text = prompt + gap + answer + (self.tokenizer.eos_token or "")
        spans = [
            (
                self._text_length(self._render(messages[:i], generation_prompt=True)),
                self._text_length(self._render(messages[: i + 1], generation_prompt=False)),
            )
            for i in assistant[:-1]
        ]
        spans.append((self._text_length(prompt), self._text_length(text)))
        return text, spans

    def _encode(self, records: Sequence[Mapping[str, Any]], texts: list[str]) -> dict[str, torch.Tensor]:
        images = [load_image(r["image"]) for r in records if r.get("image") is not None]
        kwargs: dict[str, Any] = {
            "text": texts,
            "padding": True,
            "padding_side": "left",
            "return_tensors": "pt",
        }
        if images:
            if len(images) != len(records):
                raise DataError("A batch mixes records with and without images; give every record an image.")
            kwargs["images"] = images
        if self.max_length is not None:
            kwargs.update(truncation=True, max_length=self.max_length)
        return dict(self.processor(**kwargs))

    def generation_inputs(self, records: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        """Prompts up to (not including) the last assistant turn, left-padded, for `generate`."""
        prompts = []
        for record in records:
            messages = to_messages(record)
            if messages[-1]["role"] == "assistant":
                messages = messages[:-1]
            prompts.append(self._render(messages, generation_prompt=True))
        return self._encode(records, prompts)

    def __call__(self, records: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        texts, all_spans = [], []
        for record in records:
            text, spans = self._spans(to_messages(record))
            if not spans:
                raise DataError(
                    f"A training record needs an answer: {dict(record).get('question', record)!r}."
                )
            texts.append(text)
            all_spans.append((self._text_length(text), spans))
        batch = self._encode(records, texts)
        ids = batch["input_ids"]
        labels = torch.full_like(ids, IGNORE_INDEX)
        for row, (text_length, spans) in enumerate(all_spans):
            # the processor expands image placeholders before the answers: count answer spans from the end
            shift = ids.shape[1] - text_length
            for start, end in spans:
                labels[row, shift + start : shift + end] = ids[row, shift + start : shift + end]
        batch["labels"] = labels
        return batch
