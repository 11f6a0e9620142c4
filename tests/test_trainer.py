"""ContinualMoETrainer on a synthetic stream where forgetting is real (see synthetic_stream.py)."""

from __future__ import annotations

import json
import os

import pytest
import torch
from conftest import tiny_llama
from peft import LoraConfig, PeftModel, get_peft_model
from synthetic_stream import TASKS, TokenCollator, answer_accuracy, moe_model, records, stream, trainer_for
from tiny_vlms import build_tiny_vlm

from cmoe_adapters import (
    ContinualMoEConfig,
    ContinualResult,
    Task,
)

LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def moe_run(tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("moe")
    trainer = trainer_for(moe_model(), output_dir, eval_oracle=True)
    return trainer, trainer.train_tasks(stream()), output_dir


def test_continual_moe_keeps_old_tasks_where_sequential_lora_forgets(moe_run, tmp_path):
    _, moe, _ = moe_run
    lora_model = get_peft_model(tiny_llama(), LoraConfig(r=8, lora_alpha=16, target_modules=LINEARS))
    lora = trainer_for(lora_model, tmp_path).train_tasks(stream())

    assert lora.tasks == moe.tasks == list(TASKS)
    assert [len(row) for row in moe.accuracy_matrix] == [1, 2, 3]
    assert lora.accuracy_matrix[-1][0] == 0.0 and lora.bwt <= -0.9, "one shared LoRA forgets"
    assert min(row[i] for i, row in enumerate(moe.accuracy_matrix)) >= 0.9, "each task is learnt"
    assert moe.bwt >= -0.05 and moe.final_average >= 0.9, "the continual MoE does not forget"
    assert moe.locator_accuracy >= 0.9 and lora.locator_accuracy is None
    assert moe.oracle_accuracy_matrix is not None and moe.oracle_final_average >= moe.final_average - 0.05


def test_each_task_is_saved_and_loads_back(moe_run):
    trainer, result, output_dir = moe_run
    assert {"low", "mid", "high", "results.json", "results.md"} <= set(os.listdir(output_dir))
    assert not any(name.startswith(".") for name in os.listdir(output_dir)), "no staging folders left"
    saved = json.loads((output_dir / "results.json").read_text())
    assert saved["accuracy_matrix"] == result.accuracy_matrix
    assert saved["summary"]["bwt"] == pytest.approx(result.bwt)
    assert ContinualResult.load(str(output_dir)).accuracy_matrix == result.accuracy_matrix
    assert "| after \\ on | low | mid | high |" in (output_dir / "results.md").read_text()
    confusion = result.locator_confusion
    assert [len(row) for row in confusion] == [4, 4, 4], "a none column after the three tasks"
    rate = sum(row[-1] for row in confusion) / sum(map(sum, confusion))
    assert saved["summary"]["open_set_rate"] == result.open_set_rate == pytest.approx(rate)
    table = "| task \\ located to | low | mid | high | none (base model) |"
    assert table in (output_dir / "results.md").read_text()
    assert len(result.task_logs) == 3 and result.task_logs[0]["locator"]["task"] == "low"
    assert result.task_metrics == ["custom"] * 3, "a Task's own evaluate= is its metric"

    after_mid = PeftModel.from_pretrained(tiny_llama(), output_dir / "mid")
    assert after_mid.tasks == ["low", "mid"]
    assert answer_accuracy(after_mid, records("low", 24, 100)) == pytest.approx(result.accuracy_matrix[1][0])
    final = PeftModel.from_pretrained(tiny_llama(), output_dir / "high")
    ids = torch.tensor([r["prompt"] for r in records("mid", 4, 7)])
    assert torch.equal(final(input_ids=ids).logits, trainer.model(input_ids=ids).logits)


def test_samples_located_in_no_task_are_counted_in_the_none_column(moe_run, monkeypatch):
    trainer, result, _ = moe_run
    cmoe = trainer.continual_model
    locate = cmoe.locate_tasks

    def mid_unknown(**inputs):  # the locator places every sample of "mid" in none of the tasks
        location = locate(**inputs)
        location.tasks = [None if name == "mid" else name for name in location.tasks]
        return location

    monkeypatch.setattr(cmoe, "locate_tasks", mid_unknown)
    confusion = trainer.evaluate_seen_tasks().confusion
    before = result.locator_confusion  # the same evaluation with the real locator
    assert confusion == [[low, 0, high, mid + none] for low, mid, high, none in before]
    report = ContinualResult(result.tasks, result.accuracy_matrix, locator_confusion=confusion)
    assert report.locator_accuracy_per_task["mid"] == 0.0
    assert report.open_set_rate == pytest.approx(
        sum(row[1] + row[3] for row in before) / sum(map(sum, before))
    )
    mid_row = next(line for line in report.locator_markdown().splitlines() if line.startswith("| mid |"))
    assert mid_row.split(" | ")[2] == "0.0" and mid_row.split(" | ")[5] == "0.0"  # to mid; its accuracy


def test_tasks_can_arrive_one_at_a_time(tmp_path):
    trainer = trainer_for(moe_model(), tmp_path, max_steps=8)
    first, second, _ = stream(train=32, evaluate=8)
    trainer.train_task(first)
    assert trainer.result.tasks == ["low"] and trainer.continual_model.tasks == ["low"]
    result = trainer.train_task(second)
    assert result.tasks == ["low", "mid"] and len(result.accuracy_matrix[1]) == 2


def test_balancing_loss_is_added_and_scaled_for_gradient_accumulation(tmp_path):
    model = moe_model(router_aux_loss_coef=0.5)
    model.add_task("low")
    trainer = trainer_for(model, tmp_path, gradient_accumulation_steps=4)
    batch = TokenCollator()(records("low", 8, 0))
    model.train()
    plain = model(**batch).loss
    aux = model.router_aux_loss()
    trainer.current_gradient_accumulation_steps = 4
    # num_items_in_batch given: the Trainer will not divide the loss by GA, so the aux loss is divided here
    scaled = trainer.compute_loss(model, batch, num_items_in_batch=torch.tensor(8))
    torch.testing.assert_close(scaled, plain + aux / 4)
    # without it the Trainer divides the whole loss by GA later, so the aux loss is added as is
    torch.testing.assert_close(trainer.compute_loss(model, batch), plain + aux)


def _adapter_state(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if "lora" in k or "router" in k}


def test_a_task_trains_with_its_own_arguments_as_a_trainer_given_them(tmp_path):
    """Per-task batch, accumulation, steps and learning rate equal a stream-wide setting of them."""
    low, mid, _ = stream(train=32, evaluate=4)
    own = {"per_device_train_batch_size": 4, "gradient_accumulation_steps": 2, "max_steps": 5}
    own["learning_rate"] = 1e-2
    trainer = trainer_for(moe_model(), tmp_path / "per-task", max_steps=3)
    trainer.train_tasks(
        [low, Task("mid", mid.train_dataset, mid.eval_dataset, mid.evaluate, training_args=own)]
    )
    per_task = _adapter_state(trainer.model)
    assert trainer.args.max_steps == 3 and trainer.args.per_device_train_batch_size == 8, "restored after"
    assert trainer.state.global_step == 5, "the second task ran its own max_steps"

    # the same two tasks, the second by a trainer whose own arguments are those (seeded as the
    # second task of a stream is: the seed moves by 1_000_003 per position)
    model = moe_model()
    trainer_for(model, tmp_path / "one", max_steps=3).train_task(low)
    trainer_for(model, tmp_path / "two", seed=42 + 1_000_003, **own).train_task(mid)
    reference = _adapter_state(model)
    assert per_task.keys() == reference.keys()
    for name, value in per_task.items():
        assert torch.equal(value, reference[name]), name


def test_per_task_arguments_are_checked_before_training(tmp_path):
    trainer = trainer_for(moe_model(), tmp_path)
    low = stream(train=16, evaluate=4)[0]
    with pytest.raises(ValueError, match=r"training_args may set num_train_epochs, .*not \['bf16'\]"):
        trainer.train_tasks([Task("low", low.train_dataset, training_args={"bf16": True})])
    trainer.is_deepspeed_enabled = True  # what accelerate sets under DeepSpeed (a GPU-only launch)
    with pytest.raises(
        ValueError, match="per-task per_device_train_batch_size cannot be combined with DeepSpeed"
    ):
        trainer.train_tasks(
            [Task("low", low.train_dataset, training_args={"per_device_train_batch_size": 2})]
        )
    assert trainer.continual_model.tasks == []


def test_bad_streams_fail_before_any_training(tmp_path):
    trainer = trainer_for(moe_model(), tmp_path)
    low = stream(train=16, evaluate=4)[0]
    with pytest.raises(ValueError, match=r"Duplicate task names.*'low'"):
        trainer.train_tasks([low, Task("low", low.train_dataset)])
    with pytest.raises(ValueError, match="'empty': train_dataset is empty"):
        trainer.train_tasks([low, Task("empty", [])])
    with pytest.raises(ValueError, match="'bad/name' cannot be used"):
        trainer.train_tasks([Task("bad/name", low.train_dataset)])
    with pytest.raises(TypeError, match="sized data set"):
        trainer.train_tasks([Task("gen", (r for r in low.train_dataset))])
    with pytest.raises(ValueError, match="no evaluate= function"):
        trainer.train_tasks([Task("noeval", low.train_dataset, low.eval_dataset)])
    unknown = r"Task 'text': Unknown metric 'vqa_soft'; known metrics: exact_match, vqa, "
    with pytest.raises(ValueError, match=unknown):
        trainer.train_tasks([Task("text", low.train_dataset, low.eval_dataset, metric="vqa_soft")])
    assert trainer.continual_model.tasks == [], "nothing was added or trained"


def test_fsdp_is_refused_before_any_training(tmp_path):
    trainer = trainer_for(moe_model(), tmp_path)
    trainer.is_fsdp_enabled = True  # what accelerate sets under FSDP (which it offers on GPUs only)
    with pytest.raises(ValueError, match=r"does not support FSDP.*DeepSpeed ZeRO-3"):
        trainer.train_tasks(stream())
    assert trainer.continual_model.tasks == [] and not os.listdir(tmp_path)


def test_a_task_without_eval_set_leaves_its_column_empty(tmp_path):
    trainer = trainer_for(moe_model(), tmp_path, max_steps=8)
    low, mid, _ = stream(train=32, evaluate=8)
    with pytest.warns(UserWarning, match="'mid' has no eval_dataset"):
        result = trainer.train_tasks([low, Task("mid", mid.train_dataset)])
    assert result.accuracy_matrix[1][1] is None and result.accuracy_matrix[1][0] is not None
    assert result.final_average == result.accuracy_matrix[1][0]


def test_a_vqa_data_set_without_any_image_is_refused(tmp_path):
    vlm = build_tiny_vlm("llava").model
    model = get_peft_model(vlm, ContinualMoEConfig(r=2, num_experts=2, top_k=1))
    trainer = trainer_for(model, tmp_path)
    data = [{"image": None, "question": "what color?", "answer": "red"}] * 3
    with pytest.raises(ValueError, match=r"no record of train_dataset has an image \(of the first 3\)"):
        trainer.train_tasks([Task("color", data, evaluate=lambda m, d: 0.0)])


@pytest.mark.parametrize("preset", ["llava_cmoe", "cl_moe"])
def test_method_presets_run_their_phases_in_the_trainer(preset, tmp_path):
    config = getattr(ContinualMoEConfig, preset)(r=4, lora_alpha=8, locator_steps=100)
    trainer = trainer_for(get_peft_model(tiny_llama(), config), tmp_path, max_steps=16)
    result = trainer.train_tasks(stream(train=64, evaluate=16))
    assert result.tasks == list(TASKS) and len(result.accuracy_matrix[-1]) == 3
    logs = result.task_logs
    saved = trainer.continual_model.peft_config["default"].task_records
    if preset == "llava_cmoe":
        assert "expansion" not in logs[0], "the first task is not probed"
        for log, record in zip(logs[1:], saved[1:], strict=True):
            assert 1 <= log["expansion"]["expanded"] <= 14
            assert len(record["expansion"]["probe_frequencies"]) == 14
            assert len(record["expanded_layers"]) == log["expansion"]["expanded"]
        assert trainer.continual_model.tasks == list(TASKS), "no probe task is left behind"
    else:
        assert "momentum" not in logs[0] and sum(logs[1]["momentum"].values()) == 14 * 4
    reloaded = PeftModel.from_pretrained(tiny_llama(), tmp_path / "high")
    ids = torch.tensor([r["prompt"] for r in records_of("low")])
    assert torch.equal(reloaded(input_ids=ids).logits, trainer.model(input_ids=ids).logits)


def records_of(task: str) -> list[dict]:
    return records(task, 4, 3)


def test_balancing_loss_is_summed_on_device_and_read_only_when_logging(tmp_path, monkeypatch):
    """Between logging steps the aux-loss sum stays a tensor: no float()/.item() per micro-step."""
    import transformers

    model = moe_model(router_aux_loss_coef=0.5)
    trainer = trainer_for(model, tmp_path, max_steps=6, logging_steps=2)
    cmoe = trainer.continual_model
    added: list[torch.Tensor] = []  # every aux loss compute_loss adds (GA is 1: added as is)
    router_aux_loss = cmoe.router_aux_loss

    def spy_aux_loss():
        aux = router_aux_loss()
        if aux is not None:
            added.append(aux.detach().clone())
        return aux

    monkeypatch.setattr(cmoe, "router_aux_loss", spy_aux_loss)

    # host reads in compute_loss after the Trainer's own loss is computed (what this trainer adds)
    tail = {"open": False, "reads": [], "sums": []}
    base_compute_loss = transformers.Trainer.compute_loss

    def trainer_compute_loss(self, *args, **kwargs):
        output = base_compute_loss(self, *args, **kwargs)
        tail["open"] = True
        return output

    monkeypatch.setattr(transformers.Trainer, "compute_loss", trainer_compute_loss)
    compute_loss = trainer.compute_loss

    def spy_compute_loss(*args, **kwargs):
        try:
            return compute_loss(*args, **kwargs)
        finally:
            tail["open"] = False
            tail["sums"].append(trainer._aux_loss_sum)

    monkeypatch.setattr(trainer, "compute_loss", spy_compute_loss)
    for name in ("item", "tolist", "__float__", "__bool__"):
        original = getattr(torch.Tensor, name)

        def read(self, *args, name=name, original=original, **kwargs):
            if tail["open"]:
                tail["reads"].append(name)
            return original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, read)

    trainer.train_task(stream(train=32, evaluate=4)[0])
    monkeypatch.undo()

    assert tail["reads"] == [], "compute_loss read the aux loss on the host"
    assert len(tail["sums"]) == len(added) == 6
    assert all(isinstance(total, torch.Tensor) and not total.requires_grad for total in tail["sums"])
    logged = [entry["router_aux_loss"] for entry in trainer.state.log_history if "router_aux_loss" in entry]
    expected = [round(float(torch.stack(added[i : i + 2]).mean()), 6) for i in (0, 2, 4)]
    assert logged == pytest.approx(expected, abs=2e-6)
    assert trainer._aux_loss_count == 0 and trainer._aux_loss_sum is None, "reset by the last log"


def test_a_metric_this_machine_cannot_score_is_refused_before_training(tmp_path, monkeypatch):
    """UCIT's caption metric runs Java programs: without Java, say so before a task trains."""
    monkeypatch.setattr("shutil.which", lambda program: None)
    trainer = trainer_for(moe_model(), tmp_path)
    low = stream(train=16, evaluate=4)[0]
    caption = Task("captions", low.train_dataset, low.eval_dataset, metric="caption")
    with pytest.raises(ImportError, match=r"Task 'captions': the 'caption' metric needs .*a Java runtime"):
        trainer.train_tasks([caption])
    assert trainer.continual_model.tasks == []
