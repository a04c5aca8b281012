"""One test per classic PEFT mistake handled so far (M1-M6, M10, M12).

Each test builds the mistake by hand, the way tutorials and hurried scripts do, shows the
wrong result it gives, and shows peftkit doing the same job right.
"""

from __future__ import annotations

import math
import os

import pytest
import torch
from conftest import randomize_adapters, tiny_llama, tiny_reference
from torch import nn

import peftkit


class HandLora(nn.Module):
    """LoRA as a tutorial writes it: frozen W plus trainable A and B, with knobs for mistakes."""

    def __init__(self, linear: nn.Linear, r: int, alpha: float, *, zero_b=True, scale=True):
        super().__init__()
        self.linear = linear
        self.A = nn.Parameter(torch.randn(r, linear.in_features) / math.sqrt(linear.in_features))
        self.B = nn.Parameter(torch.zeros(linear.out_features, r) if zero_b else torch.randn(linear.out_features, r))
        self.scaling = alpha / r if scale else 1.0

    def forward(self, x):
        return self.linear(x) + self.scaling * (x @ self.A.t() @ self.B.t())


def one_step(model, ids, params, lr=1e-2):
    optimizer = torch.optim.SGD(params, lr=lr)
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    optimizer.zero_grad()


def test_m1_base_weights_left_trainable():
    ids = torch.randint(0, 200, (2, 10))
    # Mistake: wrap with LoRA but forget to freeze -> one step moves the base weights.
    model = tiny_reference()
    before = model.embed_tokens.weight.detach().clone()
    one_step(model, ids, list(model.parameters()))
    assert not torch.equal(model.embed_tokens.weight, before)
    # peftkit: attach freezes every non-adapter parameter, even ones the user unfroze.
    model = tiny_reference().requires_grad_(True)
    pm = peftkit.attach(model, peftkit.LoraConfig(r=4))
    frozen = {n: p.detach().clone() for n, p in pm.named_parameters() if not p.requires_grad}
    one_step(pm, ids, list(pm.trainable_parameters().values()))
    assert all(torch.equal(p, frozen[n]) for n, p in pm.named_parameters() if n in frozen)
    assert len(frozen) == sum(1 for _ in model.named_parameters()) - len(pm.trainable_parameters())


def test_m2_lora_b_not_zero_initialised():
    torch.manual_seed(0)
    x = torch.randn(4, 64)
    # Mistake: B random -> the "untrained" adapter already changes the model.
    hand = HandLora(nn.Linear(64, 64), r=8, alpha=16, zero_b=False)
    assert (hand(x) - hand.linear(x)).abs().max() > 1e-2
    # peftkit: B = 0, so the model is unchanged at init, on a whole transformer too.
    base = tiny_llama()
    ids = torch.randint(0, 128, (2, 8))
    expected = base(input_ids=ids).logits
    pm = peftkit.attach(base, peftkit.LoraConfig(r=8, target_modules="all-linear"))
    torch.testing.assert_close(pm(input_ids=ids).logits, expected, rtol=0, atol=0)


def test_m3_missing_alpha_over_r_scaling():
    torch.manual_seed(0)
    linear = nn.Linear(32, 32).requires_grad_(False)
    x = torch.randn(5, 32)
    pm = peftkit.attach(nn.Sequential(linear), peftkit.LoraConfig(r=8, alpha=32, target_modules=["0"]))
    layer = pm.base_model[0]
    nn.init.normal_(layer.lora_B["default"])
    a, b = layer.lora_A["default"], layer.lora_B["default"]
    formula = linear(x) + (32 / 8) * (x @ a.t() @ b.t())  # h = W x + (alpha / r) B A x
    # Mistake: the same A and B without the alpha/r factor.
    unscaled = HandLora(linear, r=8, alpha=32, scale=False)
    with torch.no_grad():
        unscaled.A.copy_(a)
        unscaled.B.copy_(b)
    assert not torch.allclose(unscaled(x), formula, atol=1e-3)
    torch.testing.assert_close(pm(x), formula, rtol=1e-5, atol=1e-5)
    # rsLoRA: alpha / sqrt(r)
    assert peftkit.LoraConfig(r=16, alpha=8, use_rslora=True).scaling == pytest.approx(2.0)


def test_m4_lora_on_wrong_or_missing_layers():
    model = tiny_llama()
    # Mistake: names that exist in another architecture (BERT's) match nothing here; a loose
    # library would silently train nothing. peftkit refuses and lists what exists.
    with pytest.raises(ValueError, match=r"'query'.*M4.*q_proj"):
        peftkit.attach(model, peftkit.LoraConfig(target_modules=["query", "value"]))
    # peftkit: with no targets given, the architecture's attention projections are chosen.
    pm = peftkit.attach(model, peftkit.LoraConfig())
    assert {p.rsplit(".", 1)[-1] for p in pm.target_paths["default"]} == {"q_proj", "v_proj"}


def test_m5_rank_too_high():
    # Mistake: r = in = out is a full-rank update with more parameters than the layer.
    linear = nn.Linear(16, 16)
    hand = HandLora(linear, r=16, alpha=32)
    assert hand.A.numel() + hand.B.numel() > linear.weight.numel()
    with pytest.raises(ValueError, match="M5"):
        peftkit.attach(nn.Sequential(nn.Linear(16, 16)), peftkit.LoraConfig(r=16, target_modules=["0"]))


def test_m6_not_merging_for_inference(tmp_path):
    ids = torch.randint(0, 128, (2, 8))
    base = tiny_llama()
    pm = peftkit.attach(base, peftkit.LoraConfig(r=4))
    randomize_adapters(pm)
    expected = pm(input_ids=ids).logits
    # Mistake: exporting the wrapped model -> extra modules and an extra matmul per layer,
    # and a state dict that a plain transformers model cannot load.
    assert any("lora_A" in k for k in pm.base_model.state_dict())
    # peftkit: merge_and_unload gives the plain architecture with the same outputs.
    plain = pm.merge_and_unload()
    assert set(plain.state_dict()) == set(tiny_llama().state_dict())
    torch.testing.assert_close(plain(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-5)


def test_m10_saving_the_whole_model(tmp_path):
    from safetensors.torch import load_file, save_file

    pm = peftkit.attach(tiny_llama(), peftkit.LoraConfig(r=4))
    randomize_adapters(pm)
    # Mistake: torch.save / save_file of the whole state dict stores every base weight again.
    full = tmp_path / "full.safetensors"
    save_file({k: v.contiguous() for k, v in pm.base_model.state_dict().items()}, str(full))
    # peftkit: the adapter file holds only what the adapter declares.
    pm.save(tmp_path / "adapter")
    adapter_file = tmp_path / "adapter" / "adapter_model.safetensors"
    keys = set(load_file(str(adapter_file)))
    assert keys == set(pm.adapter_tensors("default"))
    assert all(k.endswith(("lora_A.weight", "lora_B.weight")) for k in keys)
    assert os.path.getsize(adapter_file) * 20 < os.path.getsize(full)


def test_m12_gradients_for_frozen_weights():
    ids = torch.randint(0, 200, (2, 10))
    # Mistake: "freezing" by leaving the base out of the optimizer only; backward still fills
    # every base weight's .grad (as large as the model).
    model = tiny_reference()
    hand_lora = HandLora(model.layers[0].attn.q, r=4, alpha=8)
    model.layers[0].attn.q = hand_lora
    model(input_ids=ids, labels=ids).loss.backward()
    assert model.layers[1].attn.q.weight.grad is not None
    # peftkit: frozen weights never get .grad and every adapter parameter gets one, and the
    # LoRA function never forms grad_W even for the layer it wraps.
    pm = peftkit.attach(tiny_reference(), peftkit.LoraConfig(r=4, target_modules="all-linear"))
    pm(input_ids=ids, labels=ids).loss.backward()
    assert all(p.grad is None for p in pm.parameters() if not p.requires_grad)
    assert all(p.grad is not None for p in pm.trainable_parameters().values())
