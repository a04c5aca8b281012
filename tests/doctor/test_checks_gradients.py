"""What trains and where gradients land: M1 (base weights left trainable) and M12
(gradients in the wrong places)."""

from __future__ import annotations

import torch
from helpers import tiny_reference
from doctor_setups import HandPrompt, adamw, flagged, hand_lora_model, lm_batch, peft_lora
from torch import nn

import peftkit
from peftkit.doctor import doctor


# -- M1 -----------------------------------------------------------------------------------
def test_m1_peft_model_with_its_base_unfrozen():
    model = peft_lora()
    for param in model.parameters():
        param.requires_grad_(True)
    findings = flagged(doctor(model, adamw(model)), "M1", "error")
    assert findings and "embed_tokens.weight" in findings[0].where
    assert "freeze" in findings[0].fix


def test_m1_frozen_parameters_in_the_optimizer():
    model = peft_lora()
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-4)  # every parameter, frozen ones too
    findings = flagged(doctor(model, optimizer), "M1")
    assert [f.severity for f in findings] == ["warning"]
    assert "requires_grad" in findings[0].fix


def test_m1_not_flagged_on_peftkit_and_hand_made_setups():
    pm = peftkit.attach(tiny_reference(), peftkit.LoraConfig(r=4))
    assert not flagged(doctor(pm, adamw(pm)), "M1")
    assert not flagged(doctor(hand_lora_model()), "M1")
    assert not flagged(doctor(HandPrompt(tiny_reference())), "M1")  # the prompt is found as an adapter


# -- M12 ----------------------------------------------------------------------------------
def test_m12_gradients_for_weights_no_optimizer_updates():
    model = hand_lora_model(freeze=False)  # "frozen" only by leaving W out of the optimizer
    optimizer = torch.optim.AdamW([p for n, p in model.named_parameters() if n.endswith((".A", ".B"))], lr=2e-4)
    errors = flagged(doctor(model, optimizer, lm_batch(260)), "M12", "error")
    assert errors and "no optimizer group holds them" in errors[0].message
    assert "layers.0.attn.q.linear.weight" in errors[0].where


class Checkpointed(nn.Module):
    """A block run under reentrant activation checkpointing."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.block = block

    def forward(self, *args):
        return torch.utils.checkpoint.checkpoint(self.block, *args, use_reentrant=True)


def test_m12_gradient_checkpointing_that_cuts_the_graph():
    model = hand_lora_model()
    model.layers[0] = Checkpointed(model.layers[0])
    errors = flagged(doctor(model, adamw(model), lm_batch(260)), "M12", "error")
    assert errors and "layers.0.block.attn.q.A" in errors[0].where and "use_reentrant=False" in errors[0].fix


def test_m12_not_flagged_on_correct_setups():
    model = hand_lora_model()
    assert not flagged(doctor(model, adamw(model), lm_batch(260)), "M12")
    pm = peftkit.attach(tiny_reference(), peftkit.LoraConfig(r=4, target_modules="all-linear"))
    assert not flagged(doctor(pm, adamw(pm)), "M12")
