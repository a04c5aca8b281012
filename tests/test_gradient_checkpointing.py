"""Gradient checkpointing (peftkit.checkpointing): the same loss and the same adapter
gradients as without it, for every method on the reference decoder, a tiny Llama and a tiny
GPT-2; frozen weights get no .grad; reentrant checkpointing on frozen inputs starves LoRA.

Float32 throughout, no dropout: the recompute runs the same operations on the same inputs,
so losses and gradients agree to rtol 1e-5 and atol 1e-7 (on CPU they come out equal).
"""

from __future__ import annotations

import pytest
import torch
from helpers import randomize_adapters, tiny_llama, tiny_reference
from torch import nn

import peftkit
from peftkit import checkpointing, masks

pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")

RTOL, ATOL = 1e-5, 1e-7
N = 3  # virtual tokens of a prompt or prefix

METHODS = {
    "lora": lambda: peftkit.LoraConfig(r=4, alpha=8, target_modules="all-linear"),
    "adapter": lambda: peftkit.AdapterConfig(bottleneck=8),
    "prefix": lambda: peftkit.PrefixConfig(num_virtual_tokens=N),
    "prompt": lambda: peftkit.PromptConfig(num_virtual_tokens=N),
}

def tiny_gpt2(seed: int = 0):
    """helpers.tiny_gpt2 without dropout (GPT-2's config defaults to 0.1)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=128, n_positions=128,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(config).eval()


BUILDERS = {"reference": tiny_reference, "llama": tiny_llama, "gpt2": tiny_gpt2}

CASES = [pytest.param(arch, method) for arch in BUILDERS for method in METHODS]


def build(arch: str, method: str, checkpointed: bool) -> peftkit.PeftModel:
    pm = peftkit.attach(BUILDERS[arch](), METHODS[method]())
    randomize_adapters(pm)  # LoRA's B and the adapter's up start at zero, which zeroes other gradients
    if checkpointed:
        checkpointing.enable_gradient_checkpointing(pm)
    return pm.train()


def batch() -> dict[str, torch.Tensor]:
    """Two rows of 12 tokens, the first left-padded by 3 (labels -100 there)."""
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def step(pm: nn.Module) -> tuple[torch.Tensor, dict[str, torch.Tensor], int]:
    """One forward + backward: the loss, the trainable parameters' gradients, and how many
    module calls ran (a recompute in backward calls the block's modules again)."""
    calls = [0]

    def count(*_):
        calls[0] += 1

    handles = [m.register_forward_hook(count) for m in pm.modules()]
    try:
        loss = pm(**batch()).loss
        loss.backward()
    finally:
        for handle in handles:
            handle.remove()
    frozen = [n for n, p in pm.named_parameters() if not p.requires_grad and p.grad is not None]
    assert not frozen, f"frozen parameters got a .grad: {frozen}"
    grads = {n: p.grad for n, p in pm.named_parameters() if p.requires_grad}
    assert grads and all(g is not None for g in grads.values()), "an adapter parameter got no gradient"
    return loss.detach(), grads, calls[0]


@pytest.mark.parametrize(("arch", "method"), CASES)
def test_checkpointing_gives_the_same_loss_and_adapter_gradients(arch, method):
    plain_loss, plain_grads, plain_calls = step(build(arch, method, checkpointed=False))
    pm = build(arch, method, checkpointed=True)
    assert checkpointing.gradient_checkpointing_enabled(pm)
    loss, grads, calls = step(pm)
    assert calls > plain_calls  # the blocks really ran again in backward
    torch.testing.assert_close(loss, plain_loss, rtol=RTOL, atol=ATOL)
    assert grads.keys() == plain_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], plain_grads[name], rtol=RTOL, atol=ATOL, msg=name)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_read_only_prefix_cache_keeps_the_prefix_under_checkpointing(arch):
    """The prefix path as prefix_forward will run it once wired, by hand: the checkpointed
    call matches peftkit's prefix forward without checkpointing."""
    plain_loss, plain_grads, _ = step(build(arch, "prefix", checkpointed=False))
    pm = build(arch, "prefix", checkpointed=True)
    model, encoder, inputs = pm.base_model, pm.input_adapters["prefix"], batch()
    prefix = encoder("default", 2, torch.float32)
    cache = checkpointing.prefix_cache(model, prefix)
    assert cache is not None
    mask = masks.extend_attention_mask(inputs["attention_mask"], N)
    with checkpointing.keeping_prefix(model, cache):
        loss = model(input_ids=inputs["input_ids"], attention_mask=mask, labels=inputs["labels"],
                     position_ids=masks.position_ids(mask, 12), cache=cache).loss
    loss.backward()
    torch.testing.assert_close(loss.detach(), plain_loss, rtol=RTOL, atol=ATOL)
    for name, param in pm.named_parameters():
        if param.requires_grad:
            torch.testing.assert_close(param.grad, plain_grads[name], rtol=RTOL, atol=ATOL, msg=name)
        else:
            assert param.grad is None, name
    # the switches keeping_prefix set for the call are back
    assert all(not m.__dict__.get("_can_checkpoint_with_cache", False) for m in model.modules())
    assert checkpointing.gradient_checkpointing_enabled(pm)


def test_prefix_cache_only_under_checkpointed_training():
    pm = build("llama", "prefix", checkpointed=True)
    prefix = pm.input_adapters["prefix"]("default", 2, torch.float32)
    assert checkpointing.prefix_cache(pm.base_model, prefix) is not None
    with torch.no_grad():  # generation: the growing cache as before
        assert checkpointing.prefix_cache(pm.base_model, prefix) is None
    assert checkpointing.prefix_cache(pm.base_model.eval(), prefix) is None
    assert checkpointing.prefix_cache(build("llama", "prefix", checkpointed=False).base_model, prefix) is None


def test_a_prefix_the_model_never_reads_is_an_error():
    pm = build("llama", "prefix", checkpointed=True)
    cache = checkpointing.prefix_cache(pm.base_model, pm.input_adapters["prefix"]("default", 2, torch.float32))
    with pytest.raises(ValueError, match="did not pass the prefix"):
        with checkpointing.keeping_prefix(pm.base_model, cache):
            pass  # a model that drops the cache: no layer reads it


def test_reentrant_checkpointing_on_frozen_inputs_leaves_lora_without_gradients():
    model = tiny_llama()
    pm = peftkit.attach(model, peftkit.LoraConfig(r=4, alpha=8))
    randomize_adapters(pm)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    model.disable_input_require_grads()  # transformers 5 adds the hook itself; older ones did not
    pm.train()
    with pytest.warns(UserWarning, match="requires_grad"):  # torch: "None of the inputs have requires_grad=True"
        loss = pm(**batch()).loss
    # Every block ran under no_grad with inputs that need none: nothing links the loss to LoRA.
    assert not loss.requires_grad
    lora = [p for p in pm.parameters() if p.requires_grad]
    assert lora and all(p.grad is None for p in lora)


@pytest.mark.parametrize("arch", sorted(BUILDERS))
def test_enable_and_disable(arch):
    model = BUILDERS[arch]()
    assert not checkpointing.gradient_checkpointing_enabled(model)
    checkpointing.enable_gradient_checkpointing(model)  # a bare model; attach afterwards
    assert checkpointing.gradient_checkpointing_enabled(model)
    pm = peftkit.attach(model, peftkit.LoraConfig(r=4))
    assert checkpointing.gradient_checkpointing_enabled(pm)
    if arch != "reference":
        assert model.config.use_cache is False
    checkpointing.disable_gradient_checkpointing(pm)
    assert not checkpointing.gradient_checkpointing_enabled(pm)


def test_checkpointing_acts_only_in_a_training_forward_with_grad():
    pm = build("reference", "lora", checkpointed=True)
    ids = batch()["input_ids"]
    with torch.no_grad():
        trained = pm(input_ids=ids).logits
        evaluated = pm.eval()(input_ids=ids).logits
    torch.testing.assert_close(trained, evaluated, rtol=0, atol=0)
    assert pm.generate(ids[:1], max_new_tokens=3).shape == (1, 15)


def test_unknown_model_is_refused_with_what_is_supported():
    with pytest.raises(TypeError, match="PreTrainedModel.*ReferenceDecoder"):
        checkpointing.enable_gradient_checkpointing(nn.Sequential(nn.Linear(4, 4)))
    assert not checkpointing.gradient_checkpointing_enabled(nn.Linear(4, 4))


def test_peftkit_train_with_gradient_checkpointing_trains_the_same_adapter(tmp_path, monkeypatch):
    """`--gradient-checkpointing` changes memory, not the result: the same adapter (float
    rounding) as the run without it, from the same seed and data; and the blocks really were
    checkpointed."""
    import torch.utils.checkpoint
    from helpers import reference_run_inputs
    from safetensors.torch import load_file

    from peftkit import cli

    calls = []
    real = torch.utils.checkpoint.checkpoint

    def counted(*args, **kwargs):
        calls.append(kwargs.get("use_reentrant"))
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", counted)
    model, data = reference_run_inputs(tmp_path)
    adapters = []
    for name, extra in (("plain", []), ("checkpointed", ["--gradient-checkpointing"])):
        out = tmp_path / name
        assert cli.main(["train", "--model", str(model), "--data", str(data), "--out", str(out), "--max-steps", "3",
                         "--dropout", "0", "--no-progress", *extra]) == 0
        adapters.append(load_file(str(out / "adapter" / "adapter_model.safetensors")))
        assert bool(calls) == (name == "checkpointed")  # the plain run checkpoints nothing
    assert set(calls) == {False}  # non-reentrant, every time
    assert adapters[0].keys() == adapters[1].keys()
    for key in adapters[0]:
        torch.testing.assert_close(adapters[1][key], adapters[0][key], rtol=1e-5, atol=1e-6)
