"""The LoRA layers: M3 (the formula and its alpha/r factor), M4 (targets), M5 (rank) and M6
(merging)."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import randomize_adapters, tiny_reference
from doctor_setups import HandLora, adamw, flagged, hand_lora_model, peft_lora
from torch import nn

import peftkit
from peftkit.doctor import doctor


# -- M3 -----------------------------------------------------------------------------------
def test_m3_hand_made_lora_without_scaling():
    model = hand_lora_model(scale=False)
    errors = flagged(doctor(model, adamw(model)), "M3", "error")
    assert errors and "layers.0.attn.q" in errors[0].message
    assert "alpha / r" in errors[0].fix


def test_m3_not_flagged_on_correct_scaling_peftkit_peft_and_rslora():
    assert not flagged(doctor(hand_lora_model()), "M3")
    assert not flagged(doctor(peft_lora(use_rslora=True)), "M3")
    config = peftkit.LoraConfig(r=4, alpha=32, use_rslora=True, target_modules="all-linear")
    pm = peftkit.attach(tiny_reference(), config)
    assert not flagged(doctor(pm), "M3")


class TutorialLora(nn.Module):
    """Another tutorial layout: the frozen weight is the module's own, h = W x + s · x A B."""

    def __init__(self, features: int, r: int, alpha: float):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(features, features), requires_grad=False)
        self.lora_a = nn.Parameter(torch.randn(features, r))
        self.lora_b = nn.Parameter(torch.zeros(r, features))
        self.scaling = alpha / r

    def forward(self, x):
        return x @ self.weight.t() + self.scaling * (x @ self.lora_a @ self.lora_b)


def test_m3_hand_made_lora_in_x_a_b_layout_is_found_and_checked():
    model = nn.Sequential(TutorialLora(32, 4, 8))
    report = doctor(model, adamw(model))
    assert report.ok and report.ids() == {"M4", "M6"}  # found as LoRA (on no attention layer), correct
    model[0].scaling = 1.0  # the layer now says s = 1 but computes 2: still the formula's check
    model[0].forward = lambda x, m=model[0]: x @ m.weight.t() + 2.0 * (x @ m.lora_a @ m.lora_b)
    assert flagged(doctor(model, adamw(model)), "M3", "error")


def test_m3_hand_made_lora_that_does_not_say_its_scaling_is_info():
    model = hand_lora_model()
    for layer in model.layers:
        for name in ("q", "v"):
            del getattr(layer.attn, name).alpha
    info = flagged(doctor(model), "M3")
    assert [f.severity for f in info] == ["info"] and "cannot verify" in info[0].message


@pytest.mark.parametrize("use_rslora, scaling", [(False, 1.0), (True, 2.0)])
def test_m3_peft_layer_whose_scaling_is_not_its_alpha_over_r(use_rslora, scaling):
    model = peft_lora(use_rslora=use_rslora)  # lora_alpha = 2r: s = 2, or 16 / sqrt(8) with rsLoRA
    layer = model.base_model.model.model.layers[1].self_attn.v_proj
    assert layer.lora_alpha["default"] / layer.r["default"] == 2
    layer.scaling["default"] = scaling  # the forward still computes W x + s·B A x, with the wrong s
    errors = flagged(doctor(model, adamw(model)), "M3", "error")
    assert len(errors) == 1 and errors[0].where == "base_model.model.model.layers.1.self_attn.v_proj (default)"
    assert f"s = {scaling:g}" in errors[0].message and "lora_alpha / r" in errors[0].fix
    layer.scaling["default"] = 16 / math.sqrt(8) if use_rslora else 2.0
    assert not flagged(doctor(model, adamw(model)), "M3")


# -- M4 -----------------------------------------------------------------------------------
def test_m4_lora_only_on_output_projections():
    findings = flagged(doctor(peft_lora(targets=["o_proj"])), "M4")
    assert [f.severity for f in findings] == ["warning"] and "output projections" in findings[0].message


def test_m4_config_naming_modules_that_match_nothing():
    errors = flagged(doctor(peft_lora(targets=["q_proj", "query"])), "M4", "error")
    assert errors and "'query'" in errors[0].message and "q_proj" in errors[0].fix


def test_m4_not_flagged_on_query_and_value():
    assert not flagged(doctor(peft_lora()), "M4")
    assert not flagged(doctor(hand_lora_model()), "M4")


# -- M5 -----------------------------------------------------------------------------------
def test_m5_rank_at_layer_size_and_rank_too_large_a_share():
    hand = nn.Sequential(HandLora(nn.Linear(16, 16), r=16, alpha=32))
    errors = flagged(doctor(hand), "M5", "error")
    assert errors and "r=16" in errors[0].message and errors[0].where == "0"
    warnings_ = flagged(doctor(peft_lora(targets=["q_proj"], r=40)), "M5")
    assert [f.severity for f in warnings_] == ["warning"]


def test_m5_not_flagged_on_a_small_rank():
    assert not flagged(doctor(peft_lora(r=8)), "M5")


# -- M6 -----------------------------------------------------------------------------------
def test_m6_unmerged_lora_in_an_inference_model():
    pm = peftkit.attach(tiny_reference(), peftkit.LoraConfig(r=4)).eval()
    findings = flagged(doctor(pm), "M6")
    assert [f.severity for f in findings] == ["warning"] and "merge_and_unload" in findings[0].fix
    pm.train()
    assert [f.severity for f in flagged(doctor(pm, adamw(pm)), "M6")] == ["info"]


def test_m6_not_flagged_once_merged():
    pm = peftkit.attach(tiny_reference(), peftkit.LoraConfig(r=4)).eval()
    randomize_adapters(pm)
    pm.merge()
    assert not flagged(doctor(pm), "M6")
