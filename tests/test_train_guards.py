"""The training loop refuses to produce garbage: bad numbers are refused before a step, a
NaN or infinite loss or gradient stops the run at that step (keeping the last checkpoint),
and held-out metrics ignore examples whose labels are all masked."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import tiny_bert_classifier, tiny_reference

import peftkit
from peftkit.train import NonFiniteError, evaluate, train
from peftkit.train_checkpoints import checkpoint_paths
from peftkit.validate import InvalidValue


def lora_run(seed: int = 0):
    torch.manual_seed(seed)
    pm = peftkit.attach(tiny_reference(), peftkit.LoraConfig(r=4, target_modules=["q", "v"]))
    gen = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(3):
        ids = torch.randint(0, 200, (2, 10), generator=gen)
        batches.append({"input_ids": ids, "labels": ids})
    return pm, batches


def adapter_state(pm):
    return {n: p.detach().clone() for n, p in pm.trainable_parameters().items()}


@pytest.mark.parametrize("keyword,value", [
    ("steps", 0), ("steps", -1), ("steps", 2.0), ("steps", True),
    ("lr", 0.0), ("lr", -1e-3), ("lr", math.nan), ("lr", math.inf), ("lr", "1e-3"),
    ("grad_accum", 0), ("grad_accum", 1.5),
    ("warmup_ratio", -0.1), ("warmup_ratio", 1.5), ("warmup_ratio", math.nan),
    ("weight_decay", -1.0), ("weight_decay", math.inf),
    ("checkpoint_every", -1), ("checkpoint_every", 2.5),
    ("lora_plus_ratio", 0.5), ("lora_plus_ratio", math.nan), ("lora_plus_ratio", math.inf),
])
def test_train_refuses_a_bad_number_before_any_step(keyword, value):
    pm, batches = lora_run()
    before = adapter_state(pm)
    kwargs = {"steps": 2, **{keyword: value}}
    with pytest.raises(InvalidValue, match=rf"^train\.{keyword} must be") as caught:
        train(pm, batches, progress=False, **kwargs)
    assert caught.value.field == keyword
    after = adapter_state(pm)
    assert all(torch.equal(before[n], after[n]) for n in before)


def test_train_refuses_a_bad_rate_in_its_own_groups_and_no_batches():
    pm, batches = lora_run()
    groups = [{"params": list(pm.trainable_parameters().values()), "lr": math.nan}]
    with pytest.raises(InvalidValue, match=r"param_groups\[0\]\['lr'\]"):
        train(pm, batches, steps=1, param_groups=groups, progress=False)
    with pytest.raises(ValueError, match="at least one batch"):
        train(pm, [], steps=1, lr=1e-3, progress=False)


def test_a_nan_gradient_stops_at_that_step_naming_the_group_and_keeping_the_checkpoint(tmp_path):
    """Step 3's lora_B gradient is NaN (the loss stays finite): the run stops at step 3,
    before the optimizer applies it; the weights are those after step 2 and the step-2
    checkpoint stays, with nothing of step 3 logged or saved."""
    pm, batches = lora_run()
    b_name, b_param = next((n, p) for n, p in pm.trainable_parameters().items() if ".lora_B." in n)
    calls = []

    def poison(grad):
        calls.append(1)
        return grad * math.nan if len(calls) == 3 else grad

    b_param.register_hook(poison)
    logged, states = [], {}

    def record(info):
        logged.append(info["step"])
        states[info["step"]] = adapter_state(pm)

    with pytest.raises(NonFiniteError) as caught:
        train(pm, batches, steps=6, progress=False, checkpoint_dir=tmp_path, checkpoint_every=2, on_step=record)
    error = caught.value
    assert error.step == 3 and "adapter 'default' lora_B" in error.where
    message = str(error)
    assert "step 3" in message and "gradient" in message and b_name in message
    assert "--lr" in message and "--lora-plus-ratio" in message and "\n" not in message
    assert logged == [1, 2]
    assert [p.name for p in checkpoint_paths(tmp_path)] == ["step-00000002"]
    assert error.checkpoint == checkpoint_paths(tmp_path)[-1] and str(error.checkpoint) in message
    now = adapter_state(pm)
    assert all(torch.equal(now[n], states[2][n]) for n in now)
    assert all(torch.isfinite(p).all() for p in now.values())


def test_a_loss_that_becomes_nan_stops_the_run_at_that_step(tmp_path):
    """A huge rate makes the loss non-finite at the second step; nothing from it is applied."""
    pm, batches = lora_run()
    with pytest.raises(NonFiniteError, match="step 2: the loss") as caught:
        train(pm, batches, steps=5, lr=1e30, warmup_ratio=0.0, progress=False,
              checkpoint_dir=tmp_path, checkpoint_every=1)
    assert caught.value.where == "loss"
    assert [p.name for p in checkpoint_paths(tmp_path)] == ["step-00000001"]
    assert "--lora-plus-ratio" not in str(caught.value)  # one explicit rate: no LoRA+ to turn down


def masked_copy(batch: dict) -> dict:
    """``batch`` with every label masked (-100)."""
    return {**batch, "labels": torch.full_like(batch["labels"], -100)}


def test_evaluate_ignores_examples_whose_labels_are_all_masked():
    """A fully masked example in a batch, and a batch of only such examples, change neither
    the held-out loss nor the accuracy (a batch of them alone used to make the loss NaN)."""
    pm, batches = lora_run()
    plain = evaluate(pm, batches[:2])
    with_masked_row = {k: torch.cat([v, masked_copy(batches[1])[k][:1]]) for k, v in batches[1].items()}
    masked = evaluate(pm, [batches[0], with_masked_row, masked_copy(batches[2])])
    assert math.isfinite(masked["loss"])
    assert masked["loss"] == pytest.approx(plain["loss"], rel=1e-5)
    assert masked["accuracy"] == pytest.approx(plain["accuracy"], rel=1e-6)
    assert evaluate(pm, [masked_copy(batches[0])]) == {"loss": 0.0, "accuracy": 0.0}


def test_evaluate_ignores_masked_classification_labels():
    pytest.importorskip("transformers")
    model = tiny_bert_classifier()
    ids = torch.randint(5, 100, (4, 8), generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 1, 1, 0])
    plain = evaluate(model, [{"input_ids": ids[:3], "labels": labels[:3]}])
    masked = evaluate(model, [{"input_ids": ids, "labels": torch.tensor([0, 1, 1, -100])},
                              {"input_ids": ids[3:], "labels": torch.tensor([-100])}])
    assert masked["loss"] == pytest.approx(plain["loss"], rel=1e-5)
    assert masked["accuracy"] == pytest.approx(plain["accuracy"])
