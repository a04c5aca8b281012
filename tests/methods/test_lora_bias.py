"""LoRA with bias="lora_only": each adapter trains its own change to a targeted layer's bias,
the base model's bias stays its own, and files carry the bias where Hugging Face PEFT does."""

from __future__ import annotations

import pytest
import torch
from helpers import tiny_gpt2

import peftkit


def _train_a_few_steps(pm, ids, steps=3):
    optimizer = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=5e-2)
    for _ in range(steps):
        pm(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def _bias_config(**overrides):
    return peftkit.LoraConfig(r=4, alpha=8, target_modules=["c_attn"], bias="lora_only", **overrides)


@pytest.fixture
def gpt2_ids():
    return torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(0))


def test_trained_bias_leaves_the_base_layer_bias_untouched(gpt2_ids):
    model = tiny_gpt2()
    base_biases = {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith("c_attn.bias")}
    with torch.no_grad():
        base_logits = model(input_ids=gpt2_ids).logits
    pm = peftkit.attach(model, _bias_config())
    _train_a_few_steps(pm, gpt2_ids)
    layer = pm.base_model.transformer.h[0].attn.c_attn
    assert layer.lora_bias["default"].abs().sum() > 0  # the bias change trained
    for name, before in base_biases.items():
        assert torch.equal(pm.base_model.get_parameter(name.replace("c_attn.bias", "c_attn.base_layer.bias")), before)
    with torch.no_grad(), pm.disable_adapter():
        torch.testing.assert_close(pm(input_ids=gpt2_ids).logits, base_logits, rtol=0, atol=0)
    with torch.no_grad():
        unloaded = pm.unload()(input_ids=gpt2_ids).logits
    torch.testing.assert_close(unloaded, base_logits, rtol=0, atol=0)


def test_two_adapters_do_not_share_one_bias(gpt2_ids):
    pm = peftkit.attach(tiny_gpt2(), _bias_config(), name="first")
    _train_a_few_steps(pm, gpt2_ids)
    peftkit.attach(pm, _bias_config(), name="second")
    layer = pm.base_model.transformer.h[0].attn.c_attn
    assert torch.equal(layer.lora_bias["second"], torch.zeros_like(layer.lora_bias["second"]))
    assert layer.lora_bias["first"].abs().sum() > 0


def test_merge_folds_the_bias_change_and_unmerge_restores_it(gpt2_ids):
    pm = peftkit.attach(tiny_gpt2(), _bias_config())
    _train_a_few_steps(pm, gpt2_ids)
    layer = pm.base_model.transformer.h[0].attn.c_attn
    before = layer.base_layer.bias.detach().clone()
    with torch.no_grad():
        unmerged = pm(input_ids=gpt2_ids).logits
        pm.merge()
        torch.testing.assert_close(pm(input_ids=gpt2_ids).logits, unmerged, rtol=1e-5, atol=1e-5)
        pm.unmerge()
    torch.testing.assert_close(layer.base_layer.bias, before, rtol=0, atol=1e-6)


def test_peft_loads_peftkit_trained_bias_with_the_same_logits(tmp_path, gpt2_ids):
    peft = pytest.importorskip("peft")
    pm = peftkit.attach(tiny_gpt2(), _bias_config())
    _train_a_few_steps(pm, gpt2_ids)
    pm.save(tmp_path / "adapter")
    with torch.no_grad():
        ours = pm(input_ids=gpt2_ids).logits
    theirs = peft.PeftModel.from_pretrained(tiny_gpt2(), tmp_path / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs(input_ids=gpt2_ids).logits, ours, rtol=1e-5, atol=1e-5)


def test_peftkit_loads_a_peft_trained_bias_with_the_same_logits(tmp_path, gpt2_ids):
    peft = pytest.importorskip("peft")
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], bias="lora_only", fan_in_fan_out=True)
    theirs = peft.get_peft_model(tiny_gpt2(), config)
    _train_a_few_steps(theirs, gpt2_ids)
    theirs.save_pretrained(tmp_path / "adapter")
    theirs.eval()
    with torch.no_grad():
        expected = theirs(input_ids=gpt2_ids).logits
        fresh = tiny_gpt2()
        base_bias = fresh.transformer.h[0].attn.c_attn.bias.detach().clone()
        ours = peftkit.load(fresh, tmp_path / "adapter")
        torch.testing.assert_close(ours(input_ids=gpt2_ids).logits, expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(ours.base_model.transformer.h[0].attn.c_attn.base_layer.bias, base_bias)
