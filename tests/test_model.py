"""PeftModel: attach, freezing, forward/generate, merging, disabling, several named adapters."""

from __future__ import annotations

import pytest
import torch
from helpers import BUILDERS, model_output, randomize_adapters, tiny_llama, tiny_reference

import peftkit
from peftkit.methods.base import AdapterModule


def test_llama_7b_on_meta_device_counts(capsys):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=32, vocab_size=32000)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    pm = peftkit.attach(model, peftkit.LoraConfig(r=8, alpha=16, target_modules=["q_proj", "v_proj"]))
    pm.print_trainable_parameters()
    assert capsys.readouterr().out.strip() == (
        "trainable params: 4,194,304 || all params: 6,742,609,920 || trainable%: 0.0622")
    # independent count: 32 layers x 2 projections x r (in + out)
    assert pm.parameter_counts()[0] == 32 * 2 * 8 * (4096 + 4096)


@pytest.mark.parametrize("arch", sorted(BUILDERS))
def test_attach_freezes_everything_but_declared_adapter_params(arch, ids):
    model = BUILDERS[arch]()
    for p in model.parameters():
        p.requires_grad_(True)  # a user who unfroze everything before attaching
    before = model_output(model, ids)
    pm = peftkit.attach(model, peftkit.LoraConfig(r=4, alpha=8))
    declared = {id(p) for m in pm.modules() if isinstance(m, AdapterModule) for _, p in m.adapter_parameters()}
    trainable = {id(p) for p in pm.parameters() if p.requires_grad}
    assert trainable == declared and trainable
    assert set(pm.trainable_parameters().values()) == {p for p in pm.parameters() if id(p) in declared}
    torch.testing.assert_close(model_output(pm, ids), before, rtol=0, atol=0)  # identity at init


@pytest.mark.parametrize("arch", sorted(BUILDERS))
def test_merge_and_unload_returns_plain_model_with_same_outputs(arch, ids):
    model = BUILDERS[arch]()
    pm = peftkit.attach(model, peftkit.LoraConfig(r=4, alpha=8, target_modules="all-linear"))
    randomize_adapters(pm)
    with torch.no_grad():
        unmerged = model_output(pm, ids)
        plain = pm.merge_and_unload()
        merged = model_output(plain, ids)
    assert not any(isinstance(m, AdapterModule) for m in plain.modules())
    assert type(plain) is type(model)
    torch.testing.assert_close(merged, unmerged, rtol=1e-5, atol=1e-5 * unmerged.abs().max().item())
    assert set(dict(plain.named_parameters())) == set(dict(BUILDERS[arch]().named_parameters()))


def test_disable_adapter_is_exactly_base_and_restores_state(ids):
    base = tiny_llama()
    base_out = model_output(base, ids)
    pm = peftkit.attach(base, peftkit.LoraConfig(r=4, alpha=8))
    randomize_adapters(pm)
    adapted = model_output(pm, ids)
    assert not torch.allclose(adapted, base_out)
    with pm.disable_adapter():
        torch.testing.assert_close(model_output(pm, ids), base_out, rtol=0, atol=0)
    torch.testing.assert_close(model_output(pm, ids), adapted, rtol=0, atol=0)
    # merged state: inside the block the base comes back; on exit it is merged again
    pm.merge()
    with pm.disable_adapter():
        torch.testing.assert_close(model_output(pm, ids), base_out, rtol=1e-5, atol=1e-5)
    assert pm._lora_layers_merged()
    torch.testing.assert_close(model_output(pm, ids), adapted, rtol=1e-5, atol=1e-5)


def test_disable_adapter_restores_state_after_an_exception(ids):
    pm = peftkit.attach(tiny_llama(), peftkit.LoraConfig(r=4))
    randomize_adapters(pm)
    adapted = model_output(pm, ids)
    with pytest.raises(KeyError), pm.disable_adapter():
        raise KeyError("boom")
    torch.testing.assert_close(model_output(pm, ids), adapted, rtol=0, atol=0)


def test_merge_twice_warns_and_unmerge_restores(ids):
    pm = peftkit.attach(tiny_llama(), peftkit.LoraConfig(r=4))
    randomize_adapters(pm)
    weights = {n: p.detach().clone() for n, p in pm.named_parameters() if not p.requires_grad}
    pm.merge()
    with pytest.warns(UserWarning, match="already merged"):
        pm.merge()
    pm.unmerge()
    for name, param in pm.named_parameters():
        if name in weights:
            torch.testing.assert_close(param, weights[name], rtol=1e-6, atol=1e-6)


def test_named_adapters_switch_train_and_delete(ids):
    base = tiny_llama()
    base_out = model_output(base, ids)
    pm = peftkit.attach(base, peftkit.LoraConfig(r=4, target_modules=["q_proj"]), name="a")
    randomize_adapters(pm, seed=1)
    out_a = model_output(pm, ids)
    peftkit.attach(pm, peftkit.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]), name="b")
    assert pm.active_adapters == ["b"]
    params_b = {n for n, p in pm.named_parameters() if p.requires_grad}
    assert params_b and all(n.endswith(".b") for n in params_b)  # only the active adapter trains
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if n.endswith(".b"):
                p.normal_(std=0.1)
    out_b = model_output(pm, ids)
    pm.set_adapter("a")
    torch.testing.assert_close(model_output(pm, ids), out_a, rtol=0, atol=0)
    pm.set_adapter(["a", "b"])
    out_ab = model_output(pm, ids)
    assert not torch.allclose(out_ab, out_a) and not torch.allclose(out_ab, out_b)
    with pytest.raises(ValueError, match="unknown adapter"):
        pm.set_adapter("c")
    with pytest.raises(ValueError, match="already exists"):
        peftkit.attach(pm, peftkit.LoraConfig(r=2), name="a")
    pm.delete_adapter("a")
    pm.delete_adapter("b")
    torch.testing.assert_close(model_output(pm, ids), base_out, rtol=0, atol=0)
    assert not any(isinstance(m, AdapterModule) for m in pm.modules())


def test_training_steps_reduce_loss_on_the_reference_model():
    torch.manual_seed(0)
    pm = peftkit.attach(tiny_reference(), peftkit.LoraConfig(r=8, alpha=16, target_modules="all-linear"))
    pm.train()
    ids = torch.randint(0, 200, (4, 16))
    optimizer = torch.optim.AdamW(pm.trainable_parameters().values(), lr=3e-3)
    losses = []
    for _ in range(15):
        loss = pm(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0]  # memorising one batch: the loss must fall
    assert all(p.grad is None for p in pm.parameters() if not p.requires_grad)


def test_generate_goes_through_the_wrapped_model():
    pm = peftkit.attach(tiny_reference(), peftkit.LoraConfig(r=4))
    randomize_adapters(pm)
    prompt = torch.tensor([[5, 6, 7]])
    out = pm.generate(prompt, max_new_tokens=4)
    assert out.shape == (1, 7) and torch.equal(out[:, :3], prompt)
    llama = peftkit.attach(tiny_llama(), peftkit.LoraConfig(r=4))
    out = llama.generate(input_ids=prompt, max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 6)
    assert llama.config.model_type == "llama"  # attributes reach the wrapped model


def _tied_gpt2_with_embedding_lora():
    from helpers import tiny_gpt2

    model = tiny_gpt2()
    assert model.lm_head.weight is model.transformer.wte.weight  # GPT-2 ties them
    pm = peftkit.attach(model, peftkit.LoraConfig(r=4, alpha=8, target_modules=["wte", "c_attn"]))
    randomize_adapters(pm)
    return pm


def test_merging_lora_on_a_tied_embedding_leaves_the_output_head_alone():
    pm = _tied_gpt2_with_embedding_lora()
    head_before = pm.base_model.lm_head.weight.detach().clone()
    ids = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        unmerged = pm(input_ids=ids).logits
        with pytest.warns(UserWarning, match="lm_head.weight"):
            merged_model = pm.merge_and_unload()
        merged = merged_model(input_ids=ids).logits
    torch.testing.assert_close(merged, unmerged, rtol=1e-5, atol=1e-5)
    assert torch.equal(merged_model.lm_head.weight, head_before)
    assert merged_model.config.tie_word_embeddings is False


def test_merged_tied_model_reloads_untied_with_the_same_logits(tmp_path):
    from transformers import GPT2LMHeadModel

    pm = _tied_gpt2_with_embedding_lora()
    ids = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        unmerged = pm(input_ids=ids).logits
    with pytest.warns(UserWarning):
        pm.merge_and_unload().save_pretrained(tmp_path)
    with torch.no_grad():
        reloaded = GPT2LMHeadModel.from_pretrained(tmp_path).eval()(input_ids=ids).logits
    torch.testing.assert_close(reloaded, unmerged, rtol=1e-5, atol=1e-5)
