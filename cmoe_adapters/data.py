"""Data: LLaVA/CoIN files to records, and a vision-language collator for any processor.

Records are plain dicts, one of

* ``{"image", "question", "answer"}`` -- one question, one answer (CoIN's test format, easy-vqa);
* ``{"image", "conversations": [{"from": "human", "value": "<image>\\n..."}, {"from": "gpt", ...}]}``
  -- LLaVA's conversation format (CoIN's training format).

``image`` is a PIL image or a path. The collator renders each record with the processor's own
chat template, so the same code serves LLaVA, Qwen2-VL, Idefics3 and the others; only assistant
turns are learnt (prompt, image and padding positions get label -100).

Truncation (``max_length``) never cuts what is learnt nor the image: a sample longer than
``max_length`` (counted after the processor has expanded its image placeholders) loses text from
the middle of its user turns, and a sample that cannot fit even without any user text is refused
with a `DataError` naming the record (see `VisionLanguageCollator`).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

IGNORE_INDEX = -100
IMAGE_PLACEHOLDER = "<image>"
_CACHE_SIZE = 65536  # rendered prompts and token counts kept per collator


class DataError(ValueError):
    """A data file or record that cannot be used, with the file and record named."""


def read_json(path: str) -> Any:
    """The parsed content of a ``.json`` file (a ``.jsonl`` file: the list of its lines), errors naming it."""
    if not os.path.exists(path):
        raise DataError(f"{path}: no such file.")
    with open(path, encoding="utf-8") as handle:
        text = handle.read()
    try:
        if path.endswith(".jsonl"):
            return [json.loads(line) for line in text.splitlines() if line.strip()]
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise DataError(f"{path}: not valid JSON ({error}).") from None


def read_json_records(path: str) -> list[Any]:
    data = read_json(path)
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of records, got {type(data).__name__}.")
    return data


def _resolve_image(
    path: str, record: Mapping[str, Any], index: int, image_root: str | None, check: bool
) -> Any:
    image = record.get("image")
    if image is None:
        return None
    name = record.get("id", record.get("question_id", "?"))  # LLaVA records: id; test records: question_id
    if not isinstance(image, str):
        raise DataError(f"{path}: record {index} ({name}): 'image' must be a path string.")
    full = image if image_root is None or os.path.isabs(image) else os.path.join(image_root, image)
    if check and not os.path.exists(full):
        raise DataError(f"{path}: record {index} ({name}): image file {full} does not exist.")
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


def record_name(record: Mapping[str, Any]) -> str:
    """How an error names a record: its ``id`` or ``question_id``, else the start of its question."""
    for key in ("id", "question_id"):
        if record.get(key) is not None:
            return f"record {key}={record[key]!r}"
    question = record.get("question")
    if question is None and record.get("conversations"):
        question = record["conversations"][0].get("value")
    text = " ".join(str(question).split()) if question is not None else "?"
    return f"record {text[:60]!r}" + ("..." if len(text) > 60 else "")


def _cut_middle(text: str, units: Sequence[tuple[int, int]], remove: int) -> str:
    """`text` without `remove` of its `units` (token character spans), taken from the middle.

    The head and the tail survive: a question's opening and its closing instruction (ScienceQA's
    options and "Answer with the option's letter...") matter more than a long context between them.
    """
    if remove <= 0:
        return text
    keep = len(units) - remove
    if keep <= 0:
        return ""
    head = keep // 2
    left = text[: units[head - 1][1]].rstrip() if head else ""
    right = text[units[len(units) - (keep - head)][0] :].lstrip()
    return f"{left} {right}" if left and right else left or right


def _level(remaining: Sequence[int], excess: int) -> int:
    """The highest per-turn length ``L`` such that cutting every turn down to ``L`` removes `excess`."""
    low, high = 0, max(remaining)  # removing everything (L = 0) is the caller's last resort
    while low < high:
        mid = (low + high + 1) // 2
        if sum(max(0, n - mid) for n in remaining) >= excess:
            low = mid
        else:
            high = mid - 1
    return low


class VisionLanguageCollator:
    """Records -> model inputs through the model's processor (chat template included).

    ``collator(records)`` gives a training batch whose labels cover only the assistant turns (each
    followed by the end-of-sequence token); ``collator.generation_inputs(records)`` gives the
    prompts up to the last assistant turn, for ``model.generate``. Padding is on the left, so every
    prompt ends where generation starts.

    Truncation policy, with ``max_length`` (tokens, image tokens included):

    * never cut: the image tokens (the model needs exactly as many as the vision tower produces),
      the chat template's own tokens, and every assistant turn with its end-of-sequence token (what
      is learnt);
    * cut instead: the text of the user turns, from the middle of each (its head and tail stay), the
      longest turns first, down to a common length, until the sample fits;
    * refuse: a sample that is still too long with no user text left raises `DataError` naming the
      record and its token counts (raise ``max_length`` or drop the record).

    `generation_inputs` applies the same policy to the prompt alone (up to the generation prompt),
    so that a prompt never exceeds ``max_length`` either and loses the same part of its question.
    A sample that fits is never changed; processors are never asked to truncate (they would cut
    the end, where the answer is).
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
        if images:  # a text-only record (ScienceQA has them) has no image token: images go by token
            kwargs["images"] = images
        return dict(self.processor(**kwargs))

    def _row_lengths(self, batch: Mapping[str, torch.Tensor]) -> list[int]:
        """Tokens per row, padding excluded (image tokens as the processor expanded them)."""
        mask = batch.get("attention_mask")
        if mask is None:
            mask = batch["input_ids"] != self.tokenizer.pad_token_id
        return [int(n) for n in mask.sum(dim=1).tolist()]

    def _units(self, text: str) -> list[tuple[int, int]]:
        """Character spans of the tokens of `text`; whitespace words for a tokenizer without offsets."""
        try:
            offsets = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
            return [(int(a), int(b)) for a, b in offsets["offset_mapping"] if b > a]
        except (NotImplementedError, ValueError, TypeError, KeyError):
            return [match.span() for match in re.finditer(r"\S+", text)]

    def _fit(self, messages: list[dict], build: Callable[[list[dict]], str], budget: int) -> list[dict]:
        """`messages` with user text cut (see the class docstring) until `build` gives <= `budget` tokens.

        Counted in text tokens of the rendered sample; seams can tokenize differently, so the cut is
        measured on the whole text and repeated until it fits or no user text is left.
        """
        parts = [
            (i, j)
            for i, message in enumerate(messages)
            if message["role"] == "user"
            for j, part in enumerate(message["content"])
            if part["type"] == "text"
        ]
        texts = {key: messages[key[0]]["content"][key[1]]["text"] for key in parts}
        units = {key: self._units(text) for key, text in texts.items()}
        removed = dict.fromkeys(parts, 0)
        fitted = messages
        excess = self._text_length(build(fitted)) - budget
        while excess > 0:
            remaining = [len(units[key]) - removed[key] for key in parts]
            if not any(remaining):
                break  # nothing left to cut: the caller refuses the sample
            level = _level(remaining, excess)
            for key, left in zip(parts, remaining, strict=True):
                removed[key] += max(0, left - level)
            cut = {key: _cut_middle(texts[key], units[key], removed[key]) for key in parts}
            fitted = [
                {
                    **message,
                    "content": [
                        {**part, "text": cut[(i, j)]} if (i, j) in cut else part
                        for j, part in enumerate(message["content"])
                    ],
                }
                for i, message in enumerate(messages)
            ]
            excess = self._text_length(build(fitted)) - budget
        return fitted

    def _encode_within(
        self,
        records: Sequence[Mapping[str, Any]],
        messages: list[list[dict]],
        build: Callable[[list[dict]], str],
        what: str,
    ) -> tuple[dict[str, torch.Tensor], list[list[dict]]]:
        """Encode ``build(messages)`` per record, cutting samples over ``max_length`` (class docstring).

        The first encoding measures each sample as the model sees it (the processor expands the
        image placeholders); only a batch with a sample too long is encoded a second time.
        """
        texts = [build(m) for m in messages]
        batch = self._encode(records, texts)
        if self.max_length is None:
            return batch, messages
        lengths = self._row_lengths(batch)
        over = [row for row, length in enumerate(lengths) if length > self.max_length]
        if not over:
            return batch, messages
        messages = list(messages)
        for row in over:
            fixed = lengths[row] - self._text_length(texts[row])  # image tokens and special tokens added
            messages[row] = self._fit(messages[row], build, self.max_length - fixed)
            texts[row] = build(messages[row])
            total = self._text_length(texts[row]) + fixed
            if total > self.max_length:
                raise DataError(self._too_long(records[row], messages[row], total, what))
        batch = self._encode(records, texts)
        for row, length in enumerate(self._row_lengths(batch)):
            if length > self.max_length:  # the processor tokenized the cut text unlike the tokenizer
                raise DataError(
                    f"{record_name(records[row])}: still {length} tokens after cutting its question to "
                    f"max_length={self.max_length}; its processor tokenizes text unlike its tokenizer."
                )
        return batch, messages

    def _too_long(self, record: Mapping[str, Any], messages: list[dict], total: int, what: str) -> str:
        if what == "sample":
            answer = sum(end - start for start, end in self._spans(messages)[1])
            parts = (
                f"{total - answer} for the image(s) and the chat template, {answer} for the answer(s) "
                "and end-of-sequence"
            )
        else:
            parts = "the image(s) and the chat template"
        return (
            f"{record_name(record)}: the {what} takes {total} tokens even with the question text cut away "
            f"entirely ({parts}), more than max_length={self.max_length}; the answer and the image "
            "tokens are never cut. Raise max_length or drop this record."
        )

    def generation_inputs(self, records: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        """Prompts up to (not including) the last assistant turn, left-padded, for `generate`.

        With ``max_length``, a prompt longer than it loses the middle of its question text, as in
        training (the class docstring), and one that cannot fit raises `DataError`.
        """
        prompts = []
        for record in records:
            messages = to_messages(record)
            if messages[-1]["role"] == "assistant":
                messages = messages[:-1]
            prompts.append(messages)
        batch, _ = self._encode_within(
            records, prompts, lambda m: self._render(m, generation_prompt=True), "prompt"
        )
        return batch

    def __call__(self, records: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        all_messages = []
        for record in records:
            messages = to_messages(record)
            if not any(message["role"] == "assistant" for message in messages):
                raise DataError(
                    f"A training record needs an answer: {dict(record).get('question', record)!r}."
                )
            all_messages.append(messages)
        batch, all_messages = self._encode_within(
            records, all_messages, lambda m: self._spans(m)[0], "sample"
        )
        ids = batch["input_ids"]
        labels = torch.full_like(ids, IGNORE_INDEX)
        for row, messages in enumerate(all_messages):
            text, spans = self._spans(messages)  # rendered and counted already: cached
            # the processor expands image placeholders before the answers: count answer spans from the end
            shift = ids.shape[1] - self._text_length(text)
            for start, end in spans:
                labels[row, shift + start : shift + end] = ids[row, shift + start : shift + end]
        batch["labels"] = labels
        return batch
