"""A plain training loop under `accelerate launch`: every process trains its shard of each task
inside ``model.learning_task``; the locator is fitted on all processes' features.

    accelerate launch --multi_gpu --num_processes 2 tests/scripts/plain_loop_accelerate.py DUMP_DIR

(torchrun underneath; `Accelerator(cpu=True)` makes it two CPU processes over gloo.)
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from accelerate import Accelerator

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for the tiny models

from conftest import tiny_llama
from peft import get_peft_model
from synthetic_stream import TokenCollator, records

from cmoe_adapters import ContinualMoEConfig


def main(dump: Path) -> None:
    accelerator = Accelerator(cpu=True)
    rank = accelerator.process_index
    model = get_peft_model(tiny_llama(), ContinualMoEConfig(r=4, num_experts=2, top_k=1, locator_steps=50))
    collate, fitted = TokenCollator(), {}
    for index, name in enumerate(("low", "mid")):
        rows = records(name, 64, seed=index)[rank::2]  # this process's shard
        with model.learning_task(name) as task:
            optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3)
            wrapped, optimizer = accelerator.prepare(model, optimizer)
            wrapped.train()
            for start in range(0, len(rows), 8):
                batch = collate(rows[start : start + 8])
                loss = wrapped(**batch).loss + model.router_aux_loss()
                accelerator.backward(loss)
                optimizer.step()
                optimizer.zero_grad()
            wrapped.eval()
        fitted[name] = task.log["locator"]["train_samples"] + task.log["locator"]["calibration_samples"]
    state = {k: v.detach().clone() for k, v in model.state_dict().items() if "cmoe_" in k}
    probe = torch.tensor([r["prompt"] for r in records("mid", 4, seed=9)])
    located = model.locate_tasks(input_ids=probe, attention_mask=torch.ones_like(probe))
    torch.save({"state": state, "fitted": fitted, "located": located, "world": accelerator.num_processes},
               dump / f"rank{rank}.pt")  # fmt: skip


if __name__ == "__main__":
    main(Path(sys.argv[1]))
