"""Train the synthetic three-task stream; used by the resume (kill -9) and DDP tests.

python continual_stream.py OUT [--kill-at TASK:STEP] [--resume] [--dump DIR]
torchrun --nproc_per_node 2 continual_stream.py OUT --ddp --dump DIR
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
from peft import get_peft_model  # noqa: E402
from synthetic_stream import TASKS, TokenCollator, answer_accuracy, records  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

from cmoe_adapters import ContinualMoEConfig, ContinualMoETrainer, ContinualTrainingArguments, Task  # noqa: E402


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


class KillAt(TrainerCallback):
    """SIGKILL this process (no clean-up at all) at a given step of a given task."""

    def __init__(self, trainer_ref: list, task: str, step: int) -> None:
        self.trainer_ref, self.task, self.step = trainer_ref, task, step

    def on_step_end(self, args, state, control, **kwargs):
        cmoe = self.trainer_ref[0].continual_model
        if cmoe.tasks[-1] == self.task and state.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("output_dir")
    parser.add_argument("--kill-at", default=None)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--ddp", action="store_true")
    parser.add_argument("--dump", default=None, help="write this rank's final adapter state here")
    args = parser.parse_args()

    written = record_writes_under(args.output_dir) if args.dump else []
    torch.manual_seed(0)
    model = get_peft_model(tiny_llama(), ContinualMoEConfig(r=4, num_experts=2, top_k=1, locator_steps=100))
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
    )
    trainer_ref: list = []
    callbacks = []
    if args.kill_at:
        task, step = args.kill_at.split(":")
        callbacks.append(KillAt(trainer_ref, task, int(step)))
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
        state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items() if "cmoe_" in k}
        dump = {"state": state, "matrix": result.accuracy_matrix, "written": sorted(set(written))}
        torch.save(dump, os.path.join(args.dump, f"rank{rank}.pt"))


if __name__ == "__main__":
    main()
