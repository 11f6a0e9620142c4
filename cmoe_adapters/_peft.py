"""Registration of the method with peft.

peft's `register_peft_method` only accepts members of its own `PeftType` enum, so we register
through peft's mappings directly with a `str` enum of our own. Because the enum is a `str`,
`adapter_config.json` stores the plain string ``"CONTINUAL_MOE"`` and peft's lookups by that
string (``PEFT_TYPE_TO_CONFIG_MAPPING["CONTINUAL_MOE"]``) find our classes when loading.
"""

from __future__ import annotations

import enum

from torch import nn

PREFIX = "cmoe_"


class ContinualMoEPeftType(str, enum.Enum):
    """The peft type of this library's adapters."""

    CONTINUAL_MOE = "CONTINUAL_MOE"

    def __str__(self) -> str:  # so that f-strings and json show the plain name
        return self.value


CONTINUAL_MOE = ContinualMoEPeftType.CONTINUAL_MOE


def register_with_peft(config_cls: type, model_cls: type) -> None:
    """Make `get_peft_model` / `PeftModel.from_pretrained` know the method (idempotent)."""
    from peft import mapping

    registrations = (
        (mapping.PEFT_TYPE_TO_CONFIG_MAPPING, config_cls),
        (mapping.PEFT_TYPE_TO_TUNER_MAPPING, model_cls),
        (mapping.PEFT_TYPE_TO_PREFIX_MAPPING, PREFIX),
    )
    for table, value in registrations:
        table[CONTINUAL_MOE] = value
    # peft reads and writes the adapter's files before any code of this library runs (see integrity)
    from .integrity import install_peft_guards

    install_peft_guards()


def adapter_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters of `model`'s peft adapters (any peft method), never the base model's.

    A parameter belongs to an adapter when a component of its name is an adapter's name
    (``...q_proj.lora_A.default.weight``, ``...cmoe_experts.default.lora_A.0``).
    """
    adapters = set(getattr(model, "peft_config", None) or ())
    return [
        parameter for name, parameter in model.named_parameters() if adapters.intersection(name.split("."))
    ]
