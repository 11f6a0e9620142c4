"""The routers' balancing loss in any `transformers.Trainer`: one mixin, for ours and for TRL's.

A Trainer computes its loss in ``compute_loss``; the continual MoE adds its load-balancing loss
there, scaled like the task loss under gradient accumulation, and logs its mean as
``router_aux_loss``. Put the mixin first::

    from trl import SFTTrainer
    from cmoe_adapters import RouterAuxLossMixin

    class ContinualSFTTrainer(RouterAuxLossMixin, SFTTrainer):
        pass

`ContinualMoETrainer` is built on it too. On a model without continual-MoE layers it adds nothing.
"""

from __future__ import annotations

from typing import Any

import torch

from ._compat import loss_is_scaled_for_ga
from .model import ContinualMoEModel


class RouterAuxLossMixin:
    """Adds ``model.router_aux_loss()`` to a Trainer's training loss and logs it (see the module)."""

    _aux_loss_sum: torch.Tensor | None = None
    _aux_loss_count: int = 0

    @property
    def continual_model(self) -> ContinualMoEModel | None:
        """The continual-MoE tuner inside the model, or None for a plain peft model (baseline)."""
        base = getattr(self.model, "base_model", None)
        return base if isinstance(base, ContinualMoEModel) else None

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """The task loss plus the routers' balancing loss, scaled like the task loss for GA."""
        output = super().compute_loss(
            model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
        )
        cmoe = self.continual_model
        if cmoe is None or not model.training:
            return output
        steps = 1
        if loss_is_scaled_for_ga(self, num_items_in_batch):  # the Trainer will not divide aux: do it
            configured = self.args.gradient_accumulation_steps
            steps = getattr(self, "current_gradient_accumulation_steps", configured)
        cmoe.set_aux_loss_gradient_scale(1.0 / steps)  # for the part reentrant checkpointing defers
        value = cmoe.router_aux_loss_value()  # all layers', also those whose gradient comes in backward
        if value is not None:
            value = value.float() / steps  # no host sync per micro-step: `log` reads the sum once
            self._aux_loss_sum = value if self._aux_loss_sum is None else self._aux_loss_sum + value
            self._aux_loss_count += 1
        aux = cmoe.router_aux_loss()
        if aux is None:
            return output
        if steps != 1:
            aux = aux / steps
        if return_outputs:
            loss, outputs = output
            return loss + aux.to(loss.dtype), outputs
        return output + aux.to(output.dtype)

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        if "loss" in logs and self._aux_loss_count:
            logs["router_aux_loss"] = round(float(self._aux_loss_sum) / self._aux_loss_count, 6)
            self._aux_loss_sum, self._aux_loss_count = None, 0
        super().log(logs, *args, **kwargs)
