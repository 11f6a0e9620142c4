"""Where the language model lives in each supported architecture, and its default targets.

The default is every `nn.Linear` inside the text decoder's layers (attention, cross-attention and
MLP projections) -- never the vision tower, the projector or the lm_head -- as the reference
implementations of both methods do. Known architectures are listed explicitly; any other model
falls back to transformers' `get_decoder()`.
"""

from __future__ import annotations

import re

from torch import nn

# model_type -> dotted path of the text decoder (the module holding `.layers`) in the
# *ForConditionalGeneration / *ForCausalLM class of transformers 5.
DECODER_PATHS: dict[str, str] = {
    "llava": "model.language_model",
    "llava_next": "model.language_model",
    "llava_onevision": "model.language_model",
    "qwen2_vl": "model.language_model",
    "qwen2_5_vl": "model.language_model",
    "qwen3_vl": "model.language_model",
    "idefics3": "model.text_model",
    "smolvlm": "model.text_model",
    "paligemma": "model.language_model",
    "gemma3": "model.language_model",
    "mllama": "model.language_model",
    "internvl": "model.language_model",
    "llama": "model",
    "mistral": "model",
    "qwen2": "model",
    "qwen3": "model",
    "gemma": "model",
    "gemma2": "model",
}


def _find_decoder_path(model: nn.Module) -> str | None:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    path = DECODER_PATHS.get(model_type)
    if path is not None:
        return path
    get_decoder = getattr(model, "get_decoder", None)
    if get_decoder is None:
        return None
    try:
        decoder = get_decoder()
    except (AttributeError, NotImplementedError, TypeError):
        return None
    return next((name for name, module in model.named_modules() if module is decoder and name), None)


def linear_layer_names(model: nn.Module) -> list[str]:
    """Names of the linear layers, counting an adapter-wrapped linear once (not its `base_layer`)."""
    names = []
    for name, module in model.named_modules():
        wrapped = getattr(module, "base_layer", None)
        if name.endswith(".base_layer"):
            continue
        if isinstance(module, nn.Linear) or isinstance(wrapped, nn.Linear):
            names.append(name)
    return names


def default_target_modules(model: nn.Module) -> str | None:
    """A regex (full match) for the decoder layers' linear modules, or None if none can be found."""
    path = _find_decoder_path(model)
    if path is None:
        return None
    prefix = f"{path}.layers."
    leaf_names = sorted(
        {name.rsplit(".", 1)[-1] for name in linear_layer_names(model) if name.startswith(prefix)}
    )
    if not leaf_names:
        return None
    return rf"{re.escape(prefix)}\d+\.(?:.*\.)?(?:{'|'.join(map(re.escape, leaf_names))})"


def candidate_summary(model: nn.Module, limit: int = 40) -> str:
    """A short list of the model's linear modules, grouped by leaf name, for error messages."""
    groups: dict[str, int] = {}
    example: dict[str, str] = {}
    for name in linear_layer_names(model):
        leaf = name.rsplit(".", 1)[-1]
        groups[leaf] = groups.get(leaf, 0) + 1
        example.setdefault(leaf, name)
    items = [f"{leaf} (x{count}, e.g. {example[leaf]})" for leaf, count in sorted(groups.items())]
    if len(items) > limit:
        items = [*items[:limit], f"... and {len(items) - limit} more"]
    return ", ".join(items) if items else "(no torch.nn.Linear modules at all)"
