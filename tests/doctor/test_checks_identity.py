"""Identity at init: M2 (adapter not zero at init) and M8 (adapter without residual)."""

from __future__ import annotations

from helpers import randomize_adapters, tiny_reference
from doctor_setups import adamw, flagged, hand_adapter_model, hand_lora_model, lm_batch
from torch import nn

import peftkit
from peftkit.doctor import doctor


# -- M2 -----------------------------------------------------------------------------------
def test_m2_hand_made_lora_with_random_b():
    model = hand_lora_model(zero_b=False)
    errors = flagged(doctor(model, adamw(model)), "M2", "error")  # no step yet: certain
    assert errors and "layers.0.attn.q" in errors[0].message and "zeros_(B)" in errors[0].fix
    assert flagged(doctor(model), "M2", "warning")  # no optimizer: cannot know it is untrained


def test_m2_not_flagged_when_b_is_zero_or_the_adapter_is_trained():
    model = hand_lora_model()
    assert not flagged(doctor(model, adamw(model)), "M2")
    pm = peftkit.attach(tiny_reference(), peftkit.LoraConfig(r=4))
    optimizer = adamw(pm)
    batch = lm_batch(260)
    pm(**batch).loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    randomize_adapters(pm)  # trained: B is no longer zero, and that is right
    assert not flagged(doctor(pm, optimizer), "M2")


def test_m2_bottleneck_with_nonzero_up():
    model = hand_adapter_model(residual=True)
    nn.init.normal_(model.layers[1].mlp[1].up.weight)
    errors = flagged(doctor(model, adamw(model, 1e-3)), "M2", "error")
    assert errors and "layers.1.mlp.1" in errors[0].where


# -- M8 -----------------------------------------------------------------------------------
def test_m8_adapter_without_residual():
    errors = flagged(doctor(hand_adapter_model(residual=False)), "M8", "error")
    assert errors and "layers.0.mlp.1" in errors[0].where and "h + up" in errors[0].fix


def test_m8_not_flagged_on_residual_adapters():
    assert not flagged(doctor(hand_adapter_model(residual=True)), "M8")
    pm = peftkit.attach(tiny_reference(), peftkit.AdapterConfig(bottleneck=8))
    assert not doctor(pm, adamw(pm, 1e-3)).errors
