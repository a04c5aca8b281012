"""One test per classic PEFT mistake, M1-M12.

Each test builds the mistake by hand, the way tutorials and hurried scripts do, shows the
wrong result it gives, and shows peftkit doing the same job right.
"""

from __future__ import annotations

import os

import pytest
import torch
from helpers import HandLora, randomize_adapters, tiny_llama, tiny_reference
from torch import nn

import peftkit
from peftkit.adapter_files import adapter_tensors


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


def test_m7_soft_prompt_not_at_the_input_embeddings():
    n, ids = 4, torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(0))
    model = tiny_llama()
    base = model(input_ids=ids).logits
    # Mistake: the soft prompt is concatenated in the wrong place, after the model has run (in
    # front of its final hidden states). It never passes through attention: the real tokens'
    # outputs are the base model's, and a loss on them gives the prompt no gradient at all.
    prompt = nn.Parameter(torch.randn(n, 64) * 0.02)
    hidden = model.model(input_ids=ids).last_hidden_state
    logits = model.lm_head(torch.cat([prompt.expand(2, -1, -1), hidden], dim=1))
    torch.testing.assert_close(logits[:, n:], base, rtol=0, atol=0)
    logits[:, n:-1].log_softmax(-1).gather(-1, ids[:, 1:, None]).mean().backward()
    assert prompt.grad is None or not prompt.grad.any()
    # peftkit: the prompt is prepended at the input embeddings, occupies the first n positions
    # and reaches the first real token, whose output now depends on it.
    pm = peftkit.attach(model, peftkit.PromptConfig(num_virtual_tokens=n))
    ours = pm.input_adapters["prompt"].embeddings["default"]
    out = pm(input_ids=ids, labels=ids)
    assert out.logits.shape[1] == n + ids.shape[1]
    assert not torch.allclose(out.logits[:, n:], base, atol=1e-4)
    (first_real,) = torch.autograd.grad(out.logits[:, n].sum(), ours, retain_graph=True)
    assert first_real.abs().sum() > 0
    out.loss.backward()
    assert ours.grad.abs().sum() > 0


class HandAdapter(nn.Module):
    """A bottleneck adapter as a hurried script writes it: up(relu(down(h))), no residual."""

    def __init__(self, hidden: int, bottleneck: int):
        super().__init__()
        self.down = nn.Linear(hidden, bottleneck)
        self.up = nn.Linear(bottleneck, hidden)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, h):
        return self.up(torch.relu(self.down(h)))


def test_m8_adapter_without_residual():
    from peftkit.methods.adapter import Bottleneck

    ids = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(0))
    base = tiny_reference()
    expected = base(input_ids=ids).logits
    # Mistake: the adapter after each feed-forward block replaces its output instead of adding
    # to it. At init (up = 0) it wipes the feed-forward out: the untrained model is another model.
    model = tiny_reference()
    for layer in model.layers:
        layer.mlp = nn.Sequential(layer.mlp, HandAdapter(64, 8))
    broken = model(input_ids=ids).logits
    assert (broken - expected).abs().max() > 0.1
    assert not torch.equal(broken.argmax(-1), expected.argmax(-1))
    h = torch.randn(4, 64)
    assert torch.equal(model.layers[0].mlp[1](h), torch.zeros_like(h))  # the hidden state collapses
    # peftkit: the adapter at the same place returns h + up(relu(down(h))), exactly the identity at
    # init, and once trained it adds to the feed-forward output rather than replacing it.
    pm = peftkit.attach(base, peftkit.AdapterConfig(bottleneck=8, placement="pfeiffer"))
    torch.testing.assert_close(pm(input_ids=ids).logits, expected, rtol=0, atol=0)
    ours, hand = Bottleneck(64, 8), HandAdapter(64, 8)
    assert torch.equal(ours(h), h)
    nn.init.normal_(ours.up.weight)
    hand.load_state_dict({f"{part}.{kind}": getattr(getattr(ours, part), kind)
                          for part in ("down", "up") for kind in ("weight", "bias")})
    torch.testing.assert_close(ours(h), h + hand(h))


def test_m9_learning_rate_too_low_for_peft():
    from peftkit.train import train

    ids = torch.randint(0, 200, (4, 12), generator=torch.Generator().manual_seed(0))
    batches = [{"input_ids": ids, "labels": ids}]

    def lora_b_after(lr):
        pm = peftkit.attach(tiny_reference(), peftkit.LoraConfig(r=4))
        train(pm, batches, steps=10, lr=lr, progress=False)
        moved = sum(p.abs().sum().item() for n, p in pm.trainable_parameters().items() if "lora_B" in n)
        return pm, moved

    # Mistake: a full fine-tuning rate; B starts at zero and AdamW moves it ~lr per step.
    pm, moved_low = lora_b_after(1e-5)
    # peftkit: no rate given -> LoRA's default, 2e-4.
    _, moved_default = lora_b_after(None)
    assert moved_default > 10 * moved_low
    optimizer = torch.optim.AdamW(pm.trainable_parameters().values(), lr=1e-5)
    assert "M9" in peftkit.doctor(pm, optimizer=optimizer).ids()


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
    assert keys == set(adapter_tensors(pm, "default"))
    assert all(k.endswith(("lora_A.weight", "lora_B.weight")) for k in keys)
    assert os.path.getsize(adapter_file) * 20 < os.path.getsize(full)


def test_m11_prefix_attention_mask_not_extended():
    from peftkit import integrations, masks

    n = 4
    row = torch.randint(1, 128, (5,), generator=torch.Generator().manual_seed(0))
    other = torch.randint(1, 128, (8,), generator=torch.Generator().manual_seed(1))
    ids = torch.stack([other, torch.cat([torch.zeros(3, dtype=torch.long), row])])  # left-padded
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    pm = peftkit.attach(tiny_llama(), peftkit.PrefixConfig(num_virtual_tokens=n))
    with torch.no_grad():
        alone = pm(input_ids=row[None]).logits[0]
        # Mistake: the prefix goes into the model's cache, but the caller's mask (B, T) is passed
        # unextended. Its columns now line up with the first T of the N + T keys, prefix included:
        # the padded row attends to padding and loses real keys, and nothing complains. (Positions
        # are given correctly, so the mask is the only thing wrong.)
        prefix = pm.input_adapters["prefix"]("default", 2, torch.float32)
        positions = masks.position_ids(masks.extend_attention_mask(mask, n), ids.shape[1])
        cache = {integrations.cache_argument(pm.base_model): integrations.prefix_cache(pm.base_model, prefix)}
        wrong = pm.base_model(input_ids=ids, attention_mask=mask, position_ids=positions, **cache).logits
        assert (wrong[1, 3:] - alone).abs().max() > 1e-2
        # peftkit: one mask builder extends the mask (prefix always attendable, padding still
        # masked), so the row inside the padded batch gives what it gives alone.
        right = pm(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(right[1, 3:], alone, rtol=0, atol=1e-5)


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
