"""Every preset runs in a plain PyTorch loop through the model's own task lifecycle, no private names.

The default preset's adapters from the loop are bit-identical to `ContinualMoETrainer`'s (same data
order, seed, optimizer and loss), and llava_cmoe / cl_moe run end to end with an accuracy matrix.
"""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_llama
from peft import get_peft_model
from synthetic_stream import TokenCollator, answer_accuracy, records, stream, trainer_for

from cmoe_adapters import ContinualMoEConfig
from cmoe_adapters.metrics import final_average

STEPS, BATCH, LR = 24, 8, 5e-3


def in_order(trainer) -> None:
    """The Trainer's batches in the data set's own order, so that a plain loop can match them."""
    if hasattr(trainer.args, "train_sampling_strategy"):  # transformers >= 5.x's public switch
        trainer.args.train_sampling_strategy = "sequential"
    else:  # older 5.x: the sampler hook (a test-only seam)
        trainer._get_train_sampler = lambda *args, **kwargs: torch.utils.data.SequentialSampler(
            trainer.train_dataset
        )


def batches(rows: list[dict], steps: int):
    """`steps` batches of `BATCH` records, cycling through `rows` in order, as the Trainer's epochs do."""
    collate, produced = TokenCollator(), 0
    while True:
        for start in range(0, len(rows) - BATCH + 1, BATCH):
            if produced == steps:
                return
            yield collate(rows[start : start + BATCH])
            produced += 1


def train(model, rows: list[dict], steps: int) -> None:
    """What the Trainer does per step: loss (+ balancing loss), backward, clip to 1.0, AdamW, zero."""
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=LR, weight_decay=0.0, fused=False, foreach=False)
    model.train()
    for batch in batches(rows, steps):
        tokens = batch["labels"][..., 1:].ne(-100).sum()  # the Trainer's num_items_in_batch
        loss = model(**batch, num_items_in_batch=tokens).loss
        aux = model.router_aux_loss()
        if aux is not None:
            loss = loss + aux.to(loss.dtype)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    model.eval()


def run_loop(config: ContinualMoEConfig, tasks) -> tuple[torch.nn.Module, list[list[float]], list[dict]]:
    """The whole stream in a plain loop: (probe,) learn, then evaluate every task seen, located."""
    model = get_peft_model(tiny_llama(), config)
    matrix, logs = [], []
    for index, task in enumerate(tasks):
        if model.needs_probe(task.name):
            with model.probing_task(task.name):
                train(model, task.train_dataset[: 2 * BATCH], steps=3)
        with model.learning_task(task.name) as session:
            train(model, task.train_dataset, STEPS)
        logs.append(session.log)
        matrix.append([answer_accuracy(model, seen.eval_dataset) for seen in tasks[: index + 1]])
    return model, matrix, logs


def adapter_state(model) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if "cmoe_" in k}


def test_a_plain_loop_and_the_trainer_give_bit_identical_adapters(tmp_path):
    tasks = stream()[:2]
    config = {"r": 4, "num_experts": 2, "top_k": 1, "locator_steps": 100}
    loop_model, loop_matrix, _ = run_loop(ContinualMoEConfig(**config), tasks)

    model = get_peft_model(tiny_llama(), ContinualMoEConfig(**config))
    trainer = trainer_for(
        model, tmp_path, optim="adamw_torch", lr_scheduler_type="constant", max_grad_norm=1.0
    )
    in_order(trainer)
    result = trainer.train_tasks(tasks)

    expected, actual = adapter_state(model), adapter_state(loop_model)
    assert expected.keys() == actual.keys()
    different = [k for k in expected if not torch.equal(expected[k], actual[k])]
    assert not different, f"{len(different)} of {len(expected)} tensors differ, e.g. {different[:3]}"
    assert result.accuracy_matrix == loop_matrix


@pytest.mark.parametrize("preset", ["llava_cmoe", "cl_moe"])
def test_each_published_method_runs_end_to_end_in_a_plain_loop(preset):
    tasks = stream()
    config = getattr(ContinualMoEConfig, preset)(r=4, num_experts=2, top_k=1, locator_steps=100)
    model, matrix, logs = run_loop(config, tasks)
    assert [len(row) for row in matrix] == [1, 2, 3]
    # located without its name; CL-MoE trains its shared experts on every task, so it forgets a little
    assert final_average(matrix) >= (0.9 if preset == "llava_cmoe" else 0.8), matrix
    assert all("locator" in log for log in logs)
    if preset == "llava_cmoe":
        assert "expansion" in logs[1] and "expansion" in logs[2], "later tasks were probed"
        assert model.peft_config["default"].task_records[1]["expansion"]["layers"] > 0
    else:
        assert "momentum" in logs[1], "CL-MoE's momentum merge ran after the second task"
    assert not any(p.requires_grad for p in model.parameters()), "finished tasks are frozen"


def test_the_lifecycle_refuses_what_the_method_forbids():
    model = get_peft_model(tiny_llama(), ContinualMoEConfig.llava_cmoe(r=4, num_experts=2, top_k=1))
    rows = records("low", 16, seed=0)
    with pytest.raises(ValueError, match="needs no probe phase"), model.probing_task("low"):
        pass  # the first task has nothing to probe against
    with model.learning_task("low"):
        train(model, rows, steps=1)
    with (
        pytest.raises(ValueError, match=r"first needs its probe phase, `with model.probing_task\('mid'\)"),
        model.learning_task("mid"),
    ):
        pass
    with pytest.raises(RuntimeError, match="boom"), model.probing_task("mid"):
        raise RuntimeError("boom")
    assert model.tasks == ["low"], "a failed probe phase leaves no probe behind"
