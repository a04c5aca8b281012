"""The probe harness: the doctor leaves the model, its gradients, the optimizer and the
random-number generator as it found them."""

from __future__ import annotations

import pytest
import torch
from helpers import tiny_llama
from doctor_setups import adamw, flagged, hand_lora_model, lm_batch, peft, peft_lora
from torch import nn

from peftkit.doctor import doctor


def snapshot(model: nn.Module, optimizer: torch.optim.Optimizer | None) -> dict:
    """Everything the doctor must leave alone, copied."""
    clone = lambda t: None if t is None else t.detach().clone()  # noqa: E731
    state = {} if optimizer is None else optimizer.state_dict()
    return {
        "params": {n: clone(p) for n, p in model.named_parameters()},
        "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "grads": {n: clone(p.grad) for n, p in model.named_parameters()},
        "buffers": {n: clone(b) for n, b in model.named_buffers()},
        "modes": {n: m.training for n, m in model.named_modules()},
        "optimizer": {k: {n: clone(v) if torch.is_tensor(v) else v for n, v in s.items()}
                      for k, s in state.get("state", {}).items()},
        "groups": state.get("param_groups"),
        "rng": torch.get_rng_state(),
    }


def assert_same(before: dict, after: dict) -> None:
    for key in ("requires_grad", "modes", "groups"):
        assert before[key] == after[key], key
    for key in ("params", "grads", "buffers"):
        assert before[key].keys() == after[key].keys()
        for name, tensor in before[key].items():
            other = after[key][name]
            assert (tensor is None) == (other is None), (key, name)
            assert tensor is None or torch.equal(tensor, other), (key, name)
    assert before["optimizer"].keys() == after["optimizer"].keys()
    for index, state in before["optimizer"].items():
        for name, value in state.items():
            other = after["optimizer"][index][name]
            assert torch.equal(value, other) if torch.is_tensor(value) else value == other
    assert torch.equal(before["rng"], after["rng"])


def test_doctor_leaves_model_grads_and_optimizer_state_as_they_were():
    model = peft_lora()
    model.train()
    optimizer = adamw(model)
    batch = lm_batch()
    model(**batch).loss.backward()
    optimizer.step()  # state to keep
    model(**batch).loss.backward()  # .grad to keep
    model.base_model.model.lm_head.weight.grad = torch.ones_like(model.base_model.model.lm_head.weight)  # stale
    before = snapshot(model, optimizer)
    report = doctor(model, optimizer, batch)
    assert_same(before, snapshot(model, optimizer))
    assert flagged(report, "M12", "warning")  # the stale .grad it saw, and left in place


@pytest.mark.parametrize("setup", ["prompt", "prefix", "hand-made"])
def test_doctor_leaves_prompt_prefix_and_hand_made_models_as_they_were(setup):
    if setup == "hand-made":
        model = hand_lora_model(zero_b=False)
    else:
        config = (peft.PromptTuningConfig if setup == "prompt" else peft.PrefixTuningConfig)(
            task_type="CAUSAL_LM", num_virtual_tokens=3)
        model = peft.get_peft_model(tiny_llama(), config)
    before = snapshot(model, None)
    doctor(model, batch=lm_batch())
    assert_same(before, snapshot(model, None))
