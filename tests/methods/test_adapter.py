"""Bottleneck adapters: identity at init, sites per architecture and placement, the formula,
gradients, options, merging refused, files, training, generate and unloading."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from helpers import BUILDERS, model_output, randomize_adapters, tiny_bert, tiny_llama, tiny_reference
from torch import nn

import peftkit
from peftkit.adapter_files import adapter_tensors
from peftkit.formats.adapter_folder import AdapterFileError
from peftkit.methods.adapter import AdapterWrapper, Bottleneck
from peftkit.methods.base import AdapterModule, adapter_modules

PLACEMENTS = ("houlsby", "pfeiffer", "parallel")


def attach(model, placement="pfeiffer", **kwargs):
    return peftkit.attach(model, peftkit.AdapterConfig(bottleneck=8, placement=placement, **kwargs))


def loss_of(pm, ids):
    out = pm(input_ids=ids, labels=ids) if hasattr(pm.base_model, "lm_head") else pm(input_ids=ids)
    return out.loss if getattr(out, "loss", None) is not None else out.last_hidden_state.pow(2).mean()


@pytest.mark.parametrize("placement", PLACEMENTS)
@pytest.mark.parametrize("arch", sorted(BUILDERS))
def test_identity_at_init_and_changes_once_trained(arch, placement, ids):
    model = BUILDERS[arch]()
    expected = model_output(model, ids)
    pm = attach(model, placement)
    torch.testing.assert_close(model_output(pm, ids), expected, rtol=0, atol=0)
    randomize_adapters(pm)
    assert (model_output(pm, ids) - expected).abs().max() > 1e-3
    with pm.disable_adapter():
        torch.testing.assert_close(model_output(pm, ids), expected, rtol=0, atol=0)


SITES = {  # arch -> placement -> (site suffix, mode) per layer
    "llama": {"houlsby": [("self_attn.o_proj", "serial"), ("mlp", "serial")],
              "pfeiffer": [("mlp", "serial")], "parallel": [("mlp", "parallel")]},
    "gpt2": {"houlsby": [("attn.c_proj", "serial"), ("mlp", "serial")],
             "pfeiffer": [("mlp", "serial")], "parallel": [("mlp", "parallel")]},
    "bert": {"houlsby": [("attention.output.dense", "serial"), ("output.dense", "serial")],
             "pfeiffer": [("output.dense", "serial")], "parallel": [("output", "residual")]},
    "reference": {"houlsby": [("attn.o", "serial"), ("mlp", "serial")],
                  "pfeiffer": [("mlp", "serial")], "parallel": [("mlp", "parallel")]},
}
LAYER_PREFIX = {"llama": "model.layers.", "gpt2": "transformer.h.", "bert": "encoder.layer.",
                "reference": "layers."}


@pytest.mark.parametrize("placement", PLACEMENTS)
@pytest.mark.parametrize("arch", sorted(BUILDERS))
def test_sites_per_architecture_and_placement(arch, placement):
    pm = attach(BUILDERS[arch](), placement)
    expected = [(f"{LAYER_PREFIX[arch]}{layer}.{suffix}", mode)
                for layer in range(2) for suffix, mode in SITES[arch][placement]]
    assert pm.target_paths["default"] == [path for path, _ in expected]
    found = [(path, m.modes["default"]) for path, m in adapter_modules(pm.base_model)]
    assert found == expected  # houlsby: 2 per layer, pfeiffer and parallel: 1


@pytest.mark.parametrize("placement", PLACEMENTS)
@pytest.mark.parametrize("arch", sorted(BUILDERS))
def test_only_adapter_parameters_get_gradients(arch, placement, ids):
    model = BUILDERS[arch]().requires_grad_(True)
    pm = attach(model, placement)
    declared = {id(p) for _, m in adapter_modules(pm.base_model) for _, p in m.adapter_parameters()}
    assert {id(p) for p in pm.parameters() if p.requires_grad} == declared
    loss_of(pm, ids).backward()
    assert all(p.grad is None for p in pm.parameters() if not p.requires_grad)
    assert all(p.grad is not None for p in pm.trainable_parameters().values())
    # up starts at zero, so only up learns on the first step; down follows once up moves.
    ups = [m.bottleneck["default"].up.weight for _, m in adapter_modules(pm.base_model)]
    assert all(u.grad.abs().sum() > 0 for u in ups)


def test_serial_formula_on_a_linear():
    torch.manual_seed(0)
    linear = nn.Linear(16, 16)
    pm = peftkit.attach(nn.Sequential(linear), peftkit.AdapterConfig(bottleneck=4, activation="gelu",
                                                                   target_modules=["0"]))
    adapter = pm.base_model[0].bottleneck["default"]
    nn.init.normal_(adapter.up.weight)
    nn.init.normal_(adapter.up.bias)
    x = torch.randn(3, 5, 16)
    y = linear(x)
    expected = y + F.linear(F.gelu(F.linear(y, adapter.down.weight, adapter.down.bias)),
                            adapter.up.weight, adapter.up.bias)
    torch.testing.assert_close(pm(x), expected, rtol=1e-6, atol=1e-6)


class OneBlock(nn.Module):
    """A model that is one feed-forward block."""

    def __init__(self) -> None:
        super().__init__()
        self.ffn = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 16))

    def forward(self, x):
        return self.ffn(x)


def test_parallel_formula_beside_a_block():
    torch.manual_seed(0)
    model = OneBlock()
    block = model.ffn
    pm = peftkit.attach(model, peftkit.AdapterConfig(bottleneck=4, placement="parallel", scaling=0.5,
                                                     activation="silu", target_modules=["ffn"]))
    adapter = pm.base_model.ffn.bottleneck["default"]
    nn.init.normal_(adapter.up.weight)
    x = torch.randn(3, 16)
    expected = block(x) + 0.5 * adapter.up(F.silu(adapter.down(x)))  # reads the block's input
    torch.testing.assert_close(pm(x), expected, rtol=1e-6, atol=1e-6)


class PostNormOutput(nn.Module):
    """BERT's output module: norm(dense(h) + r)."""

    def __init__(self) -> None:
        super().__init__()
        self.dense = nn.Linear(32, 16)
        self.norm = nn.LayerNorm(16)

    def forward(self, h, r):
        return self.norm(self.dense(h) + r)


def test_residual_mode_adds_the_parallel_adapter_before_the_residual_add():
    torch.manual_seed(0)
    site = PostNormOutput()
    wrapper = AdapterWrapper(site)
    wrapper.add_adapter("a", 16, 4, mode="residual", scaling=2.0)
    wrapper.set_active_adapters(["a"])
    adapter = wrapper.bottleneck["a"]
    nn.init.normal_(adapter.up.weight)
    h, r = torch.randn(3, 32), torch.randn(3, 16)
    ffn_out = site.dense(h) + 2.0 * adapter.delta(r)  # FFN output and the adapter beside it ...
    torch.testing.assert_close(wrapper(h, r), site.norm(ffn_out + r))  # ... then residual, then norm


def test_bottleneck_module_is_residual_and_zero_up_is_identity():
    torch.manual_seed(0)
    module = Bottleneck(16, 4)
    x = torch.randn(2, 16)
    assert torch.equal(module.up.weight, torch.zeros(16, 4)) and torch.equal(module.up.bias, torch.zeros(16))
    assert module.down.weight.abs().sum() > 0
    assert torch.equal(module(x), x)
    nn.init.normal_(module.up.weight)
    torch.testing.assert_close(module(x), x + module.delta(x))


@pytest.mark.parametrize("activation,kind", [("relu", nn.ReLU), ("gelu", nn.GELU), ("silu", nn.SiLU)])
def test_activation_option(activation, kind):
    pm = attach(tiny_reference(), activation=activation)
    assert all(type(m.bottleneck["default"].act) is kind for _, m in adapter_modules(pm.base_model))


def test_dropout_only_while_training_and_only_inside_the_adapter():
    torch.manual_seed(0)
    block = nn.Linear(16, 16)
    pm = peftkit.attach(nn.Sequential(block), peftkit.AdapterConfig(bottleneck=8, dropout=0.5,
                                                                   target_modules=["0"]))
    adapter = pm.base_model[0].bottleneck["default"]
    assert adapter.dropout.p == 0.5
    nn.init.normal_(adapter.up.weight)
    x = torch.randn(64, 16)
    pm.eval()
    torch.testing.assert_close(pm(x), adapter(block(x)))
    pm.train()
    torch.manual_seed(1)
    out = pm(x)
    torch.manual_seed(1)
    hidden = F.dropout(F.relu(adapter.down(block(x))), 0.5, training=True)
    torch.testing.assert_close(out, block(x) + adapter.up(hidden))


def test_merge_is_refused_with_a_clear_error(ids):
    base = tiny_llama()
    expected = model_output(base, ids)
    pm = attach(base, "houlsby")
    for call in (pm.merge, pm.merge_and_unload):
        with pytest.raises(TypeError, match="cannot be folded into the weights.*unload"):
            call()
    assert any(isinstance(m, AdapterWrapper) for m in pm.modules())  # nothing was changed
    randomize_adapters(pm)
    plain = pm.unload()
    assert not any(isinstance(m, AdapterModule) for m in plain.modules())
    assert set(plain.state_dict()) == set(tiny_llama().state_dict())
    assert all(p.requires_grad for p in plain.parameters())  # the user's own setting comes back
    torch.testing.assert_close(model_output(plain, ids), expected, rtol=0, atol=0)


@pytest.mark.parametrize("arch,placement", [("llama", "houlsby"), ("gpt2", "parallel"), ("bert", "parallel"),
                                            ("reference", "pfeiffer")])
def test_save_and_load_round_trip(tmp_path, arch, placement, ids):
    pm = attach(BUILDERS[arch](), placement, activation="gelu", scaling=2.0)
    randomize_adapters(pm)
    expected = model_output(pm, ids)
    pm.save(tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "BOTTLENECK_ADAPTER" and config["placement"] == placement
    loaded = peftkit.load(BUILDERS[arch](), tmp_path / "adapter")
    assert loaded.configs["default"] == pm.configs["default"]
    assert not loaded.trainable_parameters()  # frozen for inference by default
    torch.testing.assert_close(model_output(loaded, ids), expected, rtol=0, atol=0)
    keys = set(adapter_tensors(loaded, "default"))
    first = pm.target_paths["default"][0]
    assert {f"base_model.model.{first}.adapter_{p}.{k}" for p in ("down", "up") for k in ("weight", "bias")} <= keys


def test_load_onto_another_architecture_is_refused(tmp_path):
    pm = attach(tiny_llama(), "houlsby")
    pm.save(tmp_path / "adapter")
    with pytest.raises(AdapterFileError, match="expected shape"):
        from transformers import LlamaConfig, LlamaForCausalLM

        wider = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                             num_attention_heads=4, num_key_value_heads=2, vocab_size=128))
        peftkit.load(wider, tmp_path / "adapter")
    with pytest.raises(AdapterFileError, match="missing keys"):
        peftkit.load(tiny_reference(), tmp_path / "adapter")


def test_training_lowers_the_loss():
    from peftkit.train import train
    from peftkit.learning_rates import default_learning_rate

    pm = attach(tiny_reference(), "houlsby")
    assert default_learning_rate(pm.configs["default"]) == pytest.approx(1e-4)
    ids = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "labels": ids}
    frozen = {n: p.detach().clone() for n, p in pm.named_parameters() if not p.requires_grad}
    with torch.no_grad():
        before = pm(**batch).loss.item()
    result = train(pm, [batch], steps=15, lr=1e-2, progress=False)
    with torch.no_grad():
        after = pm(**batch).loss.item()
    assert after < before - 0.1 and result.losses[-1] < result.losses[0]
    assert all(torch.equal(p, frozen[n]) for n, p in pm.named_parameters() if n in frozen)


def greedy_without_cache(model, ids, steps):
    for _ in range(steps):
        next_id = model_output(model, ids)[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, next_id], dim=1)
    return ids


@pytest.mark.parametrize("arch", ["reference", "llama"])
def test_generate_with_an_adapter(arch):
    pm = attach(BUILDERS[arch](), "houlsby")
    randomize_adapters(pm)
    prompt = torch.randint(0, 128, (2, 5), generator=torch.Generator().manual_seed(0))
    kwargs = {"max_new_tokens": 6, "do_sample": False}
    if arch == "llama":
        kwargs["pad_token_id"] = 0
    out = pm.generate(prompt, **kwargs)
    # the cached, token-by-token path runs the adapters exactly like full forwards do
    assert torch.equal(out, greedy_without_cache(pm, prompt, 6))
    with pm.disable_adapter():
        plain = pm.generate(prompt, **kwargs)
    assert torch.equal(plain, BUILDERS[arch]().generate(prompt, **kwargs))
    assert not torch.equal(out, plain)


def test_several_adapters_share_a_site_and_switch(ids):
    base = tiny_llama()
    expected = model_output(base, ids)
    pm = attach(base, "houlsby")
    pm.add_adapter(peftkit.AdapterConfig(bottleneck=4, placement="parallel"), "par")
    mlp = pm.base_model.model.layers[0].mlp
    assert isinstance(mlp, AdapterWrapper) and mlp.modes == {"default": "serial", "par": "parallel"}
    randomize_adapters(pm)
    pm.set_adapter("default")
    houlsby = model_output(pm, ids)
    pm.set_adapter("par")
    parallel = model_output(pm, ids)
    assert {id(p) for p in pm.trainable_parameters().values()} == {
        id(p) for _, m in adapter_modules(pm.base_model) if "par" in m.adapter_names
        for _, p in m.adapter_parameters("par")}
    pm.set_adapter(["default", "par"])
    both = model_output(pm, ids)
    assert not torch.equal(both, houlsby) and not torch.equal(both, parallel)
    pm.delete_adapter("par")
    torch.testing.assert_close(model_output(pm, ids), houlsby, rtol=0, atol=0)
    pm.delete_adapter("default")
    assert not any(isinstance(m, AdapterModule) for m in pm.modules())
    torch.testing.assert_close(model_output(pm, ids), expected, rtol=0, atol=0)


def test_unknown_architecture_needs_target_modules():
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))
    with pytest.raises(ValueError, match=r"does not know where bottleneck adapters go.*target_modules"):
        attach(model)
    pm = attach(model, target_modules=["2"])
    assert pm.target_paths["default"] == ["2"]


class DeclaresSites(OneBlock):
    peft_adapter_sites = {"ffn_output": "ffn"}


def test_sites_a_model_declares():
    assert attach(DeclaresSites(), "pfeiffer").target_paths["default"] == ["ffn"]
    with pytest.raises(ValueError, match=r"parallel adapter site 'ffn' \(None\)"):
        attach(DeclaresSites(), "parallel")


def test_names_that_match_nothing_list_the_candidates():
    with pytest.raises(ValueError, match=r"'o_proj' matches no module.*'mlp'.*'o'"):
        attach(tiny_reference(), target_modules=["o_proj"])


def test_explicit_names_on_a_transformer():
    pm = attach(tiny_llama(), target_modules=["down_proj"])
    assert pm.target_paths["default"] == [f"model.layers.{i}.mlp.down_proj" for i in range(2)]


def test_unsuitable_sites_are_refused():
    with pytest.raises(ValueError, match="equal input and output widths"):
        attach(tiny_llama(), "parallel", target_modules=["up_proj"])
    with pytest.raises(ValueError, match="no forward of its own"):
        attach(tiny_llama(), target_modules=["layers"])
    with pytest.raises(ValueError, match="do not nest"):
        attach(tiny_llama(), target_modules=["mlp", "down_proj"])


def test_adapters_do_not_nest_with_other_adapters():
    pm = attach(tiny_bert(), "parallel")  # wraps encoder.layer.N.output
    with pytest.raises(ValueError, match="adapters do not nest"):
        pm.add_adapter(peftkit.AdapterConfig(placement="pfeiffer"), "serial")  # its output.dense
    pm = peftkit.attach(tiny_llama(), peftkit.LoraConfig(r=4, target_modules="all-linear"))
    with pytest.raises(ValueError, match="would contain"):
        pm.add_adapter(peftkit.AdapterConfig(placement="pfeiffer"), "bottleneck")
    pm = attach(tiny_llama(), "houlsby")
    with pytest.raises(ValueError, match="AdapterWrapper.*cannot wrap"):
        pm.add_adapter(peftkit.LoraConfig(r=4, target_modules="attention"), "lora")


def test_config_validation():
    with pytest.raises(ValueError, match="target_modules"):
        peftkit.AdapterConfig(target_modules="mlp")
    with pytest.raises(ValueError, match="placement"):
        peftkit.AdapterConfig(placement="serial")
    with pytest.raises(ValueError, match="activation"):
        peftkit.AdapterConfig(activation="tanh")
