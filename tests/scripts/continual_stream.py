"""Train the synthetic three-task stream; used by the resume (kill -9) and DDP tests.

python continual_stream.py OUT [--kill-at TASK:STEP] [--resume] [--dump DIR]
torchrun --nproc_per_node 2 continual_stream.py OUT --ddp [--zero-stage 2|3] [--preset NAME] --dump DIR
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import warnings

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
warnings.filterwarnings("ignore")

import torch  # noqa: E402
from conftest import tiny_llama  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402
from synthetic_stream import TASKS, TokenCollator, answer_accuracy, records  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

from cmoe_adapters import ContinualMoEConfig, ContinualMoETrainer, ContinualTrainingArguments, Task, zero3  # noqa: E402
from cmoe_adapters._compat import checkpointing_argument  # noqa: E402

LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def record_writes_under(root: str) -> list[str]:
    """Record every path under `root` this process writes (open for writing, replace, mkdir, save)."""
    import builtins

    import safetensors.torch

    root = os.path.abspath(root)
    written: list[str] = []

    def note(path) -> None:
        path = os.path.abspath(os.fspath(path))
        if path.startswith(root):
            written.append(path)

    def wrap(owner, name, path_args):
        original = getattr(owner, name)

        def wrapper(*args, **kwargs):
            mode = args[1] if name == "open" and len(args) > 1 else kwargs.get("mode", "r")
            if name != "open" or any(flag in mode for flag in "wax+"):
                for index in path_args:
                    if index < len(args) and isinstance(args[index], (str, os.PathLike)):
                        note(args[index])
            return original(*args, **kwargs)

        setattr(owner, name, wrapper)

    wrap(builtins, "open", [0])
    wrap(os, "replace", [0, 1])
    wrap(os, "makedirs", [0])
    wrap(safetensors.torch, "save_file", [1])
    wrap(torch, "save", [1])
    return written


class AuxLossLog(TrainerCallback):
    """Every balancing-loss value the trainer logs, across all tasks (each task is one train())."""

    def __init__(self) -> None:
        self.values: list[float] = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "router_aux_loss" in logs:
            self.values.append(logs["router_aux_loss"])


class KillAt(TrainerCallback):
    """SIGKILL this process (no clean-up at all) at a given step of a given task."""

    def __init__(self, trainer_ref: list, task: str, step: int) -> None:
        self.trainer_ref, self.task, self.step = trainer_ref, task, step

    def on_step_end(self, args, state, control, **kwargs):
        cmoe = self.trainer_ref[0].continual_model
        if cmoe.tasks[-1] == self.task and state.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


def starve_experts_on(rank: int, process_index: int) -> list[int]:
    """On process `rank`, routers may pick only expert 0: every other expert receives no tokens there.

    Returns a one-element list counting the tokens this process still assigned to other experts.
    """
    import cmoe_adapters.experts

    route = cmoe_adapters.experts.route
    others = [0]

    def starving_route(logits, top_k):
        if process_index == rank:
            logits = logits.masked_fill(torch.arange(logits.shape[-1], device=logits.device) > 0, -torch.inf)
        routed = route(logits, top_k)
        others[0] += int(routed.assigned[..., 1:].sum())
        return routed

    cmoe_adapters.experts.route = starving_route
    return others


def deepspeed_config(stage: int) -> dict:
    """A ZeRO config whose batch settings follow TrainingArguments."""
    return {
        "zero_optimization": {"stage": stage},
        "train_micro_batch_size_per_gpu": "auto",
        "train_batch_size": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("output_dir")
    parser.add_argument("--kill-at", default=None)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--ddp", action="store_true")
    parser.add_argument("--dump", default=None, help="write this rank's final adapter state here")
    parser.add_argument("--zero-stage", type=int, default=None, help="train under DeepSpeed ZeRO")
    parser.add_argument("--lora", action="store_true", help="train one plain peft LoRA (the baseline)")
    parser.add_argument("--preset", choices=["llava_cmoe", "cl_moe"], default=None)
    parser.add_argument("--starve-rank", type=int, default=None, help="no tokens for experts 1+ on this rank")
    parser.add_argument("--checkpointing", action="store_true", help="activation checkpointing (reentrant)")
    parser.add_argument("--faults", default=None, help="comma-separated kill points (see fault_points.py)")
    parser.add_argument("--hub-model-id", default=None, help="push every task (HF_ENDPOINT, HF_TOKEN)")
    args = parser.parse_args()

    written = record_writes_under(args.output_dir) if args.dump else []
    torch.manual_seed(0)
    # a strong balancing loss, so that a run that lost (or doubled) it could not match one that kept it
    settings = {"r": 4, "num_experts": 2, "top_k": 1, "locator_steps": 100, "router_aux_loss_coef": 0.5}
    make_config = getattr(ContinualMoEConfig, args.preset) if args.preset else ContinualMoEConfig
    config = make_config(**settings)
    if args.lora:  # the forgetting baseline: one shared LoRA on the same layers
        config = LoraConfig(r=4, lora_alpha=8, target_modules=LINEARS)
    model = get_peft_model(tiny_llama(), config)
    training_args = ContinualTrainingArguments(
        output_dir=args.output_dir,
        max_steps=24,
        per_device_train_batch_size=8,
        learning_rate=5e-3,
        save_strategy="steps",
        save_steps=8,
        logging_steps=8,
        report_to=[],
        disable_tqdm=True,
        use_cpu=True,
        seed=0,
        ddp_backend="gloo" if args.ddp else None,
        deepspeed=deepspeed_config(args.zero_stage) if args.zero_stage is not None else None,
        **(checkpointing_argument(True) if args.checkpointing else {}),
        **({"push_to_hub": True, "hub_model_id": args.hub_model_id} if args.hub_model_id else {}),
    )
    starved = None
    if args.starve_rank is not None:
        starved = starve_experts_on(args.starve_rank, training_args.process_index)
    trainer_ref: list = []
    callbacks: list = [AuxLossLog()]
    if args.kill_at:
        task, step = args.kill_at.split(":")
        callbacks.append(KillAt(trainer_ref, task, int(step)))
    if args.faults:
        from fault_points import Faults

        callbacks += Faults(args.faults.split(","), args.output_dir).install()
    trainer = ContinualMoETrainer(
        model=model, args=training_args, data_collator=TokenCollator(), callbacks=callbacks
    )
    trainer_ref.append(trainer)
    stream = [
        Task(name, records(name, 96, i), records(name, 24, 100 + i), evaluate=answer_accuracy)
        for i, name in enumerate(TASKS)
    ]
    result = trainer.train_tasks(stream, resume_from_checkpoint=args.resume)
    if args.dump:
        os.makedirs(args.dump, exist_ok=True)
        rank = training_args.process_index
        with zero3.gathered(model.parameters()):  # ZeRO-3 holds a slice of each parameter
            state = {
                k: v.detach().cpu().clone()
                for k, v in model.state_dict().items()
                if "cmoe_" in k or "lora_" in k
            }
        dump = {"state": state, "matrix": result.accuracy_matrix, "written": sorted(set(written))}
        dump["router_aux_loss"] = callbacks[0].values
        if starved is not None:
            dump["tokens_to_other_experts"] = starved[0]
        torch.save(dump, os.path.join(args.dump, f"rank{rank}.pt"))
    if torch.distributed.is_initialized():  # a clean exit: no communication thread left running
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
