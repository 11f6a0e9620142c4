"""LLaVA-CMoE's probe-guided knowledge extension: decide *where* a new task gets new experts.

Before a task (not the first) trains, every adapted layer gets temporary *probe* experts and the
task a probe router over old and probe experts; old experts stay frozen. A short training on a
small share of the task's data (with the balancing loss) shows how often each layer's router sends
tokens to its probes. A layer whose probe activation frequency exceeds ``mean - alpha * std``
over layers needs new capacity and gets ``experts_per_task`` new experts, each initialised from
the old expert the probe phase used most there; the other layers reuse their frozen experts
through the new task's router, which reaches first (up to ``router_max_experts``) the old experts
the probe phase used most. The probes are then removed. The decision (frequencies, threshold,
initialisation) is kept in the task's record in ``adapter_config.json``.
"""

from __future__ import annotations

from collections.abc import Mapping
from statistics import fmean, pstdev
from typing import Any

from .model import ContinualMoEModel

PROBE_TASK = "probe"


def start_probe(model: ContinualMoEModel) -> str:
    """Add the probe experts and probe router (old experts frozen); returns the probe's task name."""
    config = model._config
    name = PROBE_TASK
    while name in model.tasks:
        name += "_"
    model._grow({"name": name, "new_experts": config.expansion_probe_experts})
    adapter_name = model.active_adapters[0]
    for layer in model._layers():
        layer.cmoe_experts[adapter_name].set_trainable(len(model.tasks) - 1, freeze_old=True)
    return name


def layers_to_expand(frequencies: Mapping[str, float], alpha: float) -> tuple[list[str], float]:
    """The layers whose probe frequency exceeds ``mean - alpha * std`` over layers, and that threshold."""
    values = list(frequencies.values())
    threshold = fmean(values) - alpha * pstdev(values)
    return sorted(name for name, value in frequencies.items() if value > threshold), threshold


def finish_probe(model: ContinualMoEModel) -> dict[str, Any]:
    """Measure the probes, remove them, and return the new task's `add_task` keyword arguments."""
    config = model._config
    counts = model.usage_counts()
    probes = config.expansion_probe_experts
    frequencies, most_used, ranking = {}, {}, {}
    for layer in model._layers():
        layer_counts = counts[layer.layer_name]
        total = float(layer_counts.sum())
        frequencies[layer.layer_name] = float(layer_counts[-probes:].sum()) / total if total else 0.0
        old = layer_counts[:-probes]
        ranking[layer.layer_name] = old.argsort(descending=True, stable=True).tolist()
        most_used[layer.layer_name] = ranking[layer.layer_name][0] if old.numel() else 0
    model.remove_last_task()
    expanded, threshold = layers_to_expand(frequencies, config.expansion_alpha)
    new_experts = config.experts_per_task
    return {
        "expanded_layers": expanded,
        "init_from": {name: [most_used[name]] * new_experts for name in expanded},
        # the task's router reaches first the old experts its probe used most
        "preferred_experts": ranking,
        "details": {
            "expansion": {
                "alpha": config.expansion_alpha,
                "threshold": threshold,
                "expanded": len(expanded),
                "layers": len(frequencies),
                "probe_frequencies": {name: round(value, 6) for name, value in frequencies.items()},
            }
        },
    }
