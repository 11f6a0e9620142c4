"""Inputs that differ from the learnt tasks only in their image: which feature and density flag them,
and whether the feature tells them apart at all.

The same-question stream (`cmoe_adapters.easyvqa.streams`): digits, colour patches and stripes,
all asked "what is in the image?". Its image-only unknowns are checkerboards and easy-vqa's shapes
asked the same question. `locator_open_set.py` measures the library's locator choices on it; this
benchmark asks what else could be done with the same forward pass. Every candidate reads the
first adapted layer's input (the hidden states the default locator already sees, captured by a
forward pre-hook on that layer) and is fitted on each task's training inputs alone, with the
locator's own open-set rule: 20% of a task's inputs held out, a Tukey fence on their scores.

Candidates (feature, density):

* pooled moments (text mean, image mean, image spread; the default), Gaussian (the library's PPCA);
* pooled moments plus 15 quantiles of the cosine similarities between the image tokens (the
  image's spatial structure), Gaussian;
* pooled moments, nearest-neighbour distance (deep kNN: standardised, k = 1);
* image tokens, one Gaussian per task over single tokens (a patch-level density), the sample's
  score being the mean (or the maximum) over its image tokens;
* image tokens, nearest-neighbour distance to a bank of 4,000 training tokens per task, the
  sample's score being its farthest token (a PatchCore-style detector).

And a **supervised reference**: an MLP on the default feature, trained on the learnt tasks'
training inputs *and on training inputs of the unknown kind*, labelled, then scored (AUROC) on the
test inputs. It says whether the feature tells the unknown kind apart at all. A detector never sees
an unknown input, so it can only flag what is *atypical* for the learnt tasks; where the reference
separates a kind that no detector flags, the kind is separable but lies inside the learnt kinds'
spread of this feature.

Bases: the random tiny LLaVA and the demo's shipped one (64x64 images, 16-pixel patches: 16
image tokens), the random one with 8- and 4-pixel patches (64 and 256 image tokens, same widths;
LLaVA-1.5 has 576 per image), and the random one whose vision tower first learns to tell apart
seven other synthetic image kinds, none of the stream's (`other_image_kinds.py`): a stand-in, at
toy scale, for a tower pretrained on more images than the stream shows it.

    python benchmarks/locator_image_unknowns.py [--train 1000] [--test 200] [--threads 1] [--bases ...]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from peft import get_peft_model

from cmoe_adapters import ContinualMoEConfig
from cmoe_adapters.data import VisionLanguageCollator
from cmoe_adapters.densities import TaskGaussian, raw_scores, stack, tukey_fence
from cmoe_adapters.easyvqa import build_tiny_llava, shipped_base
from cmoe_adapters.easyvqa.streams import (
    SAME_QUESTION_TASKS,
    STREAM_WORDS,
    image_kind_records,
    unknown_inputs,
)
from cmoe_adapters.experts import ContinualMoELayer
from cmoe_adapters.features import PromptMasks, image_token_ids, pool_features
from cmoe_adapters.locator import held_out_split
from cmoe_adapters.metrics import auroc

from other_image_kinds import OTHER_KINDS, pretrained_tower_llava

CONFIG = ContinualMoEConfig()
FENCE, RANK, HELD_OUT = (
    CONFIG.locator_open_set_fence,
    CONFIG.locator_rank,
    CONFIG.locator_calibration_fraction,
)
IMAGE_ONLY = ("checkers", "shapes")
BATCH = 100
BASES: dict[str, Callable] = {
    "random, 16 image tokens": lambda: build_tiny_llava(seed=0, extra_words=STREAM_WORDS),
    "shipped, 16 image tokens": shipped_base,
    "random, 64 image tokens": lambda: build_tiny_llava(seed=0, extra_words=STREAM_WORDS, patch_size=8),
    "random, 256 image tokens": lambda: build_tiny_llava(seed=0, extra_words=STREAM_WORDS, patch_size=4),
    f"pretrained on {len(OTHER_KINDS)} other kinds, 16 image tokens": lambda: pretrained_tower_llava()[:2],
}


@dataclass
class Samples:
    """What the first adapted layer sees of each input: the default pooled feature and its image tokens."""

    pooled: torch.Tensor  # [n, 3d]
    tokens: torch.Tensor  # [n, image tokens, d]

    def __getitem__(self, index: torch.Tensor) -> Samples:
        return Samples(self.pooled[index], self.tokens[index])

    def __len__(self) -> int:
        return self.pooled.shape[0]


class FirstLayerInput:
    """The first adapted layer's input, in the feature-only pass the locator itself runs.

    A forward pre-hook on the first `ContinualMoELayer` sees the hidden states the locator pools;
    each batch checks that pooling them gives exactly the locator's feature, so this fails loudly
    if the locator ever takes its feature elsewhere.
    """

    def __init__(self, base, processor) -> None:
        self.model = get_peft_model(base, ContinualMoEConfig(r=4, num_experts=2, top_k=1))
        self.collator = VisionLanguageCollator(processor)
        self.image_ids = image_token_ids(base.config)
        first = next(m for m in self.model.modules() if isinstance(m, ContinualMoELayer))
        self.seen: list[torch.Tensor] = []
        first.register_forward_pre_hook(lambda _module, args: self.seen.append(args[0].detach().float()))

    def __call__(self, records: list[dict]) -> Samples:
        pooled, tokens = [], []
        for start in range(0, len(records), BATCH):
            inputs = self.collator.generation_inputs(records[start : start + BATCH])
            self.seen.clear()
            feature = self.model.locator_features(**inputs)
            masks = PromptMasks.from_inputs(inputs, self.image_ids)
            hidden = self.seen[0]
            torch.testing.assert_close(pool_features(hidden, masks, CONFIG.locator_pooling), feature)
            image = masks.prompt & masks.image
            counts = image.sum(1)
            if not bool((counts == counts[0]).all()):
                raise RuntimeError("every input of this stream has one image of the same size")
            pooled.append(feature)
            tokens.append(hidden[image].reshape(hidden.shape[0], int(counts[0]), hidden.shape[-1]))
        return Samples(torch.cat(pooled), torch.cat(tokens))


# A candidate: fit(task's training samples) -> score(samples) -> [n], lower = more typical.
Scorer = Callable[[Samples], torch.Tensor]
Candidate = Callable[[Samples], Scorer]


def gaussian(vectors: torch.Tensor) -> Scorer:
    density = TaskGaussian(vectors.shape[-1], RANK)
    density.fit(vectors)
    stacked = stack([density])
    return lambda x: raw_scores(stacked, x, "elbo")[0]


def token_similarity_quantiles(tokens: torch.Tensor, count: int = 15) -> torch.Tensor:
    """``[n, count]`` quantiles of the cosine similarities between an image's centred tokens."""
    centred = torch.nn.functional.normalize(tokens - tokens.mean(1, keepdim=True), dim=-1)
    similarity = centred @ centred.transpose(1, 2)
    upper = torch.triu_indices(tokens.shape[1], tokens.shape[1], 1)
    levels = torch.linspace(0, 1, count + 2)[1:-1]
    return torch.quantile(similarity[:, upper[0], upper[1]], levels, dim=1).T


def with_structure(samples: Samples) -> torch.Tensor:
    return torch.cat([samples.pooled, token_similarity_quantiles(samples.tokens)], dim=1)


def nearest_neighbour(bank: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    mean, std = bank.mean(0), bank.std(0).clamp_min(1e-4)
    bank = (bank - mean) / std
    return lambda x: torch.cdist((x - mean) / std, bank).amin(1)


def token_gaussian(reduce: str) -> Candidate:
    def fit(train: Samples) -> Scorer:
        score = gaussian(train.tokens.flatten(0, 1))

        def scorer(samples: Samples) -> torch.Tensor:
            per_token = score(samples.tokens.flatten(0, 1)).reshape(len(samples), -1)
            return per_token.mean(1) if reduce == "mean" else per_token.amax(1)

        return scorer

    return fit


def patch_nearest_neighbour(train: Samples, bank_size: int = 4000) -> Scorer:
    tokens = train.tokens.flatten(0, 1)
    keep = torch.randperm(tokens.shape[0], generator=torch.Generator().manual_seed(0))[:bank_size]
    distance = nearest_neighbour(tokens[keep])
    return lambda s: distance(s.tokens.flatten(0, 1)).reshape(len(s), -1).amax(1)


def pooled(samples: Samples) -> torch.Tensor:
    return samples.pooled


def on_vectors(feature: Callable[[Samples], torch.Tensor], detector: Callable) -> Candidate:
    """A candidate that fits `detector` on one vector per input, `feature(samples)`."""

    def fit(train: Samples) -> Scorer:
        score = detector(feature(train))
        return lambda samples: score(feature(samples))

    return fit


CANDIDATES: dict[str, tuple[Candidate, bool]] = {  # label -> (fit, scores are normalised densities)
    "pooled moments (default), Gaussian": (on_vectors(pooled, gaussian), True),
    "pooled moments + token similarity, Gaussian": (on_vectors(with_structure, gaussian), True),
    "pooled moments, nearest neighbour": (on_vectors(pooled, nearest_neighbour), False),
    "image tokens, Gaussian per token (mean)": (token_gaussian("mean"), True),
    "image tokens, Gaussian per token (max)": (token_gaussian("max"), True),
    "image tokens, nearest token (PatchCore-style)": (patch_nearest_neighbour, False),
}


@dataclass
class Outcome:
    closed_set: float  # % of the learnt tasks' test inputs given their own task
    false_rejections: float  # % of them beyond every fence
    auroc: dict[str, float]  # unknown kind -> AUROC of the novelty score
    detected: dict[str, float]  # unknown kind -> % beyond every fence
    fit_s: float


def evaluate(fit: Candidate, normalised: bool, train: dict, test: dict, unknown: dict) -> Outcome:
    """Fit every task, then score: nearest task, novelty = min over tasks of (score - upper) / IQR."""
    start = time.perf_counter()
    scorers, fences = [], []
    for task in SAME_QUESTION_TASKS:
        samples = train[task]
        held_out, kept = held_out_split(len(samples), HELD_OUT, torch.Generator().manual_seed(0))
        scorer = fit(samples[kept])
        scorers.append(scorer)
        fences.append(tukey_fence(scorer(samples[held_out])))
    fit_s = time.perf_counter() - start

    def assess(samples: Samples) -> tuple[torch.Tensor, torch.Tensor]:
        raw = torch.stack([scorer(samples) for scorer in scorers])
        beyond = torch.stack([(r - upper) / spread for r, (upper, spread) in zip(raw, fences, strict=True)])
        nearest = (raw if normalised else beyond).argmin(0)  # densities: Bayes' rule, as the locator
        return nearest, beyond.amin(0)

    hits, known = [], []
    for index, task in enumerate(SAME_QUESTION_TASKS):
        nearest, novelty = assess(test[task])
        hits += (nearest == index).tolist()
        known += novelty.tolist()
    novelties = {kind: assess(unknown[kind])[1].tolist() for kind in IMAGE_ONLY}
    return Outcome(
        closed_set=100 * sum(hits) / len(hits),
        false_rejections=100 * sum(v > FENCE for v in known) / len(known),
        auroc={kind: auroc(known, v) for kind, v in novelties.items()},
        detected={kind: 100 * sum(x > FENCE for x in v) / len(v) for kind, v in novelties.items()},
        fit_s=fit_s,
    )


def supervised_reference(
    train: tuple[torch.Tensor, torch.Tensor], test: tuple[torch.Tensor, torch.Tensor]
) -> float:
    """Test AUROC of an MLP trained to tell unknown inputs from known ones (``(known, unknown)`` pairs)."""
    features = torch.cat(train)
    labels = torch.cat([torch.zeros(len(train[0])), torch.ones(len(train[1]))])
    mean, std = features.mean(0), features.std(0).clamp_min(1e-4)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        mlp = torch.nn.Sequential(
            torch.nn.Linear(features.shape[1], 256), torch.nn.GELU(), torch.nn.Linear(256, 1)
        )
    optimizer = torch.optim.Adam(mlp.parameters(), lr=1e-3, weight_decay=1e-4)
    generator = torch.Generator().manual_seed(0)
    for _ in range(2000):
        batch = torch.randint(len(features), (256,), generator=generator)
        logits = mlp((features[batch] - mean) / std).squeeze(-1)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, labels[batch])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        known, unknown = (mlp((x - mean) / std).squeeze(-1).tolist() for x in test)
    return auroc(known, unknown)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--train", type=int, default=1000, help="train inputs per task")
    parser.add_argument("--test", type=int, default=200, help="test inputs per task and per unknown kind")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--bases", nargs="+", choices=list(BASES), default=list(BASES), metavar="BASE")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    records = {
        "train": {t: image_kind_records(t, "train", args.train) for t in SAME_QUESTION_TASKS},
        "test": {t: image_kind_records(t, "test", args.test) for t in SAME_QUESTION_TASKS},
        "unknown": {k: unknown_inputs("same_question", "test", args.test)[k] for k in IMAGE_ONLY},
        # for the supervised reference only: no candidate sees an unknown input before it is scored
        "unknown_train": {k: unknown_inputs("same_question", "train", args.train)[k] for k in IMAGE_ONLY},
    }
    print(
        f"# image-only unknowns of the same-question stream: {args.train} train / {args.test} test inputs "
        f"per task, {args.test} per unknown kind, fence {FENCE:g}, {args.threads} thread(s)\n"
    )
    print(
        "| base | feature, density | closed-set % | false rejections % | "
        + " | ".join(f"{k}: AUROC / detected %" for k in IMAGE_ONLY)
        + " | fit s |"
    )
    print("|---|---|---:|---:|" + "---:|" * len(IMAGE_ONLY) + "---:|")
    for base_name in args.bases:
        base, processor = BASES[base_name]()
        base.eval()
        capture = FirstLayerInput(base, processor)
        data = {part: {k: capture(r) for k, r in group.items()} for part, group in records.items()}
        for label, (fit, normalised) in CANDIDATES.items():
            outcome = evaluate(fit, normalised, data["train"], data["test"], data["unknown"])
            cells = " | ".join(f"{outcome.auroc[k]:.3f} / {outcome.detected[k]:.1f}" for k in IMAGE_ONLY)
            print(
                f"| {base_name} | {label} | {outcome.closed_set:.1f} | {outcome.false_rejections:.1f} | "
                f"{cells} | {outcome.fit_s:.1f} |",
                flush=True,
            )
        known_train, known_test = (
            torch.cat([data[p][t].pooled for t in SAME_QUESTION_TASKS]) for p in ("train", "test")
        )
        references = {
            k: supervised_reference(
                (known_train, data["unknown_train"][k].pooled), (known_test, data["unknown"][k].pooled)
            )
            for k in IMAGE_ONLY
        }
        cells = " | ".join(f"{references[k]:.3f} / -" for k in IMAGE_ONLY)
        label = "*supervised reference (MLP told the unknowns), default feature*"
        print(f"| {base_name} | {label} | - | - | {cells} | - |")
    print(f"\n(total {time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
