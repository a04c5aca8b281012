"""The fused causal-LM loss (``peftkit.lm_loss``): the same loss and gradients as the model's
own ``.loss``, checked against the formula in float64, and the plain path wherever fusing
would change what is computed."""

from __future__ import annotations

from functools import partial

import pytest
import torch

from helpers import randomize_adapters, tiny_decoder, tiny_gpt2, tiny_llama
from peftkit import LoraConfig, PromptConfig, attach
from peftkit.lm_loss import fused_parts, linear_cross_entropy, training_loss


def formula_loss(hidden, weight, bias, targets, scale=1.0, softcap=None):
    """Mean over rows with a target of logsumexp(z) − z[y], z = s·u or c·tanh(s·u / c) for
    u = h Wᵀ + b, in float64 (its gradient by autograd through tanh)."""
    z = scale * (hidden.double() @ weight.double().t() + (0.0 if bias is None else bias.double()))
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    scored = targets != -100
    picked = z[scored].gather(1, targets[scored][:, None]).squeeze(1)
    return (torch.logsumexp(z[scored], dim=1) - picked).mean()


@pytest.mark.parametrize("rows", [1, 7, 64, None])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("scale, softcap", [(1.0, None), (0.125, None), (1.0, 3.0), (0.5, 3.0)],
                         ids=["plain", "scaled", "capped", "scaled-capped"])
def test_matches_formula_in_float64(rows, with_bias, scale, softcap):
    gen = torch.Generator().manual_seed(0)
    # Logits of a few units: a cap of 3 bends them hard (tanh' well below 1), so a missing or
    # wrong chain-rule factor shows.
    hidden = torch.randn(3, 50, 16, generator=gen, requires_grad=True)
    weight = torch.randn(97, 16, generator=gen)
    bias = torch.randn(97, generator=gen) if with_bias else None
    targets = torch.randint(0, 97, (3, 50), generator=gen)
    targets[0, :20] = -100  # a prompt that is not scored
    targets[2, -5:] = -100  # padding
    loss = linear_cross_entropy(hidden, weight, bias, targets, rows=rows, scale=scale, softcap=softcap)
    loss.backward(torch.tensor(0.5))  # a weighted loss: the incoming gradient scales the kept one
    expected_hidden = hidden.detach().double().requires_grad_()
    expected = formula_loss(expected_hidden, weight, bias, targets, scale, softcap)
    (expected * 0.5).backward()
    torch.testing.assert_close(loss.double(), expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(hidden.grad.double(), expected_hidden.grad, rtol=1e-5, atol=1e-7)
    assert hidden.grad[0, :20].abs().max() == 0  # rows without a label get no gradient


def test_no_scored_row_is_nan_like_the_plain_mean():
    hidden = torch.randn(4, 8, requires_grad=True)
    loss = linear_cross_entropy(hidden, torch.randn(10, 8), None, torch.full((4,), -100))
    assert torch.isnan(loss)


def _batch(vocab: int = 128):
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(0, vocab, (2, 24), generator=gen)
    labels = ids.clone()
    labels[:, :9] = -100  # the user's turn
    labels[1, -4:] = -100  # padding
    mask = torch.ones_like(ids)
    mask[1, -4:] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


DECODERS = {"llama": tiny_llama, "gpt2": tiny_gpt2,
            **{t: partial(tiny_decoder, t) for t in ("gemma2", "gemma3_text", "granite", "olmo", "olmo2", "phi")}}


@pytest.mark.parametrize("build", DECODERS.values(), ids=DECODERS.keys())
def test_training_loss_equals_the_models_own_loss_and_gradients(build):
    # Gemma 2/3 soft-cap their logits (a cap of 2 here), Granite divides them by 4, Phi-2's
    # head has a bias: the fused loss maps them as the model does.
    model = attach(build(), LoraConfig(r=4, target_modules="all-linear"))
    randomize_adapters(model)
    model.train()
    assert fused_parts(model) is not None
    batch = _batch()
    grads = []
    for compute in (lambda: model(**batch).loss, lambda: training_loss(model, batch)):
        model.zero_grad()
        torch.manual_seed(5)  # GPT-2's dropout: the same masks in both forwards
        loss = compute()
        loss.backward()
        grads.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}))
    (plain_loss, plain_grads), (fused_loss, fused_grads) = grads
    torch.testing.assert_close(fused_loss, plain_loss, rtol=1e-6, atol=1e-6)
    assert plain_grads.keys() == fused_grads.keys() and plain_grads
    for name in plain_grads:
        torch.testing.assert_close(fused_grads[name], plain_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def _lora_grads(model, compute_loss):
    from peftkit.distributed import full  # a sharded model's gradients are DTensors

    model.zero_grad()
    loss = compute_loss()
    loss.backward()
    return loss.detach(), torch.cat([full(p.grad).flatten() for p in model.parameters() if p.requires_grad])


def test_bfloat16_autocast_is_as_close_to_float32_as_the_plain_loss():
    model = attach(tiny_llama(), LoraConfig(r=4))
    randomize_adapters(model)
    batch = _batch()
    exact_loss, exact_grads = _lora_grads(model, lambda: model(**batch).loss)  # float32, the plain loss
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain_loss, plain_grads = _lora_grads(model, lambda: model(**batch).loss)
        fused_loss, fused_grads = _lora_grads(model, lambda: training_loss(model, batch))
    assert fused_loss.dtype == torch.float32
    torch.testing.assert_close(fused_loss, plain_loss.float(), rtol=2e-2, atol=2e-2)

    def error(grads):
        return ((grads - exact_grads).norm() / exact_grads.norm()).item()

    assert error(fused_grads) <= 1.5 * error(plain_grads) + 1e-3, (error(fused_grads), error(plain_grads))


def test_plain_path_where_fusing_would_change_the_computation():
    # A prompt adapter rewrites the call around virtual tokens.
    prompt = attach(tiny_llama(), PromptConfig(num_virtual_tokens=4))
    assert fused_parts(prompt) is None
    # A LoRA on the head: the head is no plain frozen Linear.
    on_head = attach(tiny_llama(), LoraConfig(r=4, target_modules=["lm_head"]))
    assert fused_parts(on_head) is None
    # A soft-capped model's logits are not the head's.
    capped = tiny_llama()
    capped.config.final_logit_softcapping = 30.0
    assert fused_parts(attach(capped, LoraConfig(r=4))) is None
    # A bare transformers model, with nothing of peftkit's around it.
    assert fused_parts(tiny_llama()) is None
    batch = _batch()
    torch.testing.assert_close(training_loss(prompt, batch), prompt(**batch).loss)


class _OpRecorder(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the name of every op that runs, and the most rows of any tensor an op returns
    whose last dimension is ``width``."""

    def __init__(self, width: int | None = None):
        super().__init__()
        self.width, self.rows, self.names = width, 0, set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.add(str(func.overloadpacket))
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.dim() >= 1 and t.shape[-1] == self.width:
                self.rows = max(self.rows, t.numel() // self.width)
        return out


@pytest.mark.parametrize("build", [tiny_llama, partial(tiny_decoder, "gemma2")], ids=["llama", "gemma2-softcap"])
def test_the_logits_never_exist_whole(monkeypatch, build):
    from peftkit import lm_loss

    vocab = 203  # no other width of the model (64, 128, 32, 16)
    model = attach(build(vocab_size=vocab), LoraConfig(r=4))
    ids = torch.randint(0, vocab, (2, 100))
    batch = {"input_ids": ids, "labels": ids}
    monkeypatch.setattr(lm_loss, "MIN_CHUNK_ROWS", 8)
    monkeypatch.setattr(lm_loss, "CHUNK_LOGITS", 8 * vocab)
    plain, fused = _OpRecorder(vocab), _OpRecorder(vocab)
    with plain:
        model(**batch).loss.backward()
    with fused:
        training_loss(model, batch).backward()
    assert plain.rows >= 200  # the plain loss holds (2 x 100, vocab) logits
    assert fused.rows <= 64  # chunks of 8 rows; the largest is the head's transposed (64, vocab) view


@pytest.fixture
def fused_calls(monkeypatch):
    """A list that gains one entry per call of the fused loss's autograd Function."""
    from peftkit import lm_loss

    calls = []
    original = lm_loss.LinearCrossEntropy.apply
    monkeypatch.setattr(lm_loss.LinearCrossEntropy, "apply", lambda *a: calls.append(1) or original(*a))
    return calls


def test_the_trainer_takes_the_fused_loss(fused_calls):
    from peftkit.train import accumulate_gradients

    model = attach(tiny_llama(), LoraConfig(r=4))
    randomize_adapters(model)
    batch = _batch()
    with torch.no_grad():
        expected = model(**batch).loss.item()
    loss = accumulate_gradients(model, [batch, batch])
    assert len(fused_calls) == 2
    assert loss == pytest.approx(expected, rel=1e-6)


def test_without_grad_the_same_loss_and_no_gradient_work():
    model = attach(tiny_llama(), LoraConfig(r=4))
    randomize_adapters(model)
    batch = _batch()
    with_grad, without_grad = _OpRecorder(), _OpRecorder()
    with with_grad:
        training_loss(model, batch)
    with torch.no_grad(), without_grad:
        fused = training_loss(model, batch)
    plain = model(**batch).loss
    # The gradient of the scored rows is written with index_copy_ in forward, only when asked for.
    assert "aten.index_copy_" in with_grad.names and "aten.index_copy_" not in without_grad.names
    assert fused.grad_fn is None
    torch.testing.assert_close(fused, plain.detach(), rtol=1e-6, atol=1e-6)


def test_batch_keys_it_does_not_know_take_the_models_own_call(fused_calls):
    model = attach(tiny_llama(), LoraConfig(r=4), "a")
    attach(model, LoraConfig(r=4), "b")
    randomize_adapters(model)
    model.set_adapter("a")
    model.eval()  # a mixed batch is for inference
    batch = {**_batch(), "adapter_names": ["a", "b"]}
    with torch.no_grad():
        mixed = training_loss(model, batch)
        expected = model(**batch).loss
        only_a = training_loss(model, {k: v for k, v in batch.items() if k != "adapter_names"})
    assert fused_calls == [1]  # only the batch without adapter_names was fused
    torch.testing.assert_close(mixed, expected)
    assert not torch.allclose(mixed, only_a)  # row 1 ran adapter b, not the active a


def test_float16_under_a_loss_scale_keeps_the_plain_precision():
    # A GradScaler multiplies the loss by 2^16 (above float16's largest number), and the
    # gradient of one logit, softmax/count, lies near float16's smallest: both must survive.
    gen = torch.Generator().manual_seed(0)
    hidden32 = torch.randn(4096, 16, generator=gen)
    weight32 = torch.randn(512, 16, generator=gen) * 0.5
    targets = torch.randint(0, 512, (4096,), generator=gen)
    scale = 2.0 ** 16
    expected_hidden = hidden32.double().requires_grad_()
    formula_loss(expected_hidden, weight32, None, targets).backward()

    def error(compute_loss):
        hidden = hidden32.half().requires_grad_()
        (compute_loss(hidden, weight32.half()) * scale).backward()
        grad = hidden.grad.double() / scale
        assert torch.isfinite(grad).all()
        return ((grad - expected_hidden.grad).norm() / expected_hidden.grad.norm()).item()

    fused = error(lambda h, w: linear_cross_entropy(h, w, None, targets))
    plain = error(lambda h, w: torch.nn.functional.cross_entropy((h @ w.t()).float(), targets))
    assert fused <= 1.2 * plain, (fused, plain)


@pytest.fixture
def one_rank_group(tmp_path):
    """A gloo process group of this process alone (DDP and FSDP2 work on one rank too)."""
    import torch.distributed as dist

    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.mark.parametrize("wrapper", ["ddp", "fsdp", "fsdp-causal-lm-apart"])
def test_ddp_and_fsdp_take_the_fused_loss_inside_their_call(wrapper, one_rank_group, fused_calls):
    """Through DDP or FSDP2 (blocks, then the PeftModel as root, as ``peftkit train --fsdp``)
    the fused loss runs inside the wrapper's call; with the causal LM sharded as a unit of its
    own, whose gather the fused loss would skip, the model's own loss, still right."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel

    from peftkit.distributed import blocks

    model = attach(tiny_llama(), LoraConfig(r=4, target_modules="all-linear"))
    randomize_adapters(model)
    batch = _batch()
    plain_loss, plain_grads = _lora_grads(model, lambda: model(**batch).loss)
    if wrapper == "ddp":
        wrapped = DistributedDataParallel(model, broadcast_buffers=False)
    else:
        mesh = init_device_mesh("cpu", (1,))
        for block in blocks(model):
            fully_shard(block, mesh=mesh)
        if wrapper == "fsdp-causal-lm-apart":
            fully_shard(model.base_model, mesh=mesh)
        wrapped = fully_shard(model, mesh=mesh)  # the root: embeddings, norm and head sharded
    hooks = []
    wrapped.register_forward_pre_hook(lambda module, args: hooks.append(module))
    fused_loss, fused_grads = _lora_grads(model, lambda: training_loss(wrapped, batch))
    assert hooks == [wrapped]  # through the wrapper's own call
    assert fused_calls == ([] if wrapper == "fsdp-causal-lm-apart" else [1])
    torch.testing.assert_close(fused_loss, plain_loss, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(fused_grads, plain_grads, rtol=1e-4, atol=1e-6)


def test_the_fused_loss_asked_of_a_model_that_cannot_names_the_fallback():
    from peftkit.lm_loss import fused_loss

    prompt = attach(tiny_llama(), PromptConfig(num_virtual_tokens=4))
    with pytest.raises(ValueError, match="training_loss"):
        prompt(**_batch(), run_inside=fused_loss)
    model = attach(tiny_llama(), LoraConfig(r=4))
    with pytest.raises(ValueError, match="training_loss"):
        fused_loss(model, {**_batch(), "num_items_in_batch": 30})
    with pytest.raises(TypeError, match="by keyword"):
        model(_batch()["input_ids"], run_inside=fused_loss)


def test_a_rank_without_labels_joins_the_backward_without_logits():
    from peftkit.lm_loss import joining_loss

    vocab = 203  # no other width of the model (64, 128, 32)
    fused = attach(tiny_llama(vocab_size=vocab), LoraConfig(r=4, target_modules="all-linear"))
    prompt = attach(tiny_llama(vocab_size=vocab), PromptConfig(num_virtual_tokens=4))  # not fusable: logits x 0
    ids = torch.randint(0, vocab, (2, 24))
    stand_in = {"input_ids": ids, "labels": torch.full_like(ids, -100)}
    for model in (fused, prompt):
        recorder = _OpRecorder(vocab)
        with recorder:
            zero = joining_loss(model, stand_in)
            zero.backward()
        assert zero.item() == 0.0
        if model is fused:
            assert recorder.rows == 0  # the head never ran: no logits, not even its weight's view
        else:
            assert recorder.rows >= 2 * (24 + 4)  # the prompt model's whole logits, virtual tokens too
        grads = [p.grad for p in model.parameters() if p.requires_grad]
        assert grads and all(g is not None and g.abs().max() == 0 for g in grads)  # every one joins
