"""Training loop: schedule, method-aware learning rate, checkpoints and exact resume."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import tiny_reference

import peftkit
from peftkit.train import train
from peftkit.learning_rates import LORA_PLUS_RATIO, default_learning_rate, default_parameter_groups, warmup_cosine
from peftkit.train_checkpoints import checkpoint_paths


def make_run(seed: int = 0):
    torch.manual_seed(seed)
    pm = peftkit.attach(tiny_reference(), peftkit.LoraConfig(r=4, dropout=0.1, target_modules="all-linear"))
    gen = torch.Generator().manual_seed(0)  # the same data in every run
    batches = []
    for _ in range(3):
        ids = torch.randint(0, 200, (2, 12), generator=gen)
        batches.append({"input_ids": ids, "labels": ids})
    return pm, batches


def adapter_state(pm):
    return {n: p.detach().clone() for n, p in pm.trainable_parameters().items()}


def test_warmup_then_cosine_to_zero():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = warmup_cosine(opt, warmup_steps=4, total_steps=20)
    rates = []
    for _ in range(20):
        rates.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    assert rates[0] < rates[1] < rates[3] < rates[4] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(rates[4:], rates[5:]))
    assert sched.get_last_lr()[0] == pytest.approx(0.0, abs=1e-12)


def test_lora_default_learning_rate_is_peft_scale():
    assert default_learning_rate(peftkit.LoraConfig()) == pytest.approx(2e-4)


@pytest.mark.parametrize("hidden,published", [
    (768, (4e-4, 5e-4)),    # Hu et al. 2021, RoBERTa-base
    (1024, (3e-4, 4e-4)),   # Hu et al. 2021, RoBERTa-large
    (4096, (2e-4, 2e-4)),   # Dettmers et al. 2023, QLoRA 7B
    (8192, (1e-4, 1.5e-4)),  # QLoRA 65B (1e-4)
])
def test_lora_default_learning_rate_follows_the_models_width(hidden, published):
    """Narrow models train LoRA at larger rates than wide ones; the default lands in (or
    next to) the range published for models of that width."""
    from types import SimpleNamespace

    model = torch.nn.Module()
    model.config = SimpleNamespace(hidden_size=hidden)
    rate = default_learning_rate(peftkit.LoraConfig(), model)
    low, high = published
    assert low * 0.9 <= rate <= high * 1.1
    # Other methods do not depend on the width, and a model without a config keeps 2e-4.
    assert default_learning_rate(peftkit.PromptConfig(), model) == pytest.approx(3e-2)
    assert default_learning_rate(peftkit.LoraConfig(), torch.nn.Linear(2, 2)) == pytest.approx(2e-4)


def test_train_gives_lora_the_rate_of_the_models_width():
    """train() without lr asks for the rate through the PeftModel (a GPT-2 config says n_embd)."""
    pytest.importorskip("transformers")
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=1, n_head=2, vocab_size=32, n_positions=16))
    pm = peftkit.attach(model, peftkit.LoraConfig(r=2))
    ids = torch.randint(0, 32, (2, 6), generator=torch.Generator().manual_seed(0))
    # 10 steps: the first is warm-up, at a quarter of the rate; the rate reported is the base rate.
    result = train(pm, [{"input_ids": ids, "labels": ids}], steps=10, progress=False)
    assert result.learning_rate == pytest.approx(1e-3)  # 2e-4 * sqrt(4096 / 64) = 1.6e-3, capped


def test_killed_run_resumes_to_the_same_adapter(tmp_path):
    pm, batches = make_run()
    train(pm, batches, steps=10, lr=1e-2, progress=False, grad_accum=2,
          checkpoint_dir=tmp_path / "a", checkpoint_every=3)
    uninterrupted = adapter_state(pm)

    class Killed(Exception):
        pass

    def die_at_7(record):
        if record["step"] == 7:
            raise Killed

    pm, batches = make_run()
    with pytest.raises(Killed):
        train(pm, batches, steps=10, lr=1e-2, progress=False, grad_accum=2,
              checkpoint_dir=tmp_path / "b", checkpoint_every=3, on_step=die_at_7)
    assert [p.name for p in checkpoint_paths(tmp_path / "b")] == ["step-00000006"]  # only the newest kept
    (tmp_path / "b" / ".partial-xyz").mkdir()  # a checkpoint cut short by a kill is ignored

    pm, batches = make_run(seed=123)  # a fresh process: different init, restored from disk
    steps_seen = []
    result = train(pm, batches, steps=10, lr=1e-2, progress=False, grad_accum=2,
                   checkpoint_dir=tmp_path / "b", checkpoint_every=3, resume=True,
                   on_step=lambda r: steps_seen.append(r["step"]))
    assert steps_seen == [7, 8, 9, 10]
    assert len(result.losses) == 10
    resumed = adapter_state(pm)
    assert resumed.keys() == uninterrupted.keys()
    for name in resumed:
        torch.testing.assert_close(resumed[name], uninterrupted[name], rtol=0, atol=0)


def test_resume_with_other_parameters_is_refused(tmp_path):
    pm, batches = make_run()
    train(pm, batches, steps=2, lr=1e-2, progress=False, checkpoint_dir=tmp_path, checkpoint_every=1)
    other = peftkit.attach(tiny_reference(), peftkit.LoraConfig(r=4, target_modules=["q"]))
    with pytest.raises(ValueError, match="other trainable parameters"):
        train(other, batches, steps=4, progress=False, checkpoint_dir=tmp_path, checkpoint_every=1, resume=True)


def test_each_active_method_trains_at_its_own_default_rate():
    pm = peftkit.attach(tiny_reference(), peftkit.LoraConfig(r=4), name="lora")
    peftkit.attach(pm, peftkit.PromptConfig(num_virtual_tokens=4), name="prompt")
    pm.set_adapter(["lora", "prompt"])
    seen = {}

    def record(model, optimizer, batch):
        for group in optimizer.param_groups:
            seen[group["initial_lr"]] = sum(p.numel() for p in group["params"])

    ids = torch.randint(0, 200, (2, 8))
    train(pm, [{"input_ids": ids, "labels": ids}], steps=1, progress=False, preflight=record)
    lora = pm.trainable_parameters()
    a_params = sum(p.numel() for n, p in lora.items() if "lora_A." in n)
    b_params = sum(p.numel() for n, p in lora.items() if "lora_B." in n)
    # LoRA at the rate of its width (hidden 64: the 1e-3 cap), split LoRA+ style (A at half
    # of it, B at 16 times A's); the prompt at 3e-2 (4 tokens x hidden 64).
    assert {round(lr, 9): n for lr, n in seen.items()} == {5e-4: a_params, 8e-3: b_params, 3e-2: 4 * 64}


def lora_plus_model():
    """A reference decoder with LoRA on its linear layers and on its token embedding."""
    torch.manual_seed(0)
    return peftkit.attach(tiny_reference(), peftkit.LoraConfig(r=4, target_modules=["q", "v", "embed_tokens"]))


def test_default_groups_train_lora_b_faster_than_a_lora_plus():
    pm = lora_plus_model()
    rate = default_learning_rate(pm.configs["default"], pm)
    rates = {}
    for group in default_parameter_groups(pm):
        for p in group["params"]:
            rates[id(p)] = group["lr"]
    by_name = {n: rates[id(p)] for n, p in pm.trainable_parameters().items()}
    assert by_name and len(by_name) == len(rates)  # every trainable tensor in exactly one group
    for name, lr in by_name.items():
        if "lora_embedding_" in name:
            expected = rate  # embedding LoRA: A starts at zero there, so no LoRA+ split
        elif ".lora_B." in name:
            expected = rate / 2 * LORA_PLUS_RATIO
        else:
            expected = rate / 2
        assert lr == pytest.approx(expected), name
    # Ratio 1: the plain rate for every LoRA tensor, one group.
    plain = default_parameter_groups(pm, lora_plus_ratio=1)
    assert [(g["kind"], g["lr"]) for g in plain] == [("adapter", pytest.approx(rate))]
    with pytest.raises(ValueError, match="at least 1"):
        default_parameter_groups(pm, lora_plus_ratio=0.5)


def test_lora_plus_steps_b_sixteen_times_as_far_as_a():
    """AdamW's first step moves each weight by about its rate, so after one step without
    warm-up every B has moved 16 times as far as the A beside it; with lora_plus_ratio=1, as far."""
    for ratio, expected in ((LORA_PLUS_RATIO, LORA_PLUS_RATIO), (1.0, 1.0)):
        pm = lora_plus_model()
        with torch.no_grad():  # a non-zero B, so A gets a gradient in the first step too
            for n, p in pm.trainable_parameters().items():
                if ".lora_B." in n:
                    p.normal_(0, 0.02)
        before = {n: p.detach().clone() for n, p in pm.trainable_parameters().items()}
        ids = torch.randint(0, 200, (2, 8), generator=torch.Generator().manual_seed(0))
        optimizer = torch.optim.AdamW(default_parameter_groups(pm, ratio))
        pm(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        moved = {n: (p.detach() - before[n]).abs().max().item() for n, p in pm.trainable_parameters().items()}
        for n in moved:
            if ".lora_B." in n:
                partner = n.replace(".lora_B.", ".lora_A.")
                assert moved[n] / moved[partner] == pytest.approx(expected, rel=1e-3), n


def test_the_rate_reported_each_step_is_the_methods_on_the_schedule():
    """on_step's lr (the log and the progress bar) is the method's rate times the schedule's
    factor, not the rate of whichever LoRA+ group comes first."""
    pm = lora_plus_model()
    rate = default_learning_rate(pm.configs["default"], pm)
    seen = []
    ids = torch.randint(0, 200, (2, 8))
    train(pm, [{"input_ids": ids, "labels": ids}], steps=10, warmup_ratio=0.0, progress=False,
          on_step=lambda info: seen.append(info["lr"]))
    # No warm-up: after step k the cosine factor is (1 + cos(pi k / 10)) / 2.
    expected = [rate * (1 + math.cos(math.pi * k / 10)) / 2 for k in range(1, 11)]
    assert seen == pytest.approx(expected, abs=1e-12)


def test_an_explicit_rate_trains_every_tensor_at_that_rate():
    pm = lora_plus_model()
    seen = []
    ids = torch.randint(0, 200, (2, 8))
    train(pm, [{"input_ids": ids, "labels": ids}], steps=1, lr=3e-4, progress=False,
          preflight=lambda model, optimizer, batch: seen.extend(g["initial_lr"] for g in optimizer.param_groups))
    assert seen == [3e-4]
