"""Generation time with the task located (no label) against the task given, on the tiny LLaVA.

Locating takes no extra forward pass: the first adapted layer pools its own input and the VAEs
of all tasks score it with a few batched matrix products, once per generate call (at prefill).
The overhead is measured with 1, 4 and 16 tasks registered, on CPU, in one run.

    python benchmarks/locator_speed.py [--repeats 10]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from peft import get_peft_model
from PIL import Image

from cmoe_adapters import ContinualMoEConfig
from cmoe_adapters.data import VisionLanguageCollator
from cmoe_adapters.easyvqa import build_tiny_llava


def model_with_tasks(count: int, batch: int):
    """The tiny LLaVA with `count` tasks, each with a fitted locator, and a generation batch."""
    base, processor = build_tiny_llava(seed=0)
    config = ContinualMoEConfig(r=8, num_experts=4, top_k=2, experts_per_task=0, locator_steps=20)
    model = get_peft_model(base.eval(), config)
    records = [{"image": Image.new("RGB", (64, 64), "red"), "question": "what color is the shape?"}] * batch
    inputs = VisionLanguageCollator(processor).generation_inputs(records)
    feature_dim = model.locator_features(**inputs).shape[1]  # the real feature's size
    generator = torch.Generator().manual_seed(0)
    for index in range(count):
        model.add_task(f"task{index}")
        model.fit_locator(features=torch.randn(64, feature_dim, generator=generator) + index)
    return model.eval(), inputs


def seconds(model, inputs: dict, settings: dict, task: str | None) -> float:
    start = time.perf_counter()
    model.generate(**inputs, **settings, task=task)
    return time.perf_counter() - start


def measure(model, inputs: dict, settings: dict, repeats: int) -> tuple[float, float]:
    """Median seconds with the task given and located, measured alternately after a warm-up."""
    seconds(model, inputs, settings, "task0"), seconds(model, inputs, settings, None)
    given, located = [], []
    for _ in range(repeats):
        given.append(seconds(model, inputs, settings, "task0"))
        located.append(seconds(model, inputs, settings, None))
    return statistics.median(given), statistics.median(located)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=4)
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"# generate, batch {args.batch}, {args.new_tokens} new tokens, tiny LLaVA on CPU")
    print(f"# median of {args.repeats}, measured alternately\n")
    print("| tasks | task given ms | task located ms | overhead |")
    print("|---:|---:|---:|---:|")
    settings = {"max_new_tokens": args.new_tokens, "min_new_tokens": args.new_tokens, "do_sample": False}
    for count in (1, 4, 16):
        model, inputs = model_with_tasks(count, args.batch)
        with torch.no_grad():
            given, located = measure(model, inputs, settings, args.repeats)
        print(f"| {count} | {given * 1e3:.1f} | {located * 1e3:.1f} | {100 * (located / given - 1):+.1f}% |")


if __name__ == "__main__":
    main()
